"""
The checks of a COCO instances json that are cheap enough to run before anything trains. Each
problem names the json, the annotation id, the image id and file.

:func:`check_coco_annotations` runs on the json of a DATASETS.REGISTER_COCO dataset when it is
registered (the json is parsed then anyway). Always errors: an annotation whose image_id is not
in ``images`` (detectron2 ignores it, with a count in a warning) or whose category_id is not in
``categories`` (detectron2 stops with a KeyError naming neither the annotation nor the file), an
image entry without id/file_name/height/width, an image id or an annotation id used twice
(detectron2 silently drops the images; for annotations it asserts that the json's ids are not
unique without naming one, and not at all for a json whose name contains "minival"), and in a
training set under MODEL.MASK_ON and INPUT.MASK_FORMAT polygon an RLE segmentation of a
non-crowd object (detectron2 fails when the image is first sampled; evaluation reads RLE fine),
one image file under two image ids (its objects counted twice: a perfect detector scored 72.7
AP), an image height or width that is not a positive number, and fields of the wrong type that
detectron2 or pycocotools would misread or fail on later (:data:`FIELD_RULES`).
By RELIABILITY.BAD_ANNOTATIONS ("error" or "skip"): a box of zero area, a non-crowd box entirely
outside its image (zero area once clipped), a polygon with fewer than 3 points and, with
MODEL.MASK_ON, a non-crowd object without a segmentation, which detectron2 drops silently, with a
bare count, or fails on when sampled or evaluated; and a non-crowd object whose polygons' extent
and bbox overlap at IoU below POLYGON_BOX_MIN_IOU (a shifted polygon, or the bbox written as
[x1, y1, x2, y2], which the message says when that reading fits); the geometry rules are in
annotation_geometry.py. Duplicate category names are
refused when the json is read (data/register.py), a training set whose objects are all crowd is
warned about.

Image files that do not exist are skipped when the training set is built (data/train_dicts.py);
unreadable, truncated and wrongly sized images are only found by reading them, while training
(data/mapper.py).
"""

import collections
import logging
from typing import Any, Dict, List, Optional, Sequence, Set, Tuple

from balanced_rcnn.config import check_choice

from .annotation_geometry import geometry_problem, is_number

__all__ = ["BAD_ANNOTATION_POLICIES", "FIELD_RULES", "ID_TYPES", "check_coco_annotations"]

logger = logging.getLogger(__name__)

BAD_ANNOTATION_POLICIES = ("error", "skip")
_LISTED = 5  # problems named in an error message
_LOGGED = 20  # skipped annotations named in the log, per dataset


def image_id_of(image: Any) -> Any:
    """The id of an image entry that has every key the checks need, else None."""
    if isinstance(image, dict) and all(k in image for k in ("id", "file_name", "height",
                                                            "width")):
        return image["id"]
    return None


def _listing(problems: Sequence[str], limit: int = _LISTED) -> str:
    more = len(problems) - limit
    return "\n  " + "\n  ".join(problems[:limit]) + (f"\n  ... and {more} more" if more > 0 else "")


ID_TYPES = (int, str)  # detectron2 sorts the image and category ids: one of these for all

# Each field rule: what a value must be, and why (the messages quote both).
FIELD_RULES = {
    "id": "an int or a string (detectron2 sorts the ids)",
    "file_name": "a non-empty string",
    "iscrowd": "0 or 1 (detectron2 reads any other true value, even \"0\", as a crowd region)",
    "area": "a number >= 0 (COCO evaluation sorts the objects into small, medium and large by it)",
}


def _mixed_id_types(entries: Sequence[Dict[str, Any]], what: str) -> Optional[str]:
    types = {type(entry["id"]) for entry in entries}
    if len(types) > 1:
        return (f"{what} ids mix ints and strings (e.g. {entries[0]['id']!r}); detectron2 sorts "
                "them, which needs one type")
    return None


