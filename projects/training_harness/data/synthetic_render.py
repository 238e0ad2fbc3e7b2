"""
The drawing of one synthetic image: a textured background, the objects placed so that no two
boxes come closer than a gap, each painted from the mask that pycocotools rasterises from its json
polygon (so image, polygon and training mask agree pixel for pixel), then noise.

Each image is drawn from its own random stream, seeded by (seed, image index): changing one image
never shifts the others.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

from .synthetic_params import COLORS, SHAPES, SyntheticShapesParams

__all__ = ["render_image"]

# Gap in pixels kept between the bounding boxes of two objects, so masks never touch.
_OBJECT_GAP = 2.0
_PLACEMENT_TRIES = 200
# Minimum L1 distance (sum over RGB) between an object's colour and the mean background under it:
# enough contrast to be learnable in a few CPU minutes, not so much that colour alone solves it.
_MIN_CONTRAST = 90.0
_NOISE_STD = 6.0  # per-pixel Gaussian noise over the whole image
# Per-channel jitter of a colour-coded object's colour: the class stays unambiguous.
_COLOR_JITTER = 20.0


def _background(rng: np.random.Generator, h: int, w: int, grey: bool = False) -> np.ndarray:
    """A (H, W, 3) float32 texture: a gradient, stripes or smooth colour clouds; in shades of
    grey with ``grey`` (the backgrounds of colour-coded classes)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    # Grey: 1 channel, broadcast to 3 at the end (the random colours' stream is left as it was).
    channels = 1 if grey else 3
    c1, c2 = rng.uniform(40 if grey else 0, 215 if grey else 255,
                         size=(2, channels)).astype(np.float32)
    theta = rng.uniform(0, math.pi)
    proj = x * math.cos(theta) + y * math.sin(theta)  # (H, W) coordinate along the texture axis
    kind = int(rng.integers(3))
    if kind == 2:  # colour clouds: a few blobs per side, half of the full contrast around a base
        # colour (full-contrast clouds 24 px apart camouflage the objects for a small model)
        grid = rng.uniform(-64, 64, size=(max(h // 64, 2), max(w // 64, 2), channels))
        clouds = cv2.resize(grid.astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        texture = np.clip((c1 + c2)[None, None] / 2 + clouds.reshape(h, w, channels), 0, 255)
    else:
        if kind == 0:  # linear gradient
            t = (proj - proj.min()) / max(float(np.ptp(proj)), 1.0)
        else:  # stripes, period 6-30 px: edges that look like shape borders
            period = rng.uniform(6, 30)
            t = 0.5 + 0.5 * np.sin(2 * math.pi * proj / period + rng.uniform(0, 2 * math.pi))
        texture = c1 * (1 - t[..., None]) + c2 * t[..., None]
    return np.broadcast_to(texture, (h, w, 3)).astype(np.float32)


def _outline(rng: np.random.Generator, shape: str, size: float) -> np.ndarray:
    """The shape's polygon (V, 2), randomly rotated, scaled so max(bbox w, h) == size, at 0."""
    poly = SHAPES[shape]()
    angle = rng.uniform(0, 2 * math.pi)
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    poly = poly @ rot.T
    poly -= poly.min(axis=0)
    return poly * (size / poly.max())


def _place(rng: np.random.Generator, extents: Sequence[np.ndarray], h: int, w: int,
           image_index: int) -> List[np.ndarray]:
    """Top-left corners (2,) for boxes of the given (w, h) extents, with no two boxes closer
    than _OBJECT_GAP. Largest first, so the hardest placements are tried in the emptiest image."""
    boxes: List[np.ndarray] = []
    corners: Dict[int, np.ndarray] = {}
    for i in sorted(range(len(extents)), key=lambda i: -float(extents[i].max())):
        ew, eh = extents[i]
        for _ in range(_PLACEMENT_TRIES):
            xy = rng.uniform(0, 1, size=2) * np.array([w - ew, h - eh])
            box = np.array([xy[0], xy[1], xy[0] + ew, xy[1] + eh])
            if all(box[0] > b[2] + _OBJECT_GAP or b[0] > box[2] + _OBJECT_GAP or
                   box[1] > b[3] + _OBJECT_GAP or b[1] > box[3] + _OBJECT_GAP for b in boxes):
                boxes.append(box)
                corners[i] = xy
                break
        else:
            raise ValueError(
                f"synthetic image {image_index}: could not place {len(extents)} non-overlapping "
                f"objects in {h}x{w} px; lower objects_per_image or object_size")
    return [corners[i] for i in range(len(extents))]


def render_image(params: SyntheticShapesParams, index: int, labels: List[int]
                 ) -> Tuple[np.ndarray, List[Dict]]:
    """Image ``index`` of the dataset, (H, W, 3) uint8 RGB, holding one object of each class
    index in ``labels``, and its COCO annotations (without ids)."""
    # Each image has its own stream, so changing one image never shifts the others.
    rng = np.random.default_rng([params.seed, index])
    h, w = params.image_size
    image = _background(rng, h, w, grey=bool(params.colors))
    smin, smax = params.object_size
    kinds = [params.class_shape_and_color(c) for c in labels]
    outlines = [_outline(rng, shape, rng.uniform(smin, smax)) for shape, _ in kinds]
    corners = _place(rng, [p.max(axis=0) for p in outlines], h, w, index)
    anns = []
    for label, (_, color), poly, xy in zip(labels, kinds, outlines, corners):
        # Rounded once: this exact polygon goes to the json and is rasterised for the pixels.
        flat = np.round(poly + xy, 2).reshape(-1).tolist()
        rle = mask_util.merge(mask_util.frPyObjects([flat], h, w))
        mask = mask_util.decode(rle).astype(bool)
        _paint(rng, image, mask, color)
        xs, ys = flat[0::2], flat[1::2]
        anns.append({
            "category_id": label + 1,
            "segmentation": [flat],
            "area": int(mask_util.area(rle)),
            "bbox": [round(min(xs), 2), round(min(ys), 2),
                     round(max(xs) - min(xs), 2), round(max(ys) - min(ys), 2)],
            "iscrowd": 0,
        })
    image += rng.normal(0, _NOISE_STD, size=image.shape).astype(np.float32)
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), anns


def _paint(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray,
           color_name: Optional[str] = None) -> None:
    """Fill ``mask`` with a colour that contrasts with the background (or with the jittered
    colour ``color_name`` of COLORS), plus a little shading."""
    if color_name is not None:
        jitter = rng.uniform(-_COLOR_JITTER, _COLOR_JITTER, size=3)
        color = (np.asarray(COLORS[color_name]) + jitter).astype(np.float32)
    else:
        color = _contrasting_color(rng, image[mask].mean(axis=0))
    ys, xs = np.nonzero(mask)
    # A linear shading of +-15 across the object, so objects are not flat colour either.
    direction = rng.uniform(-1, 1, size=2)
    t = (xs - xs.mean()) * direction[0] + (ys - ys.mean()) * direction[1]
    t = t / max(float(np.abs(t).max()), 1.0)
    image[ys, xs] = color + 15.0 * t[:, None].astype(np.float32)


def _contrasting_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    for _ in range(20):
        color = rng.uniform(0, 255, size=3).astype(np.float32)
        if np.abs(color - under).sum() >= _MIN_CONTRAST:
            return color
    # background in the middle of the colour cube: push away from it
    return np.where(under > 127, under - 60, under + 60).astype(np.float32)
