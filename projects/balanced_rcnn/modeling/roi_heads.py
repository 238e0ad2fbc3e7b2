"""
BalancedROIHeads: StandardROIHeads whose box predictor computes count-normalized losses.

Shape shorthand in this module:

    N: number of images in the minibatch
    R: number of sampled proposals, combined over all images
    F: number of foreground proposals among them (gt class in [0, K))
    K: number of foreground classes; class K is the background

    loss_cls     = ROI_LOSS_CLS_WEIGHT * sum_i w_i CE_i / (max(R, 1) + EPS)
    loss_box_reg = ROI_LOSS_BBOX_WEIGHT * sum_fg boxloss_i / (max(F, 1) + EPS)   "positives"
                                                      ... / (max(R, 1) + EPS)    "samples"

(REG_NORMALIZER picks the divisor; w_i = w_pos for foreground, 1 for background; counts,
running averages and w_pos as in modeling/losses.py). The mask loss is
BalancedMaskRCNNConvUpsampleHead's. Proposal sampling and inference are detectron2's; so are the
losses with REG_NORMALIZER "samples" and weights 1 (up to EPS; with several workers and
SYNC_NORMALIZERS, R is their mean where detectron2 divides by each worker's own).

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
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY
from detectron2.structures import Instances

from ..utils.events import put_tensor_scalars
from .checks import (
    balanced_loss_kwargs,
    check_balanced_loss_keys,
    check_box_reg_loss_type,
    refuse_stock_loss_weight,
)
from .losses import adaptive_pos_weight, box_regression_loss, classification_loss
from .mask_head import BalancedMaskRCNNConvUpsampleHead
from .normalizer import CountNormalizer

__all__ = ["BalancedFastRCNNOutputLayers", "BalancedROIHeads"]


def _refuse_unimplemented(use_sigmoid_ce: bool, use_fed_loss: bool) -> None:
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


def _check_box_predictor_config(cfg) -> None:
    check_balanced_loss_keys(
        cfg, "ROI_CLS_POS_WEIGHT", "ROI_LOSS_CLS_WEIGHT", "ROI_LOSS_BBOX_WEIGHT"
    )
    refuse_stock_loss_weight(
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT",
        cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT,
        "MODEL.BALANCED_LOSS.ROI_LOSS_BBOX_WEIGHT",
    )
    check_box_reg_loss_type(
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE
    )
    _refuse_unimplemented(
        cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE, cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS
    )


def _check_mask_head_config(cfg) -> None:
    if not cfg.MODEL.MASK_ON:
        return
    name = cfg.MODEL.ROI_MASK_HEAD.NAME
    head = ROI_MASK_HEAD_REGISTRY.get(name)
    if not (isinstance(head, type) and issubclass(head, BalancedMaskRCNNConvUpsampleHead)):
        raise ValueError(
            f"BalancedROIHeads needs a mask head that computes the balanced mask loss "
            f"(MODEL.BALANCED_LOSS.ROI_LOSS_MASK_WEIGHT): set MODEL.ROI_MASK_HEAD.NAME to "
            f"'BalancedMaskRCNNConvUpsampleHead' (or a subclass), got '{name}'"
        )


class BalancedFastRCNNOutputLayers(FastRCNNOutputLayers):
    """FastRCNNOutputLayers with count-normalized, foreground-upweighted losses."""

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        cls_pos_weight: float = 1.0,
        eps: float = 1e-6,
        sync_normalizers: bool = True,
        reg_normalizer: str = "positives",
        normalizer_momentum: float = 0.0,
        adaptive_pos_weight: bool = False,
        positive_fraction: float = 0.25,
        prior_prob: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            cls_pos_weight: weight of foreground proposals in loss_cls; background has 1. With
                ``adaptive_pos_weight``, the least weight of the foreground.
            eps: added to every normalizer.
            sync_normalizers: normalize by the counts averaged over workers.
            reg_normalizer: "positives" or "samples" (modeling/losses.py, REG_NORMALIZERS).
            normalizer_momentum: of the running average of the counts; 0: per-batch counts.
            adaptive_pos_weight: raise the foreground weight to fill ``positive_fraction``
                (modeling/losses.py, adaptive_pos_weight).
            positive_fraction: the proposal sampler's (MODEL.ROI_HEADS.POSITIVE_FRACTION).
            prior_prob: > 0: initialize the class biases so that every proposal starts at this
                probability of foreground (spread evenly over the K classes); 0: detectron2's
                initialization (biases 0).
            input_shape, kwargs: arguments of :class:`FastRCNNOutputLayers`; its
                ``loss_weight`` multiplies the losses. ``use_sigmoid_ce`` and ``use_fed_loss``
                are refused.
        """
        # Before the parent acts on them (use_fed_loss loads dataset statistics).
        _refuse_unimplemented(
            kwargs.get("use_sigmoid_ce", False), kwargs.get("use_fed_loss", False)
        )
        super().__init__(input_shape, **kwargs)
        self.cls_pos_weight = cls_pos_weight
        self.reg_normalizer = reg_normalizer
        self.adaptive_pos_weight = adaptive_pos_weight
        self.positive_fraction = positive_fraction
        self.prior_prob = prior_prob
        # Counts: sampled proposals R, foreground F.
        self.normalizer = CountNormalizer(
            2, eps=eps, sync=sync_normalizers, momentum=normalizer_momentum
        )
        self.init_class_prior()

    def init_class_prior(self) -> None:
        """With ``prior_prob`` p > 0: class biases log(p / K) and background bias log(1 - p), so
        that the softmax starts at these probabilities (Lin et al. 2017's prior, for a softmax)."""
        if self.prior_prob > 0:
            with torch.no_grad():
                self.cls_score.bias.fill_(math.log(self.prior_prob / self.num_classes))
                self.cls_score.bias[-1] = math.log(1.0 - self.prior_prob)

    @classmethod
    def from_config(cls, cfg, input_shape):
        _check_box_predictor_config(cfg)
        ret = super().from_config(cfg, input_shape)
        balanced = cfg.MODEL.BALANCED_LOSS
        ret["loss_weight"] = {
            "loss_cls": balanced.ROI_LOSS_CLS_WEIGHT,
            "loss_box_reg": balanced.ROI_LOSS_BBOX_WEIGHT,
        }
        ret["cls_pos_weight"] = balanced.ROI_CLS_POS_WEIGHT
        ret["positive_fraction"] = cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION
        ret.update(balanced_loss_kwargs(cfg))
        return ret

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
        cls_normalizer = normalizers[0]
        box_normalizer = normalizers[1] if self.reg_normalizer == "positives" else normalizers[0]
        pos_weight = self.cls_pos_weight
        if self.adaptive_pos_weight:
            pos_weight = adaptive_pos_weight(
                used_counts[1],
                used_counts[0] - used_counts[1],
                self.positive_fraction,
                self.cls_pos_weight,
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
                self.box2box_transform,
                fg_deltas,
                proposal_boxes,
                gt_boxes,
                foreground,
                box_normalizer,
                self.box_reg_loss_type,
                self.smooth_l1_beta,
            ),
        }
        self._log_stats(scores, gt_classes, foreground, counts, len(proposals))
        used = {"roi_head/cls_normalizer": cls_normalizer, "roi_head/box_normalizer": box_normalizer}
        if self.adaptive_pos_weight:
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


