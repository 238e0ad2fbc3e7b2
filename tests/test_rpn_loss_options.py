"""BalancedRPN's loss options (MODEL.BALANCED_LOSS): REG_NORMALIZER "samples" gives stock's
losses, NORMALIZER_MOMENTUM's running counts, ADAPTIVE_POS_WEIGHT, and PRIOR_PROB's bias."""

import math

import pytest
import torch
from conftest import EPS, anchor_counts, build_rpn, rpn_cfg, rpn_loss_inputs

from balanced_rcnn.utils.events import flush_tensor_scalars

pytestmark = pytest.mark.core


def test_samples_normalizer_gives_stocks_losses_and_grads(event_storage):
    stock, balanced = build_rpn(rpn_cfg("RPN")), build_rpn(rpn_cfg(REG_NORMALIZER="samples"))
    anchors, logits, labels, deltas, matched = rpn_loss_inputs(balanced)  # the sampler's own labels
    n_b = balanced.batch_size_per_image * 2
    assert all(int((label >= 0).sum()) == n_b // 2 for label in labels)  # B sampled per image
    ours = balanced.losses(anchors, logits, labels, deltas, matched)
    theirs = stock.losses(anchors, logits, labels, deltas, matched)
    for key in ("loss_rpn_cls", "loss_rpn_loc"):  # both divided by B * N (+ EPS)
        torch.testing.assert_close(ours[key], theirs[key] * n_b / (n_b + EPS), rtol=1e-6, atol=0)
    grads_ours = torch.autograd.grad(sum(ours.values()), logits + deltas)
    grads_stock = torch.autograd.grad(sum(theirs.values()), logits + deltas)
    for g_o, g_s in zip(grads_ours, grads_stock):
        torch.testing.assert_close(g_o, g_s * n_b / (n_b + EPS))
    assert flush_tensor_scalars(event_storage)["rpn/loc_normalizer"] == pytest.approx(n_b + EPS)


def test_running_counts_normalize_over_steps(event_storage):
    rpn = build_rpn(rpn_cfg(REG_NORMALIZER="positives", NORMALIZER_MOMENTUM=0.5))
    first = rpn_loss_inputs(rpn)
    num_pos, num_neg = anchor_counts(first[2])
    rpn.losses(*first)
    assert flush_tensor_scalars(event_storage)["rpn/loc_normalizer"] == pytest.approx(num_pos + EPS)
    empty = rpn_loss_inputs(rpn, gt=[[], []])  # P = 0 in this batch
    losses = rpn.losses(*empty)
    # P: 0.5 * num_pos + 0.5 * 0; the batch has no positive, so loss_rpn_loc is 0 anyway.
    scalars = flush_tensor_scalars(event_storage)
    assert scalars["rpn/loc_normalizer"] == pytest.approx(max(num_pos / 2, 1) + EPS)
    assert scalars["rpn/cls_normalizer"] == pytest.approx(num_pos + num_neg + EPS)
    assert losses["loss_rpn_loc"].item() == 0.0
    torch.testing.assert_close(
        rpn.normalizer.running_counts,
        torch.tensor([num_pos + num_neg, num_pos / 2, 2.0 * rpn.batch_size_per_image]))
    assert "normalizer.running_counts" in rpn.state_dict()


def test_adaptive_pos_weight_fills_the_positive_fraction(event_storage):
    adaptive = build_rpn(rpn_cfg(ADAPTIVE_POS_WEIGHT=True))
    inputs = rpn_loss_inputs(adaptive)
    num_pos, num_neg = anchor_counts(inputs[2])
    assert 0 < num_pos < num_neg  # the RPN aims at half positives; here too few
    losses = adaptive.losses(*inputs)
    weight = flush_tensor_scalars(event_storage)["rpn/pos_weight"]
    assert weight == pytest.approx(num_neg / num_pos, rel=1e-6)  # f = 0.5: f / (1 - f) = 1
    fixed = build_rpn(rpn_cfg(RPN_CLS_POS_WEIGHT=num_neg / num_pos)).losses(*inputs)
    torch.testing.assert_close(losses["loss_rpn_cls"], fixed["loss_rpn_cls"])
    torch.testing.assert_close(losses["loss_rpn_loc"], fixed["loss_rpn_loc"])


def test_prior_prob_sets_the_objectness_bias_and_nothing_else():
    plain, prior = build_rpn(rpn_cfg()), build_rpn(rpn_cfg(PRIOR_PROB=0.01))
    bias = prior.rpn_head.objectness_logits.bias
    torch.testing.assert_close(bias, torch.full_like(bias, math.log(0.01 / 0.99)))
    theirs = plain.state_dict()
    for name, value in prior.state_dict().items():
        if name != "rpn_head.objectness_logits.bias":
            assert torch.equal(value, theirs[name]), name
