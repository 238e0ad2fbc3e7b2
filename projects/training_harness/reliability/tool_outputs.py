"""
The output folder of a command-line tool, checked before the tool does any work: it is a folder
(or can be made one) that this user can write, and none of the files the tool writes there is
one of its inputs. Without it a tool fails after its work (predictions, an export, a report)
with a raw OSError, or overwrites the config, weights or image it read.
"""

import os
from pathlib import Path
from typing import Iterable, Mapping, Optional, Union

__all__ = ["prepare_output_folder"]

PathLike = Union[str, Path]


def prepare_output_folder(folder: PathLike, option: str, writes: Iterable[str],
                          inputs: Mapping[str, Optional[PathLike]]) -> Path:
    """
    Create ``folder`` (named by the command-line ``option``) if needed and return it, or raise
    ValueError naming the option and the path: it is a file, it cannot be created or written,
    or a file of ``writes`` (names relative to the folder) is one of ``inputs`` (what -> path;
    None for an input not given).
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{option} {folder} is a file, not a folder")
    for name in writes:
        target = os.path.realpath(folder / name)
        for what, path in inputs.items():
            if path is not None and os.path.realpath(path) == target:
                raise ValueError(f"{option} {folder}: the {name} written there would overwrite "
                                 f"the {what} {path}; choose another {option}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {folder} cannot be created: {e.strerror}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{option} {folder} is not writable by this user")
    return folder
