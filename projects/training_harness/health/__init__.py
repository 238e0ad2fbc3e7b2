"""What watches a training run (docs/health.md): the monitor hook with its detection checks and
collapse rule, and the per-step stop on a non-finite or exploding loss."""

from .divergence import LossDivergenceRule
from .monitor import TrainingHealthMonitor
from .nonfinite import NonFiniteStop

__all__ = ["LossDivergenceRule", "NonFiniteStop", "TrainingHealthMonitor"]
