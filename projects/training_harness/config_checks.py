"""
Every config key with a fixed set of values, checked at set-up, before anything is built, whether
or not this run reads it: a typo in a key that only a later stage reads (the evaluation, an unused
head's loss options) otherwise fails hours in, or never.

Each key is checked by the component that reads it, with that component's own table of choices
(``balanced_rcnn.config.check_choice``, which names the close matches): here they are only called
early. detectron2's keys are left to detectron2: the names of registered classes are looked up in
its registries (so a class a user registers before set-up is accepted), and the keys its cheap
builders read are checked by calling those builders (:data:`DETECTRON2_BUILDERS`) on detectron2's
defaults with only that key changed, so that a refusal is about the key named. MODEL.FPN.FUSE_TYPE,
which detectron2's FPN only asserts, has the core's table (modeling/backbone.py);
DATALOADER.SAMPLER_TRAIN is refused by detectron2 when the Trainer builds the loader, before the
first iteration.
"""

from typing import Callable, Dict

import torch
from balanced_rcnn.config import check_choice
from balanced_rcnn.engine.optimizer import check_solver_choices
from balanced_rcnn.engine.trainer import amp_precision
from balanced_rcnn.evaluation.image_level import check_deployment_score_thresh
from balanced_rcnn.modeling.checks import check_balanced_loss_keys, check_box_reg_loss_type
from balanced_rcnn.modeling.backbone import check_fpn_fuse_type
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import annotations_to_instances, build_augmentation
from detectron2.layers import get_norm
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
from detectron2.modeling.poolers import ROIPooler
from detectron2.solver import build_lr_scheduler
from detectron2.structures import BoxMode

from .data.checks import BAD_ANNOTATION_POLICIES
from .health.collapse import ACTIONS

__all__ = ["DETECTRON2_BUILDERS", "REGISTRY_KEYS", "check_config_choices", "config_value"]

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

_NORM_KEYS = ("MODEL.FPN.NORM", "MODEL.RESNETS.NORM", "MODEL.ROI_BOX_HEAD.NORM",
              "MODEL.ROI_MASK_HEAD.NORM", "MODEL.RETINANET.NORM", "MODEL.SEM_SEG_HEAD.NORM")
_POOLER_KEYS = ("MODEL.ROI_BOX_HEAD.POOLER_TYPE", "MODEL.ROI_MASK_HEAD.POOLER_TYPE",
                "MODEL.ROI_KEYPOINT_HEAD.POOLER_TYPE")


def _one_polygon(cfg: CfgNode) -> None:
    annotation = {"bbox": [0, 0, 2, 2], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0,
                  "segmentation": [[0, 0, 2, 0, 2, 2]]}
    annotations_to_instances([annotation], (4, 4), mask_format=cfg.INPUT.MASK_FORMAT)


def _crop(cfg: CfgNode) -> None:
    cfg.INPUT.CROP.ENABLED = True  # read whether or not this run crops
    DatasetMapper.from_config(cfg, is_train=True)


def _lr_scheduler(cfg: CfgNode) -> None:
    build_lr_scheduler(cfg, torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0))


# detectron2's keys with a fixed set of values -> the detectron2 builder that reads them. Each is
# called on detectron2's default config with only that key changed, so that a refusal is about
# that key (each call costs about a millisecond).
DETECTRON2_BUILDERS: Dict[str, Callable[[CfgNode], object]] = {
    "INPUT.RANDOM_FLIP": lambda cfg: build_augmentation(cfg, is_train=True),
    "INPUT.MIN_SIZE_TRAIN_SAMPLING": lambda cfg: build_augmentation(cfg, is_train=True),
    "INPUT.CROP.TYPE": _crop,
    "SOLVER.LR_SCHEDULER_NAME": _lr_scheduler,
    "SOLVER.WARMUP_METHOD": _lr_scheduler,
    "INPUT.MASK_FORMAT": _one_polygon,
    **{key: lambda cfg, key=key: get_norm(config_value(cfg, key), 32) for key in _NORM_KEYS},
    **{key: lambda cfg, key=key: ROIPooler(7, (0.25,), 0, config_value(cfg, key))
       for key in _POOLER_KEYS},
}


def config_value(cfg: CfgNode, key: str):
    """The value of a dotted config key, e.g. "SOLVER.BASE_LR"."""
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def check_config_choices(cfg: CfgNode) -> None:
    """Refuse the first key whose value is not allowed (see the module docstring)."""
    # The project's keys, by the checks of the components that read them.
    check_solver_choices(cfg)
    amp_precision(cfg.SOLVER.AMP.PRECISION)
    # detectron2's RetinaNet takes the same types as its RPN and box head (the same table).
    for key in ("MODEL.RPN.BBOX_REG_LOSS_TYPE", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE",
                "MODEL.RETINANET.BBOX_REG_LOSS_TYPE"):
        check_box_reg_loss_type(key, config_value(cfg, key))
    check_fpn_fuse_type(cfg)
    # The balanced heads check their section when they are built; a stock-heads run never
    # builds them, and would carry a bad value into the next config copied from it.
    check_balanced_loss_keys(cfg)
    check_deployment_score_thresh(cfg.TEST.DEPLOYMENT_SCORE_THRESH)
    check_choice("HEALTH.ACTION", cfg.HEALTH.ACTION, ACTIONS)
    check_choice("RELIABILITY.BAD_ANNOTATIONS", cfg.RELIABILITY.BAD_ANNOTATIONS,
                 BAD_ANNOTATION_POLICIES)
    _check_health_rule_keys(cfg)
    # detectron2's keys, by its registries and its builders.
    for key, registry in REGISTRY_KEYS.items():
        allowed = [name for name, _ in registry] + list(_UNREGISTERED_NAMES.get(key, ()))
        check_choice(key, config_value(cfg, key), allowed)
    for key, build in DETECTRON2_BUILDERS.items():
        value = config_value(cfg, key)
        defaults = get_cfg()
        defaults.merge_from_list([key, value])
        try:
            build(defaults)
        except (ValueError, KeyError, AssertionError) as e:
            raise ValueError(f"detectron2 refuses {key} = {value!r} ({type(e).__name__}: {e})") \
                from None


def _check_health_rule_keys(cfg: CfgNode) -> None:
    # Met only at the first judged check otherwise, which may be hours into a run.
    health = cfg.HEALTH
    if health.CONFIDENT_SCORE != -1 and not 0.0 <= health.CONFIDENT_SCORE <= 1.0:
        raise ValueError("HEALTH.CONFIDENT_SCORE must be a score in [0, 1], or -1 for "
                         f"TEST.DEPLOYMENT_SCORE_THRESH; got {health.CONFIDENT_SCORE}")
