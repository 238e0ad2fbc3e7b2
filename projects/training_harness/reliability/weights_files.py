"""
Reading a weights file without running code, and naming what is wrong with it: a .pth through
``torch.load(weights_only=True)`` after its zip records pass their CRC check, a .pkl through the
plain-data unpickler (safe_files.py); :func:`check_weights_file` applies the checks to the file a
run will load before anything is built.
"""

import os
import pickle
import re
import zipfile
from typing import Any, Callable, Dict, Optional
from urllib.parse import urlparse

import torch
from detectron2.config import CfgNode
from detectron2.utils import comm

from ..errors import CheckpointError, UnsafeFileError
from .checkpoint_fit import check_checkpoint_fits
from .safe_files import check_no_unsafe_torch_load, load_model_zoo_pickle

__all__ = ["LAST_CHECKPOINT", "check_weights_file", "is_local_path", "local_checkpoint_path",
           "model_zoo_checkpoint", "read_checked", "read_weights_file", "strip_query"]

LAST_CHECKPOINT = "last_checkpoint"  # fvcore's tag file in the save folder
_ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first local file header
# torch's weights_only refusal of an object it will not build: "unsupported GLOBAL posix.system"
_UNSUPPORTED_GLOBAL = re.compile(r"unsupported GLOBAL (\S+)", re.IGNORECASE)


def is_local_path(path: str) -> bool:
    # detectron2:// and http(s):// names are resolved (downloaded) by the PathManager.
    return "://" not in path


def strip_query(path: str) -> str:
    # DetectionCheckpointer accepts "file.pth?matching_heuristics=True".
    return urlparse(path)._replace(query="").geturl()


def local_checkpoint_path(path: str) -> Optional[str]:
    """The file a checkpoint name (MODEL.WEIGHTS) points at on this machine, without its
    "?query"; None for a URL, which the PathManager downloads."""
    return strip_query(path) if path and is_local_path(path) else None


def _check_zip_records(path: str) -> Optional[str]:
    """The first problem of a zip-format checkpoint (torch >= 1.6), None if it reads clean."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and compares its CRC32
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        return f"its zip archive is damaged ({e})"
    return None if bad is None else f"record '{bad}' fails its CRC check"


def read_checked(filename: str, named_by: str, load: Callable[[], Dict[str, Any]],
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
        return model_zoo_checkpoint(load_model_zoo_pickle(filename, named_by))

    def load() -> Dict[str, Any]:
        data = torch.load(filename, map_location=torch.device("cpu"), weights_only=True)
        return data if isinstance(data, dict) and "model" in data else {"model": data}

    return read_checked(filename, named_by, load, "Point it at an intact file.")


def model_zoo_checkpoint(data: Any) -> Dict[str, Any]:
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
        if not is_local_path(weights):
            return
    if not comm.is_main_process():
        return
    if not resuming:
        local = strip_query(weights)
        if not os.path.isfile(local):
            where = "" if os.path.isabs(local) else \
                f" (relative to the current folder {os.getcwd()})"
            raise FileNotFoundError(f"MODEL.WEIGHTS '{weights}' does not exist{where}")
    # Fine-tuning from MODEL.WEIGHTS keeps detectron2's partial load (class layers of another
    # dataset re-initialized, with a warning); an evaluation or a resumed run needs it all.
    check_checkpoint_fits(cfg, resume, full_model=eval_only or resuming)