def _duplicates(entries: Sequence[Any], key: str, show: str) -> Dict[Any, List[Any]]:
    """id -> the ``show`` values of the entries that share it, for every id used twice."""
    # Other types (None, lists) are reported by the field checks.
    ids = [entry.get(key) for entry in entries if isinstance(entry, dict)]
    ids = [i for i in ids if type(i) in ID_TYPES]
    if len(set(ids)) == len(ids):  # the common case, without grouping a million entries
        return {}
    groups: Dict[Any, List[Any]] = collections.defaultdict(list)
    for entry in entries:
        if isinstance(entry, dict) and type(entry.get(key)) in ID_TYPES:
            groups[entry[key]].append(entry.get(show))
    return {i: shown for i, shown in groups.items() if len(shown) > 1}


def _annotation_field_problem(ann: Dict[str, Any], evaluated_masks: bool) -> Optional[str]:
    """A field of the wrong type (FIELD_RULES), or a crowd region without the segmentation that
    the mask evaluation of an evaluated set reads."""
    if ann.get("iscrowd", 0) not in (0, 1):
        return f"iscrowd must be {FIELD_RULES['iscrowd']}, got {ann['iscrowd']!r}"
    if "area" in ann and not (is_number(ann["area"]) and ann["area"] >= 0):
        return f"area must be {FIELD_RULES['area']}, got {ann['area']!r}"
    if evaluated_masks and ann.get("iscrowd", 0) and not ann.get("segmentation"):
        return ("a crowd region of a DATASETS.TEST set under MODEL.MASK_ON needs a "
                "segmentation: COCO's mask evaluation reads one for every annotation")
    return None


