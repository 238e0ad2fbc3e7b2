"""
A deterministic synthetic instance-segmentation dataset: filled shapes on textured backgrounds,
written as PNG files plus one COCO instances json.

Every object is a polygon (the exact outline of the shape); its pixels are painted from the mask
that pycocotools rasterises from that same polygon, so the image, the json polygon and the mask a
model is trained on agree pixel for pixel. Objects never overlap, so no polygon is occluded.

What is exact (tests rely on it): the number of images, the number of empty images
(``round(empty_fraction * num_images)``), objects per non-empty image within
``objects_per_image``, the shape extent ``max(bbox w, bbox h)`` within ``object_size`` (up to the
0.01 px rounding of the json), and the class counts, which are the largest-remainder split of the
total object count by ``class_frequencies`` (each off by less than one from ``f * total``).

Same parameters -> byte-identical json and PNG files on one machine. Across CPU types numpy's
vectorized sin/cos may differ in the last bit, which can flip a rare PNG pixel value; the json's
coordinates are rounded to 0.01 px and practically never change.
"""
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import pycocotools.mask as mask_util

__all__ = [
    "COLORS",
    "GENERATOR_VERSION",
    "SHAPES",
    "SyntheticShapesParams",
    "generate_synthetic_shapes",
]

# Bump whenever the output for given parameters changes: cached copies are then regenerated.
GENERATOR_VERSION = 2

# Gap in pixels kept between the bounding boxes of two objects, so masks never touch.
_OBJECT_GAP = 2.0
_PLACEMENT_TRIES = 200
# Minimum L1 distance (sum over RGB) between an object's colour and the mean background under it:
# enough contrast to be learnable in a few CPU minutes, not so much that colour alone solves it.
_MIN_CONTRAST = 90.0
_NOISE_STD = 6.0  # per-pixel Gaussian noise over the whole image


def _regular_polygon(num_vertices: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    angles = phase + 2 * math.pi * np.arange(num_vertices) / num_vertices
    return np.stack([np.cos(angles), np.sin(angles)], axis=1) * radius


def _star(num_points: int = 5, inner: float = 0.45) -> np.ndarray:
    outer_pts = _regular_polygon(num_points, 1.0, -math.pi / 2)
    inner_pts = _regular_polygon(num_points, inner, -math.pi / 2 + math.pi / num_points)
    # Interleave tips and notches: (P, 2) + (P, 2) -> (2P, 2).
    return np.stack([outer_pts, inner_pts], axis=1).reshape(-1, 2)


# Outline of each shape class around the origin, counter-clockwise, before rotation and scaling.
# 32 vertices make a circle whose polygon deviates from a true circle by < 0.5% of its radius.
SHAPES: Dict[str, Callable[[], np.ndarray]] = {
    "circle": lambda: _regular_polygon(32),
    "square": lambda: _regular_polygon(4, phase=math.pi / 4),
    "triangle": lambda: _regular_polygon(3, phase=-math.pi / 2),
    "star": _star,
    "hexagon": lambda: _regular_polygon(6),
}

# RGB of the colours that colour-coded classes are painted in (SyntheticShapesParams.colors):
# saturated, so each is far from the grey backgrounds those datasets get and from each other.
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 80, 225),
    "yellow": (230, 205, 35),
}
# Per-channel jitter of a colour-coded object's colour: the class stays unambiguous.
_COLOR_JITTER = 20.0


