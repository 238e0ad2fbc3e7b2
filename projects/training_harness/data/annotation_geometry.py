"""
The geometry of one COCO annotation against its image, checked at registration (checks.py): a box
of four finite numbers with an area, inside its image once clipped; polygons of at least 3 points
whose extent agrees with the box (IoU >= POLYGON_BOX_MIN_IOU); a segmentation where masks are
trained.
"""

import math
from numbers import Real
from typing import Any, Dict, List, Optional, Tuple

__all__ = ["POLYGON_BOX_MIN_IOU", "geometry_problem", "is_box", "is_number"]

# A polygon's extent and its bbox overlap at least this much (a box drawn around the polygon
# gives 1; a polygon of a thin diagonal object still fills its box's extent).
POLYGON_BOX_MIN_IOU = 0.5

_JSON_NUMBERS = frozenset((int, float))  # not bool: type(True) is bool


def is_number(x: Any) -> bool:
    # json's own types first: the abstract Real check costs a microsecond, times a million boxes.
    if type(x) is float:
        return math.isfinite(x)
    if type(x) is int:
        return True
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(x)


def is_box(box: Any) -> bool:
    """Whether ``box`` is four finite numbers. The common case costs one type test per value:
    json's own int and float, whose finite sum proves each finite (a non-finite sum of finite
    values, an overflow, takes the exact path)."""
    if type(box) is not list or len(box) != 4:
        return False
    x, y, w, h = box
    if (type(x) in _JSON_NUMBERS and type(y) in _JSON_NUMBERS and type(w) in _JSON_NUMBERS
            and type(h) in _JSON_NUMBERS and math.isfinite(x + y + w + h)):
        return True
    return all(is_number(v) for v in box)


def _clipped_length(start: float, length: float, size: float) -> float:
    # min(start + length, size) - max(start, 0), without two calls per box side
    end = start + length
    return (end if end < size else size) - (start if start > 0 else 0)


def geometry_problem(ann: Dict[str, Any], image: Dict[str, Any], masks: bool) -> Optional[str]:
    """Why the box or the mask of a COCO annotation cannot be trained on, or None (``masks``:
    the model trains a mask head, so every non-crowd object needs a segmentation)."""
    box = ann.get("bbox")
    if not is_box(box):
        return f"bbox {box!r} is not [x, y, width, height] (four finite numbers)"
    if box[2] <= 0 or box[3] <= 0:
        return f"bbox {box} has zero area (width {box[2]}, height {box[3]})"
    crowd = ann.get("iscrowd", 0)
    # detectron2 clips every box to its image and drops the empty ones without a word (crowd
    # regions are not trained on).
    if not crowd and (_clipped_length(box[0], box[2], image["width"]) <= 0
                      or _clipped_length(box[1], box[3], image["height"]) <= 0):
        return (f"bbox {box} lies outside its {image['width']}x{image['height']} image (zero "
                "area after clipping)")
    segmentation = ann.get("segmentation")
    if masks and not crowd and not segmentation:
        return ("has no segmentation, which MODEL.MASK_ON needs for every non-crowd object "
                f"(segmentation: {segmentation!r})")
    if isinstance(segmentation, dict):  # an RLE mask, decoded at the image's size with masks
        size = [image["height"], image["width"]]
        if masks and ("counts" not in segmentation or segmentation.get("size") != size):
            return ("segmentation is an RLE mask without 'counts', or whose 'size' "
                    f"{segmentation.get('size')!r} is not its image's [height, width] {size}")
    elif isinstance(segmentation, list):  # polygons
        for k, polygon in enumerate(segmentation):
            if not isinstance(polygon, list) or len(polygon) % 2:
                return f"segmentation polygon {k} is not a flat list of x, y pairs"
            if len(polygon) < 6:
                return (f"segmentation polygon {k} has {len(polygon) // 2} points (a polygon "
                        "needs at least 3)")
        if segmentation:
            return _extent_disagreement(box, segmentation, crowd)
    return None


def _extent_disagreement(box: List[float], polygons: List[List[float]], crowd: Any
                         ) -> Optional[str]:
    """Polygon values that are not numbers; else, for an object, the polygons' extent against
    the bbox (XYWH): at IoU below POLYGON_BOX_MIN_IOU one of them is wrong; when the bbox read as
    [x1, y1, x2, y2] fits, it was written so."""
    xs = [v for p in polygons for v in p[0::2]]
    ys = [v for p in polygons for v in p[1::2]]
    try:
        extent = (min(xs), min(ys), max(xs), max(ys))
    except TypeError:  # a number compared with a string, say
        extent = (None,)
    # min and max of finite numbers are finite numbers; a NaN may hide behind a number.
    if not (all(is_number(v) for v in extent) and math.isfinite(sum(xs) + sum(ys))):
        return "segmentation polygons hold values that are not finite numbers"
    if crowd:
        return None
    x, y, w, h = box
    iou = _iou(extent, (x, y, x + w, y + h))
    if iou >= POLYGON_BOX_MIN_IOU:
        return None
    hint = (" It matches the bbox read as [x1, y1, x2, y2]: COCO's bbox is [x, y, width, "
            "height]." if w > x and h > y and _iou(extent, (x, y, w, h)) >= POLYGON_BOX_MIN_IOU
            else "")
    return (f"bbox {box} and its polygons' extent [{', '.join(f'{v:g}' for v in extent)}] "
            f"(x1, y1, x2, y2) overlap at IoU {iou:.2f} < {POLYGON_BOX_MIN_IOU}: one of them is "
            f"wrong.{hint}")


def _iou(a: Tuple[float, float, float, float], b: Tuple[float, float, float, float]) -> float:
    inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
             * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
