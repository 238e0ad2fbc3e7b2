"""
Dataset registration driven by the config, with the checks that are cheap to do up front.

``register_datasets_from_config(cfg)`` registers the built-in synthetic datasets and the users'
COCO datasets of DATASETS.REGISTER_COCO, then checks that every name in DATASETS.TRAIN/TEST is
registered and has as many classes as the model predicts. Each error names the culprit: the path,
the config key, the dataset, the numbers. The images and annotations of each COCO json are checked
too (data/checks.py). It is idempotent, so setup() may call it in every process.
"""
import difflib
import functools
import json
import logging
from pathlib import Path
from typing import AbstractSet, Any, Dict, List, Optional, Sequence

import orjson
from balanced_rcnn.data.class_counts import set_class_image_count_metadata
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .box_records import box_records
from .builtin import BUILTIN_SYNTHETIC, register_builtin_synthetic
from .catalog import DatasetRegistry, coco_metadata
from .checks import FIELD_RULES, ID_TYPES, check_coco_annotations

__all__ = [
    "read_coco_categories",
    "read_coco_json",
    "register_coco_dataset",
    "register_datasets_from_config",
]

logger = logging.getLogger(__name__)

_COCO_KEYS = ("images", "annotations", "categories")
# name -> the arguments of register_coco_dataset that its checks depend on (json_file,
# image_root, bad-annotation policy, mask format, training, evaluated) of every COCO dataset
# registered here, and the number of annotations it trains on.
_REGISTERED = DatasetRegistry()
_NUM_ANNOTATIONS: Dict[str, int] = {}
_NUM_OBJECTS: Dict[str, int] = {}  # the non-crowd annotations, which are trained on
_NUM_IMAGES: Dict[str, int] = {}


def _parse_json(json_file: str) -> Any:
    try:
        return orjson.loads(Path(json_file).read_bytes())
    except orjson.JSONDecodeError:
        # What orjson refuses and json reads (NaN, infinities, integers past 64 bits, lone
        # surrogates) is left to the checks that name the annotation; json's message names what
        # neither reads.
        with open(json_file) as f:
            return json.load(f)


def read_coco_json(json_file: str) -> Dict[str, Any]:
    """A COCO instances json, after checking its structure and its categories."""
    try:
        data = _parse_json(json_file)
    except json.JSONDecodeError as e:
        raise ValueError(f"'{json_file}' is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"'{json_file}' is not a COCO instances json: its top level is a "
                         f"{type(data).__name__}, not an object with {', '.join(_COCO_KEYS)}")
    missing = [k for k in _COCO_KEYS if k not in data]
    if missing:
        raise ValueError(
            f"'{json_file}' is not a COCO instances json: it has no "
            f"{' and no '.join(repr(k) for k in missing)} (its top-level keys: "
            f"{', '.join(repr(k) for k in data) or 'none'})")
    for key in _COCO_KEYS:
        if not isinstance(data[key], list):
            raise ValueError(f"'{json_file}' is not a COCO instances json: '{key}' is a "
                             f"{type(data[key]).__name__}, not a list")
    categories = data["categories"]
    if not categories:
        raise ValueError(f"'{json_file}' has no categories: its 'categories' list is empty")
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or "id" not in cat or "name" not in cat:
            raise ValueError(f"'{json_file}': categories[{i}] needs an 'id' and a 'name', "
                             f"got {cat!r}")
        if type(cat["id"]) not in ID_TYPES:
            raise ValueError(f"'{json_file}': categories[{i}]: id must be {FIELD_RULES['id']}, "
                             f"got {cat['id']!r}")
        if type(cat["name"]) is not str or not cat["name"]:
            raise ValueError(f"'{json_file}': categories[{i}] (id {cat['id']!r}): name must be a "
                             f"non-empty string (the class name in every result), got "
                             f"{cat['name']!r}")
    if len({type(c["id"]) for c in categories}) > 1:
        raise ValueError(f"'{json_file}': category ids mix ints and strings; detectron2 sorts "
                         "them, which needs one type")
    ids = [c["id"] for c in categories]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"'{json_file}': category ids {duplicates} appear more than once")
    by_name: Dict[Any, List[Any]] = {}
    for cat in categories:
        by_name.setdefault(cat["name"], []).append(cat["id"])
    shared = {name: ids for name, ids in by_name.items() if len(ids) > 1}
    if shared:
        listed = "; ".join(f"{name!r}: ids {', '.join(map(str, ids))}"
                           for name, ids in shared.items())
        raise ValueError(f"'{json_file}': categories share a name ({listed}); their per-class AP "
                         "would overwrite each other in metrics.json. Give each its own name, or "
                         "merge them into one category")
    return data


