"""
Files that a kill cannot leave half-written: :func:`atomic_write` writes next to the target,
fsyncs, renames over it and fsyncs the folder; a full disk is named with the free space and the
size that was needed.
"""

import contextlib
import errno
import glob
import os
import shutil
from typing import BinaryIO, Callable, Optional

__all__ = ["TMP_MARK", "atomic_write"]

TMP_MARK = ".tmp-"  # in the name of a temporary file: ".<name>.tmp-<pid>"


def _fsync_folder(folder: str) -> None:
    # Makes the rename itself durable: without it a power loss can undo a completed os.replace.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """
    ``write(f)`` into a temporary file next to ``path``, then rename it to ``path``: readers of
    ``path`` only ever see the old or the complete new content.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f".{os.path.basename(path)}{TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the name points at it
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(e, (OSError, RuntimeError)):
            full = _disk_full_message(path, folder, e, written)
            if full:
                raise OSError(errno.ENOSPC, full) from e
        raise
    _fsync_folder(folder)


def _disk_full_message(path: str, folder: str, error: BaseException, written: int
                       ) -> Optional[str]:
    # torch.save reports a full disk as "RuntimeError: ... unexpected pos N vs M", naming
    # neither the file nor the cause.
    if not ((isinstance(error, OSError) and error.errno == errno.ENOSPC)
            or "unexpected pos" in str(error)):
        return None
    free = shutil.disk_usage(folder).free
    previous = [os.path.getsize(p) for p in glob.glob(os.path.join(glob.escape(folder), "*.pth"))
                if os.path.abspath(p) != os.path.abspath(path)]
    need = max(previous, default=written)
    return (f"Could not write '{path}': no space left on the device of {folder} "
            f"({free / 2**20:.0f} MiB free; {written / 2**20:.0f} MiB were written before it ran "
            f"out, and a checkpoint of this run takes about {need / 2**20:.0f} MiB). Free space "
            "or move OUTPUT_DIR; the checkpoints already there are intact.")
