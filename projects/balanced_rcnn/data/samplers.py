"""
Image rebalancing for "few images hold objects": DATALOADER.SAMPLER_TRAIN
"ObjectShareTrainingSampler" samples the images that hold objects at (at least) the share
DATALOADER.OBJECT_IMAGE_SHARE of all sampled images, however few the dataset has. A dataset
whose share is already as high is not rebalanced (every factor 1: each epoch a random
permutation, as detectron2's TrainingSampler draws, from another random stream).

detectron2's RepeatFactorTrainingSampler repeats an image by its rarest category (LVIS): it
rebalances classes, and raises the share of object-holding images only as a side effect, by an
amount that depends on the class frequencies. This one sets that share directly. It is
detectron2's RepeatFactorTrainingSampler with other repeat factors, so it is deterministic per
seed (SEED, as detectron2 seeds that sampler), DDP-sharded the same way (worker r takes every
world-size-th index of one shared stream) and stochastic-rounds the factors the same way:

    n_obj images with at least one non-crowd annotation, n_empty without, N = n_obj + n_empty
    r_obj   = s * N / n_obj              (s = OBJECT_IMAGE_SHARE)
    r_empty = (1 - s) * N / n_empty

An epoch then holds N images in expectation, s * N of them with objects. When n_obj / N >= s
every factor is 1.
"""

import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data.samplers import RepeatFactorTrainingSampler

__all__ = ["OBJECT_SHARE_SAMPLER", "build_object_share_sampler", "object_share_repeat_factors"]

logger = logging.getLogger(__name__)

OBJECT_SHARE_SAMPLER = "ObjectShareTrainingSampler"


def _holds_objects(record: Dict) -> bool:
    # What detectron2's FILTER_EMPTY_ANNOTATIONS keeps (filter_images_with_only_crowd_annotations).
    return any(ann.get("iscrowd", 0) == 0 for ann in record.get("annotations", []))


def object_share_repeat_factors(dataset_dicts: List[Dict], share: float) -> torch.Tensor:
    """
    (N,) float32 repeat factors (module docstring) that make the images with objects ``share``
    of the sampled images in expectation. A dataset where they already make at least that share
    gets 1s.

    Raises:
        ValueError: ``share`` outside (0, 1], or no image with an object.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"DATALOADER.OBJECT_IMAGE_SHARE must be in (0, 1], got {share}")
    holds = torch.tensor([_holds_objects(r) for r in dataset_dicts], dtype=torch.bool)
    num_images, num_obj = len(holds), int(holds.sum())
    if num_obj == 0:
        raise ValueError(
            f"{OBJECT_SHARE_SAMPLER}: none of the {num_images} training images has a non-crowd "
            "annotation, so there is nothing to sample at DATALOADER.OBJECT_IMAGE_SHARE"
        )
    num_empty = num_images - num_obj
    if num_obj >= share * num_images:
        return torch.ones(num_images)
    r_obj = share * num_images / num_obj
    r_empty = (1.0 - share) * num_images / num_empty
    return torch.where(holds, r_obj, r_empty).to(torch.float32)


def build_object_share_sampler(cfg: CfgNode, dataset_dicts: List[Dict]) -> Optional[
        RepeatFactorTrainingSampler]:
    """The sampler for DATALOADER.SAMPLER_TRAIN "ObjectShareTrainingSampler", else None (then
    detectron2 builds the one it names)."""
    if cfg.DATALOADER.SAMPLER_TRAIN != OBJECT_SHARE_SAMPLER:
        return None
    share = cfg.DATALOADER.OBJECT_IMAGE_SHARE
    factors = object_share_repeat_factors(dataset_dicts, share)
    holds = torch.tensor([_holds_objects(r) for r in dataset_dicts])
    num_obj = int(holds.sum())
    found = (f"{OBJECT_SHARE_SAMPLER}: {num_obj} of {len(dataset_dicts)} training images hold "
             f"objects ({100 * num_obj / len(dataset_dicts):.1f}%)")
    if bool((factors == 1).all()):
        logger.info(f"{found}, at least DATALOADER.OBJECT_IMAGE_SHARE {share:g}: sampled as they "
                    "are")
    else:
        logger.info(f"{found}; sampled at {100 * share:.0f}%: repeat factor "
                    f"{factors[holds][0]:.2f} for them, {factors[~holds][0]:.2f} for the others")
    return RepeatFactorTrainingSampler(factors, seed=cfg.SEED if cfg.SEED >= 0 else None)
