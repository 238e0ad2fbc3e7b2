"""The pure loss functions of balanced_rcnn.modeling.losses: hand-computed values on tiny
inputs, parity with detectron2 / fvcore element-wise terms, edge cases."""

import math

import pytest
import torch
from detectron2.layers import ciou_loss, diou_loss
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from fvcore.nn import giou_loss

from balanced_rcnn.modeling.losses import (
    box_regression_loss,
    box_regression_terms,
    classification_loss,
    count_normalizers,
    encode_box_deltas,
    iou_loss_terms,
    mask_loss,
    objectness_loss,
)

EPS = 1e-6
LN2, LN3 = math.log(2.0), math.log(3.0)
UNIT = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))


def _close(actual, expected, rtol=1e-6):
    assert actual.dtype == torch.float32 and actual.dim() == 0
    assert actual.item() == pytest.approx(expected, rel=rtol, abs=1e-7)


def _random_boxes(n, generator):
    xy = torch.rand(n, 2, generator=generator) * 50
    wh = torch.rand(n, 2, generator=generator) * 40 + 1
    return torch.cat([xy, xy + wh], dim=1)


# ---- count normalizer ----------------------------------------------------------------------


def test_count_normalizers_clamp_and_eps():
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


def test_objectness_loss_hand_computed():
    logits = torch.tensor([0.0, LN3, 0.0, 5.0])
    labels = torch.tensor([1, 1, 0, -1])
    normalizer = torch.tensor(3 + EPS)  # P + Q = 2 + 1
    # BCE(0, 1) = ln 2; BCE(ln 3, 1) = -ln(3/4) = ln(4/3); BCE(0, 0) = ln 2; label -1 ignored.
    # Positives weigh 2: (2 ln 2 + 2 ln(4/3) + ln 2) / (3 + eps)
    expected = (2 * LN2 + 2 * math.log(4 / 3) + LN2) / (3 + EPS)
    _close(objectness_loss(logits, labels, 2.0, normalizer), expected)


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


def test_classification_loss_hand_computed():
    # K = 2 foreground classes, class 2 is the background.
    scores = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    gt = torch.tensor([0, 2, 1])
    # Row 0: CE = ln 3. Row 1 (background): -ln(1 / (2 + 1 + 1)) = ln 4. Row 2: ln 3.
    # Foreground weighs 3: (3 ln 3 + ln 4 + 3 ln 3) / (R + eps), R = 3
    expected = (3 * LN3 + math.log(4) + 3 * LN3) / (3 + EPS)
    _close(classification_loss(scores, gt, 3.0, torch.tensor(3 + EPS)), expected)


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


# ---- box regression ------------------------------------------------------------------------

SRC = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0]])
GT = torch.tensor([[2.0, 0.0, 12.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
FG = torch.tensor([True, True, False])  # the third gt box is undefined (all zeros)


def _pred_deltas():
    return torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [0.5, -0.25, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]], requires_grad=True
    )


def test_box_regression_loss_smooth_l1_hand_computed():
    pred = _pred_deltas()
    norm = torch.tensor(2 + EPS)  # P = 2
    # Row 0: target dx = (7 - 5) / 10 = 0.2, others 0 -> |0 - 0.2| = 0.2
    # Row 1: target 0 -> |0.5| + |-0.25| = 0.75. Row 2 is background.
    loss = box_regression_loss(UNIT, pred, SRC, GT, FG, norm)
    _close(loss, (0.2 + 0.75) / (2 + EPS))
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[2].abs().sum() == 0

    # beta = 0.5: 0.5 n^2 / beta below beta, n - beta / 2 above.
    # Row 0: 0.5 * 0.2^2 / 0.5 = 0.04. Row 1: (0.5 - 0.25) + 0.5 * 0.25^2 / 0.5 = 0.3125
    loss = box_regression_loss(UNIT, _pred_deltas(), SRC, GT, FG, norm, "smooth_l1", 0.5)
    _close(loss, (0.04 + 0.3125) / (2 + EPS))


def test_box_regression_uses_the_transform_weights():
    # detectron2's ROI weights (10, 10, 5, 5): row 0's target dx becomes 10 * 0.2 = 2.
    transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    loss = box_regression_loss(transform, _pred_deltas(), SRC, GT, FG, torch.tensor(1.0))
    _close(loss, 2.0 + 0.75)


def test_iou_loss_terms_hand_computed():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 2.0, 1.0]])
    gt = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0]])
    # Pair 0: intersection 1, union 4 + 4 - 1 = 7, enclosing box 3x3 (area 9, diagonal^2 18),
    # centres (1, 1) and (2, 2) (distance^2 2). Pair 1: intersection 2, union 4, enclosing 2x2
    # (area 4, diagonal^2 8), centres (1, 0.5) and (1, 1) (distance^2 0.25).
    giou = [1 - (1 / 7 - (9 - 7) / 9), 1 - (2 / 4 - 0)]
    diou = [1 - 1 / 7 + 2 / 18, 1 - 2 / 4 + 0.25 / 8]
    # CIoU adds alpha * v: v = 4 / pi^2 (atan(w_gt / h_gt) - atan(w / h))^2,
    # alpha = v / (1 - iou + v)
    v = [0.0, 4 / math.pi**2 * (math.atan(1.0) - math.atan(2.0)) ** 2]
    ciou = [diou[0], diou[1] + v[1] / (1 - 0.5 + v[1]) * v[1]]
    for loss_type, expected in (("giou", giou), ("diou", diou), ("ciou", ciou)):
        torch.testing.assert_close(iou_loss_terms(pred, gt, loss_type), torch.tensor(expected))


