"""
The training-health monitor: watches a run for the failures that otherwise show up a day later
(detections collapsing to zero, one loss term swamping the others, bad gradients) and says so
while training, configured by the HEALTH keys (config.py).

:class:`TrainingHealthMonitor` is a trainer hook that

- every step, turns the heads' and the trainer's scalars into balance measures;
- every HEALTH.PERIOD iterations, runs the model in eval mode on a fixed set of images (the first
  HEALTH.NUM_IMAGES of HEALTH.DATASET, mapped once before training) and counts its detections
  (box branch only: the mask head is switched off for the check, the counts do not need it);
- with HEALTH.CHECK_AT_START, checks once before the first step of a run that starts at
  iteration 0 (logged, never judged: the starting weights are not the run's result, e.g. class
  layers just re-initialized for fine-tuning);
- at every check period, measures the gradient share of each loss term on the backbone
  (engine/grad_shares.py);
- reports a *collapse*: detections per image at HEALTH.MAIN_THRESHOLD are zero, or below
  HEALTH.COLLAPSE_FRACTION x the reference, in HEALTH.PATIENCE consecutive checks made after
  HEALTH.WARMUP_ITERS completed iterations (:func:`is_collapsed_check`). The reference is the best
  value of the earlier checks, capped at the ground-truth objects per check image when they have
  any: a burst of false positives early in training (tens per image) must not turn a later,
  healthy count (more detections than objects) into a "collapse". It warns loudly; with
  HEALTH.ACTION "stop" it also saves ``model_collapse_<iter>.pth`` and stops training with
  :class:`DetectionCollapseError` (train_net.py exits with :data:`EXIT_COLLAPSE`);
- logs a summary at the end of training.

Non-finite losses and gradient norms are caught inside the training step, before the optimizer
applies them (engine/nonfinite.py): :class:`NonFiniteTrainingError`, checkpoint
``model_nonfinite_<iter>.pth`` with the weights of the last finite step,
:data:`EXIT_NON_FINITE`.

Scalars put into EventStorage (hence metrics.json and TensorBoard):

Every step, on the main worker (metrics.json holds their 20-iteration median, like the losses):

    health/anchor_fg_share       positive / sampled anchors of the RPN, from rpn/num_pos_anchors
                                 and rpn/num_neg_anchors (logged by stock and balanced RPN)
    health/roi_fg_share          foreground / sampled proposals of the box head, from
                                 roi_head/num_fg_samples and roi_head/num_bg_samples
    health/loss_share/<name>     each loss term / total_loss (workers' means), e.g.
                                 health/loss_share/loss_cls
    health/grad_norm             total gradient norm before clipping (optim/grad_norm)

Every detection check (exact values):

    health/dets_per_image@<t>    detections per image with score >= t, for t in SCORE_THRESHOLDS
                                 and MAIN_THRESHOLD
                                 (e.g. health/dets_per_image@0.05)
    health/dets_per_image        the same at MAIN_THRESHOLD: the quantity of the collapse rule
    health/images_with_dets      share of the check images with >= 1 detection at MAIN_THRESHOLD
    health/best_dets_per_image   highest health/dets_per_image of the checks after the warm-up
    health/min_dets_per_image    lowest health/dets_per_image of all checks so far: the last
                                 value in metrics.json is the run's lowest
    health/collapse_streak       consecutive collapsed checks after the warm-up
    health/num_collapses         collapses reported so far (a streak reaching PATIENCE)
    health/grad_share/<loss>     each loss term's gradient norm on the backbone + FPN / their sum,
                                 measured in the training step of the check (grad_shares.py)

Once, with HEALTH.CHECK_AT_START (at iteration 0):

    health/start_dets_per_image  detections per image at MAIN_THRESHOLD before training

detectron2's writers record the latest value of each scalar every 20 iterations: with a PERIOD
that is a multiple of 20 every check reaches metrics.json; the running values (lowest, best,
number of collapses) cover all checks whatever the period.

DDP: every worker counts the detections on its share of the check images (image i goes to
worker i mod world size) and the counts are summed with one all_gather per check, so the check
costs 1/world-size of its one-process time. Every worker then runs the same rule on the same
sums and takes the same decision at the same iteration; to stop, the main worker saves the
checkpoint while the others wait at a barrier, and all raise together. Nobody waits in a
collective that another worker has left.
"""

