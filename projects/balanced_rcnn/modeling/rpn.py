"""
BalancedRPN: detectron2's RPN whose losses are normalized by the real anchor counts.

Shape shorthand in this module:

    N: number of images in the minibatch
    L: number of feature maps per image on which RPN is run
    Ri: number of anchors of feature map i (Hi * Wi * A); R = sum(Ri)
    B: MODEL.RPN.BATCH_SIZE_PER_IMAGE, the most anchors detectron2's sampler labels per image
    S: loss rows: N * B slots (the sampled anchors of every image, padded to B) after
       detectron2's sampler, N * R (every anchor) after any other labelling

Its losses, loss_rpn_cls and loss_rpn_loc, are written out in modeling/losses.py (P positive
and Q negative sampled anchors over the batch). Labelling, sampling and inference are
detectron2's; so is the loss with REG_NORMALIZER "samples", weights 1 and B anchors sampled in
every image (up to EPS; with several workers and SYNC_NORMALIZERS, P + Q is their mean).

Scalars put into EventStorage every step (``balanced_rcnn.utils.events.put_tensor_scalars``):

    rpn/num_pos_anchors   P per image on this worker (detectron2's name)
    rpn/num_neg_anchors   Q per image on this worker (detectron2's name)
    rpn/fg_fraction       P / max(P + Q, 1) on this worker
    rpn/cls_normalizer    the divisor of loss_rpn_cls as used
    rpn/loc_normalizer    the divisor of loss_rpn_loc as used
    rpn/pos_weight        w_pos as used (with ADAPTIVE_POS_WEIGHT)
"""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes, Instances

from ..utils.events import put_tensor_scalars
from .box_regression import box_loss_options
from .checks import check_rpn_config
from .losses import box_regression_loss, objectness_loss, prior_logit
from .settings import BalancedLossSettings, balanced_head_kwargs

__all__ = ["BalancedRPN"]


def _sampled_anchor_slots(
    gt_labels: List[torch.Tensor], max_per_image: int
) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """
    Indices of the sampled anchors (labels >= 0), B slots per image.

    Returns:
        (S,) bool, True for padding slots;
        N tensors of shape (B,): anchor indices in [0, R) of image i, padding slots at 0.
    """
    slots = []
    for labels_i in gt_labels:
        sampled = labels_i >= 0
        # A static size makes the indexing free of the device sync that nonzero() needs; the
        # bound (what detectron2's sampler guarantees) is checked without a sync either.
        # torch._assert_async is private, but PyTorch has no public assert on a tensor value
        # that does not wait for the device (torch._check / assert call bool() on it).
        torch._assert_async(
            sampled.sum() <= max_per_image,
            "BalancedRPN.losses: detectron2's sampler labelled more anchors in an image than "
            "batch_size_per_image; a labelling that does must not come from "
            "RPN.label_and_sample_anchors",
        )
        slots.append(torch.nonzero_static(sampled, size=max_per_image, fill_value=-1).squeeze(1))
    padding = torch.cat(slots) < 0
    return padding, [s.clamp(min=0) for s in slots]


def _gather_from_levels(
    per_level: List[torch.Tensor], image_idx: torch.Tensor, anchor_idx: torch.Tensor
) -> torch.Tensor:
    """
    Rows ``[image_idx, anchor_idx]`` of the level-concatenation of (N, Ri, ...) tensors, shape
    (S, ...), without concatenating (copying) all the levels as detectron2's losses do.
    """
    out = None
    start = 0
    for x in per_level:
        size = x.shape[1]
        if size == 0:
            continue
        rows = x[image_idx, (anchor_idx - start).clamp(0, size - 1)]
        if out is None:
            out = rows
        else:
            in_level = (anchor_idx >= start).view(-1, *([1] * (rows.dim() - 1)))
            out = torch.where(in_level, rows, out)
        start += size
    return out


def _anchor_tensors(anchors: List[Boxes]) -> List[torch.Tensor]:
    return [a.tensor if isinstance(a, Boxes) else a for a in anchors]


