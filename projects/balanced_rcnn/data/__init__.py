"""
Training data for imbalanced sets: the object-share samplers (samplers.py), simple copy-paste onto
empty images (copy_paste.py) and the training loader that uses them (loader.py).
"""
from .copy_paste import CopyPasteDatasetMapper
from .loader import build_train_loader, build_train_mapper
from .samplers import (
    CLASS_AWARE_OBJECT_SHARE_SAMPLER,
    OBJECT_SHARE_SAMPLER,
    build_object_share_sampler,
    holds_objects,
)

__all__ = [
    "CLASS_AWARE_OBJECT_SHARE_SAMPLER",
    "OBJECT_SHARE_SAMPLER",
    "CopyPasteDatasetMapper",
    "build_object_share_sampler",
    "build_train_loader",
    "build_train_mapper",
    "holds_objects",
]
