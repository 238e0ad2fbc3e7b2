"""
Balanced losses: sum-reduced, normalized by real sample counts, foreground upweighted.

Shape shorthand in this module:

    S: number of loss terms (sampled anchors, sampled proposals or foreground masks)
    C: number of counts normalized together (one collective for all of them)
    K: number of foreground classes; class K is the background
    M: side of the square mask predictions

Every loss has three layers (as in mmdetection): an element-wise term with no reduction, a
weighted sum divided by a normalizer, and the head that picks weights and normalizers. Where
PyTorch's loss kernel takes the weights itself (BCE, cross-entropy) the first two are fused.
Normalizers and weights are tensors made from sample counts by the functions of the first section
(modeling/normalizer.py chains them per head), so nothing here waits for the device. Terms are
computed in float32 whatever the dtype of the predictions (AMP).

From counts to normalizers and weights, each step optional (MODEL.BALANCED_LOSS keys):

    n      = mean of the counts over workers                          SYNC_NORMALIZERS
    n_t    = m * n_{t-1} + (1 - m) * n       (n_0: the first batch)   NORMALIZER_MOMENTUM m
    norm   = max(n_t, 1) + EPS
    w_pos  = max(POS_WEIGHT, f / (1 - f) * Q / max(P, 1))             ADAPTIVE_POS_WEIGHT

(P, Q: positive and negative counts of n_t; f: the sampler's POSITIVE_FRACTION.)
"""

import math
from typing import Tuple, Union

import torch
import torch.distributed as dist
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils import comm
from fvcore.nn import smooth_l1_loss
from torch.nn import functional as F

__all__ = [
    "BOX_REG_LOSS_TYPES",
    "REG_NORMALIZERS",
    "adaptive_pos_weight",
    "count_normalizers",
    "ema_counts",
    "prior_logit",
    "worker_mean_counts",
    "weighted_sum",
    "encode_box_deltas",
    "iou_loss_terms",
    "box_regression_terms",
    "objectness_loss",
    "classification_loss",
    "box_regression_loss",
    "mask_loss",
]

# The values of MODEL.RPN.BBOX_REG_LOSS_TYPE / MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE that
# detectron2's _dense_box_regression_loss accepts.
BOX_REG_LOSS_TYPES = ("smooth_l1", "giou", "diou", "ciou")
# MODEL.BALANCED_LOSS.REG_NORMALIZER: what the regression losses are divided by. "positives": the
# foreground count they sum over (the design); "samples": detectron2's divisor, every sampled
# anchor (B x N in the RPN) or proposal (R in the box head).
REG_NORMALIZERS = ("positives", "samples")


# ---- from sample counts to normalizers and weights ---------------------------------------------


def worker_mean_counts(counts: torch.Tensor, sync: bool = True) -> torch.Tensor:
    """
    (C,) counts of this worker (any dtype) -> a detached float32 copy, with ``sync`` averaged over
    workers (one all-reduce). With DDP averaging the gradients this makes a step equal to one
    step on the concatenated batch.
    """
    # A fresh float32 copy: the in-place all_reduce must not touch the caller's tensor.
    counts = counts.detach().to(torch.float32, copy=True)
    world_size = comm.get_world_size()
    if sync and world_size > 1:
        dist.all_reduce(counts)  # one collective for all counts of a head
        counts = counts / world_size
    return counts


def ema_counts(previous: torch.Tensor, counts: torch.Tensor, momentum: float) -> torch.Tensor:
    """
    ``momentum * previous + (1 - momentum) * counts``, elementwise; where ``previous`` is negative
    (no batch seen yet) the result is ``counts``. As detectron2's RetinaNet/FCOS smooth their
    foreground count (``_ema_update``, momentum 0.9), without its host synchronization.
    """
    smoothed = momentum * previous + (1.0 - momentum) * counts
    return torch.where(previous < 0, counts, smoothed)


def count_normalizers(counts: torch.Tensor, eps: float, sync: bool = True) -> torch.Tensor:
    """
    Counts -> loss normalizers ``max(count, 1) + eps`` (after :func:`worker_mean_counts`).

    Args:
        counts: (C,) unweighted counts of this worker (any dtype).
        eps: added to every normalizer (> 0).
        sync: replace every count by its mean over workers first.

    Returns:
        (C,) float32 normalizers, detached from autograd.
    """
    return worker_mean_counts(counts, sync).clamp(min=1.0) + eps


def adaptive_pos_weight(
    num_pos: torch.Tensor, num_neg: torch.Tensor, positive_fraction: float, min_weight: float
) -> torch.Tensor:
    """
    The weight of each positive that gives the positives the share of the total weight that the
    sampler aims for (``positive_fraction``, detectron2's POSITIVE_FRACTION) when there are too
    few of them to fill it: ``max(min_weight, f / (1 - f) * num_neg / max(num_pos, 1))``. The
    class-balancing weight of Xie & Tu (HED, ICCV 2015) with the sampler's target in place of 1/2.
    0-dim tensors in and out.
    """
    assert 0.0 < positive_fraction < 1.0, positive_fraction  # checked at build time
    ratio = positive_fraction / (1.0 - positive_fraction)
    return (ratio * num_neg / num_pos.clamp(min=1.0)).clamp(min=min_weight)


def prior_logit(prior_prob: float) -> float:
    """``log(p / (1 - p))``: the bias that makes a sigmoid start at probability ``p`` (Lin et
    al., Focal Loss, ICCV 2017, section 4.1)."""
    return math.log(prior_prob / (1.0 - prior_prob))


