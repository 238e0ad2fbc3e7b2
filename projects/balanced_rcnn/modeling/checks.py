"""
Build-time checks of the balanced heads' config: every refusal names the key to change.
"""

import math

from detectron2.config import CfgNode

from .losses import BOX_REG_LOSS_TYPES

__all__ = ["check_balanced_loss_keys", "refuse_stock_loss_weight", "check_box_reg_loss_type"]


def _balanced_loss(cfg: CfgNode) -> CfgNode:
    if "BALANCED_LOSS" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.BALANCED_LOSS is missing: call balanced_rcnn.add_balanced_rcnn_config(cfg) "
            "before merging a config that uses the balanced heads"
        )
    return cfg.MODEL.BALANCED_LOSS


def check_balanced_loss_keys(cfg: CfgNode, *weight_names: str) -> None:
    """Weights MODEL.BALANCED_LOSS.<name> must be finite and >= 0, EPS finite and > 0."""
    section = _balanced_loss(cfg)
    for name in weight_names:
        value = section[name]
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"MODEL.BALANCED_LOSS.{name} must be finite and >= 0, got {value}")
    if not (math.isfinite(section.EPS) and section.EPS > 0):
        raise ValueError(f"MODEL.BALANCED_LOSS.EPS must be finite and > 0, got {section.EPS}")


def refuse_stock_loss_weight(key: str, value: float, use_instead: str) -> None:
    """detectron2's own loss weights would multiply the balanced losses silently: keep them 1."""
    if value != 1.0:
        raise ValueError(
            f"{key} = {value} is not used by the balanced heads; leave it at 1.0 and set "
            f"{use_instead} instead"
        )


def check_box_reg_loss_type(key: str, value: str) -> None:
    """Fail at build time rather than at the first training step."""
    if value not in BOX_REG_LOSS_TYPES:
        raise ValueError(f"{key} must be one of {BOX_REG_LOSS_TYPES}, got '{value}'")
