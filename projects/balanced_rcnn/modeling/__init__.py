"""The balanced heads; importing this package registers them in detectron2's registries."""

from .fast_rcnn import BalancedFastRCNNOutputLayers
from .mask_head import BalancedMaskRCNNConvUpsampleHead, balanced_mask_rcnn_loss
from .roi_heads import BalancedROIHeads
from .rpn import BalancedRPN
from .settings import BalancedLossSettings

__all__ = [
    "BalancedFastRCNNOutputLayers",
    "BalancedLossSettings",
    "BalancedMaskRCNNConvUpsampleHead",
    "BalancedROIHeads",
    "BalancedRPN",
    "balanced_mask_rcnn_loss",
]
