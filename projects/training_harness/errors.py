"""
Every exception the package raises on purpose, and the exit codes of train_net.py
(docs/reliability.md, "Exit codes"). The modules that raise them import them from here. (The
command-line tools' own one-line errors, exit code 2, stay in the tools.)

    exit code   meaning                                           raised as
    0           training or evaluation finished
    1           any other error (a bad config, file or dataset)   the errors below, others
    3           detections collapsed, HEALTH.ACTION "stop"        DetectionCollapseError
    4           a non-finite or exploding loss                    NonFiniteTrainingError,
                                                                  LossExplosionError
    75          a DDP peer was lost (sysexits.h EX_TEMPFAIL:      exit_peer_lost (os._exit)
                rerunning with --resume is expected to work),
                or a data-loader worker process died (the     DataLoaderWorkerLost
                OOM killer), after a checkpoint
    130 / 143   Ctrl-C / SIGTERM, after a checkpoint              TrainingInterrupted
    129         SIGHUP (terminal closed), after a checkpoint      TrainingInterrupted
    128 + N     a worker was killed by signal N (137: SIGKILL)    (reliability/launch.py)
"""

__all__ = [
    "EXIT_COLLAPSE",
    "EXIT_NON_FINITE",
    "EXIT_PEER_LOST",
    "EXIT_SIGTERM",
    "SETUP_REFUSALS",
    "CheckpointError",
    "CheckpointMismatchError",
    "DataLoaderWorkerLost",
    "DetectionCollapseError",
    "ExportError",
    "LossExplosionError",
    "NonFiniteTrainingError",
    "OutputDirError",
    "PeerLostError",
    "SetupRefusedElsewhere",
    "TooManySkippedImages",
    "TrainingHealthError",
    "TrainingInterrupted",
    "UnsafeFileError",
    "UnsupportedImageError",
    "exit_code_of",
    "exit_on_refusal",
    "refusal_line",
]

import contextlib
import signal
import sys
from typing import Iterator

EXIT_COLLAPSE = 3
EXIT_NON_FINITE = 4
EXIT_PEER_LOST = 75


def exit_code_of(signum: int) -> int:
    """The shell's exit status of a process ended by signal ``signum``: 143 SIGTERM, 130 SIGINT."""
    return 128 + signum


EXIT_SIGTERM = exit_code_of(signal.SIGTERM)  # 143; Ctrl-C (SIGINT) gives 130


# -- training stopped by the health checks (health/) --


class TrainingHealthError(RuntimeError):
    """Training was stopped by a health check; ``exit_code`` is train_net.py's exit code."""

    exit_code = 1


class DetectionCollapseError(TrainingHealthError):
    """Detections collapsed for HEALTH.PATIENCE checks and HEALTH.ACTION is "stop"."""

    exit_code = EXIT_COLLAPSE


class NonFiniteTrainingError(TrainingHealthError, FloatingPointError):
    """A loss term or the gradient norm is not finite (a FloatingPointError, as detectron2's)."""

    exit_code = EXIT_NON_FINITE
    checkpoint_prefix = "model_nonfinite"  # the weights before the step are saved under it


class LossExplosionError(NonFiniteTrainingError):
    """The total loss is above the ceiling, or jumped far above every earlier value (exit code 4
    and the handling of a non-finite loss: the step is not applied, the weights are saved)."""

    checkpoint_prefix = "model_diverged"


# -- runs that stop or are refused to keep what they have (reliability/) --


class DataLoaderWorkerLost(SystemExit):
    """A data-loader worker process died (the OOM killer, say) while the training process lives:
    stopped after saving the last completed step, exit code 75 (rerun with --resume)."""

    def __init__(self, message: str):
        super().__init__(EXIT_PEER_LOST)
        self.message = message


class TrainingInterrupted(SystemExit):
    """Training stopped on a signal after saving a checkpoint; the exit status is 128 + signum.

    A SystemExit, so that detectron2's train loop does not log it as a crash and the process
    exits with its code wherever it is not caught."""

    def __init__(self, signum: int, iteration: int, checkpoint: str):
        super().__init__(exit_code_of(signum))
        self.signum = signum
        self.iteration = iteration
        self.checkpoint = checkpoint


class PeerLostError(RuntimeError):
    """Raised instead of exiting when a PeerWatchdog is given an ``on_lost`` that returns
    (tests); carries the message that is logged."""


class SetupRefusedElsewhere(RuntimeError):
    """Another worker's set-up check failed; this worker stops with it."""


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read: truncated, corrupt, or not a checkpoint."""


class UnsafeFileError(ValueError):
    """A weights or config file that would build objects other than plain data (code)."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint that must hold the whole model lacks tensors or has them in other shapes."""


class OutputDirError(RuntimeError):
    """OUTPUT_DIR is in use by another run, or holds a run that this one would mix with."""


# -- data (data/) --


class UnsupportedImageError(ValueError):
    """An image whose pixels detectron2's reader would change (16/32-bit integer or float)."""


class TooManySkippedImages(RuntimeError):
    """More than RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION of the training images were skipped."""


# -- deployment (deploy.py) --


class ExportError(Exception):
    """A request the exporter cannot do for this model: one line for the user."""


# What a set-up check raises when it refuses a config, file or dataset (exit code 1). Each carries
# its whole explanation (the key, file or id, and what to do), so a traceback adds nothing.
SETUP_REFUSALS = (ValueError, FileNotFoundError, OutputDirError, CheckpointError,
                  CheckpointMismatchError, SetupRefusedElsewhere)


@contextlib.contextmanager
def exit_on_refusal(program: str) -> Iterator[None]:
    """A refusal raised in the block ends the process with one line, ``<program>: error: ...``,
    and exit code 1. The project's own error classes keep their name in the line."""
    try:
        yield
    except SETUP_REFUSALS as e:
        sys.exit(refusal_line(program, e))


def refusal_line(program: str, error: BaseException) -> str:
    """``<program>: error: [ErrorClass: ]message``: the project's own error classes keep their
    name."""
    name = "" if type(error).__module__ == "builtins" else f"{type(error).__name__}: "
    return f"{program}: error: {name}{error}"
