"""
Object sizes against the RPN's anchors. Each ground-truth box of a training image, resized as
the config resizes it (INPUT.MIN_SIZE_TRAIN's smallest and largest short edge, MAX_SIZE_TRAIN),
is matched against the anchors of detectron2's own anchor generator (MODEL.ANCHOR_GENERATOR on the
levels of MODEL.RPN.IN_FEATURES) by detectron2's own RPN matcher (MODEL.RPN.IOU_THRESHOLDS and
IOU_LABELS, with the low-quality matches detectron2's RPN allows), which gives per object:

- ``best_iou``: its highest anchor IoU;
- ``above``: its anchors at IoU >= the foreground threshold (the last of RPN.IOU_THRESHOLDS);
- ``positives``: the anchors the matcher labels foreground for it, the low-quality matches
  included (an object with no anchor above the threshold still gets its best anchors, at an IoU
  that may be far below it).

The anchors cover the resized image (the few extra anchors over the model's padding at the bottom
and right edges are left out). Objects are binned by the square root of their resized area.
"""

import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from balanced_rcnn.data.samplers import holds_objects
from detectron2.config import CfgNode
from detectron2.data.transforms import ResizeShortestEdge
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.anchor_generator import build_anchor_generator
from detectron2.modeling.matcher import Matcher
from detectron2.structures import Boxes, BoxMode, pairwise_iou

__all__ = ["SIZE_BANDS", "AnchorMatching", "anchor_coverage", "sample_object_images",
           "training_scales"]

_CACHED_SIZES = 16  # image sizes whose anchors are kept (least recently used out)
# sqrt(area) bands in resized pixels: COCO's small / medium / large (32, 96), small split at 16.
SIZE_BANDS = (("< 16 px", 0, 16), ("16-32 px", 16, 32), ("32-96 px", 32, 96),
              ("> 96 px", 96, math.inf))


def _level_strides(cfg: CfgNode) -> List[int]:
    names = cfg.MODEL.RPN.IN_FEATURES
    # detectron2's FPN names its level of stride 2^k "p<k>" (modeling/backbone/fpn.py).
    if all(re.fullmatch(r"p\d+", n) for n in names):
        return [2 ** int(n[1:]) for n in names]
    shapes = build_backbone(cfg).output_shape()  # other backbones: ask the built one
    return [shapes[n].stride for n in names]


@dataclass
class AnchorMatching:
    """The anchor generator and RPN matcher of a config, and the anchors per image size."""

    generator: torch.nn.Module
    matcher: Matcher
    fg_threshold: float

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "AnchorMatching":
        shapes = [ShapeSpec(stride=s) for s in _level_strides(cfg)]
        return cls(build_anchor_generator(cfg, shapes),
                   Matcher(cfg.MODEL.RPN.IOU_THRESHOLDS, cfg.MODEL.RPN.IOU_LABELS,
                           allow_low_quality_matches=True),
                   float(cfg.MODEL.RPN.IOU_THRESHOLDS[-1]))

    def __post_init__(self):
        self._anchors: "OrderedDict[Tuple[int, int], Tuple[torch.Tensor, List[Tuple[int, ...]]]]" \
            = OrderedDict()
        # Per level: the cell anchors' widths and heights, (A, 2).
        self._cells = [torch.stack([c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]], dim=1)
                       for c in self.generator.cell_anchors]

    def anchors(self, height: int, width: int) -> Tuple[torch.Tensor, List[Tuple[int, ...]]]:
        """All the generator's anchors for an image of this size, (N, 4) in its order (level by
        level, then row, column, cell anchor), and per level (first index, rows, columns)."""
        key = (height, width)
        if key not in self._anchors:
            grids = [(math.ceil(height / s), math.ceil(width / s)) for s in self.generator.strides]
            # The generator reads only the feature maps' sizes: empty maps of those sizes.
            levels = self.generator([torch.empty(1, 0, h, w) for h, w in grids])
            starts = np.cumsum([0] + [len(b) for b in levels])
            self._anchors[key] = (Boxes.cat(levels).tensor, [
                (int(start), h, w) for start, (h, w) in zip(starts, grids)])
            if len(self._anchors) > _CACHED_SIZES:  # a few MB each at 800 px
                self._anchors.popitem(last=False)
        self._anchors.move_to_end(key)
        return self._anchors[key]

    def _level_bounds(self, boxes: torch.Tensor) -> torch.Tensor:
        """(G, L): the highest IoU each box can have with an anchor of each level (its centre
        on the box's, the best of the level's shapes); an upper bound of the level's IoUs."""
        wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-6)  # (G, 2)
        bounds = []
        for cells in self._cells:  # (A, 2) shapes
            inter = torch.minimum(wh[:, None, :], cells[None]).prod(dim=2)  # (G, A)
            union = wh.prod(dim=1)[:, None] + cells.prod(dim=1)[None] - inter
            bounds.append((inter / union).max(dim=1).values)
        return torch.stack(bounds, dim=1)

    def _candidates(self, boxes: torch.Tensor, levels: torch.Tensor, height: int,
                    width: int) -> torch.Tensor:
        """(K, 4): the anchors that overlap a box, on the levels ``levels`` (G, L) marks for
        it."""
        anchors, layout = self.anchors(height, width)
        parts = [torch.zeros(0, dtype=torch.long)]
        for level, ((start, rows, cols), stride, cells) in enumerate(zip(
                layout, self.generator.strides, self._cells)):
            offset = self.generator.offset * stride
            half_w, half_h = (cells.max(dim=0).values / 2).tolist()  # the widest shape's
            for x0, y0, x1, y1 in boxes[levels[:, level]].tolist():
                c = torch.arange(max(0, math.floor((x0 - half_w - offset) / stride)),
                                 min(cols, math.ceil((x1 + half_w - offset) / stride) + 1))
                r = torch.arange(max(0, math.floor((y0 - half_h - offset) / stride)),
                                 min(rows, math.ceil((y1 + half_h - offset) / stride) + 1))
                # (R, C, A) indices into the level's (rows, columns, A) layout
                cell = (r[:, None] * cols + c[None, :])[..., None] * len(cells)
                parts.append((start + cell + torch.arange(len(cells))).flatten())
        return anchors[torch.unique(torch.cat(parts))]

    def match(self, boxes: torch.Tensor, height: int, width: int) -> Tuple[torch.Tensor, ...]:
        """
        (G, 4) XYXY boxes in a (height, width) image -> best IoU, anchors above the threshold
        and positive anchors, each (G,): detectron2's matcher on the anchors that can matter,
        which gives what it gives on every anchor of the image. An anchor is positive at IoU >=
        the threshold, or as a low-quality match at a box's best IoU; every level that could
        hold either (its bound, :meth:`_level_bounds`, reaches the threshold or the best IoU
        found so far) is matched, and the IoUs against every box decide which box an anchor
        goes to. A box whose best IoU is 0 (no area) is matched on every anchor, as detectron2
        makes every anchor its low-quality match.
        """
        bounds = self._level_bounds(boxes)
        levels = bounds >= torch.clamp(0.5 * bounds.max(dim=1, keepdim=True).values,
                                       max=self.fg_threshold)
        while True:
            iou = pairwise_iou(Boxes(boxes), Boxes(self._candidates(boxes, levels, height,
                                                                    width)))  # (G, K)
            best = iou.max(dim=1).values if iou.numel() else torch.zeros(len(boxes))
            if not bool((best > 0).all()):
                iou = pairwise_iou(Boxes(boxes), Boxes(self.anchors(height, width)[0]))
                break
            wider = levels | (bounds >= best[:, None])
            if torch.equal(wider, levels):
                break
            levels = wider
        matched, labels = self.matcher(iou)
        positives = torch.bincount(matched[labels == 1], minlength=len(boxes))
        return iou.max(dim=1).values, (iou >= self.fg_threshold).sum(dim=1), positives


