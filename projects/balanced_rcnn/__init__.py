"""
Balanced R-CNN: Mask R-CNN with a Swin Transformer backbone and RPN/ROI losses that are
sum-reduced, normalized by the real sample counts and upweight the foreground, with image
rebalancing samplers and copy-paste for imbalanced data.

Importing this package registers its components in detectron2's registries and nothing else.
The training harness (health checks, reliability, dataset registration) is the separate
``training_harness`` package.
"""
from .config import add_balanced_rcnn_config
from .engine import Trainer
from .modeling import (
    BalancedFastRCNNOutputLayers,
    BalancedMaskRCNNConvUpsampleHead,
    BalancedROIHeads,
    BalancedRPN,
)
from .modeling.backbone import build_swin_fpn_backbone

__all__ = [
    "BalancedFastRCNNOutputLayers",
    "BalancedMaskRCNNConvUpsampleHead",
    "BalancedROIHeads",
    "BalancedRPN",
    "Trainer",
    "add_balanced_rcnn_config",
    "build_swin_fpn_backbone",
]
