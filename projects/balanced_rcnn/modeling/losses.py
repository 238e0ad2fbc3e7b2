"""
Balanced losses: sum-reduced, normalized by real sample counts, foreground upweighted. This
docstring is where their formulas are written out; the heads, the config comments and the docs
point here.

Shape shorthand in this module:

    S: number of loss terms (sampled anchors, sampled proposals or foreground masks)
    C: number of counts normalized together (one collective for all of them)
    K: number of foreground classes; class K is the background
    M: side of the square mask predictions

The losses of one worker, each over its whole batch (all images, all FPN levels); upper-case
names are MODEL.BALANCED_LOSS keys:

    loss_rpn_cls = RPN_LOSS_CLS_WEIGHT  * sum_sampled w_i BCE(logit_i, label_i) / norm(P + Q)
    loss_rpn_loc = RPN_LOSS_BBOX_WEIGHT * sum_positives boxloss_i / norm(P)       "positives"
                                                            ... / norm(B * N)     "samples"
    loss_cls     = ROI_LOSS_CLS_WEIGHT  * sum_i w_i CE(scores_i, gt_i) / norm(R)
    loss_box_reg = ROI_LOSS_BBOX_WEIGHT * sum_foreground boxloss_i / norm(F)      "positives"
                                                             ... / norm(R)        "samples"
    loss_mask    = ROI_LOSS_MASK_WEIGHT * sum_masks mean_pixels BCE(mask_i, gt_i) / norm(F)

RPN: P positive and Q negative anchors after detectron2's labelling and sampling, N images,
B = MODEL.RPN.BATCH_SIZE_PER_IMAGE. ROI heads: R sampled proposals, F of them foreground (gt
class < K), the proposals the mask head predicts masks for. "positives" / "samples": the value of
REG_NORMALIZER. w_i = w_pos for positive anchors and foreground proposals, 1 for the others.
boxloss_i: detectron2's per-box term (BBOX_REG_LOSS_TYPE, SMOOTH_L1_BETA; box_regression.py).

From a count X of this worker's batch to its normalizer, and the weight w_pos; each step
optional:

    X_w     = mean of X over workers                                  SYNC_NORMALIZERS
    X_t     = m * X_{t-1} + (1 - m) * X_w    (X_0: the first batch)   NORMALIZER_MOMENTUM m
    norm(X) = max(X_t, 1) + EPS
    w_pos   = max(POS_WEIGHT, f / (1 - f) * Q_t / max(P_t, 1))        ADAPTIVE_POS_WEIGHT

(POS_WEIGHT: RPN_CLS_POS_WEIGHT or ROI_CLS_POS_WEIGHT, w_pos itself without ADAPTIVE_POS_WEIGHT;
P, Q: the head's positive and negative counts, Q = R - F in the ROI heads; f: the sampler's
POSITIVE_FRACTION.) Counts are unweighted: a w_pos above 1 makes the classification loss larger.
With PRIOR_PROB p > 0 the classifiers start at probability p of foreground (Lin et al., Focal
Loss, 2017): RPN objectness bias log(p / (1 - p)); ROI class biases log(p / K), background bias
log(1 - p).

With one worker, per-batch counts and every weight 1, against detectron2's heads (tested):
loss_rpn_cls = stock * B * N / max(P + Q, 1), loss_rpn_loc = stock * B * N / max(P, 1) and
loss_box_reg = stock * R / max(F, 1) up to EPS; loss_cls and loss_mask are stock's. With
REG_NORMALIZER "samples" and B anchors sampled in every image every loss is stock's (with several
workers and SYNC_NORMALIZERS the counts are their mean, where detectron2 divides by its own).

Every loss has three layers (as in mmdetection): an element-wise term with no reduction, a
weighted sum divided by a normalizer, and the head that picks weights and normalizers. Where
PyTorch's loss kernel takes the weights itself (BCE, cross-entropy) the first two are fused.
Normalizers and weights are tensors made from sample counts by the functions of the first section
(modeling/normalizer.py chains them per head), so nothing here waits for the device. Terms are
computed in float32 whatever the dtype of the predictions (AMP).
"""

