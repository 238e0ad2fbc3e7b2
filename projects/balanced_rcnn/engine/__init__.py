"""Training: the project's DefaultTrainer, its optimizer and its whole-model gradient clipping
and gradient-norm log. What watches a run and keeps it resumable is the training_harness
package."""

from .grad_norm import GRAD_NORM_SCALAR, GradientNormHook, clip_and_measure_grad_norm
from .optimizer import build_optimizer, build_param_groups
from .trainer import Trainer

__all__ = [
    "GRAD_NORM_SCALAR",
    "GradientNormHook",
    "Trainer",
    "build_optimizer",
    "build_param_groups",
    "clip_and_measure_grad_norm",
]
