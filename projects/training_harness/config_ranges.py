"""
Numeric config values checked at set-up, naming the key and the valid range: every integer or
float key whose zero, negative or out-of-range value would divide by zero, loop, do nothing or
fail at the first step (:data:`RANGES`), every element of the numeric list keys
(:data:`LIST_RANGES`), the list keys that must agree (SOLVER.STEPS, the IoU thresholds, the Swin
stage lists), a device the machine does not have, and, as warnings, values the chosen components
ignore. The numeric keys of the components this project builds that have no range here are
listed in :data:`UNRANGED` with the reason (a test keeps the three lists covering them all).
"""

import logging
import math
import os
from typing import Callable, Dict, List, Tuple

import torch
from balanced_rcnn.data.samplers import CLASS_AWARE_OBJECT_SHARE_SAMPLER, OBJECT_SHARE_SAMPLER
from detectron2.config import CfgNode

from .config_checks import config_value

__all__ = ["LIST_RANGES", "RANGES", "UNRANGED", "check_config_ranges", "check_launch_devices",
           "ignored_key_warnings"]

logger = logging.getLogger(__name__)

_POSITIVE = ("> 0", lambda v: v > 0)
_NON_NEGATIVE = (">= 0", lambda v: v >= 0)
_FRACTION = ("in (0, 1]", lambda v: 0 < v <= 1)
_SCORE = ("in [0, 1]", lambda v: 0 <= v <= 1)
_RATE = ("in [0, 1)", lambda v: 0 <= v < 1)

