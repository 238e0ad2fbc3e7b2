"""
Every string-valued config key with a fixed set of values, checked at set-up, before anything is
built, whether or not this run reads it: a typo in a key that only a later stage reads (the
evaluation, an unused head's loss options, a sampler) otherwise fails hours in, or never.

:func:`check_config_choices` refuses the first key whose value is not one of its choices, naming
the key, the value, the choices and the close matches. The project's choices are the tuples its
modules use; detectron2's are the values its builders accept (as of detectron2 0.6) and the
names in its registries (so a class a user registers before set-up is accepted). Every other
string key of the config is free text (:data:`FREE_TEXT_KEYS`); a test keeps the three lists
covering every string key. Keys holding lists of feature names (``IN_FEATURES``) are checked by
detectron2 when the model is built.
"""

import difflib
from typing import Dict, Iterable, Sequence

from balanced_rcnn.data.samplers import CLASS_AWARE_OBJECT_SHARE_SAMPLER, OBJECT_SHARE_SAMPLER
from balanced_rcnn.engine.optimizer import CLIP_TYPES, OPTIMIZERS
from balanced_rcnn.engine.trainer import AMP_PRECISIONS
from balanced_rcnn.evaluation.image_level import check_deployment_score_thresh
from balanced_rcnn.modeling.checks import check_balanced_loss_keys
from balanced_rcnn.modeling.losses import BOX_REG_LOSS_TYPES, REG_NORMALIZERS
from detectron2.config import CfgNode
from detectron2.modeling import (
    ANCHOR_GENERATOR_REGISTRY,
    BACKBONE_REGISTRY,
    META_ARCH_REGISTRY,
    PROPOSAL_GENERATOR_REGISTRY,
    ROI_BOX_HEAD_REGISTRY,
    ROI_HEADS_REGISTRY,
    ROI_KEYPOINT_HEAD_REGISTRY,
    ROI_MASK_HEAD_REGISTRY,
    RPN_HEAD_REGISTRY,
    SEM_SEG_HEADS_REGISTRY,
)

from .data.checks import BAD_ANNOTATION_POLICIES
from .health.collapse import ACTIONS

__all__ = ["CHOICES", "FREE_TEXT_KEYS", "REGISTRY_KEYS", "check_config_choices", "config_value"]

_NORMS = ("", "BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")
_POOLERS = ("ROIAlign", "ROIAlignV2", "ROIPool", "ROIAlignRotated")

CHOICES: Dict[str, Sequence[str]] = {
    # The project's keys.
    "SOLVER.OPTIMIZER": OPTIMIZERS,
    "SOLVER.AMP.PRECISION": tuple(AMP_PRECISIONS),
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE": CLIP_TYPES,
    "HEALTH.ACTION": ACTIONS,
    "RELIABILITY.BAD_ANNOTATIONS": BAD_ANNOTATION_POLICIES,
    # detectron2's keys (detectron2/data/build.py, solver/build.py, layers/batch_norm.py, ...).
    "DATALOADER.SAMPLER_TRAIN": ("TrainingSampler", "RepeatFactorTrainingSampler",
                                 "RandomSubsetTrainingSampler", OBJECT_SHARE_SAMPLER,
                                 CLASS_AWARE_OBJECT_SHARE_SAMPLER),
    "SOLVER.LR_SCHEDULER_NAME": ("WarmupMultiStepLR", "WarmupCosineLR",
                                 "WarmupStepWithFixedGammaLR"),
    "SOLVER.WARMUP_METHOD": ("linear", "constant"),
    "INPUT.MASK_FORMAT": ("polygon", "bitmask"),
    "INPUT.RANDOM_FLIP": ("none", "horizontal", "vertical"),
    "INPUT.CROP.TYPE": ("relative_range", "relative", "absolute", "absolute_range"),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": ("choice", "range"),
    "MODEL.RPN.BBOX_REG_LOSS_TYPE": BOX_REG_LOSS_TYPES,
    "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE": BOX_REG_LOSS_TYPES,
    "MODEL.ROI_BOX_HEAD.POOLER_TYPE": _POOLERS,
    "MODEL.ROI_MASK_HEAD.POOLER_TYPE": _POOLERS,
    "MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE": _POOLERS,
    "MODEL.RETINANET.BBOX_REG_LOSS_TYPE": BOX_REG_LOSS_TYPES,
    "MODEL.FPN.FUSE_TYPE": ("sum", "avg"),
    "MODEL.FPN.NORM": _NORMS,
    "MODEL.RESNETS.NORM": _NORMS,
    "MODEL.ROI_BOX_HEAD.NORM": _NORMS,
    "MODEL.ROI_MASK_HEAD.NORM": _NORMS,
    "MODEL.RETINANET.NORM": _NORMS,
    "MODEL.SEM_SEG_HEAD.NORM": _NORMS,
    "MODEL.BALANCED_LOSS.REG_NORMALIZER": REG_NORMALIZERS,
}