import contextlib
import copy
import logging
import math
import os
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Instances
from detectron2.utils import comm
from torch.nn.parallel import DistributedDataParallel

from ..data.mapper import SkippingDatasetMapper
from ..utils.random_state import preserved_random_state
from .grad_norm import GRAD_NORM_SCALAR
from .grad_shares import LossGradientShares

__all__ = [
    "EXIT_COLLAPSE",
    "EXIT_NON_FINITE",
    "DetectionCollapseError",
    "NonFiniteTrainingError",
    "TrainingHealthError",
    "TrainingHealthMonitor",
    "check_health_images",
    "check_records",
    "count_collapses",
    "health_dataset",
    "is_collapsed_check",
    "load_check_records",
    "objects_per_image",
    "save_checkpoint_and_synchronize",
]

logger = logging.getLogger(__name__)

# Exit codes of train_net.py when the monitor stops training (README, "Training health").
EXIT_COLLAPSE = 3
EXIT_NON_FINITE = 4

ACTIONS = ("warn", "stop")


class TrainingHealthError(RuntimeError):
    """Training was stopped by the health monitor; ``exit_code`` is train_net.py's exit code."""

    exit_code = 1


class DetectionCollapseError(TrainingHealthError):
    """Detections collapsed for HEALTH.PATIENCE checks and HEALTH.ACTION is "stop"."""

    exit_code = EXIT_COLLAPSE


class NonFiniteTrainingError(TrainingHealthError, FloatingPointError):
    """A loss term or the gradient norm is not finite (a FloatingPointError, as detectron2's)."""

    exit_code = EXIT_NON_FINITE
    checkpoint_prefix = "model_nonfinite"  # the weights before the step are saved under it


def save_checkpoint_and_synchronize(
    checkpointer: DetectionCheckpointer, name: str, iteration: int
) -> str:
    """
    Save ``<name>.pth`` with its ``iteration``, as detectron2's PeriodicCheckpointer does (the
    checkpointer writes on the main worker only), and hold every worker at a barrier until it is
    written: a worker that exited earlier would make the launcher kill the main one mid-write.
    Call it on every worker. Returns the path.
    """
    checkpointer.save(name, iteration=iteration)
    comm.synchronize()
    return os.path.join(checkpointer.save_dir, f"{name}.pth")


def check_records(records: Sequence[Dict[str, Any]], num_images: int,
                  object_images_only: bool = False) -> List[Dict[str, Any]]:
    """The check images among a dataset's records: the first ``num_images``, of those holding a
    non-crowd annotation with ``object_images_only``."""
    if object_images_only:
        records = [r for r in records
                   if any(not a.get("iscrowd", 0) for a in r.get("annotations", ()))]
    return list(records[:num_images])


def load_check_records(dataset_name: str, num_images: int,
                       object_images_only: bool = False) -> List[Dict[str, Any]]:
    """:func:`check_records` of a registered dataset; an error if none is left."""
    records = check_records(DatasetCatalog.get(dataset_name), num_images, object_images_only)
    if object_images_only and not records:
        raise ValueError(
            f"HEALTH.OBJECT_IMAGES_ONLY: dataset '{dataset_name}' (HEALTH.DATASET or "
            "DATASETS.TEST[0]) has no image with a non-crowd annotation to check on"
        )
    return records


def health_dataset(cfg: CfgNode) -> str:
    """The dataset of the detection checks: HEALTH.DATASET, else DATASETS.TEST[0], else ""."""
    return cfg.HEALTH.DATASET or (cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else "")


