"""
BalancedFastRCNNOutputLayers: detectron2's box predictor whose losses are normalized by the real
proposal counts.

Shape shorthand in this module:

    N: number of images in the minibatch
    R: number of sampled proposals, combined over all images
    F: number of foreground proposals among them (gt class in [0, K))
    K: number of foreground classes; class K is the background

Its losses, loss_cls and loss_box_reg, are written out in modeling/losses.py. Inference is
detectron2's; so are the losses with REG_NORMALIZER "samples" and weights 1 (up to EPS; with
several workers and SYNC_NORMALIZERS, R is their mean where detectron2 divides by each worker's
own).

Scalars put into EventStorage every step (``balanced_rcnn.utils.events.put_tensor_scalars``):

    roi_head/num_sampled        R per image on this worker
    roi_head/num_fg             F per image on this worker
    roi_head/fg_fraction        F / max(R, 1) on this worker
    roi_head/cls_normalizer     the divisor of loss_cls as used
    roi_head/box_normalizer     the divisor of loss_box_reg as used
    roi_head/pos_weight         w_pos as used (with ADAPTIVE_POS_WEIGHT)
    fast_rcnn/cls_accuracy      detectron2's name and definition
    fast_rcnn/fg_cls_accuracy   detectron2's, but 0 (not absent) when F = 0
    fast_rcnn/false_negative    detectron2's, but 0 (not absent) when F = 0

detectron2's label_and_sample_proposals still logs roi_head/num_fg_samples and
roi_head/num_bg_samples itself.
"""

import math
from typing import Dict, List, Tuple

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Instances

from ..utils.events import put_tensor_scalars
from .box_regression import box_loss_options
from .checks import check_box_predictor_config
from .losses import box_regression_loss, classification_loss
from .settings import BalancedLossSettings, balanced_head_kwargs

__all__ = ["BalancedFastRCNNOutputLayers", "refuse_unimplemented_options"]


def refuse_unimplemented_options(use_sigmoid_ce: bool, use_fed_loss: bool) -> None:
    if use_sigmoid_ce:
        raise ValueError(
            "The balanced box head implements the softmax cross-entropy only: set "
            "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE (use_sigmoid_ce) to False"
        )
    if use_fed_loss:
        raise ValueError(
            "The balanced box head does not implement the federated loss: set "
            "MODEL.ROI_BOX_HEAD.USE_FED_LOSS (use_fed_loss) to False"
        )


