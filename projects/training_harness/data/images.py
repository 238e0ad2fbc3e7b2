"""
Image files that detectron2's ``read_image`` would misread, found by their header before the
pixels are decoded.

``read_image`` converts every file with PIL to INPUT.FORMAT's 8-bit channels. For 16-bit and
32-bit integer images (PIL modes ``I;16``, ``I``: 16-bit PNG and TIFF, depth maps, medical and
microscope images) and 32-bit float images (``F``) that conversion clips every value above 255:
a 16-bit photograph becomes an all-white image, and training and evaluation go on with it. Palette
(``P``), grey, alpha and CMYK images convert correctly and are accepted. Reading the header costs
one more file open per image: 42 us against 6.53 ms for decoding a 640x480 JPEG
(benchmarks/bench_image_check.py). The EXIF orientation is
applied by ``read_image`` in training, evaluation and tools/predict.py alike; a json written from
the stored pixels of a rotated photo then has width and height swapped, which
:func:`size_mismatch_hint` says.
"""

from typing import Optional

from detectron2.utils.file_io import PathManager
from PIL import Image

from ..errors import UnsupportedImageError

__all__ = ["check_image_mode", "size_mismatch_hint"]

_EXIF_ORIENTATION = 0x0112  # the EXIF tag detectron2's _apply_exif_orientation reads
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # the ones that swap width and height


def _misread_kind(mode: str) -> Optional[str]:
    if mode.startswith("I;16"):
        return "16-bit"
    return {"I": "32-bit integer", "F": "32-bit float"}.get(mode)


def check_image_mode(file_name: str) -> None:
    """Raise UnsupportedImageError if ``file_name`` is a 16/32-bit integer or float image."""
    with PathManager.open(file_name, "rb") as f:
        mode = Image.open(f).mode  # reads the header only
    kind = _misread_kind(mode)
    if kind is not None:
        raise UnsupportedImageError(
            f"it is a {kind} image (PIL mode {mode}), which detectron2 reads as 8 bits per "
            "channel by clipping every value above 255 (a 16-bit photo becomes all white); "
            "convert it to 8 bits first, scaling its range to 0-255")


def size_mismatch_hint(file_name: str, json_width: int, json_height: int) -> str:
    """The explanation of a size mismatch between ``file_name`` and its json entry when its
    EXIF orientation is the cause (the json holds the stored, unrotated size), else ""."""
    try:
        with PathManager.open(file_name, "rb") as f:
            image = Image.open(f)
            orientation = image.getexif().get(_EXIF_ORIENTATION)
            stored_size = image.size  # (width, height) before the rotation
    except (OSError, SyntaxError, ValueError):
        return ""
    if orientation in _TRANSPOSING_ORIENTATIONS and stored_size == (json_width, json_height):
        return (f" Its EXIF orientation {orientation} rotates it by 90 degrees, which detectron2 "
                "applies; the json's width and height must be those of the rotated image.")
    return ""