def read_coco_categories(json_file: str) -> List[Dict]:
    """The categories of a COCO instances json, sorted by id, after checking its structure."""
    return sorted(read_coco_json(json_file)["categories"], key=lambda c: c["id"])


def _load_coco(json_file: str, image_root: str, name: str, dropped: AbstractSet[Any]
               ) -> List[Dict]:
    if not dropped:
        return load_coco_json(json_file, image_root, name)
    # The annotation ids are kept so that those RELIABILITY.BAD_ANNOTATIONS skip drops are known.
    dicts = load_coco_json(json_file, image_root, name, extra_annotation_keys=["id"])
    for d in dicts:
        d["annotations"] = [a for a in d["annotations"] if a.get("id") not in dropped]
    return dicts


def register_coco_dataset(name: str, json_file: str, image_root: str,
                          key: str = "register_coco_dataset", bad_annotations: str = "error",
                          mask_format: Optional[str] = None, training: bool = True,
                          evaluated: bool = False,
                          keep_records: Optional[Dict[str, List[Dict]]] = None) -> None:
    """
    Register a COCO instances dataset whose class names come from its json, after checking the
    files, images and annotations. ``key`` names where the entry came from (a config key) in
    error messages; ``bad_annotations`` is RELIABILITY.BAD_ANNOTATIONS, ``mask_format``
    INPUT.MASK_FORMAT with MODEL.MASK_ON, else None, ``training`` and ``evaluated`` whether it
    is trained on and evaluated (data/checks.py). Idempotent for the same arguments; a name
    registered by other code is never replaced. ``keep_records``, when a dict, receives the
    dataset's :func:`box_records` under its name when this call parses the json.
    """
    json_file, image_root = str(Path(json_file).resolve()), str(Path(image_root).resolve())
    checked_as = (json_file, image_root, bad_annotations, mask_format, training, evaluated)
    builtin = " (a built-in synthetic dataset)" if name in BUILTIN_SYNTHETIC else ""
    taken = f"{key}: dataset name '{name}' is already registered{builtin}; choose another name"
    if _REGISTERED.holds(name, checked_as, refusal=taken):
        return
    if not Path(json_file).is_file():
        raise FileNotFoundError(f"{key}: json_file '{json_file}' of dataset '{name}' "
                                "does not exist")
    if not Path(image_root).is_dir():
        raise FileNotFoundError(f"{key}: image_root '{image_root}' of dataset '{name}' "
                                "does not exist or is not a folder")
    coco = read_coco_json(json_file)
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    dropped = frozenset(check_coco_annotations(coco, json_file, bad_annotations, mask_format,
                                               training, evaluated))
    _NUM_ANNOTATIONS[name] = len(coco["annotations"]) - len(dropped)
    _NUM_IMAGES[name] = len(coco["images"])
    _NUM_OBJECTS[name] = sum(1 for a in coco["annotations"]
                             if not a.get("iscrowd", 0) and a.get("id") not in dropped)
    if keep_records is not None:
        keep_records[name] = box_records(coco, dropped)
    del coco  # the loader parses the json again when the dataset is used
    _REGISTERED.register(
        name,
        functools.partial(_load_coco, json_file, image_root, name, dropped),
        # Classes sorted by id, ids -> 0..K-1, as load_coco_json derives them.
        coco_metadata(json_file, image_root, [(c["id"], c["name"]) for c in categories]),
        definition=checked_as,
    )
    logger.info(f"Registered COCO dataset '{name}': {len(categories)} classes from {json_file}")


