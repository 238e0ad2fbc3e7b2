"""The loss options' pure functions (modeling/losses.py), the per-head CountNormalizer
(modeling/normalizer.py) and BalancedLossSettings (modeling/settings.py): hand-computed values,
the initial state of the running counts, their checkpoint round trip, the settings read from a
config, and the refusals."""

import math

import pytest
import torch
from conftest import EPS, balanced_cfg

from balanced_rcnn.modeling import BalancedLossSettings
from balanced_rcnn.modeling.losses import (
    adaptive_pos_weight,
    classification_loss,
    ema_counts,
    objectness_loss,
    prior_logit,
)
from balanced_rcnn.modeling.normalizer import CountNormalizer

pytestmark = pytest.mark.core


def test_ema_counts_takes_the_first_batch_then_averages():
    unset = torch.tensor([-1.0, -1.0])
    first = ema_counts(unset, torch.tensor([20.0, 0.0]), momentum=0.9)
    torch.testing.assert_close(first, torch.tensor([20.0, 0.0]))
    # 0.9 * 20 + 0.1 * 10 = 19; 0.9 * 0 + 0.1 * 3 = 0.3
    second = ema_counts(first, torch.tensor([10.0, 3.0]), momentum=0.9)
    torch.testing.assert_close(second, torch.tensor([19.0, 0.3]))


@pytest.mark.parametrize(
    "num_pos,num_neg,fraction,min_weight,expected",
    [
        (2.0, 198.0, 0.25, 1.0, 198 / 2 / 3),  # f / (1 - f) = 1/3: too few positives
        (0.0, 100.0, 0.25, 1.0, 100 / 3),  # no positive: counted as one
        (50.0, 150.0, 0.25, 1.0, 1.0),  # exactly the sampler's fraction: weight 1
        (50.0, 150.0, 0.25, 2.0, 2.0),  # never below the POS_WEIGHT
        (10.0, 90.0, 0.5, 1.0, 9.0),  # the RPN's fraction 0.5: positives weigh as negatives
    ],
)
def test_adaptive_pos_weight_fills_the_fraction_and_never_drops_below_the_least(
    num_pos, num_neg, fraction, min_weight, expected
):
    weight = adaptive_pos_weight(torch.tensor(num_pos), torch.tensor(num_neg), fraction, min_weight)
    assert weight.item() == pytest.approx(expected, rel=1e-6)
    # The positives then carry at least the fraction of the weight (when there are any).
    if num_pos > 0:
        share = num_pos * weight.item() / (num_pos * weight.item() + num_neg)
        assert share >= fraction - 1e-6


def test_prior_logit_starts_the_sigmoid_at_the_prior():
    assert prior_logit(0.01) == pytest.approx(math.log(0.01 / 0.99))
    assert torch.sigmoid(torch.tensor(prior_logit(0.2))).item() == pytest.approx(0.2)


def test_tensor_pos_weights_equal_number_weights():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(10, generator=g), torch.tensor([1, 0, -1, 1, 0, 0, 1, -1, 0, 0])
    norm = torch.tensor(8.0)
    torch.testing.assert_close(objectness_loss(logits, labels, torch.tensor(2.5), norm),
                               objectness_loss(logits, labels, 2.5, norm))
    scores, classes = torch.randn(6, 4, generator=g), torch.tensor([0, 3, 2, 3, 1, 3])
    torch.testing.assert_close(classification_loss(scores, classes, torch.tensor(4.0), norm),
                               classification_loss(scores, classes, 4.0, norm))


# ---- CountNormalizer -----------------------------------------------------------------------


def test_per_batch_normalizer_has_no_state():
    normalizer = CountNormalizer(2, eps=EPS)
    assert dict(normalizer.state_dict()) == {}  # checkpoints look as without the option
    counts, norms = normalizer(torch.tensor([0, 7]))
    torch.testing.assert_close(counts, torch.tensor([0.0, 7.0]))
    torch.testing.assert_close(norms, torch.tensor([1 + EPS, 7 + EPS]))


