"""
Training images per class: what AP by class frequency groups the classes by
(evaluation/frequency_groups.py), and the ``class_image_count`` metadata that detectron2's
federated loss (MODEL.ROI_BOX_HEAD.USE_FED_LOSS) reads, which only detectron2's LVIS registration
sets.
"""

from typing import Dict, List, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog

__all__ = ["class_image_counts", "set_class_image_count_metadata"]


def class_image_counts(dataset_dicts: Sequence[Dict], num_classes: int) -> List[int]:
    """Per contiguous class id: the images with at least one non-crowd object of the class."""
    counts = [0] * num_classes
    for record in dataset_dicts:
        for c in {a["category_id"] for a in record.get("annotations", [])
                  if a.get("iscrowd", 0) == 0}:
            counts[c] += 1
    return counts


def set_class_image_count_metadata(dataset_names: Sequence[str]) -> None:
    """Set ``class_image_count`` (LVIS's form: [{"id", "image_count"}] in class order) on every
    dataset of ``dataset_names`` that lacks it."""
    for name in dataset_names:
        metadata = MetadataCatalog.get(name)
        if metadata.get("class_image_count", None) is not None:
            continue
        counts = class_image_counts(DatasetCatalog.get(name), len(metadata.thing_classes))
        metadata.class_image_count = [{"id": i, "image_count": n} for i, n in enumerate(counts)]
