"""The pure loss functions of balanced_rcnn.modeling.losses: hand-computed values on tiny
inputs, the foreground weights, and the properties every loss shares (float32 under AMP, empty
inputs, zero weights). The box regression terms are tested in test_box_regression_terms.py."""

import math

import pytest
import torch
from conftest import EPS, LN2, LN3, UNIT_BOX_TRANSFORM, assert_scalar_close, random_boxes

from balanced_rcnn.modeling.losses import (
    box_regression_loss,
    classification_loss,
    count_normalizers,
    mask_loss,
    objectness_loss,
)

pytestmark = pytest.mark.core


# ---- count normalizer ----------------------------------------------------------------------


def test_count_normalizers_are_the_counts_clamped_at_1_plus_eps():
    counts = torch.tensor([0, 3, 250])
    out = count_normalizers(counts, eps=EPS, sync=True)  # one worker: nothing to average
    assert out.dtype == torch.float32
    # max(0, 1) + eps, max(3, 1) + eps, max(250, 1) + eps
    torch.testing.assert_close(out, torch.tensor([1 + EPS, 3 + EPS, 250 + EPS]))
    assert counts.tolist() == [0, 3, 250]


def test_count_normalizers_do_not_touch_or_track_their_input():
    counts = torch.tensor([2.0, 5.0], requires_grad=True)
    out = count_normalizers(counts, eps=0.5)
    assert not out.requires_grad
    torch.testing.assert_close(out, torch.tensor([2.5, 5.5]))
    torch.testing.assert_close(counts.detach(), torch.tensor([2.0, 5.0]))


# ---- objectness (RPN cls) ------------------------------------------------------------------


def test_objectness_loss_equals_hand_computed_value():
    logits = torch.tensor([0.0, LN3, 0.0, 5.0])
    labels = torch.tensor([1, 1, 0, -1])
    normalizer = torch.tensor(3 + EPS)  # P + Q = 2 + 1
    # BCE(0, 1) = ln 2; BCE(ln 3, 1) = -ln(3/4) = ln(4/3); BCE(0, 0) = ln 2; label -1 ignored.
    # Positives weigh 2: (2 ln 2 + 2 ln(4/3) + ln 2) / (3 + eps)
    expected = (2 * LN2 + 2 * math.log(4 / 3) + LN2) / (3 + EPS)
    assert_scalar_close(objectness_loss(logits, labels, 2.0, normalizer), expected)


def test_objectness_pos_weight_scales_exactly_the_positive_terms():
    torch.manual_seed(1)
    logits = torch.randn(40)
    labels = torch.randint(-1, 2, (40,))
    norm = torch.tensor(17.0)
    negatives_only = objectness_loss(logits, labels, 0.0, norm)
    both = objectness_loss(logits, labels, 1.0, norm)
    positives = both - negatives_only
    for w in (0.5, 3.0, 10.0):
        torch.testing.assert_close(
            objectness_loss(logits, labels, w, norm), negatives_only + w * positives
        )
    # The negatives alone: ignored labels and positives contribute nothing at weight 0.
    neg = labels == 0
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[neg], torch.zeros(int(neg.sum())), reduction="sum"
    )
    torch.testing.assert_close(negatives_only, expected / 17.0)


# ---- classification (ROI cls) --------------------------------------------------------------


def test_classification_loss_equals_hand_computed_value():
    # K = 2 foreground classes, class 2 is the background.
    scores = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    gt = torch.tensor([0, 2, 1])
    # Row 0: CE = ln 3. Row 1 (background): -ln(1 / (2 + 1 + 1)) = ln 4. Row 2: ln 3.
    # Foreground weighs 3: (3 ln 3 + ln 4 + 3 ln 3) / (R + eps), R = 3
    expected = (3 * LN3 + math.log(4) + 3 * LN3) / (3 + EPS)
    assert_scalar_close(classification_loss(scores, gt, 3.0, torch.tensor(3 + EPS)), expected)


def test_classification_pos_weight_scales_exactly_the_foreground_terms():
    torch.manual_seed(2)
    scores = torch.randn(30, 6)
    gt = torch.randint(0, 6, (30,))
    norm = torch.tensor(30.0)
    background = classification_loss(scores, gt, 0.0, norm)
    foreground = classification_loss(scores, gt, 1.0, norm) - background
    torch.testing.assert_close(
        classification_loss(scores, gt, 4.0, norm), background + 4 * foreground
    )
    bg = gt == 5
    expected = torch.nn.functional.cross_entropy(scores[bg], gt[bg], reduction="sum") / 30.0
    torch.testing.assert_close(background, expected)


