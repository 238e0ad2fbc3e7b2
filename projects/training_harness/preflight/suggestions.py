"""
What the pre-flight report suggests, each as config overrides with its measured reason. The
anchor suggestion is checked: every candidate is applied to the config and its share of objects
without an anchor at its threshold recomputed on the same objects, and the best one is suggested
with the coverage it reaches.
"""

import shlex
from typing import Any, Callable, Dict, List, Tuple

import numpy as np
import torch
from balanced_rcnn.data.samplers import CLASS_AWARE_OBJECT_SHARE_SAMPLER, OBJECT_SHARE_SAMPLER
from detectron2.config import CfgNode

from .dataset_stats import FEW_IMAGES

__all__ = ["MOSTLY_EMPTY", "NO_ANCHOR_SHARE", "anchor_candidates", "format_overrides",
           "no_anchor_share", "suggest"]

Overrides = List[Tuple[str, str]]
# Suggest image rebalancing at this share of training images without objects or more.
MOSTLY_EMPTY = 0.5
# Suggest other anchors when more than this share of the objects has no anchor at the RPN's
# foreground IoU threshold at the smallest training scale (the matcher then trains them on
# their best anchors only, below the threshold).
NO_ANCHOR_SHARE = 0.25


def format_overrides(overrides: Overrides) -> str:
    """A line to paste after train_net.py's arguments."""
    return " ".join(f"{key} {shlex.quote(value)}" for key, value in overrides)


def no_anchor_share(coverage: Dict[str, np.ndarray]) -> float:
    """The share of objects without an anchor at the foreground threshold."""
    above = coverage["above"]
    return float((above == 0).mean()) if len(above) else 0.0


def anchor_candidates(cfg: CfgNode) -> List[Overrides]:
    """Anchors half and a quarter of the configured sizes, an RPN foreground threshold of 0.5
    (the tiny CPU config's choice), and both together."""
    sizes = [list(level) for level in cfg.MODEL.ANCHOR_GENERATOR.SIZES]
    thresholds = list(cfg.MODEL.RPN.IOU_THRESHOLDS)
    out: List[Overrides] = []
    lower = [("MODEL.RPN.IOU_THRESHOLDS", str([min(thresholds[0], 0.3), 0.5]))] if (
        len(thresholds) == 2 and thresholds[-1] > 0.5) else []
    for factor in (0.5, 0.25):
        scaled = [("MODEL.ANCHOR_GENERATOR.SIZES",
                   str([[max(1.0, s * factor) for s in level] for level in sizes]))]
        out.append(scaled)
        if lower:
            out.append(scaled + lower)
    if lower:
        out.append(lower)
    return out


def _anchor_suggestion(cfg: CfgNode, coverage: Dict[int, Dict[str, np.ndarray]],
                       recompute: Callable[[CfgNode], Dict[int, Dict[str, np.ndarray]]]
                       ) -> List[Dict[str, Any]]:
    scale = min(coverage)
    now = no_anchor_share(coverage[scale])
    if now <= NO_ANCHOR_SHARE:
        return []
    threshold = cfg.MODEL.RPN.IOU_THRESHOLDS[-1]
    # An object has no anchor at the threshold exactly when its best IoU is below it, and the
    # best IoU depends on the anchors alone: one recomputation per anchor set, not per candidate.
    best_iou = {cfg.MODEL.ANCHOR_GENERATOR.dump(): coverage[scale]["best_iou"]}
    tried = []
    for overrides in anchor_candidates(cfg):
        candidate = cfg.clone()
        candidate.defrost()
        candidate.merge_from_list([x for kv in overrides for x in kv])
        anchors = candidate.MODEL.ANCHOR_GENERATOR.dump()
        if anchors not in best_iou:
            best_iou[anchors] = recompute(candidate)[scale]["best_iou"]
        new_threshold = candidate.MODEL.RPN.IOU_THRESHOLDS[-1]
        tried.append((float((best_iou[anchors] < new_threshold).mean()), len(overrides),
                      overrides, new_threshold))
    best, _, overrides, new_threshold = min(tried, key=lambda t: (t[0], t[1]))
    if best >= now:
        return [{"warning": f"{100 * now:.1f}% of the objects have no anchor at IoU >= "
                            f"{threshold:g} at short edge {scale}, and no candidate anchor set "
                            "does better"}]
    return [{"overrides": overrides,
             "reason": f"{100 * now:.1f}% of the objects have no anchor at IoU >= {threshold:g} "
                       f"(MODEL.RPN.IOU_THRESHOLDS) at short edge {scale}: the RPN trains them "
                       "only on their best anchors, below the threshold",
             "checked": f"with these overrides: {100 * best:.1f}% without an anchor at IoU >= "
                        f"{new_threshold:g}"}]