class BalancedFastRCNNOutputLayers(FastRCNNOutputLayers):
    """FastRCNNOutputLayers with count-normalized, foreground-upweighted losses."""

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        cls_pos_weight: float = 1.0,
        positive_fraction: float = 0.25,
        loss_settings: BalancedLossSettings = BalancedLossSettings(),
        **kwargs,
    ):
        """
        Args:
            cls_pos_weight: w_pos of foreground proposals in loss_cls (background has 1); with
                ``loss_settings.adaptive_pos_weight``, the least w_pos.
            positive_fraction: the proposal sampler's (MODEL.ROI_HEADS.POSITIVE_FRACTION), the
                foreground share of the weight that the adaptive w_pos fills.
            loss_settings: the MODEL.BALANCED_LOSS keys shared by the balanced heads; with
                ``prior_prob`` > 0 the class biases start at that probability of foreground.
            input_shape, kwargs: arguments of :class:`FastRCNNOutputLayers`; its
                ``loss_weight`` multiplies the losses. ``use_sigmoid_ce`` and ``use_fed_loss``
                are refused.
        """
        # Before the parent acts on them (use_fed_loss loads dataset statistics).
        refuse_unimplemented_options(
            kwargs.get("use_sigmoid_ce", False), kwargs.get("use_fed_loss", False)
        )
        super().__init__(input_shape, **kwargs)
        self.cls_pos_weight = cls_pos_weight
        self.positive_fraction = positive_fraction
        self.loss_settings = loss_settings
        # Counts: sampled proposals R, foreground F.
        self.normalizer = loss_settings.count_normalizer(2)
        self.init_class_prior()

    def init_class_prior(self) -> None:
        """With PRIOR_PROB > 0 the class biases of modeling/losses.py's docstring, so that the
        softmax starts at that foreground probability spread evenly over the K classes."""
        prior_prob = self.loss_settings.prior_prob
        if prior_prob > 0:
            with torch.no_grad():
                self.cls_score.bias.fill_(math.log(prior_prob / self.num_classes))
                self.cls_score.bias[-1] = math.log(1.0 - prior_prob)

    @classmethod
    def from_config(cls, cfg, input_shape):
        check_box_predictor_config(cfg)
        weights = {"loss_cls": "ROI_LOSS_CLS_WEIGHT", "loss_box_reg": "ROI_LOSS_BBOX_WEIGHT"}
        balanced = balanced_head_kwargs(cfg, "ROI_CLS_POS_WEIGHT", weights)
        ret = super().from_config(cfg, input_shape)
        return {**ret, **balanced, "positive_fraction": cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION}

    def losses(
        self, predictions: Tuple[torch.Tensor, torch.Tensor], proposals: List[Instances]
    ) -> Dict[str, torch.Tensor]:
        """
        Args (as :meth:`FastRCNNOutputLayers.losses`):
            predictions: scores (R, K + 1) and deltas (R, K * 4) or (R, 4) from :meth:`forward`.
            proposals: N Instances with ``proposal_boxes``, ``gt_classes`` and, in images
                with annotations, ``gt_boxes``.

        Returns:
            dict with ``loss_cls`` and ``loss_box_reg``.
        """
        scores, proposal_deltas = predictions
        device = scores.device
        if proposals:
            gt_classes = cat([p.gt_classes for p in proposals], dim=0)
            proposal_boxes = cat([p.proposal_boxes.tensor for p in proposals], dim=0)
            assert not proposal_boxes.requires_grad, "Proposals should not require gradients!"
            # Images without annotations have no gt_boxes: their proposals are all background
            # and the placeholder is never regressed onto.
            gt_boxes = cat(
                [(p.gt_boxes if p.has("gt_boxes") else p.proposal_boxes).tensor for p in proposals],
                dim=0,
            )
        else:
            gt_classes = torch.empty(0, dtype=torch.int64, device=device)
            proposal_boxes = gt_boxes = torch.empty((0, 4), device=device)

        num_rois = gt_classes.numel()
        # gt classes are cross-entropy targets, so in [0, K]; K is the background.
        foreground = gt_classes < self.num_classes
        num_fg = foreground.sum(dtype=torch.float32)
        counts = torch.stack([torch.full_like(num_fg, num_rois), num_fg])
        used_counts, normalizers = self.normalizer(counts)
        settings = self.loss_settings
        cls_normalizer = normalizers[0]
        box_normalizer = settings.reg_divisor(positives=normalizers[1], samples=normalizers[0])
        pos_weight = settings.positive_weight(
            self.cls_pos_weight, used_counts[1], used_counts[0] - used_counts[1],
            self.positive_fraction,
        )

        box_dim = proposal_boxes.shape[1]
        if proposal_deltas.shape[1] == box_dim:  # class-agnostic
            fg_deltas = proposal_deltas
        else:
            # (R, K * 4) -> (R * K, 4) -> (R, 4): the deltas of each row's gt class; background
            # rows read class K - 1 and get weight 0.
            rows = torch.arange(num_rois, device=device) * self.num_classes
            rows += gt_classes.clamp(max=self.num_classes - 1)
            fg_deltas = proposal_deltas.view(-1, box_dim).index_select(0, rows)

        losses = {
            "loss_cls": classification_loss(scores, gt_classes, pos_weight, cls_normalizer),
            "loss_box_reg": box_regression_loss(
                self.box2box_transform, fg_deltas, proposal_boxes, gt_boxes, foreground,
                box_normalizer, **box_loss_options(self)
            ),
        }
        self._log_stats(scores, gt_classes, foreground, counts, len(proposals))
        used = {"roi_head/cls_normalizer": cls_normalizer,
                "roi_head/box_normalizer": box_normalizer}
        if settings.adaptive_pos_weight:
            used["roi_head/pos_weight"] = pos_weight
        put_tensor_scalars(**used)
        return {k: v * self.loss_weight.get(k, 1.0) for k, v in losses.items()}

    def _log_stats(
        self,
        scores: torch.Tensor,
        gt_classes: torch.Tensor,
        foreground: torch.Tensor,
        counts: torch.Tensor,
        num_images: int,
    ) -> None:
        """detectron2's classification statistics and the sample counts."""
        # max().indices: the same first maximum as argmax(), faster on the CPU
        pred_classes = scores.detach().max(dim=1).indices
        correct = pred_classes == gt_classes
        # (3, R) -> (3,): accurate, accurate foreground, foreground predicted as background
        hits = torch.stack(
            [correct, correct & foreground, (pred_classes == self.num_classes) & foreground]
        ).sum(dim=1)
        at_least_one_roi, at_least_one_fg = counts.clamp(min=1)
        fg_rates = hits[1:] / at_least_one_fg
        per_image = counts / max(num_images, 1)
        put_tensor_scalars(
            **{
                "roi_head/num_sampled": per_image[0],
                "roi_head/num_fg": per_image[1],
                "roi_head/fg_fraction": counts[1] / at_least_one_roi,
                "fast_rcnn/cls_accuracy": hits[0] / at_least_one_roi,
                "fast_rcnn/fg_cls_accuracy": fg_rates[0],
                "fast_rcnn/false_negative": fg_rates[1],
            }
        )
