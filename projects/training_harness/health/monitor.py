"""
The training-health monitor: a trainer hook that watches a run for the failures that otherwise
show up a day later (detections collapsing to zero, one loss term swamping the others) and says
so while training, configured by the HEALTH keys (docs/configuration.md). What it measures and
the scalars it writes: docs/health.md.

- every step, it turns the heads' and the trainer's scalars into balance measures
  (health/step_measures.py);
- every HEALTH.PERIOD iterations, it counts the model's detections on a fixed set of images,
  mapped once before training (health/check_images.py, health/detection_check.py), and
  measures the gradient share of each loss term on the backbone (health/grad_shares.py);
- with HEALTH.CHECK_AT_START, it counts once before the first step of a run that starts at
  iteration 0 (logged, never judged: the starting weights are not the run's result);
- it reports a *collapse* (health/collapse.py) in HEALTH.PATIENCE consecutive collapsed checks
  after HEALTH.WARMUP_ITERS iterations: a loud warning, and with HEALTH.ACTION "stop" the
  checkpoint ``model_collapse_<iter>.pth`` and DetectionCollapseError (exit code 3);
- it logs a summary at the end of training.

DDP: every worker counts on its share of the check images (image i goes to worker i mod world
size) and the counts are summed with one all_gather per check. Every worker then runs the same
rule on the same sums and takes the same decision at the same iteration; to stop, the main
worker saves the checkpoint while the others wait at a barrier, and all raise together.
"""

import copy
import logging
import time
from typing import Any, Callable, Dict, List, Sequence

import torch
from balanced_rcnn.config import check_choice
from balanced_rcnn.data.samplers import holds_objects
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper
from detectron2.engine import HookBase
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..data.mapper import SkippingMapper
from ..errors import EXIT_COLLAPSE, DetectionCollapseError
from ..reliability.checkpoint import save_checkpoint_and_synchronize
from .check_images import check_set_warnings, health_dataset, load_check_records
from .check_report import GOES_ON, CheckResult, banner, collapse_message, summary_message
from .collapse import (ACTIONS, CollapseTracker, ForegroundStarvation, confident_score,
                       objects_per_image)
from .detection_check import DetectionCounter, count_detections, detections_by_image_kind
from .grad_shares import LossGradientShares, loss_scale, shares_measurable
from .step_measures import FOREGROUND_SHARES, step_measures

__all__ = ["TrainingHealthMonitor"]

logger = logging.getLogger(__name__)


