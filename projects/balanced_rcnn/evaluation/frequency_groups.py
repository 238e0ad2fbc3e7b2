"""
AP by class frequency, in the form of LVIS's APr / APc / APf (Gupta et al. 2019): the classes are
grouped by the number of training images that hold them, and a group's AP is the mean of its
classes' AP (classes without a ground-truth object in the evaluation set, whose AP is NaN, left
out).

LVIS's groups have fixed bounds (rare: 1-10 training images, common: 11-100, frequent: more),
made for its 100k training images; on a dataset of a few thousand images every class would be
"rare". Here the bounds scale with the dataset: the classes sorted by training-image count, most
frequent first, split into three groups of (nearly) equal size, the larger groups first (20
classes: 7 frequent, 7 common, 6 rare; 2 classes: 1 frequent, 1 common, no rare class). Ties go
by class id. A group without a class, or without a class with an AP, reports NaN.
"""

import logging
from typing import Dict, List, Sequence, Tuple

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator

from ..data.class_counts import class_image_counts

__all__ = ["FREQUENCY_GROUPS", "FrequencyGroupCOCOEvaluator", "class_image_counts",
           "frequency_groups", "group_ap"]

logger = logging.getLogger(__name__)
FREQUENCY_GROUPS = ("APr", "APc", "APf")  # rare, common, frequent


def frequency_groups(counts: Sequence[int]) -> Dict[str, List[int]]:
    """{"APr": rare class ids, "APc": common, "APf": frequent} by the module docstring's rule."""
    order = sorted(range(len(counts)), key=lambda c: (-counts[c], c))
    frequent, common, rare = (list(map(int, g)) for g in np.array_split(order, 3))
    return {"APr": sorted(rare), "APc": sorted(common), "APf": sorted(frequent)}


def group_ap(per_class_ap: Sequence[float], groups: Dict[str, List[int]]) -> Dict[str, float]:
    """Each group's mean of the finite per-class APs (by contiguous class id); NaN if none."""
    out = {}
    for name, members in groups.items():
        values = [per_class_ap[c] for c in members if np.isfinite(per_class_ap[c])]
        out[name] = float(np.mean(values)) if values else float("nan")
    return out


# Per process, by the training sets' registered loaders (a dataset registered anew is read
# anew): every evaluation of a run builds this evaluator, and a COCO-sized json takes seconds
# to read.
_COUNTS: Dict[tuple, List[int]] = {}


def _training_counts(names: Tuple[str, ...], num_classes: int) -> List[int]:
    key = (tuple((name, DatasetCatalog[name]) for name in names), num_classes)
    if key not in _COUNTS:
        _COUNTS[key] = class_image_counts(
            [r for name in names for r in DatasetCatalog.get(name)], num_classes)
    return _COUNTS[key]


class FrequencyGroupCOCOEvaluator(COCOEvaluator):
    """COCOEvaluator whose bbox and segm results also hold APr / APc / APf (module docstring),
    grouped by the class counts of ``train_datasets``."""

    def __init__(self, dataset_name: str, train_datasets: Sequence[str], **kwargs):
        super().__init__(dataset_name, **kwargs)
        classes = MetadataCatalog.get(dataset_name).get("thing_classes", None)
        self._classes = classes
        self._groups = None
        if not train_datasets or not classes:
            logger.info("AP by class frequency: no training set or no class list, not computed")
            return
        for name in train_datasets:
            if MetadataCatalog.get(name).get("thing_classes", None) != classes:
                logger.warning(
                    f"AP by class frequency: the classes of training set {name!r} differ from "
                    f"those of {dataset_name!r}; not computed")
                return
        try:
            counts = _training_counts(tuple(train_datasets), len(classes))
        except (OSError, ValueError, KeyError) as e:  # e.g. --eval-only without the train json
            logger.warning(f"AP by class frequency: cannot read the training set ({e}); not "
                           "computed")
            return
        self._groups = frequency_groups(counts)
        logger.info("AP by class frequency on %s (training images per class): %s", dataset_name,
                    "; ".join(f"{g}: " + ", ".join(f"{classes[c]} {counts[c]}" for c in members)
                              for g, members in self._groups.items()))

    def evaluate(self, img_ids=None):
        results = super().evaluate(img_ids)
        if not results or self._groups is None:
            return results
        classes = self._classes
        for task in ("bbox", "segm"):
            if task in results:
                per_class = [results[task].get(f"AP-{name}", float("nan")) for name in classes]
                results[task].update(group_ap(per_class, self._groups))
        return results
