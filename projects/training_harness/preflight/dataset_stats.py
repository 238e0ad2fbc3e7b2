"""
The images and the classes of a training set (and its evaluation sets): how imbalanced it is
between empty and object images and between classes, before anything is trained.
"""

from typing import Any, Dict, Mapping, Sequence

from balanced_rcnn.data.class_counts import class_image_counts
from balanced_rcnn.evaluation.frequency_groups import frequency_groups

__all__ = ["FEW_IMAGES", "dataset_statistics"]

# Classes with fewer training images than this are named: a handful of images is too few to
# learn a class from, whatever the sampler.
FEW_IMAGES = 5


def dataset_statistics(train_dicts: Sequence[Dict[str, Any]], class_names: Sequence[str],
                       test_dicts: Mapping[str, Sequence[Dict[str, Any]]] = {}) -> Dict[str, Any]:
    """
    Counts of ``train_dicts`` (detectron2 dicts, contiguous category ids): images, the share
    without a non-crowd object, objects per object image, crowd share, per class the instances and
    images (most images first) with the head/tail ratio and the frequency groups of AP by class
    frequency, the classes with fewer than FEW_IMAGES training images, and per test set the
    classes without any object there (their AP is undefined).
    """
    num_classes = len(class_names)
    # One pass (the json's size: a million annotations); an image holds objects as
    # holds_objects says: a non-crowd annotation.
    num_anns = num_objects = object_images = 0
    instances = [0] * num_classes
    for record in train_dicts:
        before = num_objects
        for a in record.get("annotations", ()):
            num_anns += 1
            if a.get("iscrowd", 0) == 0:
                instances[a["category_id"]] += 1
                num_objects += 1
        object_images += num_objects > before
    images = class_image_counts(train_dicts, num_classes)
    order = sorted(range(num_classes), key=lambda c: (-images[c], c))
    present = [images[c] for c in order if images[c] > 0]
    groups = frequency_groups(images)
    absent_in_test = {}
    for name, dicts in test_dicts.items():
        seen = set(c for c, n in enumerate(class_image_counts(dicts, num_classes)) if n)
        absent_in_test[name] = [class_names[c] for c in range(num_classes) if c not in seen]
    return {
        "images": len(train_dicts),
        "object_images": object_images,
        "empty_share": 1.0 - object_images / len(train_dicts) if train_dicts else 0.0,
        "objects": num_objects,
        "objects_per_object_image": num_objects / object_images if object_images else 0.0,
        "crowd_share": (num_anns - num_objects) / num_anns if num_anns else 0.0,
        "classes": [{"name": class_names[c], "instances": instances[c], "images": images[c],
                     "group": next(g for g, members in groups.items() if c in members)}
                    for c in order],
        "head_tail_ratio": present[0] / present[-1] if present else None,
        "classes_without_images": [class_names[c] for c in order if images[c] == 0],
        "classes_with_few_images": [class_names[c] for c in order if 0 < images[c] < FEW_IMAGES],
        "absent_in_test": absent_in_test,
    }
