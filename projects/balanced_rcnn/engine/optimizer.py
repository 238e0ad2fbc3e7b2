"""
The optimizer of ``cfg.SOLVER``: SGD or AdamW over detectron2's parameter groups.

Weight decay is switched off for normalization layers (SOLVER.WEIGHT_DECAY_NORM) and for the
parameters named in SOLVER.NO_WEIGHT_DECAY_KEYS (Swin's relative-position-bias tables and
absolute position embeddings), as in the Swin detection recipe. Gradient clipping of the
per-parameter kinds ("value", "norm") is detectron2's own ``maybe_add_gradient_clipping``;
the whole-model kind ("full_model") needs the total norm over all parameters and is applied by
:class:`~balanced_rcnn.engine.grad_norm.GradientNormHook` instead.
"""

from typing import Any, Dict, List

import torch
from detectron2.config import CfgNode
from detectron2.solver import get_default_optimizer_params
from detectron2.solver.build import GradientClipType, maybe_add_gradient_clipping

from ..config import check_choice

__all__ = ["CLIP_TYPES", "FULL_MODEL_CLIP", "OPTIMIZERS", "build_optimizer", "build_param_groups",
           "check_solver_choices"]

FULL_MODEL_CLIP = "full_model"
# detectron2's per-parameter clip types plus the whole-model L2 clip.
CLIP_TYPES = tuple(t.value for t in GradientClipType) + (FULL_MODEL_CLIP,)
OPTIMIZERS = ("SGD", "AdamW")  # SOLVER.OPTIMIZER


def check_solver_choices(cfg: CfgNode) -> None:
    """SOLVER.OPTIMIZER and SOLVER.CLIP_GRADIENTS.CLIP_TYPE."""
    check_choice("SOLVER.OPTIMIZER", cfg.SOLVER.OPTIMIZER, OPTIMIZERS)
    check_choice("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE,
                 CLIP_TYPES)


def build_param_groups(cfg: CfgNode, model: torch.nn.Module) -> List[Dict[str, Any]]:
    """detectron2's parameter groups with no weight decay for SOLVER.NO_WEIGHT_DECAY_KEYS."""
    # `overrides` match a parameter's own name (e.g. "relative_position_bias_table"), which is
    # exactly how the Swin recipe names the parameters to exclude.
    no_decay = {key: {"weight_decay": 0.0} for key in cfg.SOLVER.NO_WEIGHT_DECAY_KEYS}
    return get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        overrides=no_decay,
    )


def build_optimizer(cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZER ("SGD" or "AdamW") over :func:`build_param_groups`."""
    check_solver_choices(cfg)
    params = build_param_groups(cfg, model)
    if cfg.SOLVER.OPTIMIZER == "SGD":
        optimizer = torch.optim.SGD(
            params,
            lr=cfg.SOLVER.BASE_LR,
            momentum=cfg.SOLVER.MOMENTUM,
            nesterov=cfg.SOLVER.NESTEROV,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
    else:
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.SOLVER.BASE_LR,
            betas=tuple(cfg.SOLVER.BETAS),
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        )
    clip = cfg.SOLVER.CLIP_GRADIENTS
    if clip.ENABLED and clip.CLIP_TYPE != FULL_MODEL_CLIP:
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer
