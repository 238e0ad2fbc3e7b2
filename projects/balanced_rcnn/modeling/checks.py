"""
Build-time checks of the balanced heads' config: every refusal names the key to change.

A model build runs each head's own checks once, in that head's from_config: the detectron2 keys
it replaces (:func:`check_rpn_config`, :func:`check_box_predictor_config`) and its
MODEL.BALANCED_LOSS weights, checked as they are read (:func:`check_balanced_loss_weights`).
The keys that the heads share are checked by
:class:`~balanced_rcnn.modeling.settings.BalancedLossSettings` and, NORMALIZER_MOMENTUM, by the
normalizer that takes it: once for each head, since each head built on its own must refuse them
too. :func:`check_balanced_loss_keys` runs all of it at set-up, before anything is built.
"""

import math

from detectron2.config import CfgNode

from ..config import check_choice
from .box_regression import BOX_REG_LOSS_TYPES
from .losses import REG_NORMALIZERS

__all__ = [
    "balanced_loss_section",
    "check_adaptive_pos_weight_fractions",
    "check_balanced_loss_keys",
    "check_balanced_loss_weights",
    "check_box_predictor_config",
    "check_box_reg_loss_type",
    "check_momentum",
    "check_rpn_config",
    "check_shared_loss_values",
    "refuse_stock_loss_weight",
]


def balanced_loss_section(cfg: CfgNode) -> CfgNode:
    """cfg.MODEL.BALANCED_LOSS, or a KeyError that says how to add it."""
    if "BALANCED_LOSS" not in cfg.MODEL:
        raise KeyError(
            "cfg.MODEL.BALANCED_LOSS is missing: call balanced_rcnn.add_balanced_rcnn_config(cfg) "
            "before merging a config that uses the balanced heads"
        )
    return cfg.MODEL.BALANCED_LOSS


def check_balanced_loss_weights(section: CfgNode, *weight_names: str) -> None:
    """Weights MODEL.BALANCED_LOSS.<name> (of ``section``) must be finite and >= 0."""
    for name in weight_names:
        value = section[name]
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"MODEL.BALANCED_LOSS.{name} must be finite and >= 0, got {value}")


def check_shared_loss_values(eps: float, reg_normalizer: str, prior_prob: float) -> None:
    """EPS finite and > 0, REG_NORMALIZER one of :data:`REG_NORMALIZERS`, PRIOR_PROB in [0, 1)."""
    if not (math.isfinite(eps) and eps > 0):
        raise ValueError(f"MODEL.BALANCED_LOSS.EPS must be finite and > 0, got {eps}")
    check_choice("MODEL.BALANCED_LOSS.REG_NORMALIZER", reg_normalizer, REG_NORMALIZERS)
    if not 0.0 <= prior_prob < 1.0:
        raise ValueError("MODEL.BALANCED_LOSS.PRIOR_PROB must be in [0, 1) (0: detectron2's "
                         f"initialization), got {prior_prob}")


def check_momentum(momentum: float) -> None:
    if not 0.0 <= momentum < 1.0:
        raise ValueError(
            f"MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM must be in [0, 1), got {momentum}"
        )


def check_adaptive_pos_weight_fractions(cfg: CfgNode) -> None:
    """ADAPTIVE_POS_WEIGHT divides by 1 - f: both samplers' POSITIVE_FRACTION f in (0, 1)."""
    if not cfg.MODEL.BALANCED_LOSS.ADAPTIVE_POS_WEIGHT:
        return
    fractions = {"MODEL.RPN.POSITIVE_FRACTION": cfg.MODEL.RPN.POSITIVE_FRACTION,
                 "MODEL.ROI_HEADS.POSITIVE_FRACTION": cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION}
    for key, fraction in fractions.items():
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"MODEL.BALANCED_LOSS.ADAPTIVE_POS_WEIGHT needs {key} in (0, 1), "
                             f"got {fraction}")


def check_balanced_loss_keys(cfg: CfgNode, *weight_names: str) -> None:
    """The whole section at set-up: the named weights, the shared keys and the options."""
    section = balanced_loss_section(cfg)
    check_balanced_loss_weights(section, *weight_names)
    check_shared_loss_values(section.EPS, section.REG_NORMALIZER, section.PRIOR_PROB)
    check_momentum(section.NORMALIZER_MOMENTUM)
    check_adaptive_pos_weight_fractions(cfg)


def refuse_stock_loss_weight(key: str, value: float, use_instead: str) -> None:
    """detectron2's own loss weights would multiply the balanced losses silently: keep them 1."""
    if value != 1.0:
        raise ValueError(
            f"{key} = {value} is not used by the balanced heads; leave it at 1.0 and set "
            f"{use_instead} instead"
        )


def check_box_reg_loss_type(key: str, value: str) -> None:
    """Fail at build time rather than at the first training step."""
    check_choice(key, value, BOX_REG_LOSS_TYPES)


def check_rpn_config(cfg: CfgNode) -> None:
    """detectron2's RPN loss keys under BalancedRPN: its loss weights, the loss type (the
    balanced weights are checked as they are read, by settings.balanced_head_kwargs)."""
    refuse_stock_loss_weight(
        "MODEL.RPN.LOSS_WEIGHT",
        cfg.MODEL.RPN.LOSS_WEIGHT,
        "MODEL.BALANCED_LOSS.RPN_LOSS_CLS_WEIGHT and MODEL.BALANCED_LOSS.RPN_LOSS_BBOX_WEIGHT",
    )
    refuse_stock_loss_weight(
        "MODEL.RPN.BBOX_REG_LOSS_WEIGHT",
        cfg.MODEL.RPN.BBOX_REG_LOSS_WEIGHT,
        "MODEL.BALANCED_LOSS.RPN_LOSS_BBOX_WEIGHT",
    )
    check_box_reg_loss_type("MODEL.RPN.BBOX_REG_LOSS_TYPE", cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE)


def check_box_predictor_config(cfg: CfgNode) -> None:
    """detectron2's box loss keys under BalancedFastRCNNOutputLayers: the regression weight, the
    loss type (the balanced weights are checked as they are read, by
    settings.balanced_head_kwargs; the options it does not implement are refused by its
    constructor, for hand-built predictors too)."""
    refuse_stock_loss_weight(
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT",
        cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT,
        "MODEL.BALANCED_LOSS.ROI_LOSS_BBOX_WEIGHT",
    )
    check_box_reg_loss_type(
        "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE
    )