import math
from typing import Union

import torch
import torch.distributed as dist
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.utils import comm
from torch.nn import functional as F

# The per-box regression terms live in box_regression.py; importable from here as before.
from .box_regression import (
    BOX_REG_LOSS_TYPES,
    box_regression_terms,
    encode_box_deltas,
    iou_loss_terms,
)

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
    ``X_t`` of the module docstring, elementwise; where ``previous`` is negative (no batch seen
    yet) the result is ``counts``. As detectron2's RetinaNet/FCOS smooth their foreground count
    (``_ema_update``, momentum 0.9), without its host synchronization.
    """
    smoothed = momentum * previous + (1.0 - momentum) * counts
    return torch.where(previous < 0, counts, smoothed)


def count_normalizers(counts: torch.Tensor, eps: float, sync: bool = True) -> torch.Tensor:
    """
    Counts -> loss normalizers ``norm`` of the module docstring (without a running average).

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
    ``w_pos`` of the module docstring with ADAPTIVE_POS_WEIGHT: the weight of each positive that
    gives the positives the share of the total weight that the sampler aims for
    (``positive_fraction``, detectron2's POSITIVE_FRACTION) when there are too few of them to fill
    it, and never less than ``min_weight``. The class-balancing weight of Xie & Tu (HED, ICCV
    2015) with the sampler's target in place of 1/2. 0-dim tensors in and out.
    """
    assert 0.0 < positive_fraction < 1.0, positive_fraction  # checked at build time
    ratio = positive_fraction / (1.0 - positive_fraction)
    return (ratio * num_neg / num_pos.clamp(min=1.0)).clamp(min=min_weight)


def prior_logit(prior_prob: float) -> float:
    """The bias that makes a sigmoid start at probability ``prior_prob`` (PRIOR_PROB in the
    module docstring)."""
    return math.log(prior_prob / (1.0 - prior_prob))


# ---- losses ------------------------------------------------------------------------------------


def weighted_sum(
    terms: torch.Tensor, weight: torch.Tensor, normalizer: torch.Tensor
) -> torch.Tensor:
    """``sum(weight * terms) / normalizer`` for (S,) terms and weights; a 0-dim float32 tensor."""
    assert terms.dim() == 1 and terms.shape == weight.shape, (terms.shape, weight.shape)
    # Not torch.dot: autocast may run matrix products in half precision.
    return (terms * weight).sum() / normalizer


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
        normalizer: 0-dim tensor, the divisor of loss_rpn_cls (module docstring).
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
        normalizer: 0-dim tensor, the divisor of loss_cls (module docstring).
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
    box2box_transform: Box2BoxTransform, pred_deltas: torch.Tensor, src_boxes: torch.Tensor,
    gt_boxes: torch.Tensor, foreground: torch.Tensor, normalizer: torch.Tensor, *,
    loss_type: str = "smooth_l1", smooth_l1_beta: float = 0.0,
) -> torch.Tensor:
    """
    ``sum over foreground of boxloss_i / normalizer``.

    Args:
        pred_deltas, src_boxes, gt_boxes: as in :func:`box_regression_terms`, (S, 4).
        foreground: (S,) bool, the terms that count. ``gt_boxes`` elsewhere may be anything
            (detectron2 leaves them undefined, e.g. all zeros in images without annotations).
        normalizer: 0-dim tensor, the divisor of loss_rpn_loc or loss_box_reg (module docstring).
        loss_type, smooth_l1_beta: as in :func:`box_regression_terms`.
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
        normalizer: 0-dim tensor, the divisor of loss_mask (module docstring).
    """
    num_pixels = mask_logits.shape[-1] * mask_logits.shape[-2]
    # The pixel mean of every mask has the same denominator: one sum over all pixels suffices.
    total = F.binary_cross_entropy_with_logits(
        mask_logits.float(), gt_masks.to(torch.float32), reduction="sum"
    )
    return total / num_pixels / normalizer
