"""Users' COCO datasets registered from the config (DATASETS.REGISTER_COCO) and the checks of
DATASETS.TRAIN/TEST against the registry: class names and ids from the json, idempotent or
replaced, and one test per bad input asserting the exact message."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from training_harness import register_datasets_from_config

from coco_builders import forgetting_datasets, tiny_synthetic_cfg


@pytest.fixture
def catalog_names():
    """Names a test registers; removed afterwards."""
    with forgetting_datasets() as names:
        yield names


def _write_coco(root: Path, **overrides) -> Path:
    """A two-image COCO json with non-contiguous category ids (7, 3) and its image folder."""
    (root / "imgs").mkdir(exist_ok=True)
    for i in (1, 2):
        cv2.imwrite(str(root / "imgs" / f"{i}.png"), np.full((20, 30, 3), 40 * i, np.uint8))
    coco = {
        "images": [{"id": i, "file_name": f"{i}.png", "height": 20, "width": 30} for i in (1, 2)],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 8], "area": 80,
             "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 12, 11, 2, 11]]},
            {"id": 2, "image_id": 2, "category_id": 3, "bbox": [5, 5, 6, 6], "area": 36,
             "iscrowd": 0, "segmentation": [[5, 5, 11, 5, 11, 11, 5, 11]]},
        ],
        "categories": [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}],
    }
    coco.update(overrides)
    coco = {k: v for k, v in coco.items() if v is not None}
    path = root / "mine.json"
    path.write_text(json.dumps(coco))
    return path


def test_user_coco_from_command_line_takes_classes_from_the_json_in_id_order(tmp_path: Path,
                                                                             catalog_names):
    json_file = _write_coco(tmp_path)
    catalog_names.append("mine_train")
    cfg = tiny_synthetic_cfg()
    cfg.merge_from_list([
        "DATASETS.REGISTER_COCO", f"[['mine_train', '{json_file}', '{tmp_path / 'imgs'}']]",
        "DATASETS.TRAIN", "('mine_train',)", "DATASETS.TEST", "()",
        "MODEL.ROI_HEADS.NUM_CLASSES", "2"])
    register_datasets_from_config(cfg)
    register_datasets_from_config(cfg)  # idempotent: setup() runs in every process
    meta = MetadataCatalog.get("mine_train")
    assert meta.thing_classes == ["dog", "cat"]  # sorted by category id, names from the json
    assert meta.thing_dataset_id_to_contiguous_id == {3: 0, 7: 1}
    assert meta.evaluator_type == "coco" and meta.json_file == str(json_file)
    dicts = DatasetCatalog.get("mine_train")
    assert [[a["category_id"] for a in d["annotations"]] for d in dicts] == [[1], [0]]
    assert dicts[0]["file_name"] == str(tmp_path / "imgs" / "1.png")


def test_user_coco_registered_again_with_new_paths_replaces_the_old(tmp_path: Path, catalog_names):
    catalog_names.append("mine")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # The second json names its categories 3 and 7 "x" and "y".
    first, second = _write_coco(tmp_path / "a"), _write_coco(
        tmp_path / "b", categories=[{"id": 3, "name": "x"}, {"id": 7, "name": "y"}])
    for json_file in (first, second):
        register_datasets_from_config(tiny_synthetic_cfg(
            REGISTER_COCO=[["mine", str(json_file), str(json_file.parent / "imgs")]]))
    assert MetadataCatalog.get("mine").thing_classes == ["x", "y"]
    assert MetadataCatalog.get("mine").json_file == str(second)


def _register_error(tmp_path: Path, entry, **cfg_datasets) -> str:
    cfg = tiny_synthetic_cfg(REGISTER_COCO=[entry], **cfg_datasets)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        register_datasets_from_config(cfg)
    return str(info.value)


def test_missing_json_file_is_named_with_its_key(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    msg = _register_error(tmp_path, ["bad_a", "nope.json", str(tmp_path / "imgs")])
    assert msg == (f"DATASETS.REGISTER_COCO[0]: json_file '{Path.cwd() / 'nope.json'}' of "
                   "dataset 'bad_a' does not exist")


def test_missing_image_folder_is_named_with_its_key(tmp_path: Path):
    json_file = _write_coco(tmp_path)
    msg = _register_error(tmp_path, ["bad_b", str(json_file), str(tmp_path / "missing")])
    assert msg == (f"DATASETS.REGISTER_COCO[0]: image_root '{tmp_path / 'missing'}' of dataset "
                   "'bad_b' does not exist or is not a folder")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "'{json}' is not valid JSON: Expecting property name enclosed in double "
                      "quotes: line 1 column 2 (char 1)"),
        ("[1, 2]", "'{json}' is not a COCO instances json: its top level is a list, not an "
                   "object with images, annotations, categories"),
        ('{"images": [], "info": {}}',
         "'{json}' is not a COCO instances json: it has no 'annotations' and no 'categories' "
         "(its top-level keys: 'images', 'info')"),
        ('{"images": [], "annotations": {}, "categories": []}',
         "'{json}' is not a COCO instances json: 'annotations' is a dict, not a list"),
        ('{"images": [], "annotations": [], "categories": []}',
         "'{json}' has no categories: its 'categories' list is empty"),
        ('{"images": [], "annotations": [], "categories": [{"id": 1}]}',
         "'{json}': categories[0] needs an 'id' and a 'name', got {'id': 1}"),
        ('{"images": [], "annotations": [], "categories": '
         '[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}',
         "'{json}': category ids [1] appear more than once"),
    ],
)
def test_json_that_is_not_coco_instances_is_refused_saying_why(tmp_path: Path, content: str,
                                                               message: str):
    (tmp_path / "imgs").mkdir()
    json_file = tmp_path / "bad.json"
    json_file.write_text(content)
    msg = _register_error(tmp_path, ["bad_c", str(json_file), str(tmp_path / "imgs")])
    assert msg == message.replace("{json}", str(json_file))


def test_malformed_duplicate_or_builtin_named_entries_are_refused(tmp_path: Path, catalog_names):
    msg = _register_error(tmp_path, ["only_two", "a.json"])
    assert msg == ("DATASETS.REGISTER_COCO[0] must be [name, json_file, image_root] (three "
                   "non-empty strings), got ['only_two', 'a.json']")
    json_file = _write_coco(tmp_path)
    entry = ["dup", str(json_file), str(tmp_path / "imgs")]
    catalog_names.append("dup")
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(tiny_synthetic_cfg(REGISTER_COCO=[entry, entry]))
    assert str(info.value) == ("DATASETS.REGISTER_COCO[1]: dataset name 'dup' is already used "
                               "by DATASETS.REGISTER_COCO[0]")
    msg = _register_error(tmp_path, ["synthetic_shapes_val", str(json_file), str(tmp_path)])
    assert msg == ("DATASETS.REGISTER_COCO[0]: dataset name 'synthetic_shapes_val' is already "
                   "registered (a built-in synthetic dataset); choose another name")


def test_num_classes_mismatch_for_user_dataset_names_the_fix(tmp_path: Path, catalog_names):
    json_file = _write_coco(tmp_path)
    catalog_names.append("mine_val")
    msg = _register_error(tmp_path, ["mine_val", str(json_file), str(tmp_path / "imgs")],
                          TEST=("mine_val",))
    assert msg == ("Dataset 'mine_val' (in DATASETS.TEST) has 2 categories (dog, cat) but "
                   "MODEL.ROI_HEADS.NUM_CLASSES is 3; set MODEL.ROI_HEADS.NUM_CLASSES 2")


def test_num_classes_mismatch_for_synthetic_dataset_names_the_fix():
    cfg = tiny_synthetic_cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(cfg)
    assert str(info.value) == (
        "Dataset 'synthetic_shapes_tiny_train' (in DATASETS.TRAIN) has 3 categories (circle, "
        "square, triangle) but MODEL.ROI_HEADS.NUM_CLASSES is 80; set "
        "MODEL.ROI_HEADS.NUM_CLASSES 3")


def test_unknown_dataset_name_lists_close_matches():
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(tiny_synthetic_cfg(TEST=("synthetic_shapes_rare_vall",)))
    assert str(info.value).startswith(
        "DATASETS.TEST: unknown dataset 'synthetic_shapes_rare_vall'. Did you mean: "
        "synthetic_shapes_rare_val, ")
    assert "This project's datasets: synthetic_shapes_many_train, synthetic_shapes_many_val, " \
           "synthetic_shapes_novel_train" in str(info.value)
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(tiny_synthetic_cfg(TRAIN=("zzz",)))
    assert str(info.value).startswith("DATASETS.TRAIN: unknown dataset 'zzz'. This project's "
                                      "datasets: synthetic_shapes_many_train")
