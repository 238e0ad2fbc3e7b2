"""
BalancedMaskRCNNConvUpsampleHead: detectron2's mask head with the count-normalized mask loss.

Shape shorthand in this module:

    F: number of foreground proposals in the minibatch (the masks the head predicts)
    C: number of mask classes (K, or 1 for class-agnostic masks)
    M: side of the square mask predictions (28 by default)

Its loss, loss_mask, is written out in modeling/losses.py (REG_NORMALIZER does not apply: the
loss is a mean over masks either way). With one worker, per-batch counts and weight 1 it equals
detectron2's mask_rcnn_loss up to EPS. Inference is detectron2's.

Scalars put into EventStorage every step (``balanced_rcnn.utils.events.put_tensor_scalars``):

    mask/normalizer            the divisor of loss_mask as used
    mask_rcnn/accuracy         pixel accuracy at logit 0 (detectron2's name and definition)
    mask_rcnn/false_positive   detectron2's name and definition
    mask_rcnn/false_negative   detectron2's name and definition
"""

from typing import List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.roi_heads.mask_head import (
    ROI_MASK_HEAD_REGISTRY,
    MaskRCNNConvUpsampleHead,
    mask_rcnn_inference,
)
from detectron2.structures import Instances

from ..utils.events import current_storage, put_tensor_scalars
from .checks import check_balanced_loss_weights, check_momentum
from .losses import mask_loss
from .normalizer import normalize_counts, unset_running_counts
from .settings import BalancedLossSettings

__all__ = ["BalancedMaskRCNNConvUpsampleHead", "balanced_mask_rcnn_loss"]


def _mask_targets(pred_mask_logits: torch.Tensor, instances: List[Instances]):
    """
    The logits of each proposal's gt class and its gt mask cropped to the proposal box, both
    (F, M, M), exactly as detectron2's mask_rcnn_loss builds them.
    """
    mask_side_len = pred_mask_logits.size(2)
    assert pred_mask_logits.size(2) == pred_mask_logits.size(3), "Mask prediction must be square!"
    gt_classes = []
    gt_masks = []
    for instances_per_image in instances:
        if len(instances_per_image) == 0:
            continue
        gt_classes.append(instances_per_image.gt_classes.to(dtype=torch.int64))
        gt_masks.append(
            # (Fi, M, M)
            instances_per_image.gt_masks.crop_and_resize(
                instances_per_image.proposal_boxes.tensor, mask_side_len
            ).to(device=pred_mask_logits.device)
        )
    if not gt_masks:
        empty = pred_mask_logits[:, 0]  # (0, M, M), still part of the graph
        return empty, torch.zeros_like(empty, dtype=torch.bool)

    gt_masks = cat(gt_masks, dim=0)
    if pred_mask_logits.size(1) == 1:  # class-agnostic
        logits = pred_mask_logits[:, 0]
    else:
        indices = torch.arange(pred_mask_logits.size(0), device=pred_mask_logits.device)
        logits = pred_mask_logits[indices, cat(gt_classes, dim=0)]
    return logits, gt_masks


def _log_mask_stats(logits: torch.Tensor, gt_masks: torch.Tensor, normalizer: torch.Tensor):
    gt_bool = gt_masks if gt_masks.dtype == torch.bool else gt_masks > 0.5
    incorrect = (logits > 0.0) != gt_bool
    num_pixels = incorrect.numel()
    num_positive = gt_bool.sum()
    put_tensor_scalars(
        **{
            "mask/normalizer": normalizer,
            "mask_rcnn/accuracy": 1 - incorrect.sum() / max(num_pixels, 1),
            "mask_rcnn/false_positive": (incorrect & ~gt_bool).sum()
            / (num_pixels - num_positive).clamp(min=1),
            "mask_rcnn/false_negative": (incorrect & gt_bool).sum() / num_positive.clamp(min=1),
        }
    )


def _visualize(logits: torch.Tensor, gt_masks: torch.Tensor, vis_period: int):
    """detectron2's mask_rcnn_loss visualization, every ``vis_period`` iterations."""
    storage = current_storage() if vis_period > 0 else None
    if storage is not None and storage.iter % vis_period == 0:
        vis_masks = torch.cat([logits.sigmoid(), gt_masks.to(torch.float32)], axis=2)
        name = "Left: mask prediction;   Right: mask GT"
        for idx, vis_mask in enumerate(vis_masks):
            storage.put_image(name + f" ({idx})", torch.stack([vis_mask] * 3, axis=0))


