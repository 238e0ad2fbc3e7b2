"""
The dataset dicts of DATASETS.TRAIN: detectron2's ``get_detection_dataset_dicts``, plus

- image files that do not exist are skipped, each logged and counted against
  RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION of all the images of DATASETS.TRAIN (data/mapper.py
  continues the tally while training);
- an empty DATASETS.TRAIN, a dataset with no image, and a training set with none left after
  filtering are errors that say what removed the images (detectron2: bare AssertionErrors,
  "Dataset '...' is empty!" and "No valid data found in ...").

Why this is not a pure wrapper: get_detection_dataset_dicts applies detectron2's two filters
(DATALOADER.FILTER_EMPTY_ANNOTATIONS: images with only crowd annotations; MODEL.ROI_KEYPOINT_HEAD.
MIN_KEYPOINTS_PER_IMAGE) before a caller sees a record, and the missing files have to be counted
among all the images, before those filters: the skip allowance is a fraction of all of them, and
"no image left" says how many images each step removed. So detectron2 is called with both filters
off (its "No valid data found" cannot fire then), and its own filter functions run here, after
the missing files are dropped. The one difference from running them inside: detectron2 logs the
class histogram before the missing files are dropped, so it counts their instances too, and
with MODEL.KEYPOINT_ON those of images with too few keypoints (the crowd filter does not change
it: it counts non-crowd instances only).
"""
import logging
import os
from typing import Dict, List, Sequence, Tuple

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.data.build import (
    filter_images_with_few_keypoints,
    filter_images_with_only_crowd_annotations,
    get_detection_dataset_dicts,
)

from .mapper import SkippedImages

__all__ = ["load_train_dicts"]

logger = logging.getLogger(__name__)


def _unfiltered_dicts(cfg: CfgNode, names: Sequence[str]) -> List[Dict]:
    """detectron2's dataset dicts of ``names`` (proposals loaded, metadata checked for
    consistency, class histogram logged), before any image is filtered out."""
    proposal_files = cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None
    try:
        return get_detection_dataset_dicts(names, filter_empty=False, min_keypoints=0,
                                           proposal_files=proposal_files)
    except AssertionError:
        # detectron2 asserts that no dataset is empty; say it as the other errors of the config
        # are said, naming the key (loading the datasets again, on the way to an error only).
        for name in names:
            if len(DatasetCatalog.get(name)) == 0:
                raise ValueError(f"DATASETS.TRAIN: dataset '{name}' has no images") from None
        raise


def _drop_missing_files(dicts: List[Dict], skipped: SkippedImages) -> List[Dict]:
    kept = []
    for d in dicts:
        file_name = d["file_name"]
        # Names with a scheme (manifold://, s3://) are read through a PathManager: not checked.
        if "://" in file_name or os.path.isfile(file_name):
            kept.append(d)
        else:
            skipped.add(file_name, "the file does not exist", check=False)
    if len(kept) < len(dicts):
        logger.warning(f"Skipping {len(dicts) - len(kept)} of {len(dicts)} training images: "
                       f"their files do not exist, e.g. '{next(iter(skipped.reasons))}'")
        skipped.check()
    return kept


def load_train_dicts(cfg: CfgNode) -> Tuple[List[Dict], SkippedImages]:
    """
    The dataset dicts of DATASETS.TRAIN (see the module docstring) and the tally of skipped
    images, which data/mapper.py continues while training.

    Raises:
        ValueError: DATASETS.TRAIN is empty, one of its datasets has no image, or no image is
            left after the filters, saying how many each removed.
        TooManySkippedImages: more image files are missing than the allowance.
    """
    names = list(cfg.DATASETS.TRAIN)
    if not names:
        raise ValueError("DATASETS.TRAIN is empty: name the dataset(s) to train on")
    dicts = _unfiltered_dicts(cfg, names)
    has_instances = "annotations" in dicts[0]
    skipped = SkippedImages(len(dicts), cfg.RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION)
    dicts = _drop_missing_files(dicts, skipped)

    # detectron2's filters, as get_detection_dataset_dicts applies them.
    num_existing = len(dicts)
    filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and has_instances
    if filter_empty:
        dicts = filter_images_with_only_crowd_annotations(dicts)
    num_with_objects = len(dicts)
    min_keypoints = cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON \
        else 0
    if min_keypoints > 0 and has_instances:
        dicts = filter_images_with_few_keypoints(dicts, min_keypoints)

    if not dicts:
        reasons = []
        if len(skipped.reasons):
            reasons.append(f"{len(skipped.reasons)} image files do not exist")
        if filter_empty and num_with_objects < num_existing:
            reasons.append(
                f"{num_existing - num_with_objects} images have no non-crowd annotation and "
                "DATALOADER.FILTER_EMPTY_ANNOTATIONS True removes those (set it to False to train "
                "on images without objects)")
        if num_with_objects > len(dicts):
            reasons.append(f"{num_with_objects - len(dicts)} images have fewer than "
                           f"MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE = {min_keypoints} "
                           "keypoints")
        raise ValueError(
            f"DATASETS.TRAIN {tuple(names)}: no image left to train on. Of "
            f"{skipped.num_images} images, {'; '.join(reasons)}."
        )
    return dicts, skipped
