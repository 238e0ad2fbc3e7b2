"""
Build-time checks of the balanced heads' config: every refusal names the key to change.
"""

import math

from detectron2.config import CfgNode

from .losses import BOX_REG_LOSS_TYPES, REG_NORMALIZERS

__all__ = [
    "balanced_loss_kwargs",
    "check_balanced_loss_keys",
    "check_box_reg_loss_type",
    "refuse_stock_loss_weight",
]


def _balanced_loss(cfg: CfgNode) -> CfgNode:
    if "BALANCED_LOSS" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.BALANCED_LOSS is missing: call balanced_rcnn.add_balanced_rcnn_config(cfg) "
            "before merging a config that uses the balanced heads"
        )
    return cfg.MODEL.BALANCED_LOSS


def check_balanced_loss_keys(cfg: CfgNode, *weight_names: str) -> None:
    """Weights MODEL.BALANCED_LOSS.<name> must be finite and >= 0, EPS finite and > 0, and the
    options within their ranges."""
    section = _balanced_loss(cfg)
    for name in weight_names:
        value = section[name]
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"MODEL.BALANCED_LOSS.{name} must be finite and >= 0, got {value}")
    if not (math.isfinite(section.EPS) and section.EPS > 0):
        raise ValueError(f"MODEL.BALANCED_LOSS.EPS must be finite and > 0, got {section.EPS}")
    if section.REG_NORMALIZER not in REG_NORMALIZERS:
        raise ValueError(f"MODEL.BALANCED_LOSS.REG_NORMALIZER must be one of {REG_NORMALIZERS}, "
                         f"got {section.REG_NORMALIZER!r}")
    if not 0.0 <= section.NORMALIZER_MOMENTUM < 1.0:
        raise ValueError("MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM must be in [0, 1), got "
                         f"{section.NORMALIZER_MOMENTUM}")
    if section.ADAPTIVE_POS_WEIGHT:
        fractions = {"MODEL.RPN.POSITIVE_FRACTION": cfg.MODEL.RPN.POSITIVE_FRACTION,
                     "MODEL.ROI_HEADS.POSITIVE_FRACTION": cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION}
        for key, fraction in fractions.items():
            if not 0.0 < fraction < 1.0:
                raise ValueError(f"MODEL.BALANCED_LOSS.ADAPTIVE_POS_WEIGHT needs {key} in (0, 1), "
                                 f"got {fraction}")
    if not 0.0 <= section.PRIOR_PROB < 1.0:
        raise ValueError("MODEL.BALANCED_LOSS.PRIOR_PROB must be in [0, 1) (0: detectron2's "
                         f"initialization), got {section.PRIOR_PROB}")


def balanced_loss_kwargs(cfg: CfgNode) -> dict:
    """The constructor arguments that every balanced head takes from MODEL.BALANCED_LOSS
    (checked by :func:`check_balanced_loss_keys` first)."""
    section = _balanced_loss(cfg)
    return {
        "eps": section.EPS,
        "sync_normalizers": section.SYNC_NORMALIZERS,
        "reg_normalizer": section.REG_NORMALIZER,
        "normalizer_momentum": section.NORMALIZER_MOMENTUM,
        "adaptive_pos_weight": section.ADAPTIVE_POS_WEIGHT,
        "prior_prob": section.PRIOR_PROB,
    }


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
