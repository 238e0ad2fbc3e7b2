"""The core's Trainer with the harness's checkpoints, loaders and health checks."""

from .trainer import GuardedTrainer

__all__ = ["GuardedTrainer"]
