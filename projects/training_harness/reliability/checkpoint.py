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

:func:`~.weights_files.check_weights_file` runs these checks before anything is built, and with
``require_full_model`` (evaluation, resume) refuses a checkpoint that does not hold the whole model
(reliability/checkpoint_fit.py).
"""

import contextlib
import glob
import logging
import os
from typing import Any, BinaryIO, Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils import comm

from ..errors import CheckpointMismatchError
from .atomic_files import TMP_MARK, atomic_write
from .checkpoint_fit import misfit_message
from .safe_files import check_no_unsafe_torch_load, load_model_zoo_pickle
from .weights_files import (LAST_CHECKPOINT, is_local_path, model_zoo_checkpoint, read_checked,
                            strip_query)

__all__ = ["AtomicCheckpointer", "save_checkpoint_and_synchronize"]

logger = logging.getLogger(__name__)


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
        if not is_local_path(self.save_dir):
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
        if not is_local_path(self.save_dir):
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
        for debris in glob.glob(os.path.join(glob.escape(self.save_dir), f".*{TMP_MARK}*")):
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
        if path and is_local_path(path) and self.file_must_exist_here:
            local = strip_query(path)
            if not os.path.isfile(local):
                raise FileNotFoundError(f"Checkpoint '{local}'{self._named_by()} does not exist")
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        self._loading = filename
        if filename.endswith(".pkl"):
            return model_zoo_checkpoint(load_model_zoo_pickle(filename, self._named_by()))
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
        return read_checked(filename, self._named_by(), lambda: super(
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
