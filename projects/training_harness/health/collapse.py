"""
The collapse rules of the monitor's detection checks (health/monitor.py, docs/health.md). A
judged check counts towards a collapse when any of these holds:

- *detections*: its detections per image at HEALTH.MAIN_THRESHOLD are zero, or below a fraction
  of the reference, the best earlier judged count capped at the ground-truth objects per check
  image (:func:`is_collapsed_check`);
- *confident*: from HEALTH.CONFIDENT_AFTER of the schedule on, its detections per image at the
  confident score are below HEALTH.CONFIDENT_FRACTION x the objects per check image
  (:func:`is_unconfident_check`): low-score clutter keeps the first rule quiet on a run whose
  deployable detections are gone;
- *no foreground*: in more than half of the steps since the previous check, the sampled anchors
  or the sampled ROIs held no foreground (:func:`is_starved_of_foreground`): the heads learn
  from background alone.

HEALTH.PATIENCE consecutive such checks make a collapse.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

from detectron2.config import CfgNode

__all__ = ["ACTIONS", "CollapseTracker", "ForegroundStarvation", "confident_score",
           "count_collapses", "is_collapsed_check", "is_starved_of_foreground",
           "is_unconfident_check", "objects_per_image"]

ACTIONS = ("warn", "stop")  # HEALTH.ACTION


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


def is_unconfident_check(confident: float, objects: float, fraction: float) -> bool:
    """The confident rule for one check: ``confident`` detections per check image below
    ``fraction`` x the ground-truth ``objects`` per check image (never with no objects, or with
    ``fraction`` 0)."""
    return confident < fraction * objects


def is_starved_of_foreground(steps_without: int, steps: int) -> bool:
    """The no-foreground rule for the steps since the previous check: the sampled anchors (or
    ROIs) held no foreground in more than half of them (their median share is 0)."""
    return 2 * steps_without > steps


class ForegroundStarvation:
    """The steps since the last check, and those whose sampled anchors or ROIs held no
    foreground, per measure (health/step_measures.py); :meth:`starved` applies the rule and
    starts a new period."""

    def __init__(self, measures: Sequence[str]):
        self._measures = tuple(measures)
        self._reset()

    def _reset(self) -> None:
        self._steps = dict.fromkeys(self._measures, 0)
        self._without = dict.fromkeys(self._measures, 0)

    def record(self, step_measures: Dict[str, float]) -> None:
        for name in self._measures:
            if name in step_measures:
                self._steps[name] += 1
                self._without[name] += step_measures[name] == 0

    def starved(self) -> bool:
        starved = any(is_starved_of_foreground(self._without[name], self._steps[name])
                      for name in self._measures)
        self._reset()
        return starved


def confident_score(cfg: CfgNode) -> float:
    """The score of the confident rule: HEALTH.CONFIDENT_SCORE, or with -1 the deployment's
    TEST.DEPLOYMENT_SCORE_THRESH."""
    score = cfg.HEALTH.CONFIDENT_SCORE
    return cfg.TEST.DEPLOYMENT_SCORE_THRESH if score == -1 else score


class CollapseTracker:
    """
    The running values of a run's detection checks and the collapse rule over them. ``state``
    is plain data, saved in checkpoints (a resumed run continues its best and lowest values and
    its streak). ``objects``: ground-truth objects per check image, set before the checks.
    """

    def __init__(self, *, warmup_iters: int, fraction: float, patience: int, objects: float = 0.0,
                 confident_fraction: float = 0.0, confident_after_iters: int = 0):
        if warmup_iters < 0:
            raise ValueError(f"HEALTH.WARMUP_ITERS must be >= 0, got {warmup_iters}")
        if patience < 1:
            raise ValueError(f"HEALTH.PATIENCE must be >= 1, got {patience}")
        for key, value in (("COLLAPSE_FRACTION", fraction),
                           ("CONFIDENT_FRACTION", confident_fraction)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"HEALTH.{key} must be in [0, 1], got {value}")
        self.warmup_iters, self.fraction, self.patience = warmup_iters, fraction, patience
        self.objects = objects
        self.confident_fraction = confident_fraction
        self.confident_after_iters = max(confident_after_iters, warmup_iters)
        self.state = self.initial_state()

    @staticmethod
    def initial_state() -> Dict[str, Any]:
        return {
            "num_checks": 0,
            "best": None,  # (dets per image, iteration) of the best judged check
            "lowest": None,  # (dets per image, iteration) of the lowest check
            "last": None,  # (dets per image, iteration, images-with-detections share)
            "start": None,  # dets per image before training (HEALTH.CHECK_AT_START)
            "streak": 0,
            "num_collapses": 0,
            "why": [],  # the rules that hold at the last judged check
        }

    def record(self, iteration: int, dets: float, with_detections: float = 0.0,
               confident: Optional[float] = None, starved: bool = False) -> bool:
        """Add the check made after ``iteration``: ``dets`` detections per image at the main
        score, ``confident`` at the confident score (None: not counted), ``starved``: the
        no-foreground rule holds for the steps since the previous check. True if the check
        counts towards a collapse and the streak has reached the patience (a collapse to
        report); the rules that hold are in ``state["why"]``."""
        state = self.state
        state["num_checks"] += 1
        state["last"] = (dets, iteration, with_detections)
        if state["lowest"] is None or dets < state["lowest"][0]:
            state["lowest"] = (dets, iteration)
        if iteration + 1 < self.warmup_iters:  # logged, not judged
            return False
        best = state["best"]
        why = []
        if is_collapsed_check(dets, None if best is None else best[0], self.objects,
                              self.fraction):
            why.append(self.reason(dets))
        if (confident is not None and iteration + 1 >= self.confident_after_iters
                and is_unconfident_check(confident, self.objects, self.confident_fraction)):
            why.append(f"{confident:.2f} confident detections per image, below "
                       f"{self.confident_fraction:g} x the {self.objects:.2f} objects per check "
                       "image")
        if starved:
            why.append("no foreground among the sampled anchors or ROIs in most steps since the "
                       "previous check")
        if best is None or dets > best[0]:
            state["best"] = (dets, iteration)
        state["why"] = why
        state["streak"] = state["streak"] + 1 if why else 0
        state["num_collapses"] += bool(why) and state["streak"] == self.patience
        return bool(why) and state["streak"] >= self.patience

    def reason(self, dets: float) -> str:
        """Why a check with ``dets`` detections per image is collapsed under the detections
        rule, for the message (before ``dets`` is recorded)."""
        if dets == 0:
            return "none at all"
        best = self.state["best"]  # there was a best earlier check
        capped = (f", capped at the {self.objects:.2f} objects per check image"
                  if 0 < self.objects < best[0] else "")
        return f"below {self.fraction:g} x the best, {best[0]:.2f} at iteration {best[1]}{capped}"

    def summary_lines(self, at: str) -> List[str]:
        """The end-of-training summary of the checks (at least one), ``at``: the main score."""
        state = self.state
        best, lowest, last = state["best"], state["lowest"], state["last"]
        return [
            f"  detections per image at {at}: "
            + (f"before training {state['start']:.2f}, " if state["start"] is not None else "")
            + f"last {last[0]:.2f} (iteration {last[1]}), "
            + (f"best {best[0]:.2f} (iteration {best[1]}), " if best else "")
            + f"lowest {lowest[0]:.2f} (iteration {lowest[1]})",
            f"  images with a detection at the last check: {100 * last[2]:.0f}%",
            f"  collapses reported: {state['num_collapses']}"
            + (f" (still collapsed for {state['streak']} checks)" if state["streak"] else ""),
        ]


def count_collapses(checks: Sequence[Tuple], *, warmup_iters: int, fraction: float,
                    patience: int, objects: float, confident_fraction: float = 0.0,
                    confident_after_iters: int = 0) -> int:
    """The collapses the monitor reports for these checks: (iteration, detections per image[,
    confident detections per image or None[, starved]]) tuples."""
    tracker = CollapseTracker(warmup_iters=warmup_iters, fraction=fraction, patience=patience,
                              objects=objects, confident_fraction=confident_fraction,
                              confident_after_iters=confident_after_iters)
    for check in checks:
        tracker.record(check[0], check[1], confident=check[2] if len(check) > 2 else None,
                       starved=bool(check[3]) if len(check) > 3 else False)
    return tracker.state["num_collapses"]