def suggest(cfg: CfgNode, stats: Dict[str, Any], schedule: Dict[str, Any],
            coverage: Dict[int, Dict[str, np.ndarray]],
            recompute: Callable[[CfgNode], Dict[int, Dict[str, np.ndarray]]],
            target_epochs: float = 0.0) -> List[Dict[str, Any]]:
    """Suggestions ({"overrides", "reason"[, "checked"]}) and warnings ({"warning"})."""
    out: List[Dict[str, Any]] = []
    empty = stats["images"] - stats["object_images"]
    if cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS and empty:
        out.append({"overrides": [("DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False")],
                    "reason": f"{empty} of {stats['images']} training images "
                              f"({100 * stats['empty_share']:.1f}%) hold no object and would be "
                              "dropped: the model would never see an image to leave empty"})
    sampler = cfg.DATALOADER.SAMPLER_TRAIN
    if (stats["empty_share"] >= MOSTLY_EMPTY
            and sampler not in (OBJECT_SHARE_SAMPLER, CLASS_AWARE_OBJECT_SHARE_SAMPLER)):
        # What ships (configs/Base-BalancedRCNN-Swin-FPN.yaml); copy-paste only where it is off.
        keys = [("DATALOADER.SAMPLER_TRAIN", CLASS_AWARE_OBJECT_SHARE_SAMPLER),
                ("DATALOADER.OBJECT_IMAGE_SHARE", "0.5"), ("DATALOADER.REPEAT_THRESHOLD", "1.0")]
        if cfg.INPUT.COPY_PASTE.PROBABILITY == 0:
            keys.append(("INPUT.COPY_PASTE.PROBABILITY", "0.5"))
        out.append({"overrides": keys,
                    "reason": f"{100 * stats['empty_share']:.1f}% of the training images hold "
                              f"no object and {sampler} samples them as they come "
                              f"({100 * schedule.get('object_share_sampled', 0):.1f}% of the "
                              "sampled images hold objects); on mostly empty data that is "
                              "where detectron2 loses its detections, and half the sampled "
                              "images holding objects, drawn by their rarest class, with "
                              "objects pasted onto empty ones, kept them and beat detectron2's "
                              "RepeatFactorTrainingSampler (BENCHMARKS.md, Conclusions)"})
    out += _anchor_suggestion(cfg, coverage, recompute)
    if target_epochs > 0:
        per_epoch = schedule["iterations_per_epoch"]
        keys = [("SOLVER.MAX_ITER", str(round(target_epochs * per_epoch)))]
        if cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupMultiStepLR":
            keys.append(("SOLVER.STEPS", str(tuple(round(f * target_epochs * per_epoch)
                                                   for f in (2 / 3, 11 / 12)))))
        out.append({"overrides": keys,
                    "reason": f"{target_epochs:g} epochs of {per_epoch} iterations "
                              f"(SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER} is "
                              f"{schedule['epochs']:.2f} epochs)"})
    elif schedule["epochs"] < 1:
        out.append({"warning": f"SOLVER.MAX_ITER {cfg.SOLVER.MAX_ITER} is {schedule['epochs']:.2f}"
                               " epochs: some training images are never seen (--epochs N "
                               "suggests MAX_ITER)"})
    if str(cfg.MODEL.DEVICE).startswith("cuda") and not torch.cuda.is_available():
        out.append({"warning": f"MODEL.DEVICE {cfg.MODEL.DEVICE} and this machine has no CUDA "
                               "GPU: train this config on a GPU machine, or check the data and "
                               "the set-up here first with the CPU twin configs/my_data/"
                               "imbalanced_coco_cpu.yaml (the tiny model, minutes)"})
    if stats["classes_with_few_images"]:
        out.append({"warning": f"classes with fewer than {FEW_IMAGES} training images: "
                               + ", ".join(stats["classes_with_few_images"])})
    if stats["classes_without_images"]:
        out.append({"warning": "classes without any training image (never learned): "
                               + ", ".join(stats["classes_without_images"])})
    for name, absent in stats["absent_in_test"].items():
        if absent:
            out.append({"warning": f"classes without an object in {name} (their AP is "
                                   f"undefined): " + ", ".join(absent)})
    return out
