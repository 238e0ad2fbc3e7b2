"""
Balanced R-CNN: Mask R-CNN with a Swin Transformer backbone and RPN/ROI losses that are
sum-reduced, normalized by the real sample counts and upweight the foreground.

Importing this package registers its components in detectron2's registries.
"""
from .config import add_balanced_rcnn_config
from .data import register_datasets_from_config
from .engine import Trainer
from .modeling.backbone import build_swin_fpn_backbone
from .modeling import (
    BalancedFastRCNNOutputLayers,
    BalancedMaskRCNNConvUpsampleHead,
    BalancedROIHeads,
    BalancedRPN,
)

__all__ = [
    "BalancedFastRCNNOutputLayers",
    "BalancedMaskRCNNConvUpsampleHead",
    "BalancedROIHeads",
    "BalancedRPN",
    "Trainer",
    "add_balanced_rcnn_config",
    "build_swin_fpn_backbone",
    "register_datasets_from_config",
]