def _sampled_rows(anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes,
                  max_per_image: int):
    """The loss rows of the anchors that detectron2's sampler labelled: at most B per image."""
    num_images = len(gt_labels)
    padding, slots = _sampled_anchor_slots(gt_labels, max_per_image)
    anchor_idx = torch.cat(slots)
    image_idx = torch.arange(num_images, device=anchor_idx.device)
    image_idx = image_idx[:, None].expand(num_images, max_per_image).reshape(-1)  # (N,) -> (S,)

    labels = torch.cat([labels_i[s] for labels_i, s in zip(gt_labels, slots)])
    labels = torch.where(padding, -1, labels)
    matched_boxes = torch.cat([boxes_i[s] for boxes_i, s in zip(gt_boxes, slots)])
    logits = _gather_from_levels(pred_objectness_logits, image_idx, anchor_idx)
    deltas = _gather_from_levels(pred_anchor_deltas, image_idx, anchor_idx)
    anchor_boxes = _gather_from_levels(
        # (Ri, 4) -> (1, Ri, 4): every image shares the anchors
        [a.unsqueeze(0) for a in _anchor_tensors(anchors)], torch.zeros_like(image_idx), anchor_idx
    )
    return labels, logits, deltas, anchor_boxes, matched_boxes


def _all_rows(anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes):
    """The loss rows of every anchor of every image (any labelling, as detectron2's losses)."""
    num_images = len(gt_labels)
    anchor_boxes = torch.cat(_anchor_tensors(anchors))  # (R, 4)
    return (
        torch.cat(gt_labels),  # N x (R,) -> (N * R,)
        torch.cat(pred_objectness_logits, dim=1).reshape(-1),  # L x (N, Ri) -> (N * R,)
        torch.cat(pred_anchor_deltas, dim=1).reshape(-1, 4),  # L x (N, Ri, 4) -> (N * R, 4)
        anchor_boxes.repeat(num_images, 1),  # (R, 4) -> (N * R, 4)
        torch.cat(gt_boxes),  # N x (R, 4) -> (N * R, 4)
    )


