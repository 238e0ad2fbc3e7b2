"""Training: the project's DefaultTrainer, its optimizer, its gradient-norm hook, the
training-health monitor, and what keeps interrupted or broken runs resumable (atomic checkpoints,
a checkpoint on SIGTERM / Ctrl-C, the DDP peer watchdog)."""

from .checkpoint import AtomicCheckpointer, CheckpointError
from .grad_norm import GRAD_NORM_SCALAR, GradientNormHook, clip_and_measure_grad_norm
from .health import (
    EXIT_COLLAPSE,
    EXIT_NON_FINITE,
    DetectionCollapseError,
    NonFiniteTrainingError,
    TrainingHealthError,
    TrainingHealthMonitor,
)
from .optimizer import build_optimizer, build_param_groups
from .signals import CheckpointOnSignal, TrainingInterrupted
from .trainer import Trainer
from .watchdog import EXIT_PEER_LOST, PeerWatchdog, PeerWatchdogHook

__all__ = [
    "EXIT_COLLAPSE",
    "EXIT_NON_FINITE",
    "DetectionCollapseError",
    "NonFiniteTrainingError",
    "TrainingHealthError",
    "TrainingHealthMonitor",
    "GRAD_NORM_SCALAR",
    "GradientNormHook",
    "Trainer",
    "AtomicCheckpointer",
    "CheckpointError",
    "CheckpointOnSignal",
    "EXIT_PEER_LOST",
    "PeerWatchdog",
    "PeerWatchdogHook",
    "TrainingInterrupted",
    "build_optimizer",
    "build_param_groups",
    "clip_and_measure_grad_norm",
]