# ---- mask ----------------------------------------------------------------------------------


def test_mask_loss_equals_hand_computed_value_for_float_and_bool_targets():
    logits = torch.stack([torch.zeros(2, 2), torch.full((2, 2), LN3)])
    gt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    # Mask 0: every pixel BCE(0, .) = ln 2, mean ln 2. Mask 1: BCE(ln 3, 1) = ln(4/3), mean ln(4/3).
    expected = (LN2 + math.log(4 / 3)) / (2 + EPS)
    assert_scalar_close(mask_loss(logits, gt, torch.tensor(2 + EPS)), expected)
    bool_targets = gt > 0.5
    assert_scalar_close(mask_loss(logits, bool_targets, torch.tensor(2 + EPS)), expected)


# ---- shared properties ---------------------------------------------------------------------


def _all_losses(dtype=torch.float32, n=6):
    torch.manual_seed(6)
    # Drawn in float32 so that both precisions see the same values (up to rounding).
    logits = torch.randn(n).to(dtype).requires_grad_()
    scores = torch.randn(n, 4).to(dtype).requires_grad_()
    deltas = (torch.randn(n, 4) * 0.1).to(dtype).requires_grad_()
    masks = torch.randn(n, 5, 5).to(dtype).requires_grad_()
    mask_targets = torch.rand(n, 5, 5) > 0.5
    labels = torch.arange(n) % 3 - 1
    classes = torch.arange(n) % 4
    src = random_boxes(n, torch.Generator().manual_seed(7))
    norm = torch.tensor(n + EPS)
    losses = {
        "objectness": objectness_loss(logits, labels, 2.0, norm),
        "classification": classification_loss(scores, classes, 2.0, norm),
        "box": box_regression_loss(UNIT_BOX_TRANSFORM, deltas, src, src + 1, labels == 1, norm),
        "mask": mask_loss(masks, mask_targets, norm),
    }
    return losses, (logits, scores, deltas, masks)


def test_low_precision_inputs_give_float32_losses():
    full, _ = _all_losses(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what AMP training does
        half, inputs = _all_losses(torch.bfloat16)
    for name in full:
        assert half[name].dtype == torch.float32, name
        torch.testing.assert_close(half[name], full[name], rtol=2e-2, atol=1e-3)
    sum(half.values()).backward()
    assert all(x.grad.dtype == torch.bfloat16 for x in inputs)


def test_empty_inputs_give_zero_and_finite_grads():
    logits = torch.zeros(0, requires_grad=True)
    scores = torch.zeros(0, 3, requires_grad=True)
    deltas = torch.zeros(0, 4, requires_grad=True)
    masks = torch.zeros(0, 4, 4, requires_grad=True)
    norm = count_normalizers(torch.tensor([0]), EPS)[0]  # max(0, 1) + eps
    boxes = torch.zeros(0, 4)
    losses = [
        objectness_loss(logits, torch.zeros(0, dtype=torch.int64), 2.0, norm),
        classification_loss(scores, torch.zeros(0, dtype=torch.int64), 2.0, norm),
        box_regression_loss(
            UNIT_BOX_TRANSFORM, deltas, boxes, boxes, torch.zeros(0, dtype=torch.bool), norm
        ),
        mask_loss(masks, torch.zeros(0, 4, 4), norm),
    ]
    for loss in losses:
        assert loss.item() == 0.0
    sum(losses).backward()
    for x in (logits, scores, deltas, masks):
        assert x.grad is not None and x.grad.numel() == 0


def test_zero_weights_and_ignored_labels_give_zero():
    logits = torch.randn(4)
    norm = torch.tensor(4.0)
    # Only positives, weighted 0.
    assert objectness_loss(logits, torch.ones(4, dtype=torch.int64), 0.0, norm).item() == 0.0
    # Only ignored anchors.
    assert objectness_loss(logits, -torch.ones(4, dtype=torch.int64), 1.0, norm).item() == 0.0
    # Only foreground, weighted 0.
    assert classification_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), 0.0, norm) == 0
