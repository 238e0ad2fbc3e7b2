"""
The monitor's per-step balance measures (docs/health.md, "Scalars"), from the scalars that
the heads, the trainer and GradientNormHook recorded in the same step.
"""

import math
from typing import Dict, Mapping

from balanced_rcnn.engine.grad_norm import GRAD_NORM_SCALAR


__all__ = ["FOREGROUND_SHARES", "step_measures"]

# measure: (foreground count, background count), as stock and balanced heads log them
FOREGROUND_SHARES = {
    "health/anchor_fg_share": ("rpn/num_pos_anchors", "rpn/num_neg_anchors"),
    "health/roi_fg_share": ("roi_head/num_fg_samples", "roi_head/num_bg_samples"),
}


def step_measures(now: Mapping[str, float]) -> Dict[str, float]:
    """The measures of one step from its scalars ``now`` (name -> value): the foreground shares,
    each ``loss_*`` / total_loss (for a finite, positive total) and the gradient norm."""
    measures = {}
    for share, (num, other) in FOREGROUND_SHARES.items():
        if num in now and other in now:
            measures[share] = now[num] / max(now[num] + now[other], 1e-12)
    total = now.get("total_loss")
    if total is not None and math.isfinite(total) and total > 0:
        for name, value in now.items():
            if name.startswith("loss_"):
                measures[f"health/loss_share/{name}"] = value / total
    if GRAD_NORM_SCALAR in now:
        measures["health/grad_norm"] = now[GRAD_NORM_SCALAR]
    return measures
