"""
The records of a parsed COCO instances json reduced to what the pre-flight report reads: each
image's size and its annotations' boxes, contiguous classes and crowd flags.

Registration parses and checks every json once; detectron2's ``load_coco_json`` parses it again
(with pycocotools) when the dataset is first used, which on a COCO-train-sized json costs as much
as the whole rest of the report. ``box_records`` builds the reduced records from registration's
parse instead. They are the projection of what the registered loader returns (image order, the
annotations of each image in file order, the annotations RELIABILITY.BAD_ANNOTATIONS skip
dropped, category ids mapped as ``load_coco_json`` maps them), which a test pins against
detectron2's loader.
"""

from typing import AbstractSet, Any, Dict, List

from detectron2.structures import BoxMode

__all__ = ["box_records"]


def box_records(coco: Dict[str, Any], dropped: AbstractSet[Any] = frozenset()) -> List[Dict]:
    """Per image of a checked COCO json, sorted by id: ``height``, ``width``, ``image_id`` and
    ``annotations`` ({``bbox``, ``bbox_mode``, ``category_id`` (0..K-1 by sorted ids),
    ``iscrowd``}), without the annotations whose id is in ``dropped``."""
    contiguous = {c: i for i, c in enumerate(sorted(c["id"] for c in coco["categories"]))}
    per_image: Dict[Any, List[Dict]] = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        if ann.get("id") in dropped:
            continue
        per_image[ann["image_id"]].append({
            "bbox": ann["bbox"], "bbox_mode": BoxMode.XYWH_ABS,
            "category_id": contiguous[ann["category_id"]], "iscrowd": ann.get("iscrowd", 0)})
    sizes = {image["id"]: (image["height"], image["width"]) for image in coco["images"]}
    return [{"image_id": i, "height": sizes[i][0], "width": sizes[i][1],
             "annotations": per_image[i]} for i in sorted(per_image)]
