"""
One training run per OUTPUT_DIR.

:func:`claim_output_dir` runs at set-up on the main worker, before anything is written there:

- it takes an exclusive lock (``flock``) on ``OUTPUT_DIR/.train_net.lock`` and keeps it until
  the process ends. A second run into the same folder would overwrite the first one's
  checkpoints and interleave its metrics.json: it is refused, naming the process that holds the
  lock. The kernel releases the lock of a process that dies, however it dies, so the lock of a
  killed run is taken over at once (logged, with the dead holder's name). The lock file stays.
- without ``--resume``, a folder that already holds checkpoints (``last_checkpoint``,
  ``model_*.pth``) is refused with the two ways out (``--resume``, or another OUTPUT_DIR):
  detectron2 would start afresh and leave a new ``last_checkpoint`` beside the old
  ``model_final.pth``. RELIABILITY.OVERWRITE_OUTPUT True deletes the old run's checkpoints and
  metrics.json instead, naming each file.

Evaluations (``--eval-only``) take no lock: they write only under ``inference/`` and are often
run while the training that writes the checkpoints goes on.
"""

import fcntl
import glob
import logging
import os
import socket
import time
from typing import List, Optional

__all__ = ["OutputDirError", "claim_output_dir"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".train_net.lock"
_RUN_FILES = ("last_checkpoint", "model_*.pth", "metrics.json")  # what OVERWRITE_OUTPUT deletes

_held: List[int] = []  # lock descriptors, open for the life of the process


class OutputDirError(RuntimeError):
    """OUTPUT_DIR is in use by another run, or holds a run that this one would mix with."""


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _checkpoints(output_dir: str) -> List[str]:
    found = [p for p in (os.path.join(output_dir, "last_checkpoint"),) if os.path.isfile(p)]
    found += sorted(glob.glob(os.path.join(glob.escape(output_dir), "model_*.pth")))
    return [os.path.basename(p) for p in found]


def _remove_run_files(output_dir: str) -> None:
    for pattern in _RUN_FILES:
        for path in sorted(glob.glob(os.path.join(glob.escape(output_dir), pattern))):
            logger.warning(f"RELIABILITY.OVERWRITE_OUTPUT: deleting {path} of the earlier run")
            os.remove(path)


def claim_output_dir(output_dir: str, *, resume: bool, overwrite: bool = False,
                     holder: Optional[str] = None) -> None:
    """
    Lock ``output_dir`` for this process and check it may train there (see the module
    docstring). ``holder`` describes this process in the lock file (default: pid, host, time).

    Raises:
        OutputDirError: another process holds the lock, or (without ``resume`` and
            ``overwrite``) the folder holds checkpoints.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _read(fd) or "a process that has not written its name yet"
        os.close(fd)
        raise OutputDirError(
            f"OUTPUT_DIR '{output_dir}' is in use by another training run ({other}; lock file "
            f"{path}). Wait for it to end or stop it, or set another OUTPUT_DIR.") from None
    try:
        previous = _read(fd)
        if previous:
            logger.info(f"Taking over {path}: its holder ({previous}) is no longer running")
        existing = _checkpoints(output_dir)
        if existing and not resume:
            if not overwrite:
                shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
                raise OutputDirError(
                    f"OUTPUT_DIR '{output_dir}' already holds the checkpoints of a run ({shown}). "
                    "Continue that run with --resume, or start a new one in another OUTPUT_DIR "
                    "(RELIABILITY.OVERWRITE_OUTPUT True deletes the old checkpoints instead).")
            _remove_run_files(output_dir)
        me = holder or (f"process {os.getpid()} on host {socket.gethostname()}, started "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, me.encode())
        os.fsync(fd)
    except BaseException:
        os.close(fd)  # releases the lock
        raise
    _held.append(fd)