def check_coco_annotations(
    coco: Dict[str, Any], json_file: str, bad_annotations: str = "error",
    mask_format: Optional[str] = None, training: bool = True, evaluated: bool = False,
) -> Set[Any]:
    """
    Check the images and annotations of a parsed COCO instances json (see the module
    docstring). Returns the ids of the annotations to drop (with ``bad_annotations="skip"``).
    ``mask_format``: INPUT.MASK_FORMAT when the model has a mask head (MODEL.MASK_ON), else None;
    ``training``: the dataset is in DATASETS.TRAIN; ``evaluated``: it is in DATASETS.TEST, so
    pycocotools reads its json: every annotation needs an ``area`` and, with masks, a
    segmentation (crowd regions too).

    Raises:
        ValueError: naming every problem (the first few in the message, the count of all).
    """
    check_choice("RELIABILITY.BAD_ANNOTATIONS", bad_annotations, BAD_ANNOTATION_POLICIES)
    errors: List[str] = []
    images: Dict[Any, Dict] = {}
    unsized: Set[Any] = set()  # images whose size is reported: their boxes are not checked
    for i, image in enumerate(coco["images"]):
        missing = [k for k in ("id", "file_name", "height", "width")
                   if not isinstance(image, dict) or k not in image]
        if missing:
            errors.append(f"images[{i}] has no {', '.join(missing)}: {image!r}"[:300])
        elif type(image["id"]) not in ID_TYPES:
            errors.append(f"images[{i}]: id must be {FIELD_RULES['id']}, got {image['id']!r}")
        elif type(image["file_name"]) is not str or not image["file_name"]:
            errors.append(f"images[{i}] (id {image['id']!r}): file_name must be "
                          f"{FIELD_RULES['file_name']}, got {image['file_name']!r}")
        else:
            images[image["id"]] = image
    mixed = _mixed_id_types(list(images.values()), "image")
    if mixed:
        errors.append(mixed)
    for image_id, files in _duplicates(coco["images"], "id", "file_name").items():
        errors.append(f"image id {image_id!r} is used by {len(files)} images ("
                      f"{', '.join(map(repr, files[:3]))}); detectron2 would keep only one")
    for file_name, ids in _duplicates(coco["images"], "file_name", "id").items():
        errors.append(f"image file {file_name!r} is listed under {len(ids)} image ids ("
                      f"{', '.join(map(str, ids[:3]))}): its objects would be counted once per "
                      "id, and a detector would be scored against each copy")
    for i, image in enumerate(coco["images"]):
        if image_id_of(image) is not None and not all(
                is_number(image[k]) and image[k] > 0 for k in ("height", "width")):
            unsized.add(image["id"])
            errors.append(f"images[{i}] (id {image.get('id')!r}): height and width must be "
                          f"positive numbers, got {image.get('height')!r} and "
                          f"{image.get('width')!r}")
    for ann_id, on in _duplicates(coco["annotations"], "id", "image_id").items():
        errors.append(f"annotation id {ann_id!r} is used by {len(on)} annotations (of image ids "
                      f"{', '.join(map(str, on[:3]))})")
    category_ids = {c["id"] for c in coco["categories"]}
    bad_geometry: List[Tuple[Any, str]] = []
    masks = mask_format is not None
    polygons_only = training and mask_format == "polygon"

    def where(ann_id: Any, image: Dict[str, Any]) -> str:
        return f"annotation id {ann_id} (image id {image['id']}, '{image['file_name']}')"

    no_area: List[Any] = []  # the annotations of an evaluated set that have no area
    for i, ann in enumerate(coco["annotations"]):
        if not isinstance(ann, dict):
            errors.append(f"annotations[{i}] is a {type(ann).__name__}, not an object")
            continue
        image_id = ann.get("image_id")
        image = images.get(image_id) if type(image_id) in ID_TYPES else None
        if image is None:
            errors.append(f"annotation id {ann.get('id', f'at index {i}')}: image_id "
                          f"{ann.get('image_id')!r} is not in 'images'")
            continue
        if type(ann.get("category_id")) not in ID_TYPES or ann["category_id"] not in category_ids:
            errors.append(f"{where(ann.get('id', f'at index {i}'), image)}: category_id "
                          f"{ann.get('category_id')!r} is not in 'categories' (ids: "
                          f"{', '.join(map(str, sorted(category_ids)))})")
            continue
        if (polygons_only and isinstance(ann.get("segmentation"), dict)
                and not ann.get("iscrowd", 0)):
            errors.append(f"{where(ann.get('id', f'at index {i}'), image)}: its segmentation "
                          "is an RLE mask, which INPUT.MASK_FORMAT polygon cannot use for a "
                          "non-crowd object; set INPUT.MASK_FORMAT bitmask")
            continue
        field = _annotation_field_problem(ann, evaluated and masks)
        if field is not None:
            errors.append(f"{where(ann.get('id', f'at index {i}'), image)}: {field}")
            continue
        if evaluated and "area" not in ann:
            no_area.append(ann.get("id", f"at index {i}"))
        if image["id"] in unsized:
            continue
        problem = geometry_problem(ann, image, masks)
        if problem is not None:
            ann_id = ann.get("id", f"at index {i}")
            bad_geometry.append((ann_id, f"{where(ann_id, image)}: {problem}"))

    if no_area:
        shown = ", ".join(map(str, no_area[:_LISTED])) + (", ..." if len(no_area) > _LISTED
                                                           else "")
        errors.append(f"{len(no_area)} annotations have no 'area' (ids {shown}), "
                      "which COCO evaluation of a DATASETS.TEST set reads: add each object's "
                      "area in pixels (its mask's; bbox width x height without masks)")
    if errors:
        raise ValueError(f"'{json_file}' has {len(errors)} invalid image or annotation entries:"
                         f"{_listing(errors)}")
    if bad_geometry and bad_annotations == "error":
        raise ValueError(
            f"'{json_file}' has {len(bad_geometry)} annotations that cannot be trained on:"
            f"{_listing([p for _, p in bad_geometry])}\nFix them, or set "
            "RELIABILITY.BAD_ANNOTATIONS skip to drop them (each is logged)."
        )
    if bad_geometry:
        logger.warning(
            f"'{json_file}': dropping {len(bad_geometry)} annotations that cannot be trained on "
            f"(RELIABILITY.BAD_ANNOTATIONS skip):{_listing([p for _, p in bad_geometry], _LOGGED)}"
        )
    return {ann_id for ann_id, _ in bad_geometry}
