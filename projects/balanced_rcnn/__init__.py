"""
Balanced R-CNN: Mask R-CNN with a Swin Transformer backbone and RPN/ROI losses that are
sum-reduced, normalized by the real sample counts and upweight the foreground.

Importing this package registers its components in detectron2's registries.
"""
from .config import add_balanced_rcnn_config

__all__ = ["add_balanced_rcnn_config"]
