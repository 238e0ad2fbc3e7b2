"""
A training run as a submitit job that survives SLURM's time limit and preemption (used by
tools/submit_slurm.py).

Each node of the job runs one submitit task, which runs ``train_net.py`` (the same ``main`` and
``launch`` as by hand) with ``--num-gpus G --num-machines N --machine-rank <node> --dist-url
tcp://<first node>:<port>``, all derived from submitit's JobEnvironment. (submitit's
``helpers.TorchDistributedEnvironment`` makes each GPU a task and sets up its process group
itself; what it lacks is train_net.py's own launch: the one-line refusals, the exit codes and the
SIGTERM checkpoint of every worker at the same step.) The task process only supervises:

- SLURM sends the job USR2 some time before its time limit or a preemption (submitit asks for
  it: ``#SBATCH --signal=USR2@<delay>``). The training processes ignore USR2 (set before they
  start, inherited by the workers), so it cannot kill them; submitit calls :meth:`checkpoint` in
  the task of global rank 0.
- :meth:`checkpoint` sends SIGTERM to its ``train_net.py``, whose launcher passes it to the
  workers: they finish the step in progress, save a checkpoint and exit 143
  (reliability/signals.py; the workers of the other nodes learn of it in the same step through the
  flag they all-reduce, and stop there too). Then it logs the iteration reached and returns
  this job with ``--resume`` for submitit to requeue, which continues from ``last_checkpoint``
  to MAX_ITER. The health monitor's state and the scheduler are in that checkpoint, and
  metrics.json is appended to, so evaluation results and checks of earlier attempts stay.
"""

import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import List, Optional

import submitit
from submitit.core import logger as submitit_logger

# EXIT_SIGTERM: train_net.py's status after a SIGTERM checkpoint (reliability/signals.py)
from ..errors import EXIT_SIGTERM

__all__ = ["TrainingJob", "last_checkpoint_iteration"]


_POLL_S = 0.5


def last_checkpoint_iteration(output_dir: str) -> Optional[int]:
    """The iteration of the checkpoint ``output_dir/last_checkpoint`` names, or None."""
    try:
        name = (Path(output_dir) / "last_checkpoint").read_text().strip()
    except OSError:
        return None
    stem = Path(name).stem
    if stem == "model_final":
        return -1
    try:
        return int(stem.rsplit("_", 1)[-1])
    except ValueError:
        return None


def _ignore_usr2() -> None:
    # In the child before exec: an ignored signal stays ignored across exec and in the
    # processes it spawns (the DDP workers).
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


class TrainingJob(submitit.helpers.Checkpointable):
    """
    Runs ``train_net.py`` with ``train_args`` on every node of a submitit job and requeues it
    with ``--resume`` when submitit reports a time-out or preemption (module docstring).
    """

    def __init__(self, train_net: str, train_args: List[str], gpus_per_node: int,
                 output_dir: str, stop_timeout_s: float = 80.0):
        """
        Args:
            train_net: path of train_net.py.
            train_args: its arguments, without --num-gpus / --num-machines / --machine-rank /
                --dist-url (set here per node).
            gpus_per_node: training processes per node (--num-gpus).
            output_dir: the run's OUTPUT_DIR (for the iteration reached, in the logs).
            stop_timeout_s: how long :meth:`checkpoint` waits for the checkpoint; keep it below
                the signal's advance warning (SLURM kills the job after it).
        """
        self.train_net = train_net
        self.train_args = list(train_args)
        self.gpus_per_node = gpus_per_node
        self.output_dir = output_dir
        self.stop_timeout_s = stop_timeout_s
        self.requeues = 0
        self._process: Optional[subprocess.Popen] = None
        self._status: Optional[int] = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_process"] = None  # a process does not travel with the requeued job
        state["_status"] = None
        return state

    def command(self, env: "submitit.JobEnvironment") -> List[str]:
        if env.num_nodes > 1:
            # One port per job, the same on every node; detectron2 binds it on the first node.
            port = 20000 + zlib.crc32(str(env.job_id).encode()) % 20000
            dist_url = f"tcp://{env.hostnames[0]}:{port}"
        else:
            dist_url = "auto"
        # Before train_args: those end with the KEY VALUE overrides.
        return [sys.executable, self.train_net,
                "--num-gpus", str(self.gpus_per_node), "--num-machines", str(env.num_nodes),
                "--machine-rank", str(env.node), "--dist-url", dist_url, *self.train_args]

    def __call__(self) -> int:
        env = submitit.JobEnvironment()
        log = submitit_logger.get_logger()  # the job folder's <job id>_<task>_log.err
        cmd = self.command(env)
        if self.requeues:
            log.warning(
                f"Requeued job {env.job_id} (requeue {self.requeues}): resuming from "
                f"{self.output_dir}/last_checkpoint, iteration "
                f"{last_checkpoint_iteration(self.output_dir)}")
        log.info(f"{env}: running {' '.join(cmd)}")
        self._process = subprocess.Popen(cmd, preexec_fn=_ignore_usr2)
        status = self._wait()
        if status == EXIT_SIGTERM and env.global_rank != 0:
            # Stopped with the other nodes (their flag is all-reduced): the task of rank 0 is
            # requeueing the job, which ends this one. An early exit here could end the job first.
            log.warning("train_net.py stopped after a checkpoint; waiting for the requeue")
            time.sleep(self.stop_timeout_s + 60)
        if status != 0:
            # Not after our own SIGTERM: then submitit's handler requeues and exits instead.
            raise RuntimeError(f"train_net.py exited with status {status} (docs/"
                               f"reliability.md, 'Exit codes'); its log: {self.output_dir}/log.txt")
        return status

    def _poll(self) -> Optional[int]:
        """The child's exit status once it has ended, else None. os.waitpid directly: this also
        runs inside a signal handler that may interrupt another wait, and Popen's lock would
        deadlock there."""
        if self._status is None:
            pid, raw = os.waitpid(self._process.pid, os.WNOHANG)
            if pid:
                self._status = os.waitstatus_to_exitcode(raw)
                if self._status < 0:  # killed by a signal, as a shell reports it
                    self._status = 128 - self._status
                self._process.returncode = self._status
        return self._status

    def _wait(self, timeout_s: Optional[float] = None) -> Optional[int]:
        start = time.monotonic()
        while self._poll() is None:
            if timeout_s is not None and time.monotonic() - start > timeout_s:
                return None
            time.sleep(_POLL_S)
        return self._status

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on USR2 in the task of global rank 0: stop training with a
        checkpoint, then return this job with --resume to be requeued."""
        log = submitit_logger.get_logger()
        if self._process is not None and self._poll() is None:
            self._process.send_signal(signal.SIGTERM)
            status = self._wait(self.stop_timeout_s)
            if status is None:
                log.error(f"train_net.py did not stop within {self.stop_timeout_s:.0f} s of "
                          "SIGTERM; requeueing from the last checkpoint written before")
            elif status != EXIT_SIGTERM:
                log.error(f"train_net.py ended with status {status} while stopping")
        self.requeues += 1
        if "--resume" not in self.train_args:
            self.train_args.insert(0, "--resume")
        log.warning(
            f"Time limit or preemption: stopped at iteration "
            f"{last_checkpoint_iteration(self.output_dir)} (checkpoint named by "
            f"{self.output_dir}/last_checkpoint); requeueing (requeue {self.requeues})")
        return submitit.helpers.DelayedSubmission(self)