def _check_names(names: Sequence[str], key: str) -> None:
    available = DatasetCatalog.list()
    for name in names:
        if name in available:
            continue
        close = difflib.get_close_matches(name, available, n=5, cutoff=0.6)
        ours = sorted(n for n in set(BUILTIN_SYNTHETIC) | set(_REGISTERED) if n in available)
        hint = f"Did you mean: {', '.join(close)}? " if close else ""
        raise ValueError(
            f"{key}: unknown dataset '{name}'. {hint}This project's datasets: {', '.join(ours)} "
            "(plus detectron2's built-in ones, e.g. coco_2017_train); register your own with "
            "DATASETS.REGISTER_COCO")


def _check_num_classes(cfg: CfgNode, names: Sequence[str], key: str) -> None:
    if cfg.MODEL.META_ARCHITECTURE == "RetinaNet":
        num_key, expected = "MODEL.RETINANET.NUM_CLASSES", cfg.MODEL.RETINANET.NUM_CLASSES
    else:
        num_key, expected = "MODEL.ROI_HEADS.NUM_CLASSES", cfg.MODEL.ROI_HEADS.NUM_CLASSES
    for name in names:
        classes = MetadataCatalog.get(name).get("thing_classes")
        if classes is not None and len(classes) != expected:
            shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
            raise ValueError(
                f"Dataset '{name}' (in {key}) has {len(classes)} categories ({shown}) but "
                f"{num_key} is {expected}; set {num_key} {len(classes)}")


def register_datasets_from_config(cfg: CfgNode,
                                  keep_records: Optional[Dict[str, List[Dict]]] = None) -> None:
    """Register the synthetic and the configured COCO datasets, then check DATASETS.TRAIN/TEST
    and HEALTH.DATASET against the registry and the model's class count. Raises on the first
    problem found. ``keep_records``: see :func:`register_coco_dataset`."""
    register_builtin_synthetic(cfg.DATASETS.SYNTHETIC_ROOT or None)
    seen: Dict[str, str] = {}
    for i, entry in enumerate(cfg.DATASETS.REGISTER_COCO):
        key = f"DATASETS.REGISTER_COCO[{i}]"
        if (not isinstance(entry, (list, tuple)) or len(entry) != 3
                or not all(isinstance(x, str) and x for x in entry)):
            raise ValueError(f"{key} must be [name, json_file, image_root] (three non-empty "
                             f"strings), got {entry!r}")
        name = entry[0]
        if name in seen:
            raise ValueError(f"{key}: dataset name '{name}' is already used by {seen[name]}")
        seen[name] = key
        register_coco_dataset(*entry, key=key,
                              bad_annotations=cfg.RELIABILITY.BAD_ANNOTATIONS,
                              mask_format=cfg.INPUT.MASK_FORMAT if cfg.MODEL.MASK_ON else None,
                              training=name in cfg.DATASETS.TRAIN,
                              evaluated=name in cfg.DATASETS.TEST, keep_records=keep_records)
    for name in cfg.DATASETS.TRAIN:
        if _NUM_ANNOTATIONS.get(name) == 0:
            logger.warning(
                f"DATASETS.TRAIN: dataset '{name}' ({_REGISTERED[name][0]}) has no annotation at "
                "all: the model can only learn to detect nothing. Check that the json is the "
                "one with your labels.")
        elif _NUM_OBJECTS.get(name) == 0:
            logger.warning(
                f"DATASETS.TRAIN: every annotation of dataset '{name}' ({_REGISTERED[name][0]}) "
                "is iscrowd, and crowd regions are not trained on: the model can only learn to "
                "detect nothing. Set iscrowd 0 on the objects to learn.")
    for key, names in (("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST",
                                                                 cfg.DATASETS.TEST)):
        for name in names:
            if _NUM_IMAGES.get(name) == 0:
                raise ValueError(f"{key}: dataset '{name}' ({_REGISTERED[name][0]}) has no "
                                 "images: there is nothing to "
                                 + ("train on" if key == "DATASETS.TRAIN" else "evaluate"))
    splits = [("DATASETS.TRAIN", cfg.DATASETS.TRAIN), ("DATASETS.TEST", cfg.DATASETS.TEST),
              ("HEALTH.DATASET", [cfg.HEALTH.DATASET] if cfg.HEALTH.DATASET else [])]
    for key, names in splits:
        _check_names(names, key)
        _check_num_classes(cfg, names, key)
    if cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS:
        set_class_image_count_metadata(cfg.DATASETS.TRAIN)
