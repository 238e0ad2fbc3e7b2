"""
The collapse rule of the monitor's detection checks (health/monitor.py, docs/health.md): a
judged check is collapsed when its detections per image are zero, or below a fraction of the
reference, the best earlier judged count capped at the ground-truth objects per check image.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

__all__ = ["ACTIONS", "CollapseTracker", "count_collapses", "is_collapsed_check",
           "objects_per_image"]

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


class CollapseTracker:
    """
    The running values of a run's detection checks and the collapse rule over them. ``state``
    is plain data, saved in checkpoints (a resumed run continues its best and lowest values and
    its streak). ``objects``: ground-truth objects per check image, set before the checks.
    """

    def __init__(self, *, warmup_iters: int, fraction: float, patience: int, objects: float = 0.0):
        if warmup_iters < 0:
            raise ValueError(f"HEALTH.WARMUP_ITERS must be >= 0, got {warmup_iters}")
        if patience < 1:
            raise ValueError(f"HEALTH.PATIENCE must be >= 1, got {patience}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"HEALTH.COLLAPSE_FRACTION must be in [0, 1], got {fraction}")
        self.warmup_iters, self.fraction, self.patience = warmup_iters, fraction, patience
        self.objects = objects
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
        }

    def record(self, iteration: int, dets: float, with_detections: float = 0.0) -> bool:
        """Add the check made after ``iteration``; True if it is collapsed and the streak of
        collapsed checks has reached the patience (a collapse to report)."""
        state = self.state
        state["num_checks"] += 1
        state["last"] = (dets, iteration, with_detections)
        if state["lowest"] is None or dets < state["lowest"][0]:
            state["lowest"] = (dets, iteration)
        if iteration + 1 < self.warmup_iters:  # logged, not judged
            return False
        best = state["best"]
        collapsed = is_collapsed_check(dets, None if best is None else best[0], self.objects,
                                       self.fraction)
        if best is None or dets > best[0]:
            state["best"] = (dets, iteration)
        state["streak"] = state["streak"] + 1 if collapsed else 0
        state["num_collapses"] += collapsed and state["streak"] == self.patience
        return collapsed and state["streak"] >= self.patience

    def reason(self, dets: float) -> str:
        """Why a check with ``dets`` detections per image is collapsed, for the message."""
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


def count_collapses(checks: Sequence[Tuple[int, float]], *, warmup_iters: int, fraction: float,
                    patience: int, objects: float) -> int:
    """The collapses the monitor reports for these (iteration, detections per image) checks."""
    tracker = CollapseTracker(warmup_iters=warmup_iters, fraction=fraction, patience=patience,
                              objects=objects)
    for iteration, dets in checks:
        tracker.record(iteration, dets)
    return tracker.state["num_collapses"]