@PROPOSAL_GENERATOR_REGISTRY.register()
class BalancedRPN(RPN):
    """RPN with count-normalized, foreground-upweighted losses (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        cls_pos_weight: float = 1.0,
        loss_settings: BalancedLossSettings = BalancedLossSettings(),
        **kwargs,
    ):
        """
        Args:
            cls_pos_weight: w_pos of positive anchors in loss_rpn_cls (negatives have 1); with
                ``loss_settings.adaptive_pos_weight``, the least w_pos.
            loss_settings: the MODEL.BALANCED_LOSS keys shared by the balanced heads; with
                ``prior_prob`` > 0 the objectness bias starts at that probability of an object.
            kwargs: arguments of :class:`RPN`. Its ``loss_weight`` multiplies the losses.
        """
        super().__init__(**kwargs)
        self.cls_pos_weight = cls_pos_weight
        self.loss_settings = loss_settings
        # Counts: sampled anchors P + Q, positives P, detectron2's divisor B * N.
        self.normalizer = loss_settings.count_normalizer(3)
        if loss_settings.prior_prob > 0:
            bias = getattr(self.rpn_head, "objectness_logits", None)
            if not isinstance(bias, torch.nn.Conv2d):
                raise ValueError(
                    "MODEL.BALANCED_LOSS.PRIOR_PROB needs an RPN head with an 'objectness_logits' "
                    f"convolution (StandardRPNHead), got {type(self.rpn_head).__name__}"
                )
            torch.nn.init.constant_(bias.bias, prior_logit(loss_settings.prior_prob))
        # The labels detectron2's sampler made in this step (see losses()).
        self._sampler_labels: Optional[List[torch.Tensor]] = None

    @classmethod
    def from_config(cls, cfg, input_shape):
        # Checked and read before detectron2's from_config builds the anchor generator and head.
        check_rpn_config(cfg)
        weights = {"loss_rpn_cls": "RPN_LOSS_CLS_WEIGHT", "loss_rpn_loc": "RPN_LOSS_BBOX_WEIGHT"}
        balanced = balanced_head_kwargs(cfg, "RPN_CLS_POS_WEIGHT", weights)
        return {**super().from_config(cfg, input_shape), **balanced}

    @torch.jit.unused
    @torch.no_grad()
    def label_and_sample_anchors(
        self, anchors: List[Boxes], gt_instances: List[Instances]
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """detectron2's labelling and sampling; remembers the labels, which hold at most B
        sampled anchors per image, so that losses() can gather just those (see there)."""
        gt_labels, matched_gt_boxes = super().label_and_sample_anchors(anchors, gt_instances)
        self._sampler_labels = gt_labels
        return gt_labels, matched_gt_boxes

    @torch.jit.unused
    def losses(
        self,
        anchors: List[Boxes],
        pred_objectness_logits: List[torch.Tensor],
        gt_labels: List[torch.Tensor],
        pred_anchor_deltas: List[torch.Tensor],
        gt_boxes: List[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """
        Args (as :meth:`RPN.losses`):
            anchors: L Boxes (or tensors) of shape (Ri, 4).
            pred_objectness_logits: L tensors of shape (N, Ri).
            gt_labels: N tensors of shape (R,) in {-1, 0, 1}.
            pred_anchor_deltas: L tensors of shape (N, Ri, 4).
            gt_boxes: N tensors of shape (R, 4), used where the label is 1.

        Any labelling is accepted, as by detectron2. When ``gt_labels`` are the very tensors that
        detectron2's sampler made in this step (at most B labelled anchors per image), only
        those anchors are gathered, into B static slots per image (no host sync, a fraction of
        the work); any other labelling (a subclass's sampler, sampling-free training) takes the
        loss over all anchors.

        Returns:
            dict with ``loss_rpn_cls`` and ``loss_rpn_loc``.
        """
        sampler_labels, self._sampler_labels = self._sampler_labels, None
        from_sampler = sampler_labels is not None and len(sampler_labels) == len(gt_labels) and all(
            a is b for a, b in zip(sampler_labels, gt_labels)
        )
        inputs = (anchors, pred_objectness_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        if from_sampler:
            rows = _sampled_rows(*inputs, max_per_image=self.batch_size_per_image)
        else:
            rows = _all_rows(*inputs)
        labels, logits, deltas, anchor_boxes, matched_boxes = rows

        num_images = len(gt_labels)
        positive = labels == 1
        num_sampled = (labels >= 0).sum()
        num_pos = positive.sum()
        stock_divisor = torch.full_like(num_pos, self.batch_size_per_image * num_images)
        counts, normalizers = self.normalizer(torch.stack([num_sampled, num_pos, stock_divisor]))
        settings = self.loss_settings
        cls_normalizer = normalizers[0]
        loc_normalizer = settings.reg_divisor(positives=normalizers[1], samples=normalizers[2])
        pos_weight = settings.positive_weight(
            self.cls_pos_weight, counts[1], counts[0] - counts[1], self.positive_fraction
        )
        losses = {
            "loss_rpn_cls": objectness_loss(logits, labels, pos_weight, cls_normalizer),
            "loss_rpn_loc": box_regression_loss(
                self.box2box_transform, deltas, anchor_boxes, matched_boxes, positive,
                loc_normalizer, **box_loss_options(self)
            ),
        }
        scalars = {
            "rpn/num_pos_anchors": num_pos / num_images,
            "rpn/num_neg_anchors": (num_sampled - num_pos) / num_images,
            "rpn/fg_fraction": num_pos / num_sampled.clamp(min=1),
            "rpn/cls_normalizer": cls_normalizer,
            "rpn/loc_normalizer": loc_normalizer,
        }
        if settings.adaptive_pos_weight:
            scalars["rpn/pos_weight"] = pos_weight
        put_tensor_scalars(**scalars)
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}
