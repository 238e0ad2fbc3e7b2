"""health/grad_share/<loss> (health/grad_shares.py): hand-computed shares, and a forward hook
that measures them without changing the training step's gradients."""

import pytest
import torch
from detectron2.utils.events import EventStorage
from torch import nn

from training_harness.health.grad_shares import (LossGradientShares, loss_gradient_shares,
                                                 loss_scale)


def test_shares_by_hand():
    w = torch.tensor([2.0, 1.0], requires_grad=True)
    other = torch.tensor(1.0, requires_grad=True)
    losses = {
        "loss_a": 3 * w[0],  # gradient (3, 0): norm 3
        "loss_b": 4 * w[1],  # gradient (0, 4): norm 4
        "loss_c": torch.tensor(5.0),  # a constant: no gradient
        "loss_d": 7 * other,  # a head-only term: no gradient on the shared parameters
    }
    shares = loss_gradient_shares(losses, [w])
    assert {k: v.item() for k, v in shares.items()} == pytest.approx(
        {"loss_a": 3 / 7, "loss_b": 4 / 7, "loss_c": 0.0, "loss_d": 0.0})
    sum(losses.values()).backward()  # the graphs are kept for the real backward
    assert w.grad.tolist() == [3.0, 4.0]


def test_all_zero_gradients_give_zero_shares():
    w = torch.tensor(1.0, requires_grad=True)
    shares = loss_gradient_shares({"loss_a": 0 * w, "loss_b": 0 * w}, [w])
    assert [v.item() for v in shares.values()] == [0.0, 0.0]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Linear(3, 4)
        self.head_a, self.head_b = nn.Linear(4, 1), nn.Linear(4, 1)

    def forward(self, x):
        features = self.backbone(x)
        if not self.training:
            return features
        return {"loss_a": self.head_a(features).square().mean(),
                "loss_b": self.head_b(features).abs().mean()}


def _step(measure: bool):
    model = _Toy()
    hook = LossGradientShares(model, model.backbone, lambda: measure)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    with EventStorage() as storage:
        losses = model(x)
        sum(losses.values()).backward()
        scalars = {k: v for k, (v, _) in storage.latest().items()}
        model.eval()
        model(x)  # inference: no measurement
    hook.remove()
    return model, scalars


def test_hook_measures_only_when_asked_and_leaves_the_gradients_alone():
    measured, scalars = _step(measure=True)
    plain, nothing = _step(measure=False)
    assert nothing == {}
    assert set(scalars) == {"health/grad_share/loss_a", "health/grad_share/loss_b"}
    assert sum(scalars.values()) == pytest.approx(1.0)
    for (name, a), b in zip(measured.named_parameters(), plain.parameters()):
        assert torch.equal(a.grad, b.grad), name


def test_a_common_scale_leaves_the_shares_unchanged():
    w = torch.tensor([2.0, 1.0], requires_grad=True)
    losses = {"loss_a": 3 * w[0], "loss_b": 4 * w[1]}
    plain = loss_gradient_shares(losses, [w])
    scaled = loss_gradient_shares(losses, [w], scale=2.0 ** 16)  # GradScaler's initial scale
    assert {k: v.item() for k, v in scaled.items()} == pytest.approx(
        {k: v.item() for k, v in plain.items()})


def test_reentrant_checkpointing_turns_the_measurement_off(caplog):
    import logging

    from training_harness.health.grad_shares import shares_measurable

    model = _Toy()
    assert shares_measurable(model.backbone)
    model.backbone.use_checkpoint = True  # what detectron2's Swin stages carry
    with caplog.at_level(logging.WARNING, logger="training_harness.health.grad_shares"):
        assert not shares_measurable(model.backbone)
    assert "no health/grad_share/* scalars: the backbone uses activation checkpointing" in (
        caplog.text)


def test_loss_scale_is_the_trainers_grad_scaler_scale():
    class AmpTrainer:
        grad_scaler = torch.amp.GradScaler("cpu", init_scale=128.0)

    class PlainTrainer:
        grad_scaler = None

    assert loss_scale(AmpTrainer()) == 128.0
    assert loss_scale(PlainTrainer()) == 1.0
    assert loss_scale(object()) == 1.0  # a trainer without the core's accessor
