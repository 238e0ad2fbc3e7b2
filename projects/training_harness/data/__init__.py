"""
Datasets: the deterministic synthetic shapes generator, its built-in registered variants,
registration of users' COCO datasets from the config, and the data loaders that check the
datasets up front and skip (training) or name (evaluation) the images they cannot use.

Importing this package registers the built-in synthetic datasets (names and metadata only; the
images are generated on first use).
"""
from ..errors import TooManySkippedImages
from .builtin import (
    BUILTIN_SYNTHETIC,
    default_dataset_root,
    prepare_synthetic_shapes,
    register_builtin_synthetic,
    register_synthetic_shapes,
)
from .loader import build_test_loader, build_train_loader
from .mapper import SkippingMapper
from .register import register_coco_dataset, register_datasets_from_config
from .synthetic import SyntheticShapesParams, generate_synthetic_shapes

register_builtin_synthetic()

__all__ = [
    "BUILTIN_SYNTHETIC",
    "SkippingMapper",
    "SyntheticShapesParams",
    "TooManySkippedImages",
    "build_test_loader",
    "build_train_loader",
    "default_dataset_root",
    "generate_synthetic_shapes",
    "prepare_synthetic_shapes",
    "register_builtin_synthetic",
    "register_coco_dataset",
    "register_datasets_from_config",
    "register_synthetic_shapes",
]