def check_health_images(cfg: CfgNode) -> None:
    """
    Read the check images at set-up, through the evaluation mapper (which names an unusable
    file): the monitor reads them again only once the model and the training data are built.
    """
    health = cfg.HEALTH
    name = health_dataset(cfg)
    if not (health.ENABLED and health.PERIOD > 0 and name):
        return
    mapper = SkippingDatasetMapper(cfg, False)
    with preserved_random_state():  # the test-time resize draws its size from NumPy's state
        for record in load_check_records(name, health.NUM_IMAGES, health.OBJECT_IMAGES_ONLY):
            mapper(copy.deepcopy(record))


def objects_per_image(records: Sequence[Dict[str, Any]]) -> float:
    """Non-crowd ground-truth objects per record (0 for no records or records without
    annotations, e.g. an unlabelled check set)."""
    objects = sum(not a.get("iscrowd", 0) for r in records for a in r.get("annotations", ()))
    return objects / len(records) if records else 0.0


def is_collapsed_check(dets: float, best: Optional[float], objects: float,
                       fraction: float) -> bool:
    """
    The collapse rule for one judged check: no detection at all, or fewer than ``fraction`` x the
    reference, i.e. the best earlier judged count ``best`` (None: this is the first) capped at the
    ground-truth ``objects`` per check image when there are any.
    """
    if dets == 0:
        return True
    if best is None:
        return False
    reference = min(best, objects) if objects > 0 else best
    return dets < fraction * reference


def count_collapses(checks: Sequence[Tuple[int, float]], *, warmup_iters: int, fraction: float,
                    patience: int, objects: float) -> int:
    """The collapses the monitor reports for these (iteration, detections per image) checks:
    streaks of ``patience`` collapsed judged checks (:func:`is_collapsed_check`)."""
    best, streak, collapses = None, 0, 0
    for iteration, dets in checks:
        if iteration + 1 < warmup_iters:
            continue
        collapsed = is_collapsed_check(dets, best, objects, fraction)
        best = dets if best is None else max(best, dets)
        streak = streak + 1 if collapsed else 0
        collapses += streak == patience
    return collapses


def _threshold_name(threshold: float) -> str:
    return f"health/dets_per_image@{threshold:g}"


