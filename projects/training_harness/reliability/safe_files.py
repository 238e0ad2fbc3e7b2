"""
Weights and config files are data, never code.

- ``.pkl`` weights (detectron2's model-zoo format) are read by :func:`load_model_zoo_pickle`, an
  unpickler that builds only what those files hold: dicts, lists, tuples, numbers, strings, bytes
  and numpy arrays. Anything else is refused, naming the file and the type it tried to build
  (pickle would call it: that is how a crafted file runs code).
- ``.pth`` weights are read with ``torch.load(..., weights_only=True)`` (tensors and plain
  containers only), passed explicitly so that no default of torch, fvcore or detectron2 can
  change it; :func:`check_no_unsafe_torch_load` refuses TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, which
  turns it off for every call that does not pass it (detectron2's ``.pyth`` branch).
- Config YAML: config.py's ``load_project_config`` (``yaml.safe_load`` only).
"""

import os
import pickle
from typing import Any

from ..errors import UnsafeFileError

__all__ = ["check_no_unsafe_torch_load", "load_model_zoo_pickle"]

# (module, name) a model-zoo pickle may reference: numpy's array and scalar reconstruction (under
# numpy 1 and 2 module names), and protocol 2's encoding of bytes.
_PICKLE_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),
})


class _ModelZooUnpickler(pickle.Unpickler):
    def __init__(self, file, filename: str, named_by: str):
        super().__init__(file, encoding="latin1")  # detectron2's: Python 2 pickles
        self._where = f"'{filename}'{named_by}"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeFileError(
            f"Refusing to load {self._where}: it asks to build {module}.{name}, and a "
            "weights .pkl holds only numpy arrays, dicts, lists, numbers and strings (unpickling "
            "anything else can run code). Convert it from a trusted source, or save the weights "
            "as a .pth state dict.")


def load_model_zoo_pickle(filename: str, named_by: str = "") -> Any:
    """The content of a detectron2 model-zoo style ``.pkl``, built from plain data only;
    ``named_by`` (e.g. " (named by MODEL.WEIGHTS)") follows the file name in the refusal."""
    with open(filename, "rb") as f:
        return _ModelZooUnpickler(f, filename, named_by).load()


def check_no_unsafe_torch_load() -> None:
    """Refuse the environment variable that lets torch.load unpickle arbitrary objects."""
    if os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "0").lower() in ("1", "y", "yes",
                                                                           "true"):
        raise UnsafeFileError(
            "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set: torch.load would unpickle any object in a "
            "checkpoint file, which can run code. Unset it; this project's checkpoints load "
            "with weights_only=True.")
