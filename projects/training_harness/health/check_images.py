"""
The images of the monitor's detection checks (health/monitor.py): which records they are, and
reading them once at set-up so that an unusable file is named before anything is built.
"""

import copy
from typing import Any, Dict, List, Sequence

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper

from ..data.mapper import SkippingMapper
from ..utils.random_state import preserved_random_state

__all__ = ["check_health_images", "check_records", "check_set_warnings", "health_dataset",
           "load_check_records"]


def check_records(records: Sequence[Dict[str, Any]], num_images: int,
                  object_images_only: bool = False) -> List[Dict[str, Any]]:
    """The check images among a dataset's records: the first ``num_images``, of those holding a
    non-crowd annotation with ``object_images_only``."""
    if object_images_only:
        records = [r for r in records
                   if any(not a.get("iscrowd", 0) for a in r.get("annotations", ()))]
    return list(records[:num_images])


def load_check_records(dataset_name: str, num_images: int,
                       object_images_only: bool = False) -> List[Dict[str, Any]]:
    """:func:`check_records` of a registered dataset; an error if none is left."""
    records = check_records(DatasetCatalog.get(dataset_name), num_images, object_images_only)
    if object_images_only and not records:
        raise ValueError(
            f"HEALTH.OBJECT_IMAGES_ONLY: dataset '{dataset_name}' (HEALTH.DATASET or "
            "DATASETS.TEST[0]) has no image with a non-crowd annotation to check on"
        )
    return records


def health_dataset(cfg: CfgNode) -> str:
    """The dataset of the detection checks: HEALTH.DATASET, else DATASETS.TEST[0], else ""."""
    return cfg.HEALTH.DATASET or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")


def check_set_warnings(cfg: CfgNode) -> List[str]:
    """What the HEALTH keys leave the detection checks unable to see."""
    warnings = []
    if not health_dataset(cfg) and cfg.HEALTH.PERIOD > 0:
        warnings.append("no detection checks (HEALTH.DATASET is empty and DATASETS.TEST names no "
                        "dataset); the per-step measures and the non-finite stop stay on.")
    lowest = min(min(cfg.HEALTH.SCORE_THRESHOLDS, default=1.0), cfg.HEALTH.MAIN_THRESHOLD)
    if lowest < cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST:
        warnings.append(
            f"the model drops detections below MODEL.ROI_HEADS.SCORE_THRESH_TEST="
            f"{cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST}, so counts at lower HEALTH thresholds "
            f"(lowest: {lowest}) equal the count at that score.")
    return warnings


def check_health_images(cfg: CfgNode) -> None:
    """
    Read the check images at set-up, through the evaluation mapper (which names an unusable
    file): the monitor reads them again only once the model and the training data are built.
    """
    health = cfg.HEALTH
    name = health_dataset(cfg)
    if not (health.ENABLED and health.PERIOD > 0 and name):
        return
    mapper = SkippingMapper(DatasetMapper(cfg, False))
    with preserved_random_state():  # the test-time resize draws its size from NumPy's state
        for record in load_check_records(name, health.NUM_IMAGES, health.OBJECT_IMAGES_ONLY):
            mapper(copy.deepcopy(record))