# ---- losses ------------------------------------------------------------------------------------


def weighted_sum(
    terms: torch.Tensor, weight: torch.Tensor, normalizer: torch.Tensor
) -> torch.Tensor:
    """``sum(weight * terms) / normalizer`` for (S,) terms and weights; a 0-dim float32 tensor."""
    assert terms.dim() == 1 and terms.shape == weight.shape, (terms.shape, weight.shape)
    # Not torch.dot: autocast may run matrix products in half precision.
    return (terms * weight).sum() / normalizer


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
        raise ValueError(f"Invalid IoU loss type '{loss_type}'")
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
    Per-box regression loss, shape (S,): the term that detectron2's
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
    if loss_type in BOX_REG_LOSS_TYPES:
        pred_boxes = box2box_transform.apply_deltas(pred_deltas, src_boxes)
        return iou_loss_terms(pred_boxes, gt_boxes.float(), loss_type)
    raise ValueError(f"Invalid box regression loss type '{loss_type}'")


def objectness_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    pos_weight: Union[float, torch.Tensor],
    normalizer: torch.Tensor,
) -> torch.Tensor:
    """
    ``sum_i w_i * BCEWithLogits(logit_i, label_i) / normalizer`` over labels >= 0.

    Args:
        logits: (S,) objectness logits.
        labels: (S,) 1 positive, 0 negative, -1 ignored (weight 0).
        pos_weight: w_i of positives (a number or a 0-dim tensor); negatives have 1.
        normalizer: 0-dim tensor, ``max(P + Q, 1) + eps`` in the balanced RPN.
    """
    positive = labels == 1
    weight = torch.where(positive, pos_weight, (labels == 0).to(torch.float32))
    # The weighted sum inside the loss kernel: one autograd node instead of three.
    total = F.binary_cross_entropy_with_logits(
        logits.float(), positive.to(torch.float32), weight=weight, reduction="sum"
    )
    return total / normalizer


def classification_loss(
    scores: torch.Tensor,
    gt_classes: torch.Tensor,
    pos_weight: Union[float, torch.Tensor],
    normalizer: torch.Tensor,
) -> torch.Tensor:
    """
    ``sum_i w_i * CE(scores_i, gt_i) / normalizer``.

    Args:
        scores: (S, K + 1) class logits, the last column is the background.
        gt_classes: (S,) int64 in [0, K].
        pos_weight: w_i of foreground (gt < K), a number or a 0-dim tensor; background has 1.
        normalizer: 0-dim tensor, ``max(R, 1) + eps`` in the balanced box head.
    """
    # w_i as a class weight (pos_weight for classes < K, 1 for K): with reduction "sum" the
    # loss kernel computes sum_i w_{gt_i} CE_i itself.
    if isinstance(pos_weight, torch.Tensor):
        class_weight = torch.cat(
            [pos_weight.reshape(1).expand(scores.shape[1] - 1), pos_weight.new_ones(1)]
        )
    else:
        # Filled on the device: a tensor made from a Python number would be copied from the host,
        # which waits for the device.
        class_weight = scores.new_full((scores.shape[1],), pos_weight, dtype=torch.float32)
        class_weight[-1] = 1.0
    total = F.cross_entropy(scores.float(), gt_classes, weight=class_weight, reduction="sum")
    return total / normalizer


def box_regression_loss(
    box2box_transform: Box2BoxTransform,
    pred_deltas: torch.Tensor,
    src_boxes: torch.Tensor,
    gt_boxes: torch.Tensor,
    foreground: torch.Tensor,
    normalizer: torch.Tensor,
    loss_type: str = "smooth_l1",
    smooth_l1_beta: float = 0.0,
) -> torch.Tensor:
    """
    ``sum over foreground of boxloss_i / normalizer``.

    Args:
        pred_deltas, src_boxes, gt_boxes: as in :func:`box_regression_terms`, (S, 4).
        foreground: (S,) bool, the terms that count. ``gt_boxes`` elsewhere may be anything
            (detectron2 leaves them undefined, e.g. all zeros in images without annotations).
        normalizer: 0-dim tensor, ``max(P, 1) + eps`` or ``max(F, 1) + eps``.
    """
    # A box regressed onto itself has finite targets for every loss type; masking the terms
    # alone would not do: 0 * inf is NaN, and so is the gradient of a where() over an inf.
    gt_boxes = torch.where(foreground[:, None], gt_boxes, src_boxes)
    terms = box_regression_terms(
        box2box_transform, pred_deltas, src_boxes, gt_boxes, loss_type, smooth_l1_beta
    )
    return weighted_sum(terms, foreground.to(torch.float32), normalizer)


def mask_loss(
    mask_logits: torch.Tensor, gt_masks: torch.Tensor, normalizer: torch.Tensor
) -> torch.Tensor:
    """
    ``sum over masks of mean_over_pixels(BCEWithLogits) / normalizer``.

    Args:
        mask_logits: (S, M, M) logits of the gt class of each foreground proposal.
        gt_masks: (S, M, M) targets in [0, 1].
        normalizer: 0-dim tensor, ``max(F, 1) + eps``.
    """
    num_pixels = mask_logits.shape[-1] * mask_logits.shape[-2]
    # The pixel mean of every mask has the same denominator: one sum over all pixels suffices.
    total = F.binary_cross_entropy_with_logits(
        mask_logits.float(), gt_masks.to(torch.float32), reduction="sum"
    )
    return total / num_pixels / normalizer
