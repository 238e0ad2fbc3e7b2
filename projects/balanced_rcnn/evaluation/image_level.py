"""
What a deployment on mostly-empty data sees, which COCO AP hides: an evaluator beside
COCOEvaluator that keeps the detections at one score threshold (TEST.DEPLOYMENT_SCORE_THRESH) and
reports, over the evaluation images (percent, except the last):

- ``false_alarm_images``: images without any annotation that get at least one detection;
- ``object_images_detected``: images with a non-crowd object that get at least one detection;
- ``recall50``: non-crowd objects found, each matched once, greedily by score (as COCO matches),
  by a detection of its class with box IoU >= 0.5;
- ``dets_per_empty_image``: detections per image without any annotation.

Images whose only annotations are crowd regions count in neither group. A metric without images
to count (no empty image, no object) is NaN. The metrics go to metrics.json and TensorBoard as
``image_level/<name>`` and to the log as a table.
"""

import itertools
import logging
from collections import OrderedDict
from typing import Any, Dict, List, NamedTuple

import torch
from detectron2.data import DatasetCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import Boxes, BoxMode, pairwise_iou
from detectron2.utils import comm
from detectron2.utils.logger import create_small_table

__all__ = ["IMAGE_LEVEL_TASK", "ImageCounts", "ImageLevelEvaluator",
           "check_deployment_score_thresh", "image_counts", "image_level_metrics"]

IMAGE_LEVEL_TASK = "image_level"
logger = logging.getLogger(__name__)


class ImageCounts(NamedTuple):
    """One image's counts at the threshold; ``kind`` is "empty", "objects" or "crowd_only"."""

    kind: str
    detections: int
    objects: int
    found: int


def image_counts(record: Dict[str, Any], boxes: torch.Tensor, scores: torch.Tensor,
                 classes: torch.Tensor, score_threshold: float, iou_threshold: float = 0.5
                 ) -> ImageCounts:
    """
    Counts of one image: its dataset ``record`` (detectron2's dict, contiguous category ids)
    against its detections, (D, 4) XYXY boxes in the record's image coordinates, (D,) scores and
    (D,) classes.
    """
    anns = record.get("annotations", [])
    objects = [a for a in anns if a.get("iscrowd", 0) == 0]
    kind = "objects" if objects else ("crowd_only" if anns else "empty")
    keep = scores >= score_threshold
    order = torch.argsort(scores[keep], descending=True)
    boxes, classes = boxes[keep][order], classes[keep][order]
    found = 0
    if objects and len(boxes):
        gt = torch.tensor([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                           for a in objects], dtype=torch.float32)
        gt_classes = torch.tensor([a["category_id"] for a in objects])
        # (D, G); a detection of another class never matches
        iou = pairwise_iou(Boxes(boxes.float()), Boxes(gt))
        iou[classes[:, None] != gt_classes[None, :]] = -1.0
        matched = torch.zeros(len(objects), dtype=torch.bool)
        for row in iou:  # at most the detections per image (100): evaluation, not training
            row = row.masked_fill(matched, -1.0)
            best = int(row.argmax())
            if row[best] >= iou_threshold:
                matched[best] = True
        found = int(matched.sum())
    return ImageCounts(kind, int(keep.sum()), len(objects), found)


def _percent(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else float("nan")


def image_level_metrics(counts: List[ImageCounts]) -> "OrderedDict[str, float]":
    """The module docstring's metrics from every image's counts."""
    empty = [c for c in counts if c.kind == "empty"]
    objects = [c for c in counts if c.kind == "objects"]
    return OrderedDict([
        ("false_alarm_images", _percent(sum(c.detections > 0 for c in empty), len(empty))),
        ("object_images_detected", _percent(sum(c.detections > 0 for c in objects),
                                            len(objects))),
        ("recall50", _percent(sum(c.found for c in objects), sum(c.objects for c in objects))),
        ("dets_per_empty_image",
         sum(c.detections for c in empty) / len(empty) if empty else float("nan")),
    ])


def check_deployment_score_thresh(value: float) -> None:
    """TEST.DEPLOYMENT_SCORE_THRESH is a score; checked at set-up and by the evaluator."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"TEST.DEPLOYMENT_SCORE_THRESH must be a score in [0, 1], got {value}")


class ImageLevelEvaluator(DatasetEvaluator):
    """The module docstring's metrics on a registered dataset, at ``score_threshold``."""

    def __init__(self, dataset_name: str, score_threshold: float, distributed: bool = True):
        check_deployment_score_thresh(score_threshold)
        self.dataset_name = dataset_name
        self.score_threshold = float(score_threshold)
        self._distributed = distributed
        self._records: Dict[Any, Dict[str, Any]] = {}
        for record in DatasetCatalog.get(dataset_name):
            image_id = record.get("image_id")
            if image_id is None or image_id in self._records:
                raise ValueError(
                    f"Image-level evaluation of {dataset_name}: '{record.get('file_name')}' has "
                    + ("no image_id" if image_id is None else
                       f"image_id {image_id!r}, as '{self._records[image_id].get('file_name')}'")
                    + "; every image needs its own")
            self._records[image_id] = record
        self.reset()

    def reset(self) -> None:
        self._counts: List[ImageCounts] = []

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        for inp, out in zip(inputs, outputs):
            instances = out["instances"].to("cpu")
            self._counts.append(image_counts(
                self._records[inp["image_id"]], instances.pred_boxes.tensor, instances.scores,
                instances.pred_classes, self.score_threshold))

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        counts = self._counts
        if self._distributed:
            counts = list(itertools.chain(*comm.gather(counts, dst=0)))
            if not comm.is_main_process():
                return {}
        metrics = image_level_metrics(counts)
        kinds = {k: sum(c.kind == k for c in counts) for k in ("empty", "objects")}
        logger.info(
            f"Image-level results on {self.dataset_name} at score >= {self.score_threshold:g} "
            f"(TEST.DEPLOYMENT_SCORE_THRESH; {kinds['empty']} images without annotations, "
            f"{kinds['objects']} with objects):\n" + create_small_table(metrics))
        return {IMAGE_LEVEL_TASK: metrics}
