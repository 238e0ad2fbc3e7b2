"""
BalancedRPN: detectron2's RPN whose losses are normalized by the real anchor counts.

Shape shorthand in this module:

    N: number of images in the minibatch
    L: number of feature maps per image on which RPN is run
    Ri: number of anchors of feature map i (Hi * Wi * A); R = sum(Ri)
    B: MODEL.RPN.BATCH_SIZE_PER_IMAGE, the most anchors sampled per image
    S: N * B loss slots, the sampled anchors of every image padded to B

With P positive and Q negative sampled anchors over the batch:

    loss_rpn_cls = RPN_LOSS_CLS_WEIGHT * sum_i w_i BCE_i / (max(P + Q, 1) + EPS)
    loss_rpn_loc = RPN_LOSS_BBOX_WEIGHT * sum_pos boxloss_i / (max(P, 1) + EPS)

(w_i = RPN_CLS_POS_WEIGHT for positives, 1 for negatives; P and Q are means over workers with
SYNC_NORMALIZERS). Labelling, sampling and inference are detectron2's.

Scalars put into EventStorage every step (``balanced_rcnn.utils.events.put_tensor_scalars``):

    rpn/num_pos_anchors   P per image on this worker (detectron2's name)
    rpn/num_neg_anchors   Q per image on this worker (detectron2's name)
    rpn/fg_fraction       P / max(P + Q, 1) on this worker
    rpn/cls_normalizer    max(P + Q, 1) + EPS as used
    rpn/loc_normalizer    max(P, 1) + EPS as used
"""

from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling.proposal_generator.build import PROPOSAL_GENERATOR_REGISTRY
from detectron2.modeling.proposal_generator.rpn import RPN
from detectron2.structures import Boxes

from ..utils.events import put_tensor_scalars
from .checks import check_balanced_loss_keys, check_box_reg_loss_type, refuse_stock_loss_weight
from .losses import box_regression_loss, count_normalizers, objectness_loss

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
        # detectron2's label_and_sample_anchors keeps at most B anchors per image. A static
        # size makes the indexing free of the device sync that nonzero() needs; the bound is
        # checked without a sync either.
        torch._assert_async(
            sampled.sum() <= max_per_image,
            "BalancedRPN.losses: more sampled anchors in an image than batch_size_per_image",
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


@PROPOSAL_GENERATOR_REGISTRY.register()
class BalancedRPN(RPN):
    """RPN with count-normalized, foreground-upweighted losses (see the module docstring)."""

    @configurable
    def __init__(
        self,
        *,
        cls_pos_weight: float = 1.0,
        eps: float = 1e-6,
        sync_normalizers: bool = True,
        **kwargs,
    ):
        """
        Args:
            cls_pos_weight: weight of positive anchors in loss_rpn_cls; negatives have 1.
            eps: added to every normalizer.
            sync_normalizers: normalize by the counts averaged over workers.
            kwargs: arguments of :class:`RPN`. Its ``loss_weight`` multiplies the losses.
        """
        super().__init__(**kwargs)
        self.cls_pos_weight = cls_pos_weight
        self.eps = eps
        self.sync_normalizers = sync_normalizers

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_balanced_loss_keys(
            cfg, "RPN_CLS_POS_WEIGHT", "RPN_LOSS_CLS_WEIGHT", "RPN_LOSS_BBOX_WEIGHT"
        )
        refuse_stock_loss_weight(
            "MODEL.RPN.LOSS_WEIGHT",
            cfg.MODEL.RPN.LOSS_WEIGHT,
            "MODEL.BALANCED_LOSS.RPN_LOSS_CLS_WEIGHT and MODEL.BALANCED_LOSS.RPN_LOSS_BBOX_WEIGHT",
        )
        refuse_stock_loss_weight(
            "MODEL.RPN.BBOX_REG_LOSS_WEIGHT",
            cfg.MODEL.RPN.BBOX_REG_LOSS_WEIGHT,
            "MODEL.BALANCED_LOSS.RPN_LOSS_BBOX_WEIGHT",
        )
        check_box_reg_loss_type("MODEL.RPN.BBOX_REG_LOSS_TYPE", cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE)
        ret = super().from_config(cfg, input_shape)
        balanced = cfg.MODEL.BALANCED_LOSS
        ret["loss_weight"] = {
            "loss_rpn_cls": balanced.RPN_LOSS_CLS_WEIGHT,
            "loss_rpn_loc": balanced.RPN_LOSS_BBOX_WEIGHT,
        }
        ret["cls_pos_weight"] = balanced.RPN_CLS_POS_WEIGHT
        ret["eps"] = balanced.EPS
        ret["sync_normalizers"] = balanced.SYNC_NORMALIZERS
        return ret

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
            gt_labels: N tensors of shape (R,) in {-1, 0, 1}, at most B of them >= 0.
            pred_anchor_deltas: L tensors of shape (N, Ri, 4).
            gt_boxes: N tensors of shape (R, 4), used where the label is 1.

        Returns:
            dict with ``loss_rpn_cls`` and ``loss_rpn_loc``.
        """
        num_images = len(gt_labels)
        per_image = self.batch_size_per_image
        padding, slots = _sampled_anchor_slots(gt_labels, per_image)
        anchor_idx = torch.cat(slots)
        image_idx = torch.arange(num_images, device=anchor_idx.device)
        image_idx = image_idx[:, None].expand(num_images, per_image).reshape(-1)  # (N,) -> (S,)

        labels = torch.cat([labels_i[s] for labels_i, s in zip(gt_labels, slots)])
        labels = torch.where(padding, -1, labels)
        matched_boxes = torch.cat([boxes_i[s] for boxes_i, s in zip(gt_boxes, slots)])
        logits = _gather_from_levels(pred_objectness_logits, image_idx, anchor_idx)
        deltas = _gather_from_levels(pred_anchor_deltas, image_idx, anchor_idx)
        anchor_boxes = _gather_from_levels(
            # (Ri, 4) -> (1, Ri, 4): every image shares the anchors
            [(a.tensor if isinstance(a, Boxes) else a).unsqueeze(0) for a in anchors],
            torch.zeros_like(image_idx),
            anchor_idx,
        )

        positive = labels == 1
        num_sampled = (labels >= 0).sum()
        num_pos = positive.sum()
        cls_normalizer, loc_normalizer = count_normalizers(
            torch.stack([num_sampled, num_pos]), self.eps, self.sync_normalizers
        )
        losses = {
            "loss_rpn_cls": objectness_loss(logits, labels, self.cls_pos_weight, cls_normalizer),
            "loss_rpn_loc": box_regression_loss(
                self.box2box_transform,
                deltas,
                anchor_boxes,
                matched_boxes,
                positive,
                loc_normalizer,
                self.box_reg_loss_type,
                self.smooth_l1_beta,
            ),
        }
        put_tensor_scalars(
            **{
                "rpn/num_pos_anchors": num_pos / num_images,
                "rpn/num_neg_anchors": (num_sampled - num_pos) / num_images,
                "rpn/fg_fraction": num_pos / num_sampled.clamp(min=1),
                "rpn/cls_normalizer": cls_normalizer,
                "rpn/loc_normalizer": loc_normalizer,
            }
        )
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}