# key -> (the range in words, the test)
RANGES: Dict[str, Tuple[str, Callable[[float], bool]]] = {
    "SOLVER.MAX_ITER": _POSITIVE,
    "SOLVER.IMS_PER_BATCH": _POSITIVE,
    "SOLVER.BASE_LR": _POSITIVE,
    "SOLVER.CHECKPOINT_PERIOD": _POSITIVE,
    "SOLVER.WARMUP_ITERS": _NON_NEGATIVE,
    "SOLVER.WARMUP_FACTOR": _FRACTION,
    "SOLVER.GAMMA": _POSITIVE,
    "SOLVER.MOMENTUM": _RATE,
    "SOLVER.WEIGHT_DECAY": _NON_NEGATIVE,
    "SOLVER.WEIGHT_DECAY_NORM": _NON_NEGATIVE,
    "SOLVER.BIAS_LR_FACTOR": _POSITIVE,
    "SOLVER.BASE_LR_END": _NON_NEGATIVE,
    "SOLVER.NUM_DECAYS": _POSITIVE,
    "SOLVER.REFERENCE_WORLD_SIZE": _NON_NEGATIVE,
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE": _POSITIVE,
    "SOLVER.CLIP_GRADIENTS.NORM_TYPE": _POSITIVE,
    "TEST.EVAL_PERIOD": _NON_NEGATIVE,
    "TEST.DETECTIONS_PER_IMAGE": _POSITIVE,
    "TEST.PRECISE_BN.NUM_ITER": _POSITIVE,
    "VIS_PERIOD": _NON_NEGATIVE,
    "DATALOADER.NUM_WORKERS": _NON_NEGATIVE,
    "DATALOADER.OBJECT_IMAGE_SHARE": _SCORE,
    "DATALOADER.REPEAT_THRESHOLD": _NON_NEGATIVE,
    "INPUT.COPY_PASTE.PROBABILITY": _SCORE,
    "INPUT.MAX_SIZE_TRAIN": _POSITIVE,
    "INPUT.MAX_SIZE_TEST": _POSITIVE,
    "INPUT.MIN_SIZE_TEST": _NON_NEGATIVE,  # 0: no resize at test time (detectron2)
    "MODEL.FPN.OUT_CHANNELS": _POSITIVE,
    "MODEL.PROPOSAL_GENERATOR.MIN_SIZE": _NON_NEGATIVE,
    "MODEL.RPN.SMOOTH_L1_BETA": _NON_NEGATIVE,
    "MODEL.RPN.LOSS_WEIGHT": _NON_NEGATIVE,
    "MODEL.RPN.BBOX_REG_LOSS_WEIGHT": _NON_NEGATIVE,
    "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION": _POSITIVE,
    "MODEL.ROI_BOX_HEAD.POOLER_SAMPLING_RATIO": _NON_NEGATIVE,
    "MODEL.ROI_BOX_HEAD.NUM_FC": _NON_NEGATIVE,
    "MODEL.ROI_BOX_HEAD.FC_DIM": _POSITIVE,
    "MODEL.ROI_BOX_HEAD.NUM_CONV": _NON_NEGATIVE,
    "MODEL.ROI_BOX_HEAD.CONV_DIM": _POSITIVE,
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA": _NON_NEGATIVE,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT": _NON_NEGATIVE,
    "MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION": _POSITIVE,
    "MODEL.ROI_MASK_HEAD.POOLER_SAMPLING_RATIO": _NON_NEGATIVE,
    "MODEL.ROI_MASK_HEAD.NUM_CONV": _NON_NEGATIVE,
    "MODEL.ROI_MASK_HEAD.CONV_DIM": _POSITIVE,
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
    "MODEL.SWIN.PRETRAIN_IMG_SIZE": _POSITIVE,
    "MODEL.SWIN.DROP_RATE": _RATE,
    "MODEL.SWIN.ATTN_DROP_RATE": _RATE,
    "MODEL.SWIN.DROP_PATH_RATE": _RATE,
    "HEALTH.PERIOD": _NON_NEGATIVE,
    "HEALTH.NUM_IMAGES": _NON_NEGATIVE,
    "HEALTH.WARMUP_ITERS": _NON_NEGATIVE,
    "HEALTH.PATIENCE": (">= 1", lambda v: v >= 1),
    "HEALTH.MAIN_THRESHOLD": _SCORE,
    "HEALTH.COLLAPSE_FRACTION": _SCORE,
    "HEALTH.CONFIDENT_FRACTION": _SCORE,
    "HEALTH.CONFIDENT_AFTER": _SCORE,
    "HEALTH.LOSS_CEILING": (">= 0 (0: off)", lambda v: v >= 0),
    "HEALTH.LOSS_JUMP_FACTOR": (">= 0 (0: off)", lambda v: v >= 0),
    "RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION": _SCORE,
    "RELIABILITY.PEER_TIMEOUT_S": _POSITIVE,
    "RELIABILITY.COLLECTIVE_TIMEOUT_MIN": _POSITIVE,
}

# list key -> (the range of every element, in words; the test). Nested lists (one per feature
# map) are checked element by element.
LIST_RANGES: Dict[str, Tuple[str, Callable[[float], bool]]] = {
    "MODEL.PIXEL_STD": _POSITIVE,  # divides the image
    "MODEL.ANCHOR_GENERATOR.SIZES": _POSITIVE,
    "MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS": _POSITIVE,
    "MODEL.RPN.BBOX_REG_WEIGHTS": _POSITIVE,  # divide the box deltas
    "MODEL.ROI_BOX_HEAD.BBOX_REG_WEIGHTS": _POSITIVE,
    "MODEL.RPN.IOU_THRESHOLDS": _SCORE,  # and increasing: see check_config_ranges
    "MODEL.ROI_HEADS.IOU_THRESHOLDS": _SCORE,
    "INPUT.MIN_SIZE_TRAIN": _POSITIVE,
    "SOLVER.BETAS": _RATE,
    "HEALTH.SCORE_THRESHOLDS": _SCORE,
}