@ROI_HEADS_REGISTRY.register()
class BalancedROIHeads(StandardROIHeads):
    """
    StandardROIHeads with :class:`BalancedFastRCNNOutputLayers` as the box predictor. With
    MODEL.MASK_ON the mask head must be :class:`BalancedMaskRCNNConvUpsampleHead` (or a subclass).
    """

    # detectron2's scripting marks these constant on StandardROIHeads (torchscript_patch.py),
    # so that TorchScript leaves out the branches of disabled heads. Class annotations are not
    # inherited on Python >= 3.10: without these, scripting compiles the keypoint branch and
    # fails on the missing keypoint_pooler.
    mask_on: torch.jit.Final[bool]
    keypoint_on: torch.jit.Final[bool]

    @classmethod
    def from_config(cls, cfg, input_shape):
        # Refused before anything is built: _init_box_head builds the stock predictor first,
        # which would act on e.g. USE_FED_LOSS.
        _check_box_predictor_config(cfg)
        _check_mask_head_config(cfg)
        return super().from_config(cfg, input_shape)

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        stock_predictor = ret["box_predictor"]
        # Built without drawing random numbers and given the stock predictor's initial weights:
        # one seed then gives the same initial model as StandardROIHeads, for A/B comparisons.
        with torch.random.fork_rng(devices=[]):
            predictor = BalancedFastRCNNOutputLayers(cfg, ret["box_head"].output_shape)
        # Only the normalizer's running counts (NORMALIZER_MOMENTUM > 0) are the stock's lack.
        missing, unexpected = predictor.load_state_dict(stock_predictor.state_dict(), strict=False)
        assert not unexpected and all(k.startswith("normalizer.") for k in missing), missing
        predictor.init_class_prior()  # the stock biases were just copied over it
        ret["box_predictor"] = predictor
        return ret
