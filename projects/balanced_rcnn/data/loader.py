"""
The training loader: detectron2's, with the project's image rebalancing (data/samplers.py) when
DATALOADER.SAMPLER_TRAIN is "ObjectShareTrainingSampler" or "ClassAwareObjectShareTrainingSampler",
and objects pasted onto empty training images (data/copy_paste.py) when INPUT.COPY_PASTE.
PROBABILITY > 0.
"""
from typing import Any, Callable, Dict, List, Optional

from detectron2.config import CfgNode
from detectron2.data import (DatasetMapper, build_detection_train_loader,
                             get_detection_dataset_dicts)

from .copy_paste import CopyPasteDatasetMapper
from .samplers import build_object_share_sampler

__all__ = ["build_train_loader", "build_train_mapper"]


def build_train_mapper(cfg: CfgNode, dicts: List[Dict[str, Any]]) -> DatasetMapper:
    """DatasetMapper, or with INPUT.COPY_PASTE.PROBABILITY != 0 the copy-paste one, whose donors
    are the object images of ``dicts``."""
    if cfg.INPUT.COPY_PASTE.PROBABILITY != 0:  # the mapper refuses values outside [0, 1]
        return CopyPasteDatasetMapper(cfg, True, donors=dicts)
    return DatasetMapper(cfg, True)


def build_train_loader(cfg: CfgNode, dicts: Optional[List[Dict[str, Any]]] = None,
                       mapper: Optional[Callable] = None):
    """
    Args:
        dicts: the training records; default: DATASETS.TRAIN as detectron2's own loader reads it.
        mapper: default: :func:`build_train_mapper`.
    """
    if dicts is None:
        dicts = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
            if cfg.MODEL.KEYPOINT_ON else 0,
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
    if mapper is None:
        mapper = build_train_mapper(cfg, dicts)
    # None: detectron2 builds the sampler DATALOADER.SAMPLER_TRAIN names.
    sampler = build_object_share_sampler(cfg, dicts)
    return build_detection_train_loader(cfg, dataset=dicts, mapper=mapper, sampler=sampler)
