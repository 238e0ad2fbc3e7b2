"""The per-box regression terms (modeling/box_regression.py) and the box regression loss:
hand-computed values, parity with detectron2's / fvcore's element-wise terms and dense loss, and
finite losses and gradients where the ground truth of background boxes is undefined."""

import math

import pytest
import torch
from conftest import EPS, UNIT_BOX_TRANSFORM, assert_scalar_close, random_boxes
from detectron2.layers import ciou_loss, diou_loss
from detectron2.modeling.box_regression import Box2BoxTransform, _dense_box_regression_loss
from fvcore.nn import giou_loss

from balanced_rcnn.modeling.losses import (
    box_regression_loss,
    box_regression_terms,
    encode_box_deltas,
    iou_loss_terms,
)

pytestmark = pytest.mark.core


SRC = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0]])
GT = torch.tensor([[2.0, 0.0, 12.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0]])
FG = torch.tensor([True, True, False])  # the third gt box is undefined (all zeros)


def _pred_deltas():
    return torch.tensor(
        [[0.0, 0.0, 0.0, 0.0], [0.5, -0.25, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]], requires_grad=True
    )


def test_smooth_l1_box_loss_equals_hand_computed_values_and_skips_background():
    pred = _pred_deltas()
    norm = torch.tensor(2 + EPS)  # P = 2
    # Row 0: target dx = (7 - 5) / 10 = 0.2, others 0 -> |0 - 0.2| = 0.2
    # Row 1: target 0 -> |0.5| + |-0.25| = 0.75. Row 2 is background.
    loss = box_regression_loss(UNIT_BOX_TRANSFORM, pred, SRC, GT, FG, norm)
    assert_scalar_close(loss, (0.2 + 0.75) / (2 + EPS))
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert pred.grad[2].abs().sum() == 0

    # beta = 0.5: 0.5 n^2 / beta below beta, n - beta / 2 above.
    # Row 0: 0.5 * 0.2^2 / 0.5 = 0.04. Row 1: (0.5 - 0.25) + 0.5 * 0.25^2 / 0.5 = 0.3125
    loss = box_regression_loss(
        UNIT_BOX_TRANSFORM, _pred_deltas(), SRC, GT, FG, norm, loss_type="smooth_l1",
        smooth_l1_beta=0.5,
    )
    assert_scalar_close(loss, (0.04 + 0.3125) / (2 + EPS))


def test_box_regression_uses_the_transform_weights():
    # detectron2's ROI weights (10, 10, 5, 5): row 0's target dx becomes 10 * 0.2 = 2.
    transform = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))
    loss = box_regression_loss(transform, _pred_deltas(), SRC, GT, FG, torch.tensor(1.0))
    assert_scalar_close(loss, 2.0 + 0.75)


def test_an_unknown_loss_type_is_refused():
    with pytest.raises(ValueError, match=r"^Invalid box regression loss type 'l2': one of "
                                         r"\('smooth_l1', 'giou', 'diou', 'ciou'\)$"):
        box_regression_terms(UNIT_BOX_TRANSFORM, _pred_deltas(), SRC, GT, loss_type="l2")


def test_iou_loss_terms_equal_hand_computed_values():
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
    pred, gt = random_boxes(64, g), random_boxes(64, g)
    stock = {"giou": giou_loss, "diou": diou_loss, "ciou": ciou_loss}[loss_type]
    torch.testing.assert_close(
        iou_loss_terms(pred, gt, loss_type), stock(pred, gt, reduction="none")
    )


def test_encode_box_deltas_equal_get_deltas_and_broadcast():
    g = torch.Generator().manual_seed(4)
    src, tgt = random_boxes(50, g), random_boxes(50, g)
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
    src, gt = random_boxes(40, g), random_boxes(40, g)
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
    ours = box_regression_loss(
        transform, pred, src, gt, fg, torch.tensor(1.0), loss_type=loss_type, smooth_l1_beta=beta
    )
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
        UNIT_BOX_TRANSFORM, pred, src, gt, torch.zeros(3, dtype=torch.bool), torch.tensor(1 + EPS),
        loss_type=loss_type, smooth_l1_beta=0.5,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() == 0