@torch.jit.unused
def balanced_mask_rcnn_loss(
    pred_mask_logits: torch.Tensor,
    instances: List[Instances],
    *,
    eps: float = 1e-6,
    sync_normalizers: bool = True,
    normalizer_momentum: float = 0.0,
    running_counts: Optional[torch.Tensor] = None,
    vis_period: int = 0,
) -> torch.Tensor:
    """
    The balanced mask loss (without its weight); arguments as detectron2's mask_rcnn_loss.

    Args:
        pred_mask_logits: (F, C, M, M) mask logits of the foreground proposals.
        instances: N Instances with ``proposal_boxes``, ``gt_classes``, ``gt_masks``, in 1:1
            correspondence with ``pred_mask_logits``.
        eps, sync_normalizers, normalizer_momentum, running_counts: the normalizer's settings
            and, with a momentum, its (1,) running count (modeling/normalizer.py).
        vis_period: put predicted and gt masks into EventStorage every that many iterations.
    """
    logits, gt_masks = _mask_targets(pred_mask_logits, instances)
    num_fg = torch.full((1,), logits.shape[0], dtype=torch.float32, device=logits.device)
    normalizer = normalize_counts(num_fg, eps=eps, sync=sync_normalizers,
                                  momentum=normalizer_momentum, running=running_counts)[1][0]
    _log_mask_stats(logits, gt_masks, normalizer)
    _visualize(logits, gt_masks, vis_period)
    return mask_loss(logits, gt_masks, normalizer)


@ROI_MASK_HEAD_REGISTRY.register()
class BalancedMaskRCNNConvUpsampleHead(MaskRCNNConvUpsampleHead):
    """MaskRCNNConvUpsampleHead whose training forward computes the balanced mask loss."""

    @configurable
    def __init__(
        self,
        input_shape,
        *,
        loss_settings: BalancedLossSettings = BalancedLossSettings(),
        **kwargs,
    ):
        """
        Args:
            loss_settings: the MODEL.BALANCED_LOSS keys shared by the balanced heads (this head
                uses EPS, SYNC_NORMALIZERS and NORMALIZER_MOMENTUM).
            input_shape, kwargs: arguments of :class:`MaskRCNNConvUpsampleHead`; its
                ``loss_weight`` multiplies the loss.
        """
        super().__init__(input_shape, **kwargs)
        check_momentum(loss_settings.normalizer_momentum)
        self.loss_settings = loss_settings
        if loss_settings.normalizer_momentum > 0:
            # A buffer of the head, not a submodule: the head is an nn.Sequential whose every
            # child is a layer (what TorchScript and detectron2's layers() rely on).
            self.register_buffer("normalizer_running_counts", unset_running_counts(1))

    @classmethod
    def from_config(cls, cfg, input_shape):
        loss_settings = BalancedLossSettings.from_config(cfg)  # refuses a config without it
        balanced = cfg.MODEL.BALANCED_LOSS
        check_balanced_loss_weights(balanced, "ROI_LOSS_MASK_WEIGHT")
        ret = super().from_config(cfg, input_shape)
        ret["loss_weight"] = balanced.ROI_LOSS_MASK_WEIGHT
        ret["loss_settings"] = loss_settings
        return ret

    def forward(self, x, instances: List[Instances]):
        """
        Args (as :meth:`BaseMaskRCNNHead.forward`):
            x: (F, channels, Hp, Wp) region features.
            instances: in training the foreground proposals with their gt; in inference the
                predicted instances.

        Returns:
            ``{"loss_mask": tensor}`` in training, ``instances`` with ``pred_masks`` in inference.
        """
        x = self.layers(x)
        if self.training:
            return {"loss_mask": self._balanced_loss(x, instances) * self.loss_weight}
        mask_rcnn_inference(x, instances)
        return instances

    @torch.jit.unused  # training only; TorchScript compiles inference and need not type settings
    def _balanced_loss(self, mask_logits: torch.Tensor, instances: List[Instances]) -> torch.Tensor:
        settings = self.loss_settings
        return balanced_mask_rcnn_loss(
            mask_logits,
            instances,
            eps=settings.eps,
            sync_normalizers=settings.sync_normalizers,
            normalizer_momentum=settings.normalizer_momentum,
            running_counts=getattr(self, "normalizer_running_counts", None),
            vis_period=self.vis_period,
        )