class TrainingHealthMonitor(HookBase):
    """The hook described in the module docstring. Register it on every worker."""

    def __init__(
        self,
        *,
        period: int,
        dataset_name: str,
        num_images: int,
        mapper: Callable[[Dict[str, Any]], Dict[str, Any]],
        batch_size: int,
        score_thresholds: Sequence[float],
        main_threshold: float,
        collapse_fraction: float,
        patience: int,
        warmup_iters: int,
        action: str,
        check_at_start: bool = False,
        object_images_only: bool = False,
        confident_threshold: float = 0.5,
        confident_fraction: float = 0.0,
        confident_after_iters: int = 0,
        foreground_rule: bool = False,
    ):
        """
        Args:
            period: run a detection check after every ``period`` iterations; 0: never.
            dataset_name: registered dataset of the check images; "": no detection checks.
            num_images: the first ``num_images`` records of the dataset are the check images.
            mapper: turns a dataset record into a model input (a test-time DatasetMapper).
            batch_size: images per inference batch on each worker.
            score_thresholds: detections are counted at each of these scores.
            main_threshold: the score threshold of the collapse rule.
            collapse_fraction: a check is collapsed when its detections per image are zero or
                below this fraction of the best value of the earlier counted checks.
            patience: consecutive collapsed checks that make a collapse.
            warmup_iters: checks made before this many completed iterations are logged but not
                counted (neither for the best value nor for a collapse).
            action: "warn" or "stop" (save a checkpoint, raise DetectionCollapseError).
            check_at_start: count detections once before the first step of a run that starts
                at iteration 0 (logged only).
            object_images_only: the check images are the first ``num_images`` records that
                hold a non-crowd annotation.
            confident_threshold, confident_fraction, confident_after_iters: the confident
                rule (health/collapse.py): from ``confident_after_iters`` on, detections per
                image at ``confident_threshold`` below ``confident_fraction`` x the objects
                per check image count towards a collapse; fraction 0: off.
            foreground_rule: periods in which most steps sampled no foreground anchor or ROI
                count towards a collapse.
        """
        check_choice("HEALTH.ACTION", action, ACTIONS)
        if period < 0 or num_images < 0:
            raise ValueError(
                f"HEALTH.PERIOD and HEALTH.NUM_IMAGES must be >= 0, got {period}, {num_images}"
            )
        self._counter = DetectionCounter([*score_thresholds, confident_threshold], main_threshold)
        self._confident_index = self._counter.thresholds.index(float(confident_threshold))
        self._starvation = ForegroundStarvation(FOREGROUND_SHARES) if foreground_rule else None
        self._period = period if dataset_name and num_images > 0 else 0
        self._dataset_name = dataset_name
        self._num_images = num_images
        self._mapper = mapper
        self._batch_size = max(1, batch_size)
        self._main_threshold = float(main_threshold)
        self._action = action
        self._check_at_start = check_at_start
        self._object_images_only = object_images_only
        self._grad_shares = None
        self._inputs: List[Dict[str, Any]] = []  # this worker's share of the check images
        self._num_check_images = 0  # on all workers together
        self._train_start = 0.0
        self._check_seconds = 0.0  # wall time spent in detection checks by this process
        self._collapses = CollapseTracker(
            warmup_iters=warmup_iters, fraction=collapse_fraction, patience=patience,
            confident_fraction=confident_fraction, confident_after_iters=confident_after_iters)

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "TrainingHealthMonitor":
        health = cfg.HEALTH
        dataset = health_dataset(cfg)
        for warning in check_set_warnings(cfg):
            logger.warning(f"Training health: {warning}")
        return cls(
            period=health.PERIOD, dataset_name=dataset, num_images=health.NUM_IMAGES,
            object_images_only=health.OBJECT_IMAGES_ONLY,
            mapper=SkippingMapper(DatasetMapper(cfg, False)),  # names an unusable image
            # Each worker's training batch fits in its memory with gradients, so it fits here.
            batch_size=cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
            score_thresholds=health.SCORE_THRESHOLDS, main_threshold=health.MAIN_THRESHOLD,
            collapse_fraction=health.COLLAPSE_FRACTION, patience=health.PATIENCE,
            warmup_iters=health.WARMUP_ITERS, action=health.ACTION,
            check_at_start=health.CHECK_AT_START,
            confident_threshold=confident_score(cfg),
            confident_fraction=health.CONFIDENT_FRACTION,
            confident_after_iters=round(health.CONFIDENT_AFTER * cfg.SOLVER.MAX_ITER),
            foreground_rule=health.NO_FOREGROUND_RULE,
        )

    # -- state, saved in checkpoints through the trainer's state_dict (a resumed run continues
    # -- its best/lowest values and its streak) --

    def state_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(self._collapses.state)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._collapses.state = {**CollapseTracker.initial_state(), **copy.deepcopy(state_dict)}

    # -- hook methods --

    def before_train(self) -> None:
        self._train_start = time.perf_counter()
        if not self._period:
            return
        # Loaded and mapped once: a check then costs only the forward passes.
        records = self._check_records()
        rank, world_size = comm.get_rank(), comm.get_world_size()
        self._inputs = [self._mapper(copy.deepcopy(r)) for r in records[rank::world_size]]
        self._num_check_images = len(records)
        self._collapses.objects = objects_per_image(records)
        self._counter.empty_image_ids = frozenset(
            r["image_id"] for r in records if "image_id" in r and not holds_objects(r))
        num_empty = len(self._counter.empty_image_ids)
        if len(records) < self._num_images:
            logger.info(
                f"Training health: HEALTH.NUM_IMAGES is {self._num_images} but "
                f"{self._dataset_name} has only {len(records)} "
                + ("images that hold objects (HEALTH.OBJECT_IMAGES_ONLY)"
                   if self._object_images_only else "images")
                + f": the checks run on those {len(records)}.")
        logger.info(
            f"Training health: a detection check every {self._period} iterations on "
            f"{len(records)} images of {self._dataset_name} ({len(self._inputs)} on this "
            f"worker; {self._collapses.objects:.2f} objects per image, {num_empty} images "
            f"without objects), collapse rule at score >= {self._main_threshold:g}."
        )
        model = self._unwrapped_model()
        if getattr(model, "backbone", None) is not None and shares_measurable(model.backbone):
            period = self._period
            self._grad_shares = LossGradientShares(
                model, model.backbone, lambda: (self.trainer.iter + 1) % period == 0,
                lambda: loss_scale(self.trainer),
            )
        if self._check_at_start and self.trainer.iter == 0:
            self._check_start()

    def _check_records(self) -> List[Dict[str, Any]]:
        return load_check_records(self._dataset_name, self._num_images, self._object_images_only)

    def after_step(self) -> None:
        if comm.is_main_process():
            storage = self.trainer.storage
            # Only values recorded in this very step (e.g. losses exist only on metric steps).
            measures = step_measures({k: v for k, (v, it) in storage.latest().items()
                                      if it == self.trainer.iter})
            if measures:
                storage.put_scalars(**measures)
            if self._starvation is not None:
                self._starvation.record(measures)
        next_iter = self.trainer.iter + 1
        if self._period and self._num_check_images and next_iter % self._period == 0:
            start = time.perf_counter()
            try:
                self._check(self.trainer.iter)
            finally:
                self._check_seconds += time.perf_counter() - start

    def after_train(self) -> None:
        if self._grad_shares is not None:
            self._grad_shares.remove()
            self._grad_shares = None
        state = self._collapses.state
        if not state["num_checks"]:
            return
        logger.info(summary_message(
            state["num_checks"], f"{self._num_check_images} images of {self._dataset_name}",
            self._collapses.summary_lines(f"score >= {self._main_threshold:g}"),
            self._check_seconds, time.perf_counter() - self._train_start))

    # -- detection checks --

    def _unwrapped_model(self) -> torch.nn.Module:
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module  # DDP's forward would wait for a backward that never comes
        return model

    def _count_detections(self) -> Dict[str, Any]:
        """Summed over all workers (health/detection_check.py); every worker calls it."""
        return count_detections(self._unwrapped_model(), self._inputs, self._batch_size,
                                self._counter)

    def _check_start(self) -> None:
        counts = self._count_detections()
        dets = counts["detections"][self._counter.main_index] / max(counts["images"], 1.0)
        self._collapses.state["start"] = dets
        self.trainer.storage.put_scalar("health/start_dets_per_image", dets, smoothing_hint=False)
        logger.info(
            f"Training health check before training: {dets:.2f} detections per image at score "
            f">= {self._main_threshold:g}"
        )

    def _starved_of_foreground(self) -> bool:
        """The no-foreground rule since the last check, measured on the main worker and the same
        answer on every worker."""
        starved = self._starvation is not None and self._starvation.starved()
        if comm.get_world_size() > 1:
            starved = comm.all_gather(starved)[0]
        return starved

    def _check(self, iteration: int) -> None:
        counts = self._count_detections()
        num_images = max(counts["images"], 1.0)
        per_threshold = [c / num_images for c in counts["detections"]]
        with_detections = counts["images_with_detections"] / num_images
        dets = per_threshold[self._counter.main_index]
        report = self._collapses.record(iteration, dets, with_detections,
                                        confident=per_threshold[self._confident_index],
                                        starved=self._starved_of_foreground())
        check = CheckResult(self._counter.thresholds, per_threshold, dets, with_detections,
                            detections_by_image_kind(counts, self._counter.main_index))
        state = self._collapses.state
        self.trainer.storage.put_scalars(smoothing_hint=False, **check.scalars(state))
        logger.info(check.line(iteration, self._main_threshold, state, self._collapses.patience))
        if report:
            self._report_collapse(iteration, dets)

    def _report_collapse(self, iteration: int, dets: float) -> None:
        state = self._collapses.state
        message = collapse_message(iteration, dets, self._main_threshold,
                                   f"{self._num_check_images} images of {self._dataset_name}",
                                   state, self._collapses.patience, self._period)
        if state["streak"] > self._collapses.patience:
            logger.warning(message + " Still collapsed.")
            return
        if self._action == "warn":
            logger.warning(banner(f"{message}\n{GOES_ON}"))
            return
        path = save_checkpoint_and_synchronize(self.trainer.checkpointer,
                                               f"model_collapse_{iteration:07d}", iteration)
        message += (
            f" Saved the model to {path}. Stopping training (HEALTH.ACTION 'stop', exit code "
            f"{EXIT_COLLAPSE})."
        )
        logger.error(banner(message))
        raise DetectionCollapseError(message)
