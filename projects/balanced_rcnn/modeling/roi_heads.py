"""
BalancedROIHeads: StandardROIHeads with the balanced box predictor (BalancedFastRCNNOutputLayers,
modeling/fast_rcnn.py) and, with MODEL.MASK_ON, the balanced mask head
(BalancedMaskRCNNConvUpsampleHead, modeling/mask_head.py); their losses are written out in
modeling/losses.py. Proposal sampling and inference are detectron2's; one seed gives the same
initial weights as StandardROIHeads.
"""

import torch
from detectron2.config import CfgNode
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.mask_head import ROI_MASK_HEAD_REGISTRY

from .fast_rcnn import BalancedFastRCNNOutputLayers
from .mask_head import BalancedMaskRCNNConvUpsampleHead

__all__ = ["BalancedFastRCNNOutputLayers", "BalancedROIHeads", "check_mask_head_is_balanced"]


def check_mask_head_is_balanced(cfg: CfgNode) -> None:
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


def _stock_predictor_cfg(cfg: CfgNode) -> CfgNode:
    """
    ``cfg`` for detectron2's own box predictor, which _init_box_head builds first and which only
    gives its initial weights: without the options the balanced predictor refuses, so that the
    refusal is the balanced predictor's (stock's USE_FED_LOSS asserts USE_SIGMOID_CE, then loads
    dataset statistics). Neither option changes the stock predictor's parameters.
    """
    box_head = cfg.MODEL.ROI_BOX_HEAD
    if not (box_head.USE_SIGMOID_CE or box_head.USE_FED_LOSS):
        return cfg
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = False
    cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = False
    return cfg


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
        # The heads below check their own keys as they are built (once each).
        check_mask_head_is_balanced(cfg)
        return super().from_config(cfg, input_shape)

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(_stock_predictor_cfg(cfg), input_shape)
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
