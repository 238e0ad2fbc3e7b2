"""
The built-in synthetic datasets and their lazy registration.

Registering only records names and metadata (cheap, no file is touched); the first
``DatasetCatalog.get(name)`` generates the images into ``<root>/<name>/`` (see data/cache.py),
where root is $BALANCED_RCNN_DATASETS or ``datasets/`` at the repository root. Later calls, in any
process, reuse that folder until the parameters or the generator version change.
"""
import functools
import logging
import os
import time
from pathlib import Path
from typing import Dict, List, Optional

from detectron2.data.datasets import load_coco_json

from .cache import build_cached
from .catalog import DatasetRegistry, coco_metadata
from .synthetic import GENERATOR_VERSION, SyntheticShapesParams, generate_synthetic_shapes

__all__ = [
    "BUILTIN_SYNTHETIC",
    "default_dataset_root",
    "prepare_synthetic_shapes",
    "register_builtin_synthetic",
    "register_synthetic_shapes",
]

logger = logging.getLogger(__name__)

_MILD = dict(image_size=(192, 192), objects_per_image=(1, 3), object_size=(12, 60),
             empty_fraction=0.1)
# The imbalanced setting: most images are pure background, objects are small, classes long-tail.
_RARE = dict(image_size=(128, 128), objects_per_image=(1, 3), object_size=(8, 20),
             empty_fraction=0.8, class_frequencies=(0.7, 0.2, 0.1))

# Long tail over many classes (the quality A/B's "many" setting): 5 shapes x 4 colours = 20
# classes with Zipf frequencies 1/k (the most frequent is 20x the rarest), 85% empty images.
_MANY = dict(image_size=(128, 128), objects_per_image=(1, 3), object_size=(8, 20),
             classes=("circle", "square", "triangle", "star", "hexagon"),
             colors=("red", "green", "blue", "yellow"),
             class_frequencies=tuple(1.0 / k for k in range(1, 21)))
# Classes that the 3-class datasets do not have, for fine-tuning a detector trained on them (the
# quality A/B's "finetune" setting): 95% empty images, small objects, frequencies 0.8 / 0.2.
_NOVEL = dict(image_size=(128, 128), objects_per_image=(1, 3), object_size=(8, 20),
              classes=("star", "hexagon"), class_frequencies=(0.8, 0.2))


def _tiny(setting: Dict, num_images: int, seed: int) -> SyntheticShapesParams:
    """``setting``'s classes on the tiny datasets' 64-px images (generated in well under 1 s)."""
    tiny = dict(image_size=(64, 64), object_size=(8, 24), empty_fraction=0.25)
    return SyntheticShapesParams(num_images=num_images, seed=seed, **{**setting, **tiny})


