"""
What the monitor (monitor.py) says about a detection check: its scalars, its log line, and the
collapse message.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

__all__ = ["GOES_ON", "CheckResult", "banner", "collapse_message", "summary_message"]

GOES_ON = ("Training goes on (HEALTH.ACTION 'warn'). The usual causes: too few foreground samples "
           "(see health/anchor_fg_share and health/roi_fg_share), a learning rate too high, empty "
           "images dominating.")


def banner(message: str) -> str:
    line = "!" * 100
    return f"\n{line}\n{message}\n{line}"


@dataclass
class CheckResult:
    """One check: detections per image at each score threshold, at the collapse rule's score
    (``dets``), the share of images with a detection, and the detections per object / empty
    image (detection_check.detections_by_image_kind)."""

    thresholds: Sequence[float]
    per_threshold: Sequence[float]
    dets: float
    with_detections: float
    by_image_kind: Dict[str, float]

    def scalars(self, state: Dict[str, Any]) -> Dict[str, float]:
        """The health/ scalars of the check, with the collapse tracker's ``state``."""
        scalars = {f"health/dets_per_image@{t:g}": v
                   for t, v in zip(self.thresholds, self.per_threshold)}
        scalars.update({"health/dets_per_image": self.dets,
                        "health/images_with_dets": self.with_detections,
                        "health/min_dets_per_image": state["lowest"][0],
                        "health/collapse_streak": state["streak"],
                        "health/num_collapses": state["num_collapses"]})
        if state["best"] is not None:
            scalars["health/best_dets_per_image"] = state["best"][0]
        scalars.update(self.by_image_kind)
        return scalars

    def line(self, iteration: int, main_threshold: float, state: Dict[str, Any],
             patience: int) -> str:
        per_score = ", ".join(f"{v:.2f} at score >= {t:g}"
                              for t, v in zip(self.thresholds, self.per_threshold))
        apart = ", ".join(f"{self.by_image_kind[key]:.2f} per image {what}" for key, what in (
            ("health/dets_per_object_image", "with objects"),
            ("health/dets_per_empty_image", "without")) if key in self.by_image_kind)
        counts_towards = (
            f"; counts towards a collapse ({state['streak']} of {patience}): "
            + "; ".join(state["why"]) if state["streak"] and state["why"] else "")
        return (f"Training health check at iteration {iteration}: detections per image "
                f"{per_score}; {100 * self.with_detections:.0f}% of the images have one; at "
                f"score >= {main_threshold:g}: {apart}{counts_towards}")


def collapse_message(iteration: int, dets: float, main_threshold: float, check_images: str,
                     state: Dict[str, Any], patience: int, period: int) -> str:
    return (
        f"Detection collapse at iteration {iteration}: {dets:.2f} detections per image at "
        f"score >= {main_threshold:g} on {check_images} ({'; '.join(state['why'])}) for "
        f"{state['streak']} consecutive checks (HEALTH.PATIENCE {patience}, a check every "
        f"{period} iterations)."
    )


def summary_message(num_checks: int, check_images: str, tracker_lines: List[str],
                    check_seconds: float, elapsed: float) -> str:
    """The end-of-training summary: the collapse tracker's lines and the time the checks took."""
    return "\n".join([
        f"Training health summary ({num_checks} detection checks on {check_images}):",
        *tracker_lines,
        f"  time in detection checks: {check_seconds:.1f} s, "
        f"{100 * check_seconds / max(elapsed, 1e-9):.1f}% of this run's training time",
    ])
