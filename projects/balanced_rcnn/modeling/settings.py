"""
BalancedLossSettings: the MODEL.BALANCED_LOSS keys that every balanced head takes, read and
checked in one place, and the small decisions they make in each head's losses (which regression
divisor, which positive weight); :func:`balanced_head_kwargs`, what the RPN's and the box
predictor's from_config read from MODEL.BALANCED_LOSS. The formulas they enter are
modeling/losses.py's.
"""

from dataclasses import dataclass, fields
from typing import Dict, Union

import torch
from detectron2.config import CfgNode

from . import losses
from .checks import (
    balanced_loss_section,
    check_adaptive_pos_weight_fractions,
    check_balanced_loss_weights,
    check_shared_loss_values,
)
from .normalizer import CountNormalizer

__all__ = ["BalancedLossSettings", "balanced_head_kwargs"]


@dataclass(frozen=True)
class BalancedLossSettings:
    """
    The normalizer settings and loss options of one balanced head; each field is the
    MODEL.BALANCED_LOSS key of its name in upper case (config.py says what it does). EPS,
    REG_NORMALIZER and PRIOR_PROB are checked when the settings are made, NORMALIZER_MOMENTUM by
    the normalizer that takes it; hand-built settings get the same checks as config-built ones.
    """

    eps: float = 1e-6
    sync_normalizers: bool = True
    reg_normalizer: str = "samples"
    normalizer_momentum: float = 0.0
    adaptive_pos_weight: bool = False
    prior_prob: float = 0.0

    def __post_init__(self):
        check_shared_loss_values(self.eps, self.reg_normalizer, self.prior_prob)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "BalancedLossSettings":
        section = balanced_loss_section(cfg)
        check_adaptive_pos_weight_fractions(cfg)
        return cls(**{field.name: section[field.name.upper()] for field in fields(cls)})

    def count_normalizer(self, num_counts: int) -> CountNormalizer:
        """The normalizer of a head with ``num_counts`` counts."""
        return CountNormalizer(
            num_counts, eps=self.eps, sync=self.sync_normalizers, momentum=self.normalizer_momentum
        )

    def reg_divisor(self, positives: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
        """The normalizer of a regression loss: that of the positives' count or of the samples'
        (REG_NORMALIZER "positives" / "samples")."""
        return positives if self.reg_normalizer == "positives" else samples

    def positive_weight(
        self,
        pos_weight: float,
        num_pos: torch.Tensor,
        num_neg: torch.Tensor,
        positive_fraction: float,
    ) -> Union[float, torch.Tensor]:
        """w_pos: the head's ``pos_weight`` (*_CLS_POS_WEIGHT), or with ADAPTIVE_POS_WEIGHT the
        adaptive weight from the 0-dim counts, at least ``pos_weight``."""
        if not self.adaptive_pos_weight:
            return pos_weight
        return losses.adaptive_pos_weight(num_pos, num_neg, positive_fraction, pos_weight)


def balanced_head_kwargs(cfg: CfgNode, cls_pos_weight: str, loss_weight: Dict[str, str]) -> dict:
    """
    The constructor arguments that a balanced RPN or box predictor takes from MODEL.BALANCED_LOSS,
    each key checked: ``cls_pos_weight`` and ``loss_weight`` ({loss name: weight}) from the keys
    named, and the shared ``loss_settings``.
    """
    loss_settings = BalancedLossSettings.from_config(cfg)  # refuses a config without the section
    section = cfg.MODEL.BALANCED_LOSS
    check_balanced_loss_weights(section, cls_pos_weight, *loss_weight.values())
    return {
        "cls_pos_weight": section[cls_pos_weight],
        "loss_weight": {name: section[key] for name, key in loss_weight.items()},
        "loss_settings": loss_settings,
    }
