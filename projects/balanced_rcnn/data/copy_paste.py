"""
Simple copy-paste onto the empty training images (Ghiasi et al. 2021, "Simple Copy-Paste is a
Strong Data Augmentation Method for Instance Segmentation", CVPR): with probability
INPUT.COPY_PASTE.PROBABILITY, a training image without objects gets every non-crowd object of a
random training image that holds objects, pasted at the same place (as the paper pastes, before
the usual resize and flip) with its mask, box and class. The empty images then show objects on
new backgrounds instead of the same few object images repeated.

The paste is a detectron2 Transform put in front of the mapper's augmentations for that image,
and the pasted annotations join the image's (empty) list before DatasetMapper transforms them:
resizing, flipping and cropping treat the pasted objects exactly as their own. An object's mask is
its polygons (an RLE segmentation or none: its box); objects that do not fit inside the target
image (the donor is larger) are left out.
"""

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from detectron2.config import configurable
from detectron2.data import DatasetFromList, DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode, polygons_to_bitmask

from .samplers import holds_objects

__all__ = ["CopyPasteDatasetMapper", "PasteTransform", "paste_objects"]

logger = logging.getLogger(__name__)


class PasteTransform(T.Transform):
    """Pastes ``pixels`` (h, w, C) where ``mask`` (h, w) is true into the top-left h x w of an
    image; coordinates do not move."""

    def __init__(self, pixels: np.ndarray, mask: np.ndarray):
        super().__init__()
        self.pixels = pixels
        self.mask = mask

    def apply_image(self, img: np.ndarray) -> np.ndarray:
        out = img.copy()
        h, w = self.mask.shape
        out[:h, :w][self.mask] = self.pixels[self.mask]
        return out

    def apply_coords(self, coords: np.ndarray) -> np.ndarray:
        return coords

    def apply_segmentation(self, segmentation: np.ndarray) -> np.ndarray:
        return segmentation


def _object_mask(ann: Dict[str, Any], height: int, width: int) -> np.ndarray:
    segm = ann.get("segmentation")
    if isinstance(segm, list) and segm:
        return polygons_to_bitmask([np.asarray(p, dtype=np.float64) for p in segm], height, width)
    x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
    mask = np.zeros((height, width), dtype=bool)
    mask[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
    return mask


def paste_objects(donor: Dict[str, Any], donor_image: np.ndarray, target_height: int,
                  target_width: int) -> Tuple[Optional[PasteTransform], List[Dict[str, Any]]]:
    """The transform that pastes ``donor``'s non-crowd objects (from its (H, W, C) image) into
    an image of the target size, and their annotations; (None, []) if none fits."""
    height, width = min(donor_image.shape[0], target_height), min(donor_image.shape[1],
                                                                   target_width)
    union = np.zeros(donor_image.shape[:2], dtype=bool)
    pasted = []
    for ann in donor.get("annotations", []):
        if ann.get("iscrowd", 0):
            continue
        x0, y0, x1, y1 = BoxMode.convert(ann["bbox"], ann["bbox_mode"], BoxMode.XYXY_ABS)
        if x1 > width or y1 > height:
            continue  # would not fit: a larger donor image
        union |= _object_mask(ann, *donor_image.shape[:2])
        pasted.append({k: ann[k] for k in ("bbox", "bbox_mode", "category_id", "segmentation")
                       if k in ann} | {"iscrowd": 0})
    if not pasted:
        return None, []
    return PasteTransform(donor_image[:height, :width], union[:height, :width]), pasted


class CopyPasteDatasetMapper(DatasetMapper):
    """DatasetMapper that pastes objects onto empty training images (module docstring).
    ``donors``: the training records that hold objects."""

    @configurable
    def __init__(self, is_train: bool = True, *, donors: Sequence[Dict[str, Any]] = (),
                 paste_probability: float = 0.0, **kwargs: Any):
        if not 0.0 <= paste_probability <= 1.0:
            raise ValueError(
                f"INPUT.COPY_PASTE.PROBABILITY must be in [0, 1], got {paste_probability}")
        if kwargs.get("use_keypoint"):
            raise ValueError("INPUT.COPY_PASTE.PROBABILITY > 0 with MODEL.KEYPOINT_ON: pasted "
                             "objects carry no keypoints; turn one of them off")
        super().__init__(is_train, **kwargs)
        # Serialized as detectron2 keeps the dataset, so that forked loader workers share it
        # instead of copying a list of dicts on read.
        self.donors = DatasetFromList([d for d in donors if holds_objects(d)], copy=False)
        self.paste_probability = paste_probability

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, donors: Sequence[Dict[str, Any]] = ()):
        ret = super().from_config(cfg, is_train)
        ret.update(donors=donors, paste_probability=cfg.INPUT.COPY_PASTE.PROBABILITY)
        return ret

    def __call__(self, dataset_dict: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        # np.random, as detectron2's augmentations draw: seeded per data-loader worker.
        if (not self.is_train or not self.donors or holds_objects(dataset_dict)
                or np.random.rand() >= self.paste_probability):
            return super().__call__(dataset_dict)
        donor = self.donors[np.random.randint(len(self.donors))]
        try:
            donor_image = utils.read_image(donor["file_name"], format=self.image_format)
        except OSError as e:  # the donor is skipped when it is drawn itself
            logger.warning(f"Copy-paste: cannot read '{donor['file_name']}' ({e}); not pasted")
            return super().__call__(dataset_dict)
        paste, pasted = paste_objects(donor, donor_image, dataset_dict["height"],
                                      dataset_dict["width"])
        if paste is None:
            return super().__call__(dataset_dict)
        dataset_dict = {**dataset_dict,
                        "annotations": list(dataset_dict.get("annotations", [])) + pasted}
        augmentations = self.augmentations
        # This image's pipeline: the paste, then the usual augmentations (AugmentationList.augs,
        # public); a mapper runs one image at a time in its process.
        self.augmentations = T.AugmentationList([paste, *augmentations.augs])
        try:
            return super().__call__(dataset_dict)
        finally:
            self.augmentations = augmentations
