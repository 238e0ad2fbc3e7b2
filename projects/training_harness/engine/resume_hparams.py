"""
--resume trains with the config's optimizer hyperparameters, not the checkpoint's.

detectron2 restores the optimizer's and the scheduler's state dicts on resume, hyperparameters
included: a lower SOLVER.BASE_LR (the divergence stop's advice) or a new WEIGHT_DECAY would be
recorded in OUTPUT_DIR/config.yaml and silently not used. :func:`apply_config_hyperparameters`
puts the config's values back into every parameter group (the learning rate through the
scheduler's base values, at the schedule's current position) and keeps the moment estimates;
:func:`check_same_optimizer` refuses at set-up a checkpoint of another optimizer type, whose
state would fail at the first step.
"""

from typing import Any, Dict, List, Sequence

import torch
from balanced_rcnn.engine.optimizer import build_optimizer
from detectron2.config import CfgNode

__all__ = ["apply_config_hyperparameters", "check_same_optimizer", "optimizer_kind"]

# A parameter group's hyperparameter -> the config key it comes from.
CONFIG_KEYS = {"lr": "SOLVER.BASE_LR", "weight_decay": "SOLVER.WEIGHT_DECAY",
               "momentum": "SOLVER.MOMENTUM", "nesterov": "SOLVER.NESTEROV",
               "betas": "SOLVER.BETAS"}
_NOT_HYPERPARAMETERS = ("params", "initial_lr")


def optimizer_kind(group: Dict[str, Any]) -> str:
    """The SOLVER.OPTIMIZER a parameter group was made by (its hyperparameter names)."""
    return "AdamW" if "betas" in group else "SGD" if "momentum" in group else "unknown"


def check_same_optimizer(cfg: CfgNode, checkpoint_groups: Sequence[Dict[str, Any]],
                         filename: str) -> None:
    """Refuse resuming ``filename``, whose optimizer had ``checkpoint_groups``, under another
    SOLVER.OPTIMIZER."""
    if not checkpoint_groups:
        return
    ours = optimizer_kind(build_optimizer(cfg, torch.nn.Linear(1, 1)).param_groups[0])
    theirs = optimizer_kind(checkpoint_groups[0])
    if theirs != ours:
        raise ValueError(
            f"--resume: SOLVER.OPTIMIZER is {ours} but the checkpoint '{filename}' was trained "
            f"with {theirs}, whose state {ours} cannot continue. Resume with SOLVER.OPTIMIZER "
            f"{theirs}, or start a new run from its weights (MODEL.WEIGHTS {filename}, another "
            "OUTPUT_DIR, no --resume).")


def apply_config_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: Any,
                                 config_groups: Sequence[Dict[str, Any]]) -> List[str]:
    """
    Set each group of the resumed ``optimizer`` to the hyperparameters of the same group of an
    optimizer freshly built from the config (``config_groups``); the learning rate through
    ``scheduler.base_lrs``, scaled by where the schedule is. Returns one line per change, e.g.
    "SOLVER.BASE_LR 1e-05 (checkpoint: 0.0008)".
    """
    changes: Dict[str, tuple] = {}
    base_lrs = list(scheduler.base_lrs)
    for i, (group, wanted) in enumerate(zip(optimizer.param_groups, config_groups)):
        old_base, new_base = base_lrs[i], wanted["lr"]
        if new_base != old_base:
            # lr = base x the schedule's multiplier now; the multiplier is the config's anyway.
            group["lr"] = new_base * (group["lr"] / old_base) if old_base else new_base
            group["initial_lr"] = base_lrs[i] = new_base
            changes.setdefault(("lr", old_base, new_base), None)
        for key, value in wanted.items():
            if key in _NOT_HYPERPARAMETERS or key == "lr" or group.get(key) == value:
                continue
            changes.setdefault((key, group.get(key), value), None)
            group[key] = value
    scheduler.base_lrs = base_lrs
    return [f"{CONFIG_KEYS.get(key, f'optimizer {key}')} {new} (checkpoint: {old})"
            for key, old, new in changes]