def test_running_counts_start_unset_then_average():
    normalizer = CountNormalizer(2, eps=EPS, momentum=0.5)
    torch.testing.assert_close(normalizer.running_counts, torch.tensor([-1.0, -1.0]))
    counts, norms = normalizer(torch.tensor([512, 4]))
    torch.testing.assert_close(counts, torch.tensor([512.0, 4.0]))  # the first batch as it is
    counts, norms = normalizer(torch.tensor([512, 0]))
    torch.testing.assert_close(counts, torch.tensor([512.0, 2.0]))  # 0.5 * 4 + 0.5 * 0
    torch.testing.assert_close(norms, torch.tensor([512 + EPS, 2 + EPS]))
    torch.testing.assert_close(normalizer.running_counts, torch.tensor([512.0, 2.0]))
    counts, norms = normalizer(torch.tensor([512, 0]))
    torch.testing.assert_close(norms, torch.tensor([512 + EPS, 1 + EPS]))  # 1.0, clamped at 1


def test_running_counts_survive_a_checkpoint_round_trip():
    trained = CountNormalizer(3, eps=EPS, momentum=0.9)
    for counts in ([10, 2, 5], [30, 0, 5], [20, 6, 5]):
        trained(torch.tensor(counts))
    resumed = CountNormalizer(3, eps=EPS, momentum=0.9)
    resumed.load_state_dict(trained.state_dict())
    torch.testing.assert_close(resumed.running_counts, trained.running_counts)
    torch.testing.assert_close(resumed(torch.tensor([1, 1, 5]))[0],
                               trained(torch.tensor([1, 1, 5]))[0])


def test_normalizer_output_is_detached():
    counts = torch.tensor([3.0, 1.0], requires_grad=True)
    out, norms = CountNormalizer(2, eps=EPS, momentum=0.9)(counts)
    assert not out.requires_grad and not norms.requires_grad


@pytest.mark.parametrize("momentum", [1.0, -0.1, 1.5])
def test_momentum_outside_zero_one_is_refused(momentum):
    with pytest.raises(ValueError, match=r"NORMALIZER_MOMENTUM must be in \[0, 1\), got "
                                         f"{momentum}"):
        CountNormalizer(2, eps=EPS, momentum=momentum)


# ---- BalancedLossSettings ------------------------------------------------------------------


def test_settings_from_config_read_every_shared_key():
    cfg = balanced_cfg(EPS=0.5, SYNC_NORMALIZERS=False, REG_NORMALIZER="samples",
                       NORMALIZER_MOMENTUM=0.9, ADAPTIVE_POS_WEIGHT=True, PRIOR_PROB=0.01)
    assert BalancedLossSettings.from_config(cfg) == BalancedLossSettings(
        eps=0.5, sync_normalizers=False, reg_normalizer="samples", normalizer_momentum=0.9,
        adaptive_pos_weight=True, prior_prob=0.01,
    )
    assert BalancedLossSettings.from_config(balanced_cfg()) == BalancedLossSettings()


def test_settings_pick_the_regression_divisor_and_the_positive_weight():
    positives, samples = torch.tensor(3.0), torch.tensor(8.0)
    assert BalancedLossSettings().reg_divisor(positives, samples) is samples  # the shipped default
    design = BalancedLossSettings(reg_normalizer="positives")
    assert design.reg_divisor(positives, samples) is positives
    num_pos, num_neg = torch.tensor(2.0), torch.tensor(198.0)
    assert BalancedLossSettings().positive_weight(2.0, num_pos, num_neg, 0.25) == 2.0
    adaptive = BalancedLossSettings(adaptive_pos_weight=True)
    torch.testing.assert_close(adaptive.positive_weight(2.0, num_pos, num_neg, 0.25),
                               adaptive_pos_weight(num_pos, num_neg, 0.25, 2.0))


def test_settings_make_the_head_normalizer():
    normalizer = BalancedLossSettings(eps=0.5, sync_normalizers=False,
                                      normalizer_momentum=0.9).count_normalizer(3)
    assert (normalizer.eps, normalizer.sync, normalizer.momentum) == (0.5, False, 0.9)
    torch.testing.assert_close(normalizer.running_counts, torch.full((3,), -1.0))