# mild, rare and tiny share the classes circle/square/triangle (NUM_CLASSES 3), so configs switch
# between them by changing DATASETS only; "many" has 20 classes, "novel" 2. Each split has its own
# seed: val images are never train images. The val splits of "many" and "novel" are half empty,
# so that their AP rests on a few hundred objects.
BUILTIN_SYNTHETIC: Dict[str, SyntheticShapesParams] = {
    # The CPU demo's data: sized so a tiny Swin trains to a real AP in a few minutes.
    "synthetic_shapes_train": SyntheticShapesParams(num_images=1000, seed=0, **_MILD),
    "synthetic_shapes_val": SyntheticShapesParams(num_images=200, seed=1, **_MILD),
    # 600 train images -> 480 empty, 120 with objects.
    "synthetic_shapes_rare_train": SyntheticShapesParams(num_images=600, seed=2, **_RARE),
    "synthetic_shapes_rare_val": SyntheticShapesParams(num_images=300, seed=3, **_RARE),
    # For tests and instant schedules: generated in well under a second.
    "synthetic_shapes_tiny_train": SyntheticShapesParams(
        num_images=16, image_size=(64, 64), object_size=(8, 24), empty_fraction=0.25, seed=4),
    "synthetic_shapes_tiny_val": SyntheticShapesParams(
        num_images=8, image_size=(64, 64), object_size=(8, 24), empty_fraction=0.25, seed=5),
    # Their classes at the tiny size, for tests.
    "synthetic_shapes_tiny_many_train": _tiny(_MANY, num_images=16, seed=10),
    "synthetic_shapes_tiny_many_val": _tiny(_MANY, num_images=8, seed=11),
    "synthetic_shapes_tiny_novel_train": _tiny(_NOVEL, num_images=16, seed=12),
    "synthetic_shapes_tiny_novel_val": _tiny(_NOVEL, num_images=8, seed=13),
    # 2000 train images -> 300 with objects.
    "synthetic_shapes_many_train": SyntheticShapesParams(
        num_images=2000, empty_fraction=0.85, seed=6, **_MANY),
    "synthetic_shapes_many_val": SyntheticShapesParams(
        num_images=400, empty_fraction=0.5, seed=7, **_MANY),
    # 2000 train images -> 100 with objects.
    "synthetic_shapes_novel_train": SyntheticShapesParams(
        num_images=2000, empty_fraction=0.95, seed=8, **_NOVEL),
    "synthetic_shapes_novel_val": SyntheticShapesParams(
        num_images=400, empty_fraction=0.5, seed=9, **_NOVEL),
}

# name -> (params, folder) of every dataset this module registered, for idempotent calls.
_REGISTERED = DatasetRegistry()


def default_dataset_root() -> Path:
    """$BALANCED_RCNN_DATASETS, else ``datasets/`` at the repository root (or the cwd when the
    package is installed outside a checkout)."""
    env = os.environ.get("BALANCED_RCNN_DATASETS")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[3]
    if (repo / "projects" / "balanced_rcnn").is_dir():
        return repo / "datasets"
    return Path.cwd() / "datasets"


def prepare_synthetic_shapes(params: SyntheticShapesParams, folder: Path) -> Path:
    """Generate the dataset into ``folder`` unless an identical one is there; return folder."""
    def build(tmp: Path) -> None:
        start = time.perf_counter()
        generate_synthetic_shapes(params, tmp)
        logger.info(f"Generated {params.num_images} synthetic images into {folder} in "
                    f"{time.perf_counter() - start:.1f} s")

    info = {"generator_version": GENERATOR_VERSION, "params": params.to_dict()}
    return build_cached(Path(folder), params.fingerprint(), build, info)


def _load(name: str, params: SyntheticShapesParams, folder: Path) -> List[Dict]:
    prepare_synthetic_shapes(params, folder)
    return load_coco_json(str(folder / "annotations.json"), str(folder / "images"), name)


def register_synthetic_shapes(name: str, params: SyntheticShapesParams,
                              root: Optional[Path] = None) -> None:
    """
    Register a synthetic dataset under ``name`` (generated on first use into ``root/name``).
    Calling it again with the same arguments does nothing; with other arguments it replaces
    this module's earlier registration. Names registered by other code are never replaced.
    """
    folder = Path(root if root is not None else default_dataset_root()) / name
    _REGISTERED.register_once(
        name,
        functools.partial(_load, name, params, folder),
        # Known without generating anything: class names and ids are fixed by the parameters.
        coco_metadata(str(folder / "annotations.json"), str(folder / "images"),
                      enumerate(params.class_names(), start=1)),
        definition=(params, folder),
        refusal=f"Dataset name '{name}' is already registered by other code; choose another "
                "name for the synthetic dataset",
    )


def register_builtin_synthetic(root: Optional[Path] = None) -> None:
    """Register every dataset of BUILTIN_SYNTHETIC (idempotent, generates nothing)."""
    for name, params in BUILTIN_SYNTHETIC.items():
        register_synthetic_shapes(name, params, root)
