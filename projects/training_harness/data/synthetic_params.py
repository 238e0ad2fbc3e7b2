"""
What a synthetic shapes dataset is made of: the shape outlines and colours its classes are drawn
from (:data:`SHAPES`, :data:`COLORS`) and :class:`SyntheticShapesParams`, every knob of the
generator (data/synthetic.py), of which the dataset is a pure function.
"""
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np

__all__ = ["COLORS", "GENERATOR_VERSION", "SHAPES", "SyntheticShapesParams"]

# Bump whenever the output for given parameters changes (data/synthetic.py,
# data/synthetic_render.py): cached copies are then regenerated.
GENERATOR_VERSION = 2


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
