"""
Checkpoints that a kill cannot corrupt, and loads that name the file they cannot use.

:class:`AtomicCheckpointer` is detectron2's ``DetectionCheckpointer`` with two changes:

- ``save`` writes ``<name>.pth`` to a hidden temporary file in the same folder, fsyncs it,
  renames it over the final name (``os.replace``: atomic within one file system) and fsyncs the
  folder; only then does it rewrite ``last_checkpoint``, the same way. A process killed at any
  moment leaves under each name either the old or the new complete file, and
  ``last_checkpoint`` always names a complete checkpoint. A killed write leaves a
  ``.<name>.pth.tmp-<pid>`` file behind, which the next save in that folder removes.
- ``load`` reads no code: ``.pth`` files with ``torch.load(weights_only=True)``, ``.pkl`` files
  with an unpickler that builds plain data only (reliability/safe_files.py).
- ``load`` refuses a missing file, and a truncated or corrupt one (checked with the CRC32 that
  ``torch.save`` stores for every record of its zip archive, so a flipped byte in the middle of a
  tensor is caught too) with an error that names the file and where its name came from
  (MODEL.WEIGHTS or OUTPUT_DIR/last_checkpoint). fvcore would fail with an AssertionError after
  the model and the data loader are built, or inside a zip reader with no file name.

:func:`check_weights_file` runs these checks before anything is built, and with
``require_full_model`` (evaluation, resume) refuses a checkpoint that does not hold the whole model
(reliability/checkpoint_fit.py).
"""

import contextlib
import errno
import glob
import logging
import os
import pickle
import re
import shutil
import zipfile
from typing import Any, BinaryIO, Callable, Dict, Optional
from urllib.parse import urlparse

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.utils import comm

from ..errors import CheckpointError, CheckpointMismatchError, UnsafeFileError
from .checkpoint_fit import check_checkpoint_fits, misfit_message
from .safe_files import check_no_unsafe_torch_load, load_model_zoo_pickle

__all__ = [
    "AtomicCheckpointer",
    "atomic_write",
    "check_checkpoint_fits",
    "check_weights_file",
    "local_checkpoint_path",
    "read_weights_file",
    "save_checkpoint_and_synchronize",
]

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "last_checkpoint"  # fvcore's tag file in the save folder
_TMP_MARK = ".tmp-"
_ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first local file header
# torch's weights_only refusal of an object it will not build: "unsupported GLOBAL posix.system"
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+)", re.IGNORECASE)


def _is_local(path: str) -> bool:
    # detectron2:// and http(s):// names are resolved (downloaded) by the PathManager.
    return "://" not in path


def _strip_query(path: str) -> str:
    # DetectionCheckpointer accepts "file.pth?matching_heuristics=True".
    return urlparse(path)._replace(query="").geturl()


def local_checkpoint_path(path: str) -> Optional[str]:
    """The file a checkpoint name (MODEL.WEIGHTS) points at on this machine, without its
    "?query"; None for a URL, which the PathManager downloads."""
    return _strip_query(path) if path and _is_local(path) else None


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
    tmp = os.path.join(folder, f".{os.path.basename(path)}{_TMP_MARK}{os.getpid()}")
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


