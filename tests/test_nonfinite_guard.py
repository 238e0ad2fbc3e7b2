"""The non-finite stop inside the training step (health/nonfinite.py): on hand-made loss dicts,
and as a hook of a toy model's SimpleTrainer in one process, where detectron2 calls the hooks'
after_backward after the backward pass and before optimizer.step() (those tests fail if that
order changes)."""

import pytest
import torch
from balanced_rcnn.engine.grad_norm import GRAD_NORM_SCALAR
from balanced_rcnn.utils.events import put_tensor_scalars
from detectron2.utils.events import EventStorage
from torch import nn
from training_harness.errors import EXIT_NON_FINITE, NonFiniteTrainingError
from detectron2.engine import SimpleTrainer
from training_harness.health import LossDivergenceRule, NonFiniteStop
from training_harness.health.nonfinite import _non_finite_report, check_step


def test_finite_step_passes(event_storage):
    put_tensor_scalars(**{GRAD_NORM_SCALAR: torch.tensor(3.0)})
    check_step({"loss_cls": torch.tensor(0.5), "loss_mask": torch.tensor(0.25)}, cur_iter=0)


@pytest.mark.parametrize(
    "loss_mask, grad_norm, expected",
    [
        (float("nan"), 1.0, "loss_mask = nan"),
        (float("inf"), float("nan"), "loss_mask = inf, total gradient norm = nan"),
        (0.3, float("inf"), "total gradient norm = inf"),
    ],
)
def test_non_finite_step_names_the_term_and_the_iteration(
    event_storage, loss_mask, grad_norm, expected
):
    put_tensor_scalars(**{GRAD_NORM_SCALAR: torch.tensor(grad_norm)})
    losses = {"loss_cls": torch.tensor(0.5), "loss_mask": torch.tensor(loss_mask)}
    with pytest.raises(NonFiniteTrainingError, match=f"at iteration 7: {expected}\\. ") as error:
        check_step(losses, cur_iter=7)
    assert "loss_cls" not in str(error.value)
    assert isinstance(error.value, FloatingPointError)  # what detectron2 raises, for callers
    assert error.value.exit_code == EXIT_NON_FINITE


def test_amp_overflow_gradients_are_not_an_error(event_storage):
    put_tensor_scalars(**{GRAD_NORM_SCALAR: torch.tensor(float("inf"))})
    check_step({"loss_cls": torch.tensor(0.5)}, cur_iter=0, check_grad_norm=False)


def test_report_names_the_worker():
    workers = [
        {"losses": {"loss_cls": 0.5, "loss_mask": 0.2}, "grad_norm": float("nan")},
        {"losses": {"loss_cls": 0.4, "loss_mask": float("nan")}, "grad_norm": float("nan")},
    ]
    report = _non_finite_report(workers, ["loss_cls", "loss_mask"], check_grad_norm=True)
    assert report == ["loss_mask = nan (worker 1)", "total gradient norm = nan"]


class _Toy(nn.Module):
    def __init__(self, bad: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2))
        self.bad = bad

    def forward(self, data):
        return {"loss_good": self.weight.sum(), "loss_bad": self.weight[0] * self.bad}


def _trainer(bad: float, divergence=None) -> SimpleTrainer:
    model = _Toy(bad)
    trainer = SimpleTrainer(model, [None] * 4, torch.optim.SGD(model.parameters(), lr=0.5))
    trainer.register_hooks([NonFiniteStop(divergence)])
    return trainer


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_term_stops_before_the_optimizer_step(bad):
    trainer = _trainer(bad)
    with pytest.raises(NonFiniteTrainingError) as error:
        trainer.train(0, 1)
    assert str(error.value) == (f"Non-finite training values at iteration 0: loss_bad = {bad}. "
                                "The optimizer step was not applied.")
    assert trainer.model.weight.tolist() == [1.0, 1.0]  # the step was not applied


def test_finite_terms_are_written_and_applied():
    trainer = _trainer(2.0)
    trainer.train(0, 1)
    latest = {k: v for k, (v, _) in trainer.storage.latest().items()}
    assert (latest["loss_good"], latest["loss_bad"], latest["total_loss"]) == (2.0, 2.0, 4.0)
    # d/dw (w0 + w1 + 2 w0) = (3, 1); SGD with lr 0.5
    assert trainer.model.weight.tolist() == [-0.5, 0.5]


def test_an_exploding_step_stops_before_the_optimizer_step_and_the_reference_is_the_hooks_state():
    from training_harness.errors import LossExplosionError

    trainer = _trainer(2.0, LossDivergenceRule(ceiling=3.0, jump_factor=0.0))
    with pytest.raises(LossExplosionError, match="total_loss = 4 is above HEALTH.LOSS_CEILING = 3"):
        trainer.train(0, 1)
    assert trainer.model.weight.tolist() == [1.0, 1.0]
    fine = _trainer(1.0, LossDivergenceRule(ceiling=0.0, jump_factor=100.0))
    fine.train(0, 1)
    assert fine.state_dict()["hooks"]["NonFiniteStop"] == {
        "loss_divergence": {"largest": {"total_loss": 3.0, "loss_good": 2.0, "loss_bad": 1.0}}}
