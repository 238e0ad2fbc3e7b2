"""Small COCO instances datasets on disk for the data tests: SIZE x SIZE noisy PNGs with one
square object each, their json, and project configs that register and train on them or on the
tiny synthetic datasets, and the removal of the datasets a test registered."""

import contextlib
import json
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from conftest import harness_cfg

SIZE = 32  # height and width of the test images
CATEGORIES = [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}]


def annotation(ann_id: int, image_id: int, x: int = 4, category_id: int = 3) -> Dict:
    """A 12 x 12 square at (x, x), with its polygon."""
    s = 12
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "bbox": [x, x, s, s], "area": s * s,
            "segmentation": [[x, x, x + s, x, x + s, x + s, x, x + s]]}


def write_coco(root: Path, num_images: int = 4, annotations: Optional[List[Dict]] = None,
               images: Optional[List[Dict]] = None) -> Tuple[Path, Path]:
    """``num_images`` images 1.png, ... with a square each (or ``annotations``) and their json
    (or ``images`` as its 'images' list); returns (json file, image folder)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    entries = []
    for i in range(1, num_images + 1):
        cv2.imwrite(str(images_dir / f"{i}.png"), rng.integers(0, 255, (SIZE, SIZE, 3), np.uint8))
        entries.append({"id": i, "file_name": f"{i}.png", "height": SIZE, "width": SIZE})
    if annotations is None:
        annotations = [annotation(i, i) for i in range(1, num_images + 1)]
    coco = {"images": entries if images is None else images, "annotations": annotations,
            "categories": CATEGORIES}
    json_file = root / "instances.json"
    json_file.write_text(json.dumps(coco))
    return json_file, images_dir


def coco_cfg(name: str, json_file: Path, image_root: Path, base: Optional[CfgNode] = None
             ) -> CfgNode:
    """``base`` (default: detectron2's defaults and the project's keys) training on the json."""
    cfg = base if base is not None else harness_cfg()
    cfg.DATASETS.REGISTER_COCO = [[name, str(json_file), str(image_root)]]
    cfg.DATASETS.TRAIN = (name,)
    cfg.DATASETS.TEST = ()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2
    return cfg


def tiny_synthetic_cfg(**datasets) -> CfgNode:
    """The project's defaults training on synthetic_shapes_tiny_train and testing on
    synthetic_shapes_tiny_val (3 classes); ``datasets``: DATASETS keys to override."""
    cfg = harness_cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.DATASETS.TRAIN = ("synthetic_shapes_tiny_train",)
    cfg.DATASETS.TEST = ("synthetic_shapes_tiny_val",)
    for key, value in datasets.items():
        cfg.DATASETS[key] = value
    return cfg


@contextlib.contextmanager
def forgetting_datasets() -> Iterator[List[str]]:
    """``with forgetting_datasets() as names``: the datasets whose names a test appends to
    ``names`` are removed from detectron2's catalogs on the way out, so tests stay
    independent."""
    names: List[str] = []
    try:
        yield names
    finally:
        for name in names:
            if name in DatasetCatalog:
                DatasetCatalog.remove(name)
            if name in MetadataCatalog:
                MetadataCatalog.remove(name)


def ground_truth_as_predictions(record: Dict, with_masks: bool = False):
    """A dataset record's objects as a model's output Instances (score 1 each): what scores AP
    100 when fed back to an evaluator."""
    import pycocotools.mask as mask_util
    import torch
    from detectron2.structures import Boxes, BoxMode, Instances

    h, w = record["height"], record["width"]
    inst = Instances((h, w))
    boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
             for a in record["annotations"]]
    inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.scores = torch.ones(len(boxes))
    inst.pred_classes = torch.tensor([a["category_id"] for a in record["annotations"]],
                                     dtype=torch.int64)
    if with_masks:
        masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w)))
                 for a in record["annotations"]]
        inst.pred_masks = torch.from_numpy(np.array(masks, dtype=bool).reshape(-1, h, w))
    return inst
