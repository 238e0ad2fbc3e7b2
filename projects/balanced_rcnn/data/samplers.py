"""
Image rebalancing for "few images hold objects", as DATALOADER.SAMPLER_TRAIN choices:

- "ObjectShareTrainingSampler" samples the images that hold objects at (at least) the share
  DATALOADER.OBJECT_IMAGE_SHARE of all sampled images, however few the dataset has, every object
  image alike;
- "ClassAwareObjectShareTrainingSampler" does the same, but within the object images it repeats
  each one by detectron2's RepeatFactorTrainingSampler factor (LVIS, Gupta et al. 2019: by the
  rarest category it holds, DATALOADER.REPEAT_THRESHOLD and REPEAT_SQRT), so that it rebalances
  the classes and the empty images together.

detectron2's RepeatFactorTrainingSampler alone rebalances classes and raises the share of object
images only as a side effect, by an amount that depends on the class frequencies; these set that
share directly. Both are detectron2's RepeatFactorTrainingSampler with other repeat factors, so
they are deterministic per seed (SEED, as detectron2 seeds that sampler), DDP-sharded the same
way (worker r takes every world-size-th index of one shared stream) and stochastic-round the
factors the same way. The one formula of both:

    n_obj images with at least one non-crowd annotation, n_empty without, N = n_obj + n_empty
    b_i     base factor of object image i: 1 (ObjectShare), or RFS's
            max(1, g(t / f_c)) over its categories c, f_c the share of all images holding c
            (crowd annotations count, as detectron2 counts them), g = sqrt if REPEAT_SQRT else
            identity, t = REPEAT_THRESHOLD (ClassAwareObjectShare)
    B       = sum of b_i over the object images, s = OBJECT_IMAGE_SHARE
    if B / (B + n_empty) >= s:  r_i = b_i, r_empty = 1  (already at least the share)
    else:   r_i = b_i * s * N / B,  r_empty = (1 - s) * N / n_empty

In the second case an epoch of the sampler holds N images in expectation, s * N of them with
objects; in the first it is RFS's (B + n_empty images). Either way each object image is drawn in
proportion to b_i. With every b_i = 1 and n_obj / N >= s every factor is 1.
"""

import logging
from typing import Dict, List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data.samplers import RepeatFactorTrainingSampler

__all__ = [
    "CLASS_AWARE_OBJECT_SHARE_SAMPLER",
    "OBJECT_SHARE_SAMPLER",
    "build_object_share_sampler",
    "class_aware_object_share_repeat_factors",
    "holds_objects",
    "object_share_factors_from_config",
    "object_share_repeat_factors",
]

logger = logging.getLogger(__name__)

OBJECT_SHARE_SAMPLER = "ObjectShareTrainingSampler"
CLASS_AWARE_OBJECT_SHARE_SAMPLER = "ClassAwareObjectShareTrainingSampler"


def holds_objects(record: Dict) -> bool:
    """Whether a record holds a non-crowd object: what detectron2's FILTER_EMPTY_ANNOTATIONS
    keeps (filter_images_with_only_crowd_annotations)."""
    return any(ann.get("iscrowd", 0) == 0 for ann in record.get("annotations", []))


def object_share_repeat_factors(dataset_dicts: List[Dict], share: float,
                                base_factors: Optional[torch.Tensor] = None,
                                sampler: str = OBJECT_SHARE_SAMPLER) -> torch.Tensor:
    """
    (N,) float32 repeat factors r (module docstring) that make the images with objects ``share``
    of the sampled images in expectation, each drawn in proportion to ``base_factors`` (b, (N,);
    None: 1s). A dataset where they already make at least that share keeps its base factors, and
    the empty images 1.

    Raises:
        ValueError: ``share`` outside (0, 1], or no image with an object.
    """
    if not 0.0 < share <= 1.0:
        raise ValueError(f"DATALOADER.OBJECT_IMAGE_SHARE must be in (0, 1], got {share}")
    holds = torch.tensor([holds_objects(r) for r in dataset_dicts], dtype=torch.bool)
    num_images, num_obj = len(holds), int(holds.sum())
    if num_obj == 0:
        raise ValueError(
            f"{sampler}: none of the {num_images} training images has a non-crowd "
            "annotation, so there is nothing to sample at DATALOADER.OBJECT_IMAGE_SHARE"
        )
    base = torch.ones(num_images) if base_factors is None else base_factors.to(torch.float32)
    base = torch.where(holds, base, torch.ones_like(base))
    num_empty = num_images - num_obj
    object_mass = float(base[holds].sum())
    if object_mass >= share * (object_mass + num_empty):
        return base
    r_empty = (1.0 - share) * num_images / num_empty
    return torch.where(holds, base * (share * num_images / object_mass), r_empty).to(
        torch.float32)