# The numeric keys of the components this project builds that take any value, or that another
# set-up check covers: key (or section.*) -> why.
UNRANGED: Dict[str, str] = {
    "VERSION": "detectron2's config version",
    "SEED": "-1: a random seed",
    "GLOBAL.HACK": "unused by detectron2",
    "MODEL.BACKBONE.FREEZE_AT": "ResNet backbones only; Swin reads MODEL.SWIN.FROZEN_STAGES",
    "MODEL.SWIN.FROZEN_STAGES": "-1: every stage trains",
    "MODEL.PIXEL_MEAN": "any mean",
    "MODEL.ANCHOR_GENERATOR.OFFSET": "any offset of the anchor centres",
    "MODEL.ANCHOR_GENERATOR.ANGLES": "rotated anchors only",
    "MODEL.RPN.IOU_LABELS": "labels (-1, 0, 1) that detectron2's Matcher checks itself",
    "MODEL.ROI_HEADS.IOU_LABELS": "labels (-1, 0, 1) that detectron2's Matcher checks itself",
    "MODEL.RPN.CONV_DIMS": "-1: the input's channels",
    "INPUT.CROP.SIZE": "fractions or pixels by INPUT.CROP.TYPE; detectron2 checks it",
    "MODEL.RPN.BOUNDARY_THRESH": "-1: anchors crossing the border are kept",
    "MODEL.ROI_BOX_HEAD.FED_LOSS_FREQ_WEIGHT_POWER": "any power (the federated loss option)",
    "MODEL.ROI_BOX_HEAD.FED_LOSS_NUM_CLASSES": "detectron2 caps it at the class count",
    "MODEL.BALANCED_LOSS.*": "checked at set-up by config_checks.check_config_choices",
    "HEALTH.CONFIDENT_SCORE": "a score, or -1: checked by config_checks.check_config_choices",
    "TEST.DEPLOYMENT_SCORE_THRESH": "checked by config_checks.check_config_choices",
    "TEST.AUG.*": "test-time augmentation, not built by this project",
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TRAIN": "precomputed proposals, not used here",
    "DATASETS.PRECOMPUTED_PROPOSAL_TOPK_TEST": "precomputed proposals, not used here",
}


def check_config_ranges(cfg: CfgNode) -> None:
    """Refuse the first value out of its range (see the module docstring)."""
    for key, (words, valid) in RANGES.items():
        value = config_value(cfg, key)
        if not (math.isfinite(value) and valid(value)):
            raise ValueError(f"{key} must be {words}, got {value}")
    for key, (words, valid) in LIST_RANGES.items():
        values = config_value(cfg, key)
        flat = [v for x in values for v in (x if isinstance(x, (list, tuple)) else [x])]
        if not flat or not all(math.isfinite(v) and valid(v) for v in flat):
            raise ValueError(f"{key} must hold values {words}, got {_shown(values)}")
    for key in ("MODEL.RPN.IOU_THRESHOLDS", "MODEL.ROI_HEADS.IOU_THRESHOLDS"):
        values = list(config_value(cfg, key))
        if any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{key} must be increasing (detectron2's Matcher asserts it), got "
                             f"{values}")
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


def _shown(values) -> str:
    return str([list(x) if isinstance(x, tuple) else x for x in values])


def check_launch_devices(cfg: CfgNode, num_gpus_per_machine: int) -> None:
    """Before workers start: --num-gpus above the CUDA devices this machine shows (each worker
    takes device local_rank: the extra ones fail with "invalid device ordinal")."""
    if not (cfg.MODEL.DEVICE.startswith("cuda") and torch.cuda.is_available()):
        return  # no CUDA at all is refused by check_config_ranges; CPU workers need no device
    available = torch.cuda.device_count()
    if num_gpus_per_machine > available:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise ValueError(f"--num-gpus {num_gpus_per_machine} but this machine shows "
                         f"{available} CUDA device(s){shown}: use --num-gpus {available} (and "
                         "scale SOLVER.IMS_PER_BATCH and BASE_LR, or set "
                         "SOLVER.REFERENCE_WORLD_SIZE)")


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
