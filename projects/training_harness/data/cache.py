"""
A folder built once per fingerprint and shared by every process that asks for it.

``build_cached(target, fingerprint, build)`` takes an exclusive ``fcntl`` lock next to the folder,
returns at once if ``target/manifest.json`` already holds the fingerprint, and otherwise builds
into a temporary sibling folder and renames it into place. The manifest is written last, so a
folder with a matching manifest is always complete, and a process killed mid-build only leaves a
temporary folder behind, which the next builder removes.
"""
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional

__all__ = ["MANIFEST", "build_cached", "read_manifest"]

MANIFEST = "manifest.json"
logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # blocks while another process builds
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_manifest(target: Path) -> Optional[Dict]:
    """The manifest of a complete folder, or None if the folder is missing or incomplete."""
    try:
        return json.loads((Path(target) / MANIFEST).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None


def build_cached(target: Path, fingerprint: str, build: Callable[[Path], None],
                 info: Optional[Dict] = None) -> Path:
    """
    Make ``target`` hold what ``build(folder)`` writes for ``fingerprint``; build at most once.

    Args:
        target: the folder to fill; its parent is created if needed.
        fingerprint: identifies the content; a different one rebuilds the folder.
        build: writes the content into the (empty, temporary) folder it is given.
        info: extra json-serializable facts stored in the manifest (e.g. parameters).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.parent / f".{target.name}.lock"):
        manifest = read_manifest(target)
        if manifest is not None and manifest.get("fingerprint") == fingerprint:
            return target
        # Holding the lock, any temporary sibling is debris of a killed builder.
        for debris in target.parent.glob(f".{target.name}.tmp-*"):
            shutil.rmtree(debris, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        # mkdtemp makes the folder private (0700); the dataset is meant to be shared.
        os.chmod(tmp, 0o755)
        try:
            logger.info(f"Building {target} (fingerprint {fingerprint}) ...")
            build(tmp)
            (tmp / MANIFEST).write_text(
                json.dumps({"fingerprint": fingerprint, **(info or {})}, sort_keys=True))
            if target.exists():
                # Stale content: move it aside first, since rename cannot replace a folder.
                stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
                os.rename(target, stale / "old")
                os.rename(tmp, target)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target
