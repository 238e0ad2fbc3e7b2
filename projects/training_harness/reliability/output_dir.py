"""
One training run per OUTPUT_DIR.

:func:`claim_output_dir` runs at set-up on the main worker, before anything is written there:

- it takes an exclusive lock (``flock``) on ``OUTPUT_DIR/.train_net.lock`` and keeps it until
  the process ends. A second run into the same folder would overwrite the first one's
  checkpoints and interleave its metrics.json: it is refused, naming the process that holds the
  lock. The kernel releases the lock of a process that dies on this machine, however it dies,
  so the lock of a killed run is taken over at once (forked DataLoader workers close their copy
  of the lock file, so they do not hold it after their parent). On a network file system the lock of a machine
  that crashed can outlive it until the server notices; the message then says to delete the lock
  file. Where the file system has no locks at all, a warning says so and training goes on.
  (filelock would take the same ``flock``; what it lacks is the record of the holder, which the
  refusal names: process, host and start time, written into the lock file.)
- without ``--resume``, a folder that already holds checkpoints (``last_checkpoint``,
  ``model_*.pth``) is refused with the two ways out (``--resume``, or another OUTPUT_DIR):
  detectron2 would start afresh and leave a new ``last_checkpoint`` beside the old
  ``model_final.pth``. With RELIABILITY.OVERWRITE_OUTPUT True the old run's checkpoints and
  metrics.json are deleted instead, by :func:`remove_earlier_run` once the set-up checks have
  passed (a refusal while the data loader is built comes after it), naming each file and
  sparing the MODEL.WEIGHTS file.

Evaluations (``--eval-only``) take no lock: they are often run while the training that writes
the checkpoints goes on. They write under ``inference/``, append to ``log.txt`` and, as
detectron2's ``default_setup`` does for every run, rewrite ``config.yaml``.
"""

import errno
import fcntl
import glob
import logging
import os
import re
import socket
import time
from typing import Dict, List, Optional, Sequence

from ..errors import OutputDirError
from .weights_files import local_checkpoint_path

__all__ = ["claim_output_dir", "release_output_dir", "remove_earlier_run"]

logger = logging.getLogger(__name__)

LOCK_FILE = ".train_net.lock"
_RUN_FILES = ("last_checkpoint", "model_*.pth", "metrics.json")  # what OVERWRITE_OUTPUT deletes
# flock errors of file systems without locks (some FUSE, NFS or Lustre mounts).
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)

_held: Dict[str, int] = {}  # real path of a locked folder -> its lock descriptor


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) shares the lock; closing its copy, without unlocking,
    # lets the lock go with this process alone, as soon as it dies.
    for fd in _held.values():
        os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_in_child)


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace").strip()


def _checkpoints(output_dir: str) -> List[str]:
    found = [p for p in (os.path.join(output_dir, "last_checkpoint"),) if os.path.isfile(p)]
    found += sorted(glob.glob(os.path.join(glob.escape(output_dir), "model_*.pth")))
    return [os.path.basename(p) for p in found]


def _lock(fd: int, path: str) -> bool:
    """Take the lock; False where the file system has none."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = _read(fd) or "a process that has not written its name yet"
        raise OutputDirError(
            f"OUTPUT_DIR '{os.path.dirname(path)}' is in use by another training run ({other}; "
            f"lock file {path}). Wait for it to end or stop it, or set another OUTPUT_DIR. If "
            "that process is gone (a machine that crashed, on a network file system), delete "
            "the lock file.") from None
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            raise
        logger.warning(f"Cannot lock {path} ({e.strerror}): this file system has no locks, so a "
                       "second run into this OUTPUT_DIR would not be refused.")
        return False
    return True


def _resumable(output_dir: str) -> List[str]:
    """The periodic and final checkpoints of a run (not the ones its stops save to inspect)."""
    return [p for p in glob.glob(os.path.join(glob.escape(output_dir), "model_*.pth"))
            if re.fullmatch(r"model_(\d{7}|final)\.pth", os.path.basename(p))]


def _resume_without_tag(output_dir: str) -> str:
    # Checkpoints copied without their tag file: detectron2 would start from MODEL.WEIGHTS at
    # iteration 0 and overwrite them.
    found = _resumable(output_dir)
    newest = os.path.basename(max(found, key=os.path.getmtime))
    tag = os.path.join(output_dir, "last_checkpoint")
    return (f"--resume: OUTPUT_DIR '{output_dir}' holds {len(found)} checkpoint(s), the newest "
            f"{newest}, but no last_checkpoint naming the one to continue from, so this run "
            f"would start from MODEL.WEIGHTS at iteration 0 and overwrite them. To continue from "
            f"{newest}: echo {newest} > {tag}, then rerun with --resume. To start anew, use "
            "another OUTPUT_DIR.")


def claim_output_dir(output_dir: str, *, resume: bool, overwrite: bool = False,
                     holder: Optional[str] = None) -> None:
    """
    Lock ``output_dir`` for this process and check it may train there (see the module
    docstring). ``holder`` describes this process in the lock file (default: pid, host, time).
    Claiming a folder this process holds already does nothing.

    Raises:
        OutputDirError: another process holds the lock, or (without ``resume`` and
            ``overwrite``) the folder holds checkpoints.
    """
    os.makedirs(output_dir, exist_ok=True)
    existing = _checkpoints(output_dir)
    if existing and not resume and not overwrite:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        refusal = OutputDirError(
            f"OUTPUT_DIR '{output_dir}' already holds the checkpoints of a run ({shown}). "
            "Continue that run with --resume, or start a new one in another OUTPUT_DIR "
            "(RELIABILITY.OVERWRITE_OUTPUT True deletes the old checkpoints instead).")
    elif resume and "last_checkpoint" not in existing and _resumable(output_dir):
        refusal = OutputDirError(_resume_without_tag(output_dir))
    else:
        refusal = None
    key = os.path.realpath(output_dir)
    if key in _held:  # this process holds the lock already
        if refusal is not None:
            raise refusal
        return
    path = os.path.join(output_dir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        locked = _lock(fd, path)  # "in use" comes before "holds checkpoints"
        previous = _read(fd)
        if previous:
            logger.info(f"Taking over {path}, last held by {previous}")
        if refusal is not None:
            raise refusal
        if locked:
            me = holder or (f"process {os.getpid()} on host {socket.gethostname()}, started "
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, me.encode())
            os.fsync(fd)
    except BaseException:
        os.close(fd)  # releases the lock
        raise
    _held[key] = fd


def release_output_dir(output_dir: str) -> None:
    """Give up this process's lock on ``output_dir`` (the process's end does it too)."""
    fd = _held.pop(os.path.realpath(output_dir), None)
    if fd is not None:
        os.close(fd)


def remove_earlier_run(output_dir: str, keep: Sequence[str] = ()) -> None:
    """RELIABILITY.OVERWRITE_OUTPUT: delete the checkpoints and metrics.json of the run that
    trained in ``output_dir`` before, except the files named in ``keep`` (MODEL.WEIGHTS)."""
    kept = {os.path.realpath(p) for p in map(local_checkpoint_path, keep) if p}
    for pattern in _RUN_FILES:
        for path in sorted(glob.glob(os.path.join(glob.escape(output_dir), pattern))):
            if os.path.realpath(path) in kept:
                logger.warning(f"RELIABILITY.OVERWRITE_OUTPUT: keeping {path}, the MODEL.WEIGHTS "
                               "this run starts from")
                continue
            logger.warning(f"RELIABILITY.OVERWRITE_OUTPUT: deleting {path} of the earlier run")
            os.remove(path)