def class_aware_object_share_repeat_factors(dataset_dicts: List[Dict], share: float,
                                            repeat_threshold: float,
                                            sqrt: bool = True) -> torch.Tensor:
    """The factors of "ClassAwareObjectShareTrainingSampler" (module docstring): RFS's factors
    (detectron2's own function) as the object images' base, then the object share."""
    if repeat_threshold <= 0:
        raise ValueError(
            f"{CLASS_AWARE_OBJECT_SHARE_SAMPLER} needs DATALOADER.REPEAT_THRESHOLD > 0, got "
            f"{repeat_threshold}: at 0 every class factor is 1 and it samples as "
            f"{OBJECT_SHARE_SAMPLER}. LVIS uses 0.001; 1.0 repeats every class below 100% of "
            "the images")
    base = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
        dataset_dicts, repeat_threshold, sqrt=sqrt)
    return object_share_repeat_factors(dataset_dicts, share, base,
                                       sampler=CLASS_AWARE_OBJECT_SHARE_SAMPLER)


def _log_factors(sampler: str, dataset_dicts: List[Dict], factors: torch.Tensor,
                 share: float) -> None:
    holds = torch.tensor([holds_objects(r) for r in dataset_dicts])
    num_obj = int(holds.sum())
    obj, rest = factors[holds], factors[~holds]
    sampled = float(obj.sum() / factors.sum())
    logger.info(
        f"{sampler}: {num_obj} of {len(dataset_dicts)} training images hold objects "
        f"({100 * num_obj / len(dataset_dicts):.1f}%), sampled at {100 * sampled:.1f}% "
        f"(DATALOADER.OBJECT_IMAGE_SHARE {share:g}); repeat factor "
        + (f"{float(obj.min()):.2f}" if bool((obj == obj[0]).all())
           else f"{float(obj.min()):.2f}-{float(obj.max()):.2f}")
        + " for them" + (f", {float(rest[0]):.2f} for the others" if len(rest) else ""))


def object_share_factors_from_config(cfg: CfgNode, dataset_dicts: List[Dict]) -> Optional[
        torch.Tensor]:
    """The repeat factors of DATALOADER.SAMPLER_TRAIN "ObjectShareTrainingSampler" or
    "ClassAwareObjectShareTrainingSampler" on ``dataset_dicts``; None for other samplers."""
    name = cfg.DATALOADER.SAMPLER_TRAIN
    share = cfg.DATALOADER.OBJECT_IMAGE_SHARE
    if name == OBJECT_SHARE_SAMPLER:
        return object_share_repeat_factors(dataset_dicts, share)
    if name == CLASS_AWARE_OBJECT_SHARE_SAMPLER:
        return class_aware_object_share_repeat_factors(
            dataset_dicts, share, cfg.DATALOADER.REPEAT_THRESHOLD, cfg.DATALOADER.REPEAT_SQRT)
    return None


def build_object_share_sampler(cfg: CfgNode, dataset_dicts: List[Dict]) -> Optional[
        RepeatFactorTrainingSampler]:
    """The sampler for DATALOADER.SAMPLER_TRAIN "ObjectShareTrainingSampler" or
    "ClassAwareObjectShareTrainingSampler", else None (then detectron2 builds the one it
    names)."""
    factors = object_share_factors_from_config(cfg, dataset_dicts)
    if factors is None:
        return None
    _log_factors(cfg.DATALOADER.SAMPLER_TRAIN, dataset_dicts, factors,
                 cfg.DATALOADER.OBJECT_IMAGE_SHARE)
    return RepeatFactorTrainingSampler(factors, seed=cfg.SEED if cfg.SEED >= 0 else None)
