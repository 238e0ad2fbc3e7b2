"""
The monitor's detection count (health/monitor.py), run by detectron2's own inference loop:
``inference_on_dataset`` (eval mode, no gradients) with a :class:`DetectionCounter` over this
worker's share of the check images.
"""

import contextlib
from typing import Any, Dict, Iterable, Iterator, List, Sequence

import torch
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Instances
from detectron2.utils import comm
from torch import nn

__all__ = ["DetectionCounter", "UnscaledDetections", "boxes_only", "count_detections",
           "detections_by_image_kind"]


class DetectionCounter(DatasetEvaluator):
    """
    Counts, over the images it is shown, the detections at each score of ``thresholds`` (the
    sorted scores and ``main_threshold``), the images with a detection at ``main_threshold``,
    and, apart, the images whose ``image_id`` is in ``empty_image_ids`` and their detections at
    ``main_threshold``. :meth:`evaluate` sums the counts of all workers (one transfer, then one
    all_gather, which every worker must enter) and returns them on every worker, so that all of
    them judge the same numbers.
    """

    def __init__(self, score_thresholds: Sequence[float], main_threshold: float,
                 empty_image_ids: Iterable[Any] = ()):
        thresholds = sorted(set(float(t) for t in score_thresholds) | {float(main_threshold)})
        if not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(
                "HEALTH.SCORE_THRESHOLDS and HEALTH.MAIN_THRESHOLD must be scores in [0, 1], got "
                f"{list(score_thresholds)} and {main_threshold}"
            )
        self.thresholds = thresholds
        self.main_index = thresholds.index(float(main_threshold))
        self.empty_image_ids = frozenset(empty_image_ids)
        self.reset()

    def reset(self) -> None:
        # On the device of the outputs: [images, per threshold (T)..., images with one, empty
        # images, detections on them]
        self._counts = None
        self._thresholds_on_device = None

    def process(self, inputs: List[Dict[str, Any]], outputs: List[Dict[str, Any]]) -> None:
        num_thresholds = len(self.thresholds)
        for inp, output in zip(inputs, outputs):
            scores = output["instances"].scores
            if self._counts is None:
                self._thresholds_on_device = torch.tensor(self.thresholds, device=scores.device)
                self._counts = torch.zeros(num_thresholds + 4, device=scores.device,
                                           dtype=torch.float64)
            # (D, 1) >= (T,) -> (D, T) -> (T,): this image's detections per threshold
            per_threshold = (scores[:, None] >= self._thresholds_on_device).sum(dim=0)
            self._counts[0] += 1
            self._counts[1 : 1 + num_thresholds] += per_threshold
            self._counts[1 + num_thresholds] += per_threshold[self.main_index] > 0
            if inp.get("image_id") in self.empty_image_ids:
                self._counts[2 + num_thresholds] += 1
                self._counts[3 + num_thresholds] += per_threshold[self.main_index]

    def evaluate(self) -> Dict[str, Any]:
        num_thresholds = len(self.thresholds)
        local = ([0.0] * (num_thresholds + 4) if self._counts is None
                 else self._counts.cpu().tolist())
        sums = [sum(values) for values in zip(*comm.all_gather(local))]
        return {"images": sums[0], "detections": sums[1 : 1 + num_thresholds],
                "images_with_detections": sums[1 + num_thresholds],
                "empty_images": sums[2 + num_thresholds],
                "detections_on_empty_images": sums[3 + num_thresholds]}


def detections_by_image_kind(counts: Dict[str, Any], main_index: int) -> Dict[str, float]:
    """From :meth:`DetectionCounter.evaluate`'s sums: detections per check image at the main
    threshold on the images with objects and on those without, each only where there are such
    images (``health/dets_per_object_image``, ``health/dets_per_empty_image``)."""
    main = counts["detections"][main_index]
    empty, on_empty = counts.get("empty_images", 0.0), counts.get("detections_on_empty_images", 0.0)
    split = {}
    if counts["images"] > empty:
        split["health/dets_per_object_image"] = (main - on_empty) / (counts["images"] - empty)
    if empty:
        split["health/dets_per_empty_image"] = on_empty / empty
    return split


@contextlib.contextmanager
def boxes_only(model: torch.nn.Module) -> Iterator[None]:
    """
    Switch StandardROIHeads' mask and keypoint branches off for the duration: counting
    detections needs only the box head's scores, and on a CPU the mask head makes a check
    several times slower while the model still makes ~100 detections per image.
    """
    roi_heads = getattr(model, "roi_heads", None)
    saved = {k: getattr(roi_heads, k) for k in ("mask_on", "keypoint_on") if hasattr(roi_heads, k)}
    try:
        for name in saved:
            setattr(roi_heads, name, False)
        yield
    finally:
        for name, value in saved.items():
            setattr(roi_heads, name, value)


class UnscaledDetections(nn.Module):
    """
    A GeneralizedRCNN's detections at the network's input size: ``model.inference(...,
    do_postprocess=False)``, without the rescaling to the original image size, whose filter
    drops boxes that became empty (a count must not depend on it). Other models: their own
    outputs. A module, so that inference_on_dataset switches the model to eval mode and back.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: List[Dict[str, Any]]) -> List[Dict[str, Instances]]:
        if isinstance(self.model, GeneralizedRCNN):
            return [{"instances": r} for r in self.model.inference(batch, do_postprocess=False)]
        return self.model(batch)


def count_detections(model: nn.Module, inputs: Sequence[Dict[str, Any]], batch_size: int,
                     counter: DetectionCounter) -> Dict[str, Any]:
    """``counter``'s sums over every worker's ``inputs`` (mapped model inputs), run in batches
    of ``batch_size`` with the box branch only. Every worker must call it at the same point."""
    batches = [list(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    with boxes_only(model):
        return inference_on_dataset(UnscaledDetections(model), batches, counter)