@contextlib.contextmanager
def _boxes_only(model: torch.nn.Module) -> Iterator[None]:
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
        """
        if action not in ACTIONS:
            raise ValueError(f"HEALTH.ACTION must be one of {ACTIONS}, got {action!r}")
        if period < 0 or num_images < 0 or warmup_iters < 0:
            raise ValueError(
                "HEALTH.PERIOD, HEALTH.NUM_IMAGES and HEALTH.WARMUP_ITERS must be >= 0, got "
                f"{period}, {num_images}, {warmup_iters}"
            )
        if patience < 1:
            raise ValueError(f"HEALTH.PATIENCE must be >= 1, got {patience}")
        if not 0.0 <= collapse_fraction <= 1.0:
            raise ValueError(f"HEALTH.COLLAPSE_FRACTION must be in [0, 1], got {collapse_fraction}")
        thresholds = sorted(set(float(t) for t in score_thresholds) | {float(main_threshold)})
        if not all(0.0 <= t <= 1.0 for t in thresholds):
            raise ValueError(
                "HEALTH.SCORE_THRESHOLDS and HEALTH.MAIN_THRESHOLD must be scores in [0, 1], got "
                f"{list(score_thresholds)} and {main_threshold}"
            )
        self._period = period if dataset_name and num_images > 0 else 0
        self._dataset_name = dataset_name
        self._num_images = num_images
        self._mapper = mapper
        self._batch_size = max(1, batch_size)
        self._thresholds = thresholds
        self._main_index = thresholds.index(float(main_threshold))
        self._main_threshold = float(main_threshold)
        self._collapse_fraction = collapse_fraction
        self._patience = patience
        self._warmup_iters = warmup_iters
        self._action = action
        self._check_at_start = check_at_start
        self._object_images_only = object_images_only
        self._objects_per_image = 0.0  # ground truth on the check images (set before training)
        self._grad_shares = None
        self._inputs: List[Dict[str, Any]] = []  # this worker's share of the check images
        self._num_check_images = 0  # on all workers together
        self._train_start = 0.0
        self._check_seconds = 0.0  # wall time spent in detection checks by this process
        self._state = self._initial_state()

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "TrainingHealthMonitor":
        health = cfg.HEALTH
        dataset = health_dataset(cfg)
        if not dataset and health.PERIOD > 0:
            logger.warning(
                "Training health: no detection checks (HEALTH.DATASET is empty and DATASETS.TEST "
                "names no dataset); the per-step measures and the non-finite stop stay on."
            )
        lowest = min(min(health.SCORE_THRESHOLDS, default=1.0), health.MAIN_THRESHOLD)
        if lowest < cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST:
            logger.warning(
                f"Training health: the model drops detections below MODEL.ROI_HEADS."
                f"SCORE_THRESH_TEST={cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST}, so counts at lower "
                f"HEALTH thresholds (lowest: {lowest}) equal the count at that score."
            )
        return cls(
            period=health.PERIOD,
            dataset_name=dataset,
            num_images=health.NUM_IMAGES,
            mapper=SkippingDatasetMapper(cfg, False),  # names an unusable image
            # Each worker's training batch fits in its memory with gradients, so it fits here.
            batch_size=cfg.SOLVER.IMS_PER_BATCH // comm.get_world_size(),
            score_thresholds=health.SCORE_THRESHOLDS,
            main_threshold=health.MAIN_THRESHOLD,
            collapse_fraction=health.COLLAPSE_FRACTION,
            patience=health.PATIENCE,
            warmup_iters=health.WARMUP_ITERS,
            action=health.ACTION,
            check_at_start=health.CHECK_AT_START,
            object_images_only=health.OBJECT_IMAGES_ONLY,
        )

    # -- state, saved in checkpoints through the trainer's state_dict (a resumed run continues
    # -- its best/lowest values and its streak) --

    @staticmethod
    def _initial_state() -> Dict[str, Any]:
        return {
            "num_checks": 0,
            "best": None,  # (dets per image, iteration) of the best counted check
            "lowest": None,  # (dets per image, iteration) of the lowest check
            "last": None,  # (dets per image, iteration, images-with-detections share)
            "start": None,  # dets per image before training (HEALTH.CHECK_AT_START)
            "streak": 0,
            "num_collapses": 0,
        }

    def state_dict(self) -> Dict[str, Any]:
        return copy.deepcopy(self._state)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self._state = {**self._initial_state(), **copy.deepcopy(state_dict)}

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
        self._objects_per_image = objects_per_image(records)
        logger.info(
            f"Training health: a detection check every {self._period} iterations on "
            f"{len(records)} images of {self._dataset_name} ({len(self._inputs)} on this "
            f"worker; {self._objects_per_image:.2f} objects per image), collapse rule at score "
            f">= {self._main_threshold:g}."
        )
        model = self._unwrapped_model()
        if getattr(model, "backbone", None) is not None and self._grad_shares_possible(model):
            period = self._period
            self._grad_shares = LossGradientShares(
                model, model.backbone, lambda: (self.trainer.iter + 1) % period == 0,
                self._loss_scale,
            )
        if self._check_at_start and self.trainer.iter == 0:
            self._check_start()

    def _check_records(self) -> List[Dict[str, Any]]:
        return load_check_records(self._dataset_name, self._num_images, self._object_images_only)

    def after_step(self) -> None:
        if comm.is_main_process():
            self._put_step_measures()
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
        state = self._state
        if not state["num_checks"]:
            return
        best, lowest, last = state["best"], state["lowest"], state["last"]
        elapsed = time.perf_counter() - self._train_start
        at = f"score >= {self._main_threshold:g}"
        lines = [
            f"Training health summary ({state['num_checks']} detection checks on "
            f"{self._num_check_images} images of {self._dataset_name}):",
            f"  detections per image at {at}: "
            + (f"before training {state['start']:.2f}, " if state["start"] is not None else "")
            + f"last {last[0]:.2f} (iteration {last[1]}), "
            + (f"best {best[0]:.2f} (iteration {best[1]}), " if best else "")
            + f"lowest {lowest[0]:.2f} (iteration {lowest[1]})",
            f"  images with a detection at the last check: {100 * last[2]:.0f}%",
            f"  collapses reported: {state['num_collapses']}"
            + (f" (still collapsed for {state['streak']} checks)" if state["streak"] else ""),
            f"  time in detection checks: {self._check_seconds:.1f} s, "
            f"{100 * self._check_seconds / max(elapsed, 1e-9):.1f}% of this run's training time",
        ]
        logger.info("\n".join(lines))

    # -- per-step measures --

    def _put_step_measures(self) -> None:
        storage = self.trainer.storage
        iteration = self.trainer.iter
        # Only values recorded in this very step (e.g. losses exist only on metric steps).
        now = {k: v for k, (v, it) in storage.latest().items() if it == iteration}
        measures = {}
        for share, (num, other) in {
            "health/anchor_fg_share": ("rpn/num_pos_anchors", "rpn/num_neg_anchors"),
            "health/roi_fg_share": ("roi_head/num_fg_samples", "roi_head/num_bg_samples"),
        }.items():
            if num in now and other in now:
                measures[share] = now[num] / max(now[num] + now[other], 1e-12)
        total = now.get("total_loss")
        if total is not None and math.isfinite(total) and total > 0:
            for name, value in now.items():
                if name.startswith("loss_"):
                    measures[f"health/loss_share/{name}"] = value / total
        if GRAD_NORM_SCALAR in now:
            measures["health/grad_norm"] = now[GRAD_NORM_SCALAR]
        if measures:
            storage.put_scalars(**measures)

    # -- detection checks --

    def _predict(self, model: torch.nn.Module, batch: List[Dict[str, Any]]) -> List[Instances]:
        if isinstance(model, GeneralizedRCNN):
            # No rescaling to the original image size nor mask pasting: counting needs scores.
            return model.inference(batch, do_postprocess=False)
        return [r["instances"] for r in model(batch)]

    @staticmethod
    def _grad_shares_possible(model: torch.nn.Module) -> bool:
        # detectron2's Swin stages carry the flag (BasicLayer.use_checkpoint).
        if any(getattr(m, "use_checkpoint", False) for m in model.backbone.modules()):
            logger.warning(
                "Training health: no health/grad_share/* scalars: the backbone uses activation "
                "checkpointing (MODEL.SWIN.USE_CHECKPOINT), whose reentrant backward "
                "torch.autograd.grad does not support"
            )
            return False
        return True

    def _loss_scale(self) -> float:
        """The GradScaler's scale under AMP (once per check: its value waits for the device)."""
        scaler = getattr(getattr(self.trainer, "_trainer", None), "grad_scaler", None)
        if scaler is None or not scaler.is_enabled():
            return 1.0
        return float(scaler.get_scale())

    def _unwrapped_model(self) -> torch.nn.Module:
        model = self.trainer.model
        if isinstance(model, DistributedDataParallel):
            model = model.module  # DDP's forward would wait for a backward that never comes
        return model

    @torch.no_grad()
    def _count_detections(self) -> List[float]:
        """
        On this worker's images: [number of images, detections at each threshold, images with a
        detection at the main threshold], summed over all workers.
        """
        model = self._unwrapped_model()
        device = next(model.parameters()).device
        thresholds = torch.tensor(self._thresholds, device=device)
        local = torch.zeros(len(self._thresholds) + 2, device=device, dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            with _boxes_only(model):
                for start in range(0, len(self._inputs), self._batch_size):
                    batch = self._inputs[start : start + self._batch_size]
                    for instances in self._predict(model, batch):
                        # (D, 1) >= (T,) -> (D, T) -> (T,): this image's detections per threshold
                        per_threshold = (instances.scores[:, None] >= thresholds).sum(dim=0)
                        local[0] += 1
                        local[1:-1] += per_threshold
                        local[-1] += per_threshold[self._main_index] > 0
        finally:
            model.train(was_training)
        # One transfer, then one all_gather (all workers, same iteration): everyone gets the sums.
        gathered = comm.all_gather(local.cpu().tolist())
        return [sum(values) for values in zip(*gathered)]

    def _check_start(self) -> None:
        counts = self._count_detections()
        dets = counts[1 + self._main_index] / max(counts[0], 1.0)
        self._state["start"] = dets
        self.trainer.storage.put_scalar("health/start_dets_per_image", dets, smoothing_hint=False)
        logger.info(
            f"Training health check before training: {dets:.2f} detections per image at score "
            f">= {self._main_threshold:g}"
        )

    def _check(self, iteration: int) -> None:
        counts = self._count_detections()
        num_images = max(counts[0], 1.0)
        per_threshold = [c / num_images for c in counts[1:-1]]
        dets = per_threshold[self._main_index]
        state = self._state
        state["num_checks"] += 1
        state["last"] = (dets, iteration, counts[-1] / num_images)
        if state["lowest"] is None or dets < state["lowest"][0]:
            state["lowest"] = (dets, iteration)

        collapsed = False
        if iteration + 1 >= self._warmup_iters:
            best = state["best"]
            collapsed = is_collapsed_check(dets, None if best is None else best[0],
                                           self._objects_per_image, self._collapse_fraction)
            if best is None or dets > best[0]:
                state["best"] = (dets, iteration)
            state["streak"] = state["streak"] + 1 if collapsed else 0
        if state["streak"] == self._patience and collapsed:
            state["num_collapses"] += 1

        scalars = {_threshold_name(t): v for t, v in zip(self._thresholds, per_threshold)}
        scalars.update(
            {
                "health/dets_per_image": dets,
                "health/images_with_dets": counts[-1] / num_images,
                "health/min_dets_per_image": state["lowest"][0],
                "health/collapse_streak": state["streak"],
                "health/num_collapses": state["num_collapses"],
            }
        )
        if state["best"] is not None:
            scalars["health/best_dets_per_image"] = state["best"][0]
        self.trainer.storage.put_scalars(smoothing_hint=False, **scalars)
        per_score = ", ".join(
            f"{v:.2f} at score >= {t:g}" for t, v in zip(self._thresholds, per_threshold)
        )
        logger.info(
            f"Training health check at iteration {iteration}: detections per image {per_score}; "
            f"{100 * counts[-1] / num_images:.0f}% of the images have one"
        )
        if collapsed and state["streak"] >= self._patience:
            self._report_collapse(iteration, dets)

    def _report_collapse(self, iteration: int, dets: float) -> None:
        state = self._state
        best = state["best"]
        reason = "none at all"
        if dets > 0:  # then there was a best earlier check
            objects = self._objects_per_image
            capped = (f", capped at the {objects:.2f} objects per check image"
                      if 0 < objects < best[0] else "")
            reason = (f"below {self._collapse_fraction:g} x the best, {best[0]:.2f} at iteration "
                      f"{best[1]}{capped}")
        message = (
            f"Detection collapse at iteration {iteration}: {dets:.2f} detections per image at "
            f"score >= {self._main_threshold:g} on {self._num_check_images} images of "
            f"{self._dataset_name} ({reason}) for {state['streak']} consecutive checks "
            f"(HEALTH.PATIENCE {self._patience}, a check every {self._period} iterations)."
        )
        if state["streak"] > self._patience:
            logger.warning(message + " Still collapsed.")
            return
        banner = "!" * 100
        if self._action == "warn":
            logger.warning(
                f"\n{banner}\n{message}\nTraining goes on (HEALTH.ACTION 'warn'). The usual "
                "causes: too few foreground samples (see health/anchor_fg_share and "
                "health/roi_fg_share), a learning rate too high, empty images dominating.\n"
                f"{banner}"
            )
            return
        path = save_checkpoint_and_synchronize(
            self.trainer.checkpointer, f"model_collapse_{iteration:07d}", iteration
        )
        message += (
            f" Saved the model to {path}. Stopping training (HEALTH.ACTION 'stop', exit code "
            f"{EXIT_COLLAPSE})."
        )
        logger.error(f"\n{banner}\n{message}\n{banner}")
        raise DetectionCollapseError(message)