@pytest.mark.parametrize("loss_type", ["giou", "diou", "ciou"])
def test_iou_loss_terms_equal_detectron2s(loss_type):
    g = torch.Generator().manual_seed(3)
    pred, gt = _random_boxes(64, g), _random_boxes(64, g)
    stock = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}[loss_type]
    torch.testing.assert_close(
        iou_loss_terms(pred, gt, loss_type), stock(pred, gt, reduction="none")
    )


def test_encode_box_deltas_equal_get_deltas_and_broadcast():
    g = torch.Generator().manual_seed(4)
    src, tgt = _random_boxes(50, g), _random_boxes(50, g)
    transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    assert torch.equal(
        encode_box_deltas(transform.weights, src, tgt), transform.get_deltas(src, tgt)
    )
    stacked = torch.stack([tgt, tgt.flip(0)])  # (2, 50, 4) against (50, 4)
    assert encode_box_deltas(transform.weights, src, stacked).shape == (2, 50, 4)


@pytest.mark.parametrize(
    "loss_type,beta",
    [("smooth_l1", 0.0), ("smooth_l1", 0.3), ("giou", 0.0), ("diou", 0.0), ("ciou", 0.0)],
)
def test_box_regression_terms_sum_to_detectron2s_dense_loss(loss_type, beta):
    g = torch.Generator().manual_seed(5)
    src, gt = _random_boxes(40, g), _random_boxes(40, g)
    pred = torch.randn(40, 4, generator=g) * 0.3
    fg = torch.rand(40, generator=g) > 0.5
    transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    stock = _dense_box_regression_loss(
        [src],
        transform,
        [pred[None]],
        [gt],
        fg[None],
        box_reg_loss_type=loss_type,
        smooth_l1_beta=beta,
    )
    ours = box_regression_loss(transform, pred, src, gt, fg, torch.tensor(1.0), loss_type, beta)
    torch.testing.assert_close(ours, stock)
    terms = box_regression_terms(transform, pred, src, gt, loss_type, beta)
    torch.testing.assert_close(terms[fg].sum(), stock)


@pytest.mark.parametrize("loss_type", ["smooth_l1", "giou", "diou", "ciou"])
def test_undefined_background_boxes_give_finite_loss_and_grads(loss_type):
    # Background rows with degenerate or infinite "gt" (detectron2 leaves them undefined).
    src = SRC.clone()
    gt = torch.tensor([[0.0, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0], [float("inf")] * 4])
    pred = torch.randn(3, 4, requires_grad=True)
    loss = box_regression_loss(
        UNIT, pred, src, gt, torch.zeros(3, dtype=torch.bool), torch.tensor(1 + EPS), loss_type, 0.5
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0


# ---- mask ----------------------------------------------------------------------------------


def test_mask_loss_hand_computed():
    logits = torch.stack([torch.zeros(2, 2), torch.full((2, 2), LN3)])
    gt = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [1.0, 1.0]]])
    # Mask 0: every pixel BCE(0, .) = ln 2, mean ln 2. Mask 1: BCE(ln 3, 1) = ln(4/3), mean ln(4/3).
    expected = (LN2 + math.log(4 / 3)) / (2 + EPS)
    _close(mask_loss(logits, gt, torch.tensor(2 + EPS)), expected)
    _close(mask_loss(logits, gt > 0.5, torch.tensor(2 + EPS)), expected)  # bool targets


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
    src = _random_boxes(n, torch.Generator().manual_seed(7))
    norm = torch.tensor(n + EPS)
    losses = {
        "objectness": objectness_loss(logits, labels, 2.0, norm),
        "classification": classification_loss(scores, classes, 2.0, norm),
        "box": box_regression_loss(UNIT, deltas, src, src + 1, labels == 1, norm),
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
        box_regression_loss(UNIT, deltas, boxes, boxes, torch.zeros(0, dtype=torch.bool), norm),
        mask_loss(masks, torch.zeros(0, 4, 4), norm),
    ]
    for loss in losses:
        assert loss.item() == 0.0
    sum(losses).backward()
    for x in (logits, scores, deltas, masks):
        assert x.grad is not None and x.grad.numel() == 0


def test_zero_weights_give_zero():
    logits = torch.randn(4)
    norm = torch.tensor(4.0)
    # Only positives, weighted 0.
    assert objectness_loss(logits, torch.ones(4, dtype=torch.int64), 0.0, norm).item() == 0.0
    # Only ignored anchors.
    assert objectness_loss(logits, -torch.ones(4, dtype=torch.int64), 1.0, norm).item() == 0.0
    # Only foreground, weighted 0.
    assert classification_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.int64), 0.0, norm) == 0
