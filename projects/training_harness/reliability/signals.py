"""
SIGTERM, Ctrl-C (SIGINT) and SIGHUP (the terminal or ssh session closed) end training at a step
boundary, with a checkpoint.

Schedulers send SIGTERM some time before they kill a job (SLURM: KillWait, 30 s by default;
Kubernetes: terminationGracePeriodSeconds), and Ctrl-C sends SIGINT to every process of the
terminal's foreground group. Their default actions (exit at once; KeyboardInterrupt anywhere in
the step) lose everything since the last periodic checkpoint.

During training, :class:`CheckpointOnSignal` turns both signals into a flag. After the step in
progress has completed (model, optimizer, scheduler and iteration counter agree), the main
worker saves ``model_<iter>.pth`` (atomically, reliability/checkpoint.py; unless the periodic
checkpointer has just saved that iteration), and every worker raises :class:`TrainingInterrupted`,
which exits with 128 + the signal number: **143** for SIGTERM, **130** for SIGINT, **129** for
SIGHUP, the shell's
codes for "ended by that signal", which schedulers already understand. ``--resume`` continues at
the next iteration.

Under DDP the workers must stop at the same step, or the ones still training wait forever in a
collective: after every step the flag is all-reduced (max) over a gloo group
(:func:`cpu_process_group`), one 8-byte message, so a signal that reaches the workers at different
steps stops them all at the first step any of them saw it. The main worker saves while the
others wait at a barrier.

A second signal changes nothing (a terminal's Ctrl-C and the launcher's forwarding may both
deliver one); SIGKILL or SIGQUIT (Ctrl-\\) still end a process at once, and the atomic writes keep
OUTPUT_DIR resumable then too. DataLoader worker processes are forked after the handlers are
installed and inherit them, so Ctrl-C does not kill them in the middle of the last step.

:func:`forward_signals_to_workers` is for the process that launched the workers: it passes both
signals on to them instead of dying, which would leave them orphaned in the middle of a save.
"""

import contextlib
import functools
import logging
import multiprocessing
import os
import signal
import threading
from types import FrameType
from typing import Dict, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from detectron2.checkpoint import Checkpointer
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..errors import TrainingInterrupted, exit_code_of

__all__ = [
    "CheckpointOnSignal",
    "cpu_process_group",
    "forward_signals_to_workers",
]

logger = logging.getLogger(__name__)


@functools.lru_cache()
def cpu_process_group() -> Optional[dist.ProcessGroup]:
    """A group of all workers whose collectives take CPU tensors: the default group (None)
    under gloo, else a gloo group, made once per process (as detectron2's own helper). Every
    worker must make its first call at the same point."""
    return None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")


HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class CheckpointOnSignal(HookBase):
    """
    The hook described in the module docstring. Register it on every worker, after
    ``PeriodicCheckpointer`` and ``LRScheduler`` (so that the saved scheduler state is that of the
    completed step) and before the evaluation hook (so that a signal does not wait for an
    evaluation first).
    """

    def __init__(self, checkpointer: Checkpointer, signals: Sequence[int] = HANDLED_SIGNALS):
        self._checkpointer = checkpointer
        self._signals = tuple(signals)
        self._received: Optional[int] = None
        self._previous: Dict[int, object] = {}
        self._pid = os.getpid()
        self._group: Optional[dist.ProcessGroup] = None

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        if os.getpid() != self._pid:
            return  # a forked DataLoader worker: the training process decides
        if self._received is None:
            self._received = signum
            logger.warning(
                f"Received {signal.Signals(signum).name}: training stops after the current step, "
                "with a checkpoint"
            )

    def before_train(self) -> None:
        self._received = None
        self._pid = os.getpid()
        # Now, by every worker at the same point (making a group is a collective), and also when
        # no handler is installed below: after_step's all-reduce runs either way.
        self._group = cpu_process_group() if comm.get_world_size() > 1 else None
        if threading.current_thread() is not threading.main_thread():
            # Python delivers signals to the main thread only; a trainer run from another thread
            # keeps the default actions.
            logger.warning("Training runs outside the main thread: SIGTERM / SIGINT / SIGHUP "
                           "will not save a checkpoint")
            return
        for signum in self._signals:
            self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _agreed_signal(self) -> Optional[int]:
        if comm.get_world_size() == 1:
            return self._received
        flag = torch.tensor([self._received or 0], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return int(flag.item()) or None

    def after_step(self) -> None:
        signum = self._agreed_signal()
        if signum is None:
            return
        iteration = self.trainer.iter
        name = f"model_{iteration:07d}"
        path = os.path.join(self._checkpointer.save_dir, f"{name}.pth")
        # The periodic checkpointer runs before this hook: it may have saved this very step.
        if self._checkpointer.get_checkpoint_file() != path:
            self._checkpointer.save(name, iteration=iteration)
        comm.synchronize()  # nobody exits (and gets the others killed) before the file is complete
        self._restore_handlers()
        code = exit_code_of(signum)
        logger.warning(
            f"Stopped by {signal.Signals(signum).name} after iteration {iteration}: checkpoint "
            f"{path}. Exit code {code}; rerun with --resume to continue at iteration "
            f"{iteration + 1}."
        )
        raise TrainingInterrupted(signum, iteration, path)

    def after_train(self) -> None:
        self._restore_handlers()


@contextlib.contextmanager
def forward_signals_to_workers(signals: Sequence[int] = HANDLED_SIGNALS) -> Iterator[None]:
    """In the launching process: send SIGTERM / SIGINT / SIGHUP on to the worker processes and keep
    waiting for them, instead of exiting and orphaning them."""

    def forward(signum: int, frame: Optional[FrameType]) -> None:
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signum)

    previous = {signum: signal.signal(signum, forward) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
