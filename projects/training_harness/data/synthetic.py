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

The parameters are in data/synthetic_params.py, the drawing of one image in
data/synthetic_render.py; this module plans the objects of every image and writes the files.

Same parameters -> byte-identical json and PNG files on one machine. Across CPU types numpy's
vectorized sin/cos may differ in the last bit, which can flip a rare PNG pixel value; the json's
coordinates are rounded to 0.01 px and practically never change.
"""
import json
from pathlib import Path
from typing import List

import cv2
import numpy as np

from .synthetic_params import COLORS, GENERATOR_VERSION, SHAPES, SyntheticShapesParams
from .synthetic_render import render_image

__all__ = [
    "COLORS",
    "GENERATOR_VERSION",
    "SHAPES",
    "SyntheticShapesParams",
    "generate_synthetic_shapes",
]


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


def generate_synthetic_shapes(params: SyntheticShapesParams, out_dir: Path) -> Path:
    """Write ``out_dir/images/*.png`` and ``out_dir/annotations.json``; return the json path."""
    out_dir = Path(out_dir)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    plan = _plan_labels(params, np.random.default_rng(params.seed))
    h, w = params.image_size
    images, annotations = [], []
    for index, labels in enumerate(plan):
        pixels, anns = render_image(params, index, labels)
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
