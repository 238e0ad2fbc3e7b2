"""
The per-box regression term boxloss_i of the balanced losses (modeling/losses.py holds the
formulas): detectron2's smooth L1 / GIoU / DIoU / CIoU terms with no reduction, computed without
waiting for the device.

Shape shorthand in this module:

    S: number of boxes (anchors or proposals, each with its matched ground truth)
"""

import math
from typing import Any, Dict, Tuple

import torch
from detectron2.modeling.box_regression import Box2BoxTransform
from fvcore.nn import smooth_l1_loss

__all__ = [
    "BOX_REG_LOSS_TYPES",
    "box_loss_options",
    "box_regression_terms",
    "encode_box_deltas",
    "iou_loss_terms",
]

# The values of MODEL.RPN.BBOX_REG_LOSS_TYPE / MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE that
# detectron2's _dense_box_regression_loss accepts.
BOX_REG_LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")


def encode_box_deltas(
    weights: Tuple[float, float, float, float], src_boxes: torch.Tensor, target_boxes: torch.Tensor
) -> torch.Tensor:
    """
    ``Box2BoxTransform.get_deltas`` for (..., 4) XYXY boxes that broadcast against each other.

    Same arithmetic in the same order as detectron2 (so the same float results), without its
    ``assert (...).all().item()``, which waits for the device.
    """
    src_widths = src_boxes[..., 2] - src_boxes[..., 0]
    src_heights = src_boxes[..., 3] - src_boxes[..., 1]
    src_ctr_x = src_boxes[..., 0] + 0.5 * src_widths
    src_ctr_y = src_boxes[..., 1] + 0.5 * src_heights

    target_widths = target_boxes[..., 2] - target_boxes[..., 0]
    target_heights = target_boxes[..., 3] - target_boxes[..., 1]
    target_ctr_x = target_boxes[..., 0] + 0.5 * target_widths
    target_ctr_y = target_boxes[..., 1] + 0.5 * target_heights

    wx, wy, ww, wh = weights
    dx = wx * (target_ctr_x - src_ctr_x) / src_widths
    dy = wy * (target_ctr_y - src_ctr_y) / src_heights
    dw = ww * torch.log(target_widths / src_widths)
    dh = wh * torch.log(target_heights / src_heights)
    return torch.stack((dx, dy, dw, dh), dim=-1)


def iou_loss_terms(
    pred_boxes: torch.Tensor, gt_boxes: torch.Tensor, loss_type: str, eps: float = 1e-7
) -> torch.Tensor:
    """
    Per-box GIoU / DIoU / CIoU loss of (S, 4) XYXY boxes, shape (S,).

    The arithmetic of fvcore's ``giou_loss`` and detectron2's ``diou_loss`` / ``ciou_loss``;
    the intersection uses ``clamp(min=0)`` instead of their boolean-mask assignment and their
    ``assert (...).all()`` checks are left out, both of which wait for the device.
    """
    x1, y1, x2, y2 = pred_boxes.unbind(dim=-1)
    x1g, y1g, x2g, y2g = gt_boxes.unbind(dim=-1)

    # Non-overlapping pairs give 0 in both formulations.
    intsct = (torch.min(x2, x2g) - torch.max(x1, x1g)).clamp(min=0) * (
        torch.min(y2, y2g) - torch.max(y1, y1g)
    ).clamp(min=0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - intsct

    # smallest enclosing box
    xc1 = torch.min(x1, x1g)
    yc1 = torch.min(y1, y1g)
    xc2 = torch.max(x2, x2g)
    yc2 = torch.max(y2, y2g)

    if loss_type == "giou":
        iou = intsct / (union + eps)
        area_c = (xc2 - xc1) * (yc2 - yc1)
        return 1 - (iou - ((area_c - union) / (area_c + eps)))

    if loss_type not in ("diou", "ciou"):
        raise ValueError(f"Invalid box regression loss type {loss_type!r}: one of "
                         f"{BOX_REG_LOSS_TYPES}")
    iou = intsct / (union + eps)
    diag_len = ((xc2 - xc1) ** 2) + ((yc2 - yc1) ** 2) + eps
    x_p = (x2 + x1) / 2
    y_p = (y2 + y1) / 2
    x_g = (x1g + x2g) / 2
    y_g = (y1g + y2g) / 2
    distance = ((x_p - x_g) ** 2) + ((y_p - y_g) ** 2)
    loss = 1 - iou + (distance / diag_len)
    if loss_type == "diou":
        return loss

    w_pred = x2 - x1
    h_pred = y2 - y1
    w_gt = x2g - x1g
    h_gt = y2g - y1g
    v = (4 / (math.pi**2)) * torch.pow((torch.atan(w_gt / h_gt) - torch.atan(w_pred / h_pred)), 2)
    with torch.no_grad():
        alpha = v / (1 - iou + v + eps)
    return loss + alpha * v


def box_regression_terms(
    box2box_transform: Box2BoxTransform,
    pred_deltas: torch.Tensor,
    src_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    loss_type: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
) -> torch.Tensor:
    """
    Per-box regression loss boxloss_i, shape (S,): the term that detectron2's
    ``_dense_box_regression_loss`` sums over the foreground.

    Args:
        pred_deltas: (S, 4) predicted deltas relative to ``src_boxes``.
        src_boxes, gt_boxes: (S, 4) anchors or proposals, and their matched ground truth.
        loss_type: one of :data:`BOX_REG_LOSS_TYPES`.
        smooth_l1_beta: beta of the smooth L1 loss (0: L1).
    """
    pred_deltas = pred_deltas.float()
    if loss_type == "smooth_l1":
        target = encode_box_deltas(box2box_transform.weights, src_boxes, gt_boxes)
        return smooth_l1_loss(pred_deltas, target, beta=smooth_l1_beta, reduction="none").sum(-1)
    pred_boxes = box2box_transform.apply_deltas(pred_deltas, src_boxes)
    return iou_loss_terms(pred_boxes, gt_boxes.float(), loss_type)  # refuses an unknown type


def box_loss_options(head: Any) -> Dict[str, Any]:
    """The options of :func:`box_regression_terms` that a detectron2 head holds: RPN and
    FastRCNNOutputLayers both keep BBOX_REG_LOSS_TYPE and SMOOTH_L1_BETA under these names."""
    return {"loss_type": head.box_reg_loss_type, "smooth_l1_beta": head.smooth_l1_beta}