def training_scales(cfg: CfgNode) -> List[int]:
    """The smallest and largest short edge INPUT.MIN_SIZE_TRAIN trains at (one if equal)."""
    sizes = cfg.INPUT.MIN_SIZE_TRAIN
    return sorted({int(min(sizes)), int(max(sizes))})


def sample_object_images(dataset_dicts: Sequence[Dict[str, Any]], max_images: int = 0,
                         seed: int = 0) -> List[Dict[str, Any]]:
    """The records that hold objects and state their size, or a random sample of ``max_images``
    of them (0: all), in their order."""
    # A record without its size (detectron2 reads it from the image then) cannot be resized here.
    images = [r for r in dataset_dicts if holds_objects(r) and "height" in r and "width" in r]
    if 0 < max_images < len(images):
        rng = np.random.default_rng(seed)
        images = [images[i] for i in sorted(rng.choice(len(images), max_images, replace=False))]
    return images


def anchor_coverage(cfg: CfgNode, dataset_dicts: Sequence[Dict[str, Any]], max_images: int = 0,
                    seed: int = 0, scales: Optional[Sequence[int]] = None
                    ) -> Dict[int, Dict[str, np.ndarray]]:
    """
    Per training scale (``scales``, default :func:`training_scales`): every non-crowd object's
    resized ``size`` (sqrt of the area), ``best_iou``, ``above`` and ``positives`` (module
    docstring), as arrays, over :func:`sample_object_images`.
    """
    matching = AnchorMatching.from_config(cfg)
    images = sample_object_images(dataset_dicts, max_images, seed)
    out = {}
    for scale in scales or training_scales(cfg):
        columns: Dict[str, List[np.ndarray]] = {"size": [], "best_iou": [], "above": [],
                                                "positives": []}
        for record in images:
            h, w = record["height"], record["width"]
            new_h, new_w = ResizeShortestEdge.get_output_shape(h, w, scale,
                                                               cfg.INPUT.MAX_SIZE_TRAIN)
            boxes = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                                  for a in record["annotations"] if a.get("iscrowd", 0) == 0],
                                 dtype=torch.float32)
            boxes *= torch.tensor([new_w / w, new_h / h, new_w / w, new_h / h])
            best, above, positives = matching.match(boxes, new_h, new_w)
            columns["size"].append(Boxes(boxes).area().sqrt().numpy())
            for key, value in (("best_iou", best), ("above", above), ("positives", positives)):
                columns[key].append(value.numpy())
        out[scale] = {k: np.concatenate(v) if v else np.zeros(0) for k, v in columns.items()}
    return out
