"""
The schedule in epochs, and how often the configured sampler shows each image.

    iterations per epoch = ceil(training images / SOLVER.IMS_PER_BATCH)
    epochs               = SOLVER.MAX_ITER / iterations per epoch

An epoch here is N training images drawn, whatever the sampler (a repeat-factor sampler's own
epochs hold sum(r) images), as detectron2's schedules count. An image i with repeat factor r_i
(1 under TrainingSampler) is drawn with probability r_i / sum(r), so over the run it is seen
MAX_ITER x IMS_PER_BATCH x r_i / sum(r) times in expectation. tools/schedule.py turns a schedule
in epochs into these keys with the same arithmetic.
"""

import math
from typing import Any, Dict, List, Optional, Sequence

import torch
from balanced_rcnn.data.samplers import holds_objects, object_share_factors_from_config
from detectron2.config import CfgNode
from detectron2.data.samplers import RepeatFactorTrainingSampler

__all__ = ["iterations_per_epoch", "repeat_factors", "schedule_keys", "times_seen"]


def iterations_per_epoch(num_images: int, batch: int) -> int:
    return math.ceil(num_images / batch)


def schedule_keys(num_images: int, batch: int, epochs: float, steps: Sequence[float],
                  eval_every: float, checkpoint_every: float) -> Dict[str, object]:
    """The iteration keys for ``epochs`` over ``num_images`` at ``batch`` images per step
    (``steps``, ``eval_every``, ``checkpoint_every`` in epochs)."""
    per_epoch = iterations_per_epoch(num_images, batch)

    def iters(e: float) -> int:
        return max(1, round(e * per_epoch))

    return {
        "iterations_per_epoch": per_epoch,
        "SOLVER.MAX_ITER": iters(epochs),
        "SOLVER.STEPS": tuple(iters(s) for s in steps),
        "SOLVER.CHECKPOINT_PERIOD": iters(checkpoint_every),
        "TEST.EVAL_PERIOD": iters(eval_every),
    }


def repeat_factors(cfg: CfgNode, dataset_dicts: List[Dict[str, Any]]) -> Optional[torch.Tensor]:
    """The (N,) repeat factors DATALOADER.SAMPLER_TRAIN draws ``dataset_dicts`` with (the
    samplers' own functions); None for a sampler without factors (RandomSubsetTrainingSampler)."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name == "TrainingSampler":
        return torch.ones(len(dataset_dicts))
    if name == "RepeatFactorTrainingSampler":
        return RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD, sqrt=cfg.DATALOADER.REPEAT_SQRT)
    return object_share_factors_from_config(cfg, dataset_dicts)


def times_seen(cfg: CfgNode, dataset_dicts: List[Dict[str, Any]],
               class_names: Sequence[str]) -> Dict[str, Any]:
    """The schedule in epochs and the expected times an image is seen over SOLVER.MAX_ITER: per
    object image, per empty image, and per image holding each class (mean), under the
    configured sampler."""
    batch, max_iter = cfg.SOLVER.IMS_PER_BATCH, cfg.SOLVER.MAX_ITER
    per_epoch = iterations_per_epoch(len(dataset_dicts), batch)
    out: Dict[str, Any] = {
        "training_images": len(dataset_dicts), "iterations_per_epoch": per_epoch,
        "epochs": max_iter / per_epoch,
        "checkpoint_period_epochs": cfg.SOLVER.CHECKPOINT_PERIOD / per_epoch,
        "eval_period_epochs": cfg.TEST.EVAL_PERIOD / per_epoch if cfg.TEST.EVAL_PERIOD else None,
        "sampler": cfg.DATALOADER.SAMPLER_TRAIN,
        "copy_paste": cfg.INPUT.COPY_PASTE.PROBABILITY,
    }
    factors = repeat_factors(cfg, dataset_dicts)
    if factors is None:
        return out
    seen = factors.double() * (max_iter * batch / float(factors.sum()))
    holds = torch.tensor([holds_objects(r) for r in dataset_dicts], dtype=torch.bool)
    out["seen_per_object_image"] = float(seen[holds].mean()) if holds.any() else None
    out["seen_per_empty_image"] = float(seen[~holds].mean()) if (~holds).any() else None
    out["object_share_sampled"] = share = float(factors[holds].sum() / factors.sum())
    # Copy-paste gives each sampled empty image the objects of an object image with probability
    # p (data/copy_paste.py), so the model sees objects in up to share + (1 - share) * p of the
    # images ("up to": objects that do not fit a smaller image are left out).
    out["object_share_shown"] = share + (1 - share) * cfg.INPUT.COPY_PASTE.PROBABILITY
    sums, counts = [0.0] * len(class_names), [0] * len(class_names)
    for seen_i, record in zip(seen.tolist(), dataset_dicts):
        for c in {a["category_id"] for a in record.get("annotations", [])
                  if a.get("iscrowd", 0) == 0}:
            sums[c] += seen_i
            counts[c] += 1
    out["seen_per_class_image"] = [
        {"name": name, "images": n, "seen_per_image": total / n if n else None}
        for name, total, n in zip(class_names, sums, counts)]
    return out
