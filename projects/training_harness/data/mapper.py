"""
Training images that cannot be used are skipped, logged, counted and summarized, and too many
of them is an error.

An image file can be missing (deleted after the up-front check of data/train_dicts.py), unreadable
(not an image, zero bytes), truncated (a copy that did not finish: PIL raises "image file is
truncated"), of another size than its json entry (often EXIF rotation: detectron2 applies the EXIF
orientation, the json was written from the stored pixels) or of a pixel type that detectron2 would
misread (16-bit, float: data/images.py). detectron2's DatasetMapper raises on each of these, and
training dies hours in for one file among millions.

:class:`SkippingMapper` wraps a mapper and catches exactly these errors (OSError, PIL's
SyntaxError for a broken PNG, SizeMismatchError, UnsupportedImageError), logs the file and the
reason, remembers the file so that it is not read again, and returns None, on which
detectron2's MapDataset draws another image. The record of the skip travels to the main process
inside the next dataset dict this mapper returns (under :data:`SKIPPED_KEY`), which works across DataLoader worker processes;
:class:`SkipTrackingLoader` takes it off the batch into :class:`SkippedImages`, which counts the
distinct files, raises :class:`TooManySkippedImages` once more than
RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION of the training images are skipped, and logs a summary at
the end of training. Each mapper also applies the limit to what it saw itself, so a loader whose
images all fail raises instead of drawing forever.

In evaluation (``is_train=False``) a skipped image would change the result: the same errors are
raised again, naming the file.
"""

import logging
import math
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from detectron2.data import DatasetMapper
from detectron2.data.detection_utils import SizeMismatchError

from ..errors import TooManySkippedImages, UnsupportedImageError
from .images import check_image_mode, size_mismatch_hint

__all__ = [
    "SKIPPED_KEY",
    "SkipTrackingLoader",
    "SkippedImages",
    "SkippingMapper",
]

logger = logging.getLogger(__name__)

# Dataset-dict key that carries (file_name, reason) pairs from a mapper to the main process.
SKIPPED_KEY = "skipped_images"
# What reading an image raises when the file is at fault, not the code.
_READ_ERRORS = (OSError, SyntaxError, SizeMismatchError, UnsupportedImageError)
_LISTED = 5  # files named in an error message


def _listing(reasons: Dict[str, str], limit: int = _LISTED) -> str:
    items = [f"'{f}' ({r})" for f, r in list(reasons.items())[:limit]]
    more = len(reasons) - limit
    return "; ".join(items) + (f"; and {more} more (all in the log)" if more > 0 else "")


class SkippedImages:
    """The distinct training images skipped so far, with their reasons, against the limit."""

    def __init__(self, num_images: int, max_fraction: float):
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError("RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION must be in [0, 1], got "
                             f"{max_fraction}")
        self.num_images = num_images
        self.max_fraction = max_fraction
        self.reasons: Dict[str, str] = {}  # file name -> reason, in the order of the skips

    @property
    def limit(self) -> float:
        """Skipping more distinct images than this is an error."""
        return self.max_fraction * self.num_images

    def remaining(self) -> float:
        return self.limit - len(self.reasons)

    def add(self, file_name: str, reason: str, check: bool = True) -> None:
        self.reasons.setdefault(file_name, reason)
        if check:
            self.check()

    def check(self) -> None:
        if len(self.reasons) > self.limit:
            raise TooManySkippedImages(
                f"{len(self.reasons)} of {self.num_images} training images cannot be used, more "
                f"than RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION = {self.max_fraction:g} of them: "
                f"{_listing(self.reasons)}. Fix or remove these files (or their json entries), "
                "or raise the fraction."
            )

    def summary(self) -> Optional[str]:
        if not self.reasons:
            return None
        return (f"Skipped {len(self.reasons)} of {self.num_images} training images that cannot "
                f"be used (RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION = {self.max_fraction:g}): "
                f"{_listing(self.reasons, limit=50)}")

    def log_summary(self) -> None:
        message = self.summary()
        if message:
            logger.warning(message)


class SkippingMapper:
    """Wraps a dataset mapper (a DatasetMapper, or the core's CopyPasteDatasetMapper) so that it
    skips (training) or names (evaluation) the images it cannot use."""

    def __init__(self, mapper: DatasetMapper, *, max_skipped: float = math.inf):
        """
        Args:
            mapper: maps one dataset dict; its ``is_train`` says which of the two it does.
            max_skipped: this mapper raises TooManySkippedImages when it has skipped more
                distinct files than this (the rest of the data set's allowance).
        """
        self.mapper = mapper
        self.is_train = mapper.is_train
        self.max_skipped = max_skipped
        self._bad: Dict[str, str] = {}
        self._pending: List[Tuple[str, str]] = []  # skips not yet handed to the main process

    def __call__(self, dataset_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        file_name = dataset_dict["file_name"]
        if file_name in self._bad:
            return None  # known bad: draw another one without reading it again
        try:
            check_image_mode(file_name)
            ret = self.mapper(dataset_dict)
        except _READ_ERRORS as e:
            reason = f"{type(e).__name__}: {e}"
            if isinstance(e, SizeMismatchError):
                reason += size_mismatch_hint(file_name, dataset_dict.get("width"),
                                             dataset_dict.get("height"))
            if not self.is_train:
                raise ValueError(f"Cannot use image '{file_name}' (image id "
                                 f"{dataset_dict.get('image_id')}): {reason}") from e
            return self._skip(file_name, reason)
        if self._pending:
            ret[SKIPPED_KEY], self._pending = self._pending, []
        return ret

    def _skip(self, file_name: str, reason: str) -> None:
        self._bad[file_name] = reason
        self._pending.append((file_name, reason))
        logger.warning(f"Skipping training image '{file_name}': {reason}")
        if len(self._bad) > self.max_skipped:
            raise TooManySkippedImages(
                f"{len(self._bad)} training images failed to load in one data-loader process, "
                f"more than RELIABILITY.MAX_SKIPPED_IMAGE_FRACTION allows: {_listing(self._bad)}"
            )
        return None


class SkipTrackingLoader:
    """Iterates ``loader``'s batches, moving the mappers' skip records into ``skipped``."""

    def __init__(self, loader: Iterable[List[Dict[str, Any]]], skipped: SkippedImages):
        self.loader = loader
        self.skipped = skipped

    def __iter__(self) -> Iterator[List[Dict[str, Any]]]:
        for batch in self.loader:
            for dataset_dict in batch:
                for file_name, reason in dataset_dict.pop(SKIPPED_KEY, ()):
                    self.skipped.add(file_name, reason)
            yield batch

    def __getattr__(self, name: str) -> Any:
        # Everything else (dataset, batch_size, ...) is the wrapped loader's.
        return getattr(self.__dict__["loader"], name)
