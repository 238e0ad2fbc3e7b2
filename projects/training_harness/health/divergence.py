"""
The stop on a loss that explodes while staying finite (a learning rate far too high: with
SOLVER.BASE_LR 50 the CPU demo config's total loss goes from 3.19 to 472 in its second step; the
non-finite stop fires only once something overflows, if ever).

The rule, checked every step on the worker-averaged loss values that the non-finite stop already
has on the host (health/nonfinite.py; no added synchronization), with the same exit code 4:

- **ceiling**: the total loss is above HEALTH.LOSS_CEILING (default 1000);
- **jump**: the total loss is more than HEALTH.LOSS_JUMP_FACTOR (default 100) x the reference:
  the largest total of every earlier step of the run, but at least 1. The floor matters when
  training starts from a model that already fits mostly empty data: its batches without objects
  have a total near 0 (a median of 0.006 over a fine-tuning run on the 95%-empty data), and the
  first batch with objects would count as a jump of hundreds. The reference is kept in
  checkpoints, so a resumed run goes on comparing with the same value.

The defaults against healthy runs (benchmarks/loss_margin.py, BENCHMARKS.md "loss_margin": 8
800-iteration runs of the quality A/B on the 95%-empty data, 2-3 seeds each): the largest total
was 2.07-2.6 (stock heads), 1.52-2.75 (fine-tuning) and 22.9-26 (the design configuration), 38-659
x below the ceiling; the largest step-to-reference jump 1.02-1.12, 1.2-1.52 and 2.09-6.55, 15-98
x below the factor.
The largest earlier value, not a running median, is the reference: most steps on mostly empty
data have almost no loss (median totals 0.006-0.010), so a median rule would stop healthy runs.
0 turns either part off. The message names the term that rose most.
"""

from typing import Dict, Mapping, Optional

from detectron2.config import CfgNode

from ..errors import LossExplosionError

__all__ = ["JUMP_REFERENCE_FLOOR", "LossDivergenceRule", "explosion_message"]

JUMP_REFERENCE_FLOOR = 1.0  # the jump rule's reference is never below this total


def _largest_rise(losses: Mapping[str, float], previous_max: Mapping[str, float]) -> str:
    """'name = value (r x its previous largest)' of the term that rose most."""
    def rise(name: str) -> float:
        return losses[name] / max(previous_max.get(name, 0.0), 1e-12)

    name = max(losses, key=rise)
    if name not in previous_max:
        return f"{name} = {losses[name]:.3g}"
    return f"{name} = {losses[name]:.3g}, {rise(name):.3g} x its previous largest"


def explosion_message(iteration: int, losses: Mapping[str, float],
                      previous_max: Mapping[str, float], ceiling: float,
                      jump_factor: float) -> Optional[str]:
    """
    Why the step's ``losses`` (every term) break the rule of the module docstring, or None.
    ``previous_max``: the largest total (under "total_loss") and term values of the earlier
    steps; empty for the first step. The jump is measured against the largest total, floored
    at JUMP_REFERENCE_FLOOR.
    """
    total = sum(losses.values())
    largest = previous_max.get("total_loss")
    reference = None if largest is None else max(largest, JUMP_REFERENCE_FLOOR)
    if ceiling > 0 and total > ceiling:
        reason = f"is above HEALTH.LOSS_CEILING = {ceiling:g}"
    elif jump_factor > 0 and reference is not None and total > jump_factor * reference:
        before = f"{largest:.3g}" if largest >= JUMP_REFERENCE_FLOOR else \
            f"{largest:.3g}, taken as {JUMP_REFERENCE_FLOOR:g}"
        reason = (f"is {total / reference:.3g} x the largest total before it ({before}), more "
                  f"than HEALTH.LOSS_JUMP_FACTOR = {jump_factor:g}")
    else:
        return None
    return (f"Loss exploded at iteration {iteration}: total_loss = {total:.3g} {reason} (term "
            f"that rose most: {_largest_rise(losses, previous_max)}). The optimizer step was not "
            "applied; lower SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS.")


class LossDivergenceRule:
    """The rule of the module docstring, fed one step's loss values at a time; its reference
    (the largest values so far) is saved in checkpoints through the trainer's state_dict."""

    def __init__(self, ceiling: float, jump_factor: float):
        if not (ceiling >= 0 and jump_factor >= 0):
            raise ValueError("HEALTH.LOSS_CEILING and HEALTH.LOSS_JUMP_FACTOR must be >= 0 (0: "
                             f"off), got {ceiling} and {jump_factor}")
        self.ceiling = ceiling
        self.jump_factor = jump_factor
        self.largest: Dict[str, float] = {}  # "total_loss" and each term

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "LossDivergenceRule":
        return cls(cfg.HEALTH.LOSS_CEILING, cfg.HEALTH.LOSS_JUMP_FACTOR)

    def check(self, iteration: int, losses: Mapping[str, float]) -> None:
        """
        Raises:
            LossExplosionError: the step breaks the rule (its values are not kept).
        """
        problem = explosion_message(iteration, losses, self.largest, self.ceiling,
                                    self.jump_factor)
        if problem is not None:
            raise LossExplosionError(problem)
        for name, value in [("total_loss", sum(losses.values())), *losses.items()]:
            self.largest[name] = max(self.largest.get(name, value), value)

    def state_dict(self) -> Dict[str, Dict[str, float]]:
        return {"largest": dict(self.largest)}

    def load_state_dict(self, state: Mapping[str, Mapping[str, float]]) -> None:
        self.largest = dict(state["largest"])
