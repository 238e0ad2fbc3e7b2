"""The balanced heads; importing this package registers them in detectron2's registries."""

from .mask_head import BalancedMaskRCNNConvUpsampleHead, balanced_mask_rcnn_loss
from .roi_heads import BalancedFastRCNNOutputLayers, BalancedROIHeads
from .rpn import BalancedRPN

__all__ = [
    "BalancedFastRCNNOutputLayers",
    "BalancedMaskRCNNConvUpsampleHead",
    "BalancedROIHeads",
    "BalancedRPN",
    "balanced_mask_rcnn_loss",
]