@dataclass(frozen=True)
class SyntheticShapesParams:
    """Every knob of the generator; the dataset is a pure function of these values."""

    num_images: int = 100
    image_size: Tuple[int, int] = (192, 192)  # (height, width) in pixels
    # Inclusive range of the object count of an image that is not empty (min >= 1).
    objects_per_image: Tuple[int, int] = (1, 3)
    # Inclusive range of an object's extent max(bbox width, bbox height), in pixels.
    object_size: Tuple[float, float] = (12.0, 60.0)
    # Share of images with no object at all.
    empty_fraction: float = 0.1
    classes: Tuple[str, ...] = ("circle", "square", "triangle")  # names from SHAPES
    # Names from COLORS. Empty: one class per shape, painted in random colours. Otherwise one
    # class per (shape, colour) pair, named "<colour>_<shape>", shape-major (see class_names),
    # painted in that colour on grey backgrounds.
    colors: Tuple[str, ...] = ()
    # Relative frequency of each class of class_names() (normalized); empty means uniform.
    class_frequencies: Tuple[float, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        # Lists (e.g. from yaml/json) become tuples so the parameters stay hashable.
        for field in ("image_size", "objects_per_image", "object_size", "classes", "colors",
                      "class_frequencies"):
            object.__setattr__(self, field, tuple(getattr(self, field)))
        self._validate()

    def _validate(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"SyntheticShapesParams: {msg}")

        if self.num_images < 1:
            fail(f"num_images must be >= 1, got {self.num_images}")
        if len(self.image_size) != 2 or min(self.image_size) < 8:
            fail(f"image_size must be (height, width) with both >= 8, got {self.image_size}")
        lo, hi = self.objects_per_image
        if not 1 <= lo <= hi:
            fail(f"objects_per_image must satisfy 1 <= min <= max, got {self.objects_per_image}")
        smin, smax = self.object_size
        if not 4 <= smin <= smax <= min(self.image_size):
            fail(f"object_size must satisfy 4 <= min <= max <= {min(self.image_size)} "
                 f"(the image side), got {self.object_size}")
        if not 0.0 <= self.empty_fraction <= 1.0:
            fail(f"empty_fraction must be in [0, 1], got {self.empty_fraction}")
        unknown = [c for c in self.classes if c not in SHAPES]
        if not self.classes or unknown:
            fail(f"classes must be a non-empty subset of {sorted(SHAPES)}, got {self.classes}")
        if len(set(self.classes)) != len(self.classes):
            fail(f"classes must be distinct, got {self.classes}")
        unknown = [c for c in self.colors if c not in COLORS]
        if unknown or len(set(self.colors)) != len(self.colors):
            fail(f"colors must be distinct names from {sorted(COLORS)}, got {self.colors}")
        freqs, num_classes = self.class_frequencies, len(self.class_names())
        if freqs and (len(freqs) != num_classes or min(freqs) < 0 or sum(freqs) <= 0):
            fail(f"class_frequencies must be {num_classes} non-negative numbers with a "
                 f"positive sum (one per class), got {freqs}")

    def class_names(self) -> Tuple[str, ...]:
        """The dataset's categories in id order: the shapes, or "<colour>_<shape>" for every
        (shape, colour) pair, shape-major (all colours of classes[0] first)."""
        if not self.colors:
            return self.classes
        return tuple(f"{color}_{shape}" for shape in self.classes for color in self.colors)

    def class_shape_and_color(self, label: int) -> Tuple[str, Optional[str]]:
        """(shape, colour name or None for random colours) of class index ``label``."""
        if not self.colors:
            return self.classes[label], None
        shape, color = divmod(label, len(self.colors))
        return self.classes[shape], self.colors[color]

    def frequencies(self) -> np.ndarray:
        """Normalized class frequencies, (K,)."""
        num_classes = len(self.class_names())
        freqs = np.asarray(self.class_frequencies or [1.0] * num_classes, dtype=np.float64)
        return freqs / freqs.sum()

    def num_empty_images(self) -> int:
        return int(math.floor(self.empty_fraction * self.num_images + 0.5))

    def to_dict(self) -> Dict:
        return {k: list(v) if isinstance(v, tuple) else v
                for k, v in dataclasses.asdict(self).items()}

    def fingerprint(self) -> str:
        """Hash of the parameters and the generator version: names one exact dataset."""
        blob = json.dumps({"generator_version": GENERATOR_VERSION, **self.to_dict()},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _largest_remainder(total: int, freqs: np.ndarray) -> List[int]:
    """Split ``total`` into integer counts proportional to ``freqs`` (each within 1 of exact)."""
    exact = freqs * total
    counts = np.floor(exact).astype(int)
    # Ties in the remainder go to the lower class index (stable sort): deterministic.
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - counts.sum()]] += 1
    return counts.tolist()


def _plan_labels(params: SyntheticShapesParams, rng: np.random.Generator) -> List[List[int]]:
    """Class indices of the objects of every image (empty list = empty image)."""
    n = params.num_images
    empty = set(rng.permutation(n)[: params.num_empty_images()].tolist())
    lo, hi = params.objects_per_image
    counts = [0 if i in empty else int(rng.integers(lo, hi + 1)) for i in range(n)]
    per_class = _largest_remainder(sum(counts), params.frequencies())
    labels = rng.permutation(np.repeat(np.arange(len(per_class)), per_class)).tolist()
    plan, start = [], 0
    for c in counts:
        plan.append(labels[start:start + c])
        start += c
    return plan


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


def _render_image(params: SyntheticShapesParams, index: int, labels: List[int]
                  ) -> Tuple[np.ndarray, List[Dict]]:
    """One image (H, W, 3) uint8 RGB and its annotations (without ids)."""
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


def generate_synthetic_shapes(params: SyntheticShapesParams, out_dir: Path) -> Path:
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations.json``; return the json path."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan_labels(params, np.random.default_rng(params.seed))
    h, w = params.image_size
    images, annotations = [], []
    for index, labels in enumerate(plan):
        pixels, anns = _render_image(params, index, labels)
        file_name = f"{index:06d}.png"
        # OpenCV writes BGR; the colours are random, the flip only keeps the file RGB-true.
        ok, png = cv2.imencode(".png", pixels[:, :, ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 3])
        assert ok, file_name
        (image_dir / file_name).write_bytes(png.tobytes())
        images.append({"id": index + 1, "file_name": file_name, "height": h, "width": w})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **ann})
    coco = {
        "info": {"description": "balanced_rcnn synthetic shapes",
                 "generator_version": GENERATOR_VERSION, "params": params.to_dict()},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"}
                       for i, name in enumerate(params.class_names())],
    }
    json_path = out_dir / "annotations.json"
    json_path.write_text(json.dumps(coco, separators=(",", ":")))
    return json_path