def _check_zip_records(path: str) -> Optional[str]:
    """The first problem of a zip-format checkpoint (torch >= 1.6), None if it reads clean."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and compares its CRC32
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        return f"its zip archive is damaged ({e})"
    return None if bad is None else f"record '{bad}' fails its CRC check"


class AtomicCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer with atomic saves and clear load errors (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, save_dir: str = "", *,
                 require_full_model: bool = False, **kwargs: Any):
        """
        Args:
            require_full_model: refuse a checkpoint that lacks a model tensor or has one in
                another shape (CheckpointMismatchError) instead of logging it and keeping the
                model's initialization, which is right only for fine-tuning.
            model, save_dir, kwargs: DetectionCheckpointer's.
        """
        super().__init__(model, save_dir, **kwargs)
        self.require_full_model = require_full_model
        # Refuse a missing file by name (under DDP only the main worker needs to have it).
        self.file_must_exist_here = comm.get_world_size() == 1
        self._debris_removed = False
        # Where the path being loaded came from, for error messages.
        self._source: Optional[str] = None
        self._loading = ""  # the file being loaded, for error messages
        self.last_incompatible = None  # fvcore's incompatible keys of the last model load

    # ---- save ----
    def save(self, name: str, *, tag_last: bool = True, **kwargs: Any) -> None:
        """fvcore's save, atomic; ``tag_last`` False leaves ``last_checkpoint`` as it is (a file
        to inspect, not to resume from)."""
        if not self.save_dir or not self.save_to_disk:
            return
        if not _is_local(self.save_dir):
            super().save(name, **kwargs)  # remote storage has its own write semantics
            return
        # fvcore's Checkpointer.save, with the file written by atomic_write.
        data: Dict[str, Any] = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self._remove_debris()
        self.logger.info(f"Saving checkpoint to {path}")
        atomic_write(path, lambda f: torch.save(data, f))
        if tag_last:
            self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not _is_local(self.save_dir):
            super().tag_last_checkpoint(last_filename_basename)
            return
        atomic_write(
            os.path.join(self.save_dir, LAST_CHECKPOINT),
            lambda f: f.write(last_filename_basename.encode()),
        )

    def _remove_debris(self) -> None:
        # Temporary files of writes that were killed. Only one run writes into a save folder, so
        # any of them at the first save of this run is debris.
        if self._debris_removed:
            return
        self._debris_removed = True
        for debris in glob.glob(os.path.join(glob.escape(self.save_dir), f".*{_TMP_MARK}*")):
            logger.info(f"Removing {debris}, left by a checkpoint write that was interrupted")
            with contextlib.suppress(OSError):
                os.remove(debris)

    # ---- load ----
    def resume_or_load(self, path: str, *, resume: bool = True) -> Dict[str, Any]:
        if resume and self.has_checkpoint():
            self._source = os.path.join(self.save_dir, LAST_CHECKPOINT)
        else:
            self._source = "MODEL.WEIGHTS"
        try:
            return super().resume_or_load(path, resume=resume)
        finally:
            self._source = None

    @property
    def loaded_file(self) -> str:
        """The file the last load read ("" before any)."""
        return self._loading

    def _named_by(self) -> str:
        return f" (named by {self._source})" if self._source else ""

    def load(self, path: str, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        # Under DDP detectron2 lets the other workers take the main worker's weights when only it
        # can read the file, so the check is left to it there (file_must_exist_here).
        check_no_unsafe_torch_load()
        if path and _is_local(path) and self.file_must_exist_here:
            local = _strip_query(path)
            if not os.path.isfile(local):
                raise FileNotFoundError(f"Checkpoint '{local}'{self._named_by()} does not exist")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        if filename.endswith(".pkl"):
            return _model_zoo_checkpoint(load_model_zoo_pickle(filename, self._named_by()))
        return self._read_checked(filename)

    def _torch_load(self, f: BinaryIO) -> Dict[str, Any]:
        # fvcore leaves weights_only to torch's default: pinned here.
        return torch.load(f, map_location=torch.device("cpu"), weights_only=True)

    def _load_model(self, checkpoint: Any):
        incompatible = super()._load_model(checkpoint)
        self.last_incompatible = incompatible
        if self.require_full_model:
            problem = misfit_message(
                self._loading, self._named_by(), incompatible.missing_keys,
                incompatible.unexpected_keys, incompatible.incorrect_shapes,
                num_model_tensors=len(self.model.state_dict()))
            if problem:
                raise CheckpointMismatchError(problem)
        return incompatible

    def _read_checked(self, filename: str) -> Dict[str, Any]:
        return _read_checked(filename, self._named_by(), lambda: super(
            AtomicCheckpointer, self)._load_file(filename), self._remedy(filename))

    def _remedy(self, filename: str) -> str:
        if self._source != os.path.join(self.save_dir, LAST_CHECKPOINT):
            return "Point MODEL.WEIGHTS at an intact file."
        others = sorted(
            os.path.basename(p)
            for p in glob.glob(os.path.join(glob.escape(self.save_dir), "*.pth"))
            if os.path.abspath(p) != os.path.abspath(filename)
        )
        hint = f" (this folder also has: {', '.join(others[-3:])})" if others else ""
        return (f"Delete it and write the name of an earlier checkpoint into {self._source}"
                f"{hint}, or start without --resume.")


def _read_checked(filename: str, named_by: str, load: Callable[[], Dict[str, Any]],
                  remedy: str) -> Dict[str, Any]:
    """``load()`` of the .pth ``filename`` after checking its zip records, with its failures
    named: UnsafeFileError for a file that would build other objects, else CheckpointError."""
    if zipfile.is_zipfile(filename):
        problem = _check_zip_records(filename)
    else:
        with open(filename, "rb") as f:
            starts_like_zip = f.read(4) == _ZIP_MAGIC
        # torch.save writes a zip; one whose end (the central directory) is missing was cut.
        problem = "it starts as a zip archive but its end is missing" if starts_like_zip \
            else None
    if problem is None:
        try:
            return load()
        except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as e:
            if _UNSUPPORTED_GLOBAL.search(str(e)):  # intact, but would build other objects
                raise UnsafeFileError(_unsafe_pth_message(filename, named_by, e)) from None
            # An empty file gives EOFError, other bytes UnpicklingError ("Weights only load
            # failed", misleading here), a damaged legacy (non-zip) file RuntimeError/OSError.
            first_line = (str(e).strip().splitlines() or [""])[0][:300]
            problem = f"torch.load failed: {type(e).__name__}" + (
                f": {first_line}" if first_line else "")
    raise CheckpointError(
        f"Cannot load checkpoint '{filename}'{named_by}: it is truncated, corrupt or not a "
        f"checkpoint ({problem}). {remedy}"
    )


def read_weights_file(filename: str, named_by: str = "") -> Dict[str, Any]:
    """A .pth or .pkl weights file read as the checkpointer reads it, without a model:
    {"model": tensors or arrays, ...}. No code runs. ``named_by`` (e.g. "the converter's
    input") goes into the messages.

    Raises:
        UnsafeFileError: the file would build objects other than tensors and plain data.
        CheckpointError: it is truncated, corrupt or not a checkpoint.
    """
    check_no_unsafe_torch_load()
    named_by = f" (named by {named_by})" if named_by else ""
    if filename.endswith(".pkl"):
        return _model_zoo_checkpoint(load_model_zoo_pickle(filename, named_by))

    def load() -> Dict[str, Any]:
        data = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        return data if isinstance(data, dict) and "model" in data else {"model": data}

    return _read_checked(filename, named_by, load, "Point it at an intact file.")


def _model_zoo_checkpoint(data: Any) -> Dict[str, Any]:
    # What DetectionCheckpointer._load_file makes of a .pkl (detectron2 model zoo, or Caffe2 /
    # Detectron1 blobs), from data read without running code.
    if "model" in data and "__author__" in data:
        return data
    if "blobs" in data:
        data = data["blobs"]
    data = {k: v for k, v in data.items() if not k.endswith("_momentum")}
    return {"model": data, "__author__": "Caffe2", "matching_heuristics": True}


def _unsafe_pth_message(filename: str, named_by: str, error: Exception) -> str:
    built = _UNSUPPORTED_GLOBAL.search(str(error)).group(1)
    return (f"Refusing to load checkpoint '{filename}'{named_by}: it asks to build {built}, and "
            "a checkpoint is read with torch.load(weights_only=True), which builds only tensors "
            "and plain containers (unpickling anything else can run code). Load it yourself only "
            "if you trust its source, and save its tensors (torch.save(model.state_dict(), "
            "path)).")


def check_weights_file(cfg: CfgNode, *, resume: bool, eval_only: bool = False) -> None:
    """
    Refuse, before the model and the data are built, the checkpoint that will be loaded if it
    does not exist, cannot be read or (evaluation, resume) does not hold the whole model; for an
    evaluation, also no checkpoint at all (it would evaluate a random initialization). Checked on
    the main worker only, as detectron2 allows a file that only the main worker has.
    """
    resuming = resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, LAST_CHECKPOINT))
    weights = cfg.MODEL.WEIGHTS
    if not resuming:  # MODEL.WEIGHTS is loaded
        if not weights:
            if eval_only:
                raise ValueError(
                    "--eval-only needs trained weights: MODEL.WEIGHTS is empty (and no "
                    f"{LAST_CHECKPOINT} with --resume in OUTPUT_DIR '{cfg.OUTPUT_DIR}'), so a "
                    "random initialization would be evaluated. Set MODEL.WEIGHTS "
                    "path/to/model_final.pth")
            return
        if not _is_local(weights):
            return
    if not comm.is_main_process():
        return
    if not resuming:
        local = _strip_query(weights)
        if not os.path.isfile(local):
            where = "" if os.path.isabs(local) else \
                f" (relative to the current folder {os.getcwd()})"
            raise FileNotFoundError(f"MODEL.WEIGHTS '{weights}' does not exist{where}")
    # Fine-tuning from MODEL.WEIGHTS keeps detectron2's partial load (class layers of another
    # dataset re-initialized, with a warning); an evaluation or a resumed run needs it all.
    check_checkpoint_fits(cfg, resume, full_model=eval_only or resuming)
def save_checkpoint_and_synchronize(
    checkpointer: DetectionCheckpointer, name: str, iteration: int, tag_last: bool = True
) -> str:
    """
    Save ``<name>.pth`` with its ``iteration``, as detectron2's PeriodicCheckpointer does (the
    checkpointer writes on the main worker only), and hold every worker at a barrier until it is
    written: a worker that exited earlier would make the launcher kill the main one mid-write.
    Call it on every worker. ``tag_last`` False: ``last_checkpoint`` keeps naming the checkpoint
    before (AtomicCheckpointer only). Returns the path.
    """
    if tag_last:
        checkpointer.save(name, iteration=iteration)
    else:
        checkpointer.save(name, iteration=iteration, tag_last=False)
    comm.synchronize()
    return os.path.join(checkpointer.save_dir, f"{name}.pth")
