"""
Numeric config values checked at set-up, naming the key and the valid range: every integer or
float key whose zero, negative or out-of-range value would divide by zero, loop, do nothing or
fail at the first step (:data:`RANGES`), the list keys that must agree (SOLVER.STEPS, the Swin
stage lists), a device the machine does not have, and, as warnings, values the chosen components
ignore.
"""

import logging
import math
from typing import Callable, Dict, List, Tuple

import torch
from detectron2.config import CfgNode

from .config_checks import config_value
from .data.samplers import CLASS_AWARE_OBJECT_SHARE_SAMPLER, OBJECT_SHARE_SAMPLER

__all__ = ["RANGES", "check_config_ranges", "ignored_key_warnings"]

logger = logging.getLogger(__name__)

_POSITIVE = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
_FRACTION = ("in (0, 1]", lambda v: 0 < v <= 1)
_SCORE = ("in [0, 1]", lambda v: 0 <= v <= 1)

# key -> (the range in words, the test)
RANGES: Dict[str, Tuple[str, Callable[[float], bool]]] = {
    "SOLVER.MAX_ITER": _POSITIVE,
    "SOLVER.IMS_PER_BATCH": _POSITIVE,
    "SOLVER.BASE_LR": _POSITIVE,
    "SOLVER.CHECKPOINT_PERIOD": _POSITIVE,
    "SOLVER.WARMUP_ITERS": _NON_NEGATIVE,
    "SOLVER.WARMUP_FACTOR": _FRACTION,
    "SOLVER.GAMMA": _POSITIVE,
    "SOLVER.MOMENTUM": ("in [0, 1)", lambda v: 0 <= v < 1),
    "SOLVER.WEIGHT_DECAY": _NON_NEGATIVE,
    "SOLVER.BIAS_LR_FACTOR": _POSITIVE,
    "TEST.EVAL_PERIOD": _NON_NEGATIVE,
    "TEST.DETECTIONS_PER_IMAGE": _POSITIVE,
    "DATALOADER.NUM_WORKERS": _NON_NEGATIVE,
    "DATALOADER.OBJECT_IMAGE_SHARE": _SCORE,
    "INPUT.MAX_SIZE_TRAIN": _POSITIVE,
    "INPUT.MAX_SIZE_TEST": _POSITIVE,
    "INPUT.MIN_SIZE_TEST": _NON_NEGATIVE,  # 0: no resize at test time (detectron2)
    "MODEL.ROI_HEADS.NUM_CLASSES": _POSITIVE,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": _POSITIVE,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": _FRACTION,
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST": _SCORE,
    "MODEL.ROI_HEADS.NMS_THRESH_TEST": _SCORE,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": _POSITIVE,
    "MODEL.RPN.POSITIVE_FRACTION": _FRACTION,
    "MODEL.RPN.NMS_THRESH": _FRACTION,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN": _POSITIVE,
    "MODEL.RPN.PRE_NMS_TOPK_TEST": _POSITIVE,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": _POSITIVE,
    "MODEL.RPN.POST_NMS_TOPK_TEST": _POSITIVE,
    "MODEL.SWIN.EMBED_DIM": _POSITIVE,
    "MODEL.SWIN.PATCH_SIZE": _POSITIVE,
    "MODEL.SWIN.WINDOW_SIZE": _POSITIVE,
    "MODEL.SWIN.MLP_RATIO": _POSITIVE,
    "HEALTH.PERIOD": _NON_NEGATIVE,
    "HEALTH.NUM_IMAGES": _NON_NEGATIVE,
    "HEALTH.WARMUP_ITERS": _NON_NEGATIVE,
    "HEALTH.PATIENCE": (">= 1", lambda v: v >= 1),
}


def check_config_ranges(cfg: CfgNode) -> None:
    """Refuse the first value out of its range (see the module docstring)."""
    for key, (words, valid) in RANGES.items():
        value = config_value(cfg, key)
        if not (math.isfinite(value) and valid(value)):
            raise ValueError(f"{key} must be {words}, got {value}")
    steps = list(cfg.SOLVER.STEPS)
    if any(b <= a for a, b in zip(steps, steps[1:])) or any(s <= 0 for s in steps):
        raise ValueError(f"SOLVER.STEPS must be increasing iterations > 0, got {tuple(steps)}")
    swin = cfg.MODEL.SWIN
    if len(swin.NUM_HEADS) != len(swin.DEPTHS) or not all(
            d > 0 for d in [*swin.DEPTHS, *swin.NUM_HEADS]):
        raise ValueError(
            "MODEL.SWIN.DEPTHS and MODEL.SWIN.NUM_HEADS must give one positive number per stage, "
            f"got {list(swin.DEPTHS)} and {list(swin.NUM_HEADS)}")
    if swin.EMBED_DIM % swin.NUM_HEADS[0]:
        raise ValueError(f"MODEL.SWIN.EMBED_DIM ({swin.EMBED_DIM}) must be divisible by "
                         f"MODEL.SWIN.NUM_HEADS[0] ({swin.NUM_HEADS[0]})")
    if not torch.cuda.is_available():
        cpu = "MODEL.DEVICE cpu SOLVER.AMP.ENABLED False"
        if cfg.MODEL.DEVICE.startswith("cuda"):
            raise ValueError(f"MODEL.DEVICE is {cfg.MODEL.DEVICE} but this machine has no CUDA "
                             f"GPU: run on a GPU machine, or add `{cpu}` (and no --num-gpus), "
                             "or use the CPU twin configs (README)")
        if cfg.SOLVER.AMP.ENABLED:
            raise ValueError("SOLVER.AMP.ENABLED needs CUDA (detectron2's AMPTrainer) and this "
                             f"machine has none: add `{cpu}`")


def ignored_key_warnings(cfg: CfgNode) -> List[str]:
    """Values the chosen components ignore, or that turn a safety net off, in words."""
    out = []
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    if (sampler not in (OBJECT_SHARE_SAMPLER, CLASS_AWARE_OBJECT_SHARE_SAMPLER)
            and cfg.DATALOADER.OBJECT_IMAGE_SHARE != 0.5):
        out.append(f"DATALOADER.OBJECT_IMAGE_SHARE {cfg.DATALOADER.OBJECT_IMAGE_SHARE} is "
                   f"ignored: DATALOADER.SAMPLER_TRAIN is {sampler}, not {OBJECT_SHARE_SAMPLER} "
                   f"or {CLASS_AWARE_OBJECT_SHARE_SAMPLER}")
    if cfg.HEALTH.ENABLED and cfg.HEALTH.PERIOD > 0 and cfg.HEALTH.NUM_IMAGES == 0:
        out.append("HEALTH.NUM_IMAGES is 0: no detection checks, so no collapse can be reported "
                   "(HEALTH.PERIOD 0 says that on purpose)")
    return out