# String keys without a fixed set: paths, devices, dataset names (checked against the dataset
# registry in data/register.py), and INPUT.FORMAT (any PIL mode, or BGR).
FREE_TEXT_KEYS = ("MODEL.DEVICE", "MODEL.WEIGHTS", "INPUT.FORMAT", "OUTPUT_DIR",
                  "DATASETS.SYNTHETIC_ROOT", "HEALTH.DATASET")

# Keys that name a registered class; read when the model is built.
REGISTRY_KEYS = {
    "MODEL.META_ARCHITECTURE": META_ARCH_REGISTRY,
    "MODEL.BACKBONE.NAME": BACKBONE_REGISTRY,
    "MODEL.ANCHOR_GENERATOR.NAME": ANCHOR_GENERATOR_REGISTRY,
    "MODEL.PROPOSAL_GENERATOR.NAME": PROPOSAL_GENERATOR_REGISTRY,
    "MODEL.RPN.HEAD_NAME": RPN_HEAD_REGISTRY,
    "MODEL.ROI_HEADS.NAME": ROI_HEADS_REGISTRY,
    "MODEL.ROI_BOX_HEAD.NAME": ROI_BOX_HEAD_REGISTRY,
    "MODEL.ROI_MASK_HEAD.NAME": ROI_MASK_HEAD_REGISTRY,
    "MODEL.ROI_KEYPOINT_HEAD.NAME": ROI_KEYPOINT_HEAD_REGISTRY,
    "MODEL.SEM_SEG_HEAD.NAME": SEM_SEG_HEADS_REGISTRY,
}
# Accepted besides the registered names: detectron2's precomputed-proposals path, and the empty
# box head of its default Res5ROIHeads (which has none).
_UNREGISTERED_NAMES = {"MODEL.PROPOSAL_GENERATOR.NAME": ("PrecomputedProposals",),
                       "MODEL.ROI_BOX_HEAD.NAME": ("",)}


def config_value(cfg: CfgNode, key: str):
    """The value of a dotted config key, e.g. "SOLVER.BASE_LR"."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _refuse(key: str, value: object, choices: Iterable[str]) -> None:
    choices = sorted(choices, key=str.lower)
    close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(f"{key} must be one of {', '.join(map(repr, choices))}; got {value!r}."
                     f"{hint}")


def check_config_choices(cfg: CfgNode) -> None:
    """Refuse the first key of :data:`CHOICES` or :data:`REGISTRY_KEYS` whose value is not
    allowed, then check MODEL.BALANCED_LOSS's ranges (see the module docstring)."""
    for key, choices in CHOICES.items():
        value = config_value(cfg, key)
        if value not in choices:
            _refuse(key, value, choices)
    for key, registry in REGISTRY_KEYS.items():
        value = config_value(cfg, key)
        allowed = [name for name, _ in registry] + list(_UNREGISTERED_NAMES.get(key, ()))
        if value not in allowed:
            _refuse(key, value, allowed)
    # The balanced heads check their section when they are built; a stock-heads run never
    # builds them, and would carry a bad value into the next config copied from it.
    check_balanced_loss_keys(cfg)
    check_deployment_score_thresh(cfg.TEST.DEPLOYMENT_SCORE_THRESH)
    _check_health_rule_keys(cfg)


def _check_health_rule_keys(cfg: CfgNode) -> None:
    # Met only at the first judged check otherwise, which may be hours into a run.
    health = cfg.HEALTH
    if health.CONFIDENT_SCORE != -1 and not 0.0 <= health.CONFIDENT_SCORE <= 1.0:
        raise ValueError("HEALTH.CONFIDENT_SCORE must be a score in [0, 1], or -1 for "
                         f"TEST.DEPLOYMENT_SCORE_THRESH; got {health.CONFIDENT_SCORE}")
