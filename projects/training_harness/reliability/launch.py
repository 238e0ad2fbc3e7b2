"""
detectron2's ``launch`` with the project's handling of failures and signals.

Three additions, each for the multi-process case only:

- ``timeout``: the collective timeout, from RELIABILITY.COLLECTIVE_TIMEOUT_MIN (see
  :func:`collective_timeout`); it bounds a wait on a peer that is alive but stuck.
- SIGTERM / SIGINT / SIGHUP sent to the launching process are passed on to the workers, which save a
  checkpoint and exit 143 / 130 (reliability/signals.py), instead of killing the launcher and
  leaving the workers orphaned.
- When a worker ends with a non-zero status, detectron2's launcher stops the other workers of this
  machine and raises ``ProcessExitedException`` with a traceback. This launcher prints one line
  naming the worker and its status and exits with that worker's code (128 + N for a worker killed
  by signal N, as a shell reports it), so that schedulers and scripts see the real reason, e.g.
  143 (stopped by SIGTERM, checkpoint saved) or 75 (a peer was lost, reliability/watchdog.py).
  A worker that raised a Python exception still ends with detectron2's report of it.

Under torchrun (torch.distributed.elastic) train_net.py starts no process: each worker torchrun
started joins the process group from its environment (:func:`run_torchrun_worker`), and torch's
elastic agent stops the others when one fails and restarts them up to ``--max-restarts``.
"""

import contextlib
import datetime
import os
import sys
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from detectron2.config import CfgNode
from detectron2.engine import launch as detectron2_launch
from detectron2.utils import comm
from torch.multiprocessing import ProcessExitedException

from ..errors import SetupRefusedElsewhere, exit_code_of
from .signals import forward_signals_to_workers

__all__ = ["collective_timeout", "launch", "launched_by_torchrun", "leave_process_group",
           "refused_together", "run_torchrun_worker", "worker_exit_status"]

# What torchrun sets in the environment of every worker it starts.
_TORCHRUN_VARIABLES = ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK", "WORLD_SIZE",
                       "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@contextlib.contextmanager
def refused_together() -> Iterator[None]:
    """
    Set-up checks that may run on the main worker only (the output folder's lock, the
    checkpoint's fit, the check images): if any worker's check fails, every worker raises at the
    end of the block, the others with :class:`SetupRefusedElsewhere` naming the worker and its
    error. Without it the others would go on to their first collective and wait there, on other
    machines until RELIABILITY.COLLECTIVE_TIMEOUT_MIN. One all_gather when there are several
    workers; every worker must enter the block.
    """
    error = None
    try:
        yield
    except Exception as e:  # shared below, then raised again
        error = e
    if comm.get_world_size() > 1:
        texts = comm.all_gather(None if error is None else f"{type(error).__name__}: {error}")
        failed = [(rank, text) for rank, text in enumerate(texts) if text is not None]
        if error is None and failed:
            rank, text = failed[0]
            raise SetupRefusedElsewhere(f"Worker rank {rank} refused the set-up: {text}")
    if error is not None:
        raise error


def collective_timeout(cfg: CfgNode) -> datetime.timedelta:
    minutes = cfg.RELIABILITY.COLLECTIVE_TIMEOUT_MIN
    if not minutes > 0:
        raise ValueError(f"RELIABILITY.COLLECTIVE_TIMEOUT_MIN must be > 0, got {minutes}")
    return datetime.timedelta(minutes=minutes)


def worker_exit_status(e: ProcessExitedException) -> int:
    """The exit status a shell would report for the worker: its code, or 128 + N for signal N."""
    return e.exit_code if e.exit_code > 0 else exit_code_of(-e.exit_code)


def launch(
    main_func: Callable[..., Any],
    num_gpus_per_machine: int,
    num_machines: int = 1,
    machine_rank: int = 0,
    dist_url: str = None,
    args: Sequence[Any] = (),
    timeout: datetime.timedelta = datetime.timedelta(minutes=30),
) -> None:
    """detectron2's ``launch`` (same arguments) plus what the module docstring lists."""
    if num_machines * num_gpus_per_machine == 1:
        detectron2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank, dist_url,
                          args=args, timeout=timeout)
        return
    with forward_signals_to_workers():
        try:
            detectron2_launch(main_func, num_gpus_per_machine, num_machines, machine_rank,
                              dist_url, args=args, timeout=timeout)
        except ProcessExitedException as e:
            status = worker_exit_status(e)
            how = (f"was killed by {e.signal_name}" if e.exit_code < 0
                   else f"exited with code {e.exit_code}")
            rank = machine_rank * num_gpus_per_machine + e.error_index
            print(f"launch: worker rank {rank} (pid {e.error_pid}) {how}; any other workers of "
                  f"this machine were stopped. Exit code {status} (docs/reliability.md, 'Exit codes').",
                  file=sys.stderr, flush=True)
            sys.exit(status)


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _TORCHRUN_VARIABLES)


def run_torchrun_worker(main_func: Callable[..., Any], args: Sequence[Any] = (),
                        timeout: datetime.timedelta = datetime.timedelta(minutes=30)) -> Any:
    """``main_func(*args)`` in this worker of a torchrun launch, set up as detectron2's launch
    sets up its workers (the backend, the local process group, the device), with the process
    group from torchrun's environment."""
    has_gpu = torch.cuda.is_available()
    dist.init_process_group(backend="NCCL" if has_gpu else "GLOO", init_method="env://",
                            timeout=timeout)
    comm.create_local_process_group(int(os.environ["LOCAL_WORLD_SIZE"]))
    if has_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    comm.synchronize()
    try:
        return main_func(*args)
    finally:
        leave_process_group()


def leave_process_group() -> None:
    """Destroy the default process group, if any, before the worker exits: left to the
    interpreter's exit, its threads can outlive it and abort the process (SIGABRT, "terminate
    called without an active exception") after a clean refusal or stop."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
