"""Dataset registration: the lazy, cached, lock-protected synthetic datasets and users' COCO data
from the config, with one test per bad input asserting the exact message."""
import json
import multiprocessing
import re
from pathlib import Path

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
import torch
from balanced_rcnn import add_balanced_rcnn_config, register_datasets_from_config
from balanced_rcnn.data import (
    BUILTIN_SYNTHETIC,
    SyntheticShapesParams,
    builtin,
    prepare_synthetic_shapes,
    register_builtin_synthetic,
    register_synthetic_shapes,
)
from balanced_rcnn.data.cache import build_cached, read_manifest
from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from detectron2.structures import Boxes, BoxMode, Instances

TINY = SyntheticShapesParams(num_images=4, image_size=(32, 32), object_size=(6, 12), seed=1)


@pytest.fixture
def catalog_names():
    """Names a test registers; removed afterwards so tests stay independent."""
    names = []
    yield names
    for name in names:
        if name in DatasetCatalog:
            DatasetCatalog.remove(name)
        if name in MetadataCatalog:
            MetadataCatalog.remove(name)


@pytest.fixture
def synthetic_root(tmp_path: Path):
    """Point the built-in synthetic datasets at a temporary folder, then back at the default."""
    register_builtin_synthetic(tmp_path)
    yield tmp_path
    register_builtin_synthetic()


def _cfg(**datasets) -> "CfgNode":
    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.DATASETS.TRAIN = ("synthetic_shapes_tiny_train",)
    cfg.DATASETS.TEST = ("synthetic_shapes_tiny_val",)
    for key, value in datasets.items():
        cfg.DATASETS[key] = value
    return cfg


# ---------------------------------------------------------------- cache and lazy generation


def test_builtin_names_and_settings():
    three_class = {
        "synthetic_shapes_train", "synthetic_shapes_val",
        "synthetic_shapes_rare_train", "synthetic_shapes_rare_val",
        "synthetic_shapes_tiny_train", "synthetic_shapes_tiny_val"}
    many = {"synthetic_shapes_many_train", "synthetic_shapes_many_val",
            "synthetic_shapes_tiny_many_train", "synthetic_shapes_tiny_many_val"}
    novel = {"synthetic_shapes_novel_train", "synthetic_shapes_novel_val",
             "synthetic_shapes_tiny_novel_train", "synthetic_shapes_tiny_novel_val"}
    assert set(BUILTIN_SYNTHETIC) == three_class | many | novel
    mild, rare = BUILTIN_SYNTHETIC["synthetic_shapes_train"], BUILTIN_SYNTHETIC[
        "synthetic_shapes_rare_train"]
    assert (mild.image_size, mild.object_size, mild.empty_fraction) == ((192, 192), (12, 60), 0.1)
    assert (rare.object_size, rare.empty_fraction) == ((8, 20), 0.8)
    assert rare.class_frequencies == (0.7, 0.2, 0.1)
    # One class list for the 3-class sets, so configs switch between them by DATASETS alone.
    assert {BUILTIN_SYNTHETIC[n].class_names() for n in three_class} == {
        ("circle", "square", "triangle")}
    # 20 colour-coded classes, Zipf frequencies: the most frequent is 20x the rarest.
    many_train = BUILTIN_SYNTHETIC["synthetic_shapes_many_train"]
    assert len(many_train.class_names()) == 20 and many_train.class_names()[0] == "red_circle"
    freqs = many_train.frequencies()
    assert freqs[0] / freqs[-1] == pytest.approx(20.0)
    assert many_train.empty_fraction == 0.85
    novel_train = BUILTIN_SYNTHETIC["synthetic_shapes_novel_train"]
    assert novel_train.class_names() == ("star", "hexagon") and novel_train.empty_fraction == 0.95
    assert not set(novel_train.classes) & set(mild.classes)  # classes the mild data lacks
    for name in many | novel:  # the tiny twins have the classes of their full-size sets
        full = BUILTIN_SYNTHETIC[name.replace("tiny_", "")]
        assert BUILTIN_SYNTHETIC[name].class_names() == full.class_names()
    # Train and val of a setting never share images.
    assert len({p.seed for p in BUILTIN_SYNTHETIC.values()}) == len(BUILTIN_SYNTHETIC)


def test_registration_is_lazy_then_generates_once_and_regenerates_on_change(
        tmp_path: Path, catalog_names, monkeypatch):
    built = []
    real_generate = builtin.generate_synthetic_shapes
    monkeypatch.setattr(builtin, "generate_synthetic_shapes",
                        lambda p, out: built.append(p) or real_generate(p, out))
    catalog_names.append("test_lazy_shapes")
    register_synthetic_shapes("test_lazy_shapes", TINY, tmp_path)
    register_synthetic_shapes("test_lazy_shapes", TINY, tmp_path)  # idempotent
    folder = tmp_path / "test_lazy_shapes"
    assert not folder.exists()  # registering generates nothing
    meta = MetadataCatalog.get("test_lazy_shapes")
    assert meta.json_file == str(folder / "annotations.json")
    assert meta.image_root == str(folder / "images")
    assert meta.evaluator_type == "coco"
    assert meta.thing_classes == ["circle", "square", "triangle"]
    assert meta.thing_dataset_id_to_contiguous_id == {1: 0, 2: 1, 3: 2}

    dicts = DatasetCatalog.get("test_lazy_shapes")
    assert len(dicts) == 4 and built == [TINY]
    assert read_manifest(folder)["fingerprint"] == TINY.fingerprint()
    assert all(Path(d["file_name"]).is_file() for d in dicts)
    assert {a["category_id"] for d in dicts for a in d["annotations"]} <= {0, 1, 2}
    first_json = (folder / "annotations.json").read_bytes()
    DatasetCatalog.get("test_lazy_shapes")
    assert built == [TINY]  # cached

    changed = SyntheticShapesParams(num_images=5, image_size=(32, 32), object_size=(6, 12))
    register_synthetic_shapes("test_lazy_shapes", changed, tmp_path)
    assert len(DatasetCatalog.get("test_lazy_shapes")) == 5 and built == [TINY, changed]
    assert read_manifest(folder)["fingerprint"] == changed.fingerprint()
    assert (folder / "annotations.json").read_bytes() != first_json
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_synthetic_name_taken_by_other_code_is_not_replaced(tmp_path: Path):
    with pytest.raises(ValueError, match=re.escape(
            "Dataset name 'coco_2017_val' is already registered by other code; choose another "
            "name for the synthetic dataset")):
        register_synthetic_shapes("coco_2017_val", TINY, tmp_path)


def test_failed_build_leaves_nothing_and_debris_is_cleaned(tmp_path: Path):
    target = tmp_path / "ds"
    (tmp_path / ".ds.tmp-killed").mkdir()  # what a builder killed mid-way leaves behind

    def broken(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        build_cached(target, "f1", broken)
    assert not target.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ds.lock"]
    build_cached(target, "f1", lambda folder: (folder / "ok.txt").write_text("y"))
    assert (target / "ok.txt").read_text() == "y"
    assert read_manifest(target) == {"fingerprint": "f1"}
    assert oct((target).stat().st_mode & 0o777) == "0o755"


def _prepare_in_child(folder: str, log: str) -> None:
    def slow_generate(params, out):
        with open(log, "a") as f:
            f.write("built\n")
        import time
        time.sleep(0.5)  # both children are inside prepare at the same time
        return real_generate(params, out)

    real_generate = builtin.generate_synthetic_shapes
    builtin.generate_synthetic_shapes = slow_generate
    prepare_synthetic_shapes(TINY, Path(folder))
    assert len(json.loads((Path(folder) / "annotations.json").read_text())["images"]) == 4


def test_two_processes_asking_at_once_generate_once(tmp_path: Path):
    folder, log = tmp_path / "shared", tmp_path / "log.txt"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_prepare_in_child, args=(str(folder), str(log)))
             for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert log.read_text() == "built\n"
    assert read_manifest(folder)["fingerprint"] == TINY.fingerprint()


def test_builtin_val_is_evaluated_by_coco_evaluator(synthetic_root):
    """Ground truth fed back as predictions scores AP 100: metadata, ids and masks agree."""
    name = "synthetic_shapes_tiny_val"
    register_datasets_from_config(_cfg(SYNTHETIC_ROOT=str(synthetic_root)))
    dicts = DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).json_file.startswith(str(synthetic_root))
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False,
                              use_fast_impl=False)
    evaluator.reset()
    for d in dicts:
        h, w = d["height"], d["width"]
        inst = Instances((h, w))
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)
                 for a in d["annotations"]]
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor([a["category_id"] for a in d["annotations"]],
                                         dtype=torch.int64)
        masks = [mask_util.decode(mask_util.merge(mask_util.frPyObjects(a["segmentation"], h, w)))
                 for a in d["annotations"]]
        inst.pred_masks = torch.from_numpy(np.array(masks, dtype=bool).reshape(-1, h, w))
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)


# ---------------------------------------------------------------- users' COCO datasets


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


def test_user_coco_from_command_line_opts(tmp_path: Path, catalog_names):
    json_file = _write_coco(tmp_path)
    catalog_names.append("mine_train")
    cfg = _cfg()
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


def test_user_coco_reregistered_with_new_paths(tmp_path: Path, catalog_names):
    catalog_names.append("mine")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # The second json names its categories 3 and 7 "x" and "y".
    first, second = _write_coco(tmp_path / "a"), _write_coco(
        tmp_path / "b", categories=[{"id": 3, "name": "x"}, {"id": 7, "name": "y"}])
    for json_file in (first, second):
        register_datasets_from_config(_cfg(
            REGISTER_COCO=[["mine", str(json_file), str(json_file.parent / "imgs")]]))
    assert MetadataCatalog.get("mine").thing_classes == ["x", "y"]
    assert MetadataCatalog.get("mine").json_file == str(second)


def _register_error(tmp_path: Path, entry, **cfg_datasets) -> str:
    cfg = _cfg(REGISTER_COCO=[entry], **cfg_datasets)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        register_datasets_from_config(cfg)
    return str(info.value)


def test_missing_json_file(tmp_path: Path):
    (tmp_path / "imgs").mkdir()
    msg = _register_error(tmp_path, ["bad_a", "nope.json", str(tmp_path / "imgs")])
    assert msg == (f"DATASETS.REGISTER_COCO[0]: json_file '{Path.cwd() / 'nope.json'}' of "
                   "dataset 'bad_a' does not exist")


def test_missing_image_folder(tmp_path: Path):
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
def test_json_that_is_not_coco_instances(tmp_path: Path, content: str, message: str):
    (tmp_path / "imgs").mkdir()
    json_file = tmp_path / "bad.json"
    json_file.write_text(content)
    msg = _register_error(tmp_path, ["bad_c", str(json_file), str(tmp_path / "imgs")])
    assert msg == message.replace("{json}", str(json_file))


def test_malformed_and_duplicate_entries(tmp_path: Path, catalog_names):
    msg = _register_error(tmp_path, ["only_two", "a.json"])
    assert msg == ("DATASETS.REGISTER_COCO[0] must be [name, json_file, image_root] (three "
                   "non-empty strings), got ['only_two', 'a.json']")
    json_file = _write_coco(tmp_path)
    entry = ["dup", str(json_file), str(tmp_path / "imgs")]
    catalog_names.append("dup")
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(_cfg(REGISTER_COCO=[entry, entry]))
    assert str(info.value) == ("DATASETS.REGISTER_COCO[1]: dataset name 'dup' is already used "
                               "by DATASETS.REGISTER_COCO[0]")
    msg = _register_error(tmp_path, ["synthetic_shapes_val", str(json_file), str(tmp_path)])
    assert msg == ("DATASETS.REGISTER_COCO[0]: dataset name 'synthetic_shapes_val' is already "
                   "registered (a built-in synthetic dataset); choose another name")


def test_num_classes_mismatch_for_user_dataset(tmp_path: Path, catalog_names):
    json_file = _write_coco(tmp_path)
    catalog_names.append("mine_val")
    msg = _register_error(tmp_path, ["mine_val", str(json_file), str(tmp_path / "imgs")],
                          TEST=("mine_val",))
    assert msg == ("Dataset 'mine_val' (in DATASETS.TEST) has 2 categories (dog, cat) but "
                   "MODEL.ROI_HEADS.NUM_CLASSES is 3; set MODEL.ROI_HEADS.NUM_CLASSES 2")


def test_num_classes_mismatch_for_synthetic_dataset():
    cfg = _cfg()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(cfg)
    assert str(info.value) == (
        "Dataset 'synthetic_shapes_tiny_train' (in DATASETS.TRAIN) has 3 categories (circle, "
        "square, triangle) but MODEL.ROI_HEADS.NUM_CLASSES is 80; set "
        "MODEL.ROI_HEADS.NUM_CLASSES 3")


def test_unknown_dataset_name_lists_close_matches():
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(_cfg(TEST=("synthetic_shapes_rare_vall",)))
    assert str(info.value).startswith(
        "DATASETS.TEST: unknown dataset 'synthetic_shapes_rare_vall'. Did you mean: "
        "synthetic_shapes_rare_val, ")
    assert "This project's datasets: synthetic_shapes_many_train, synthetic_shapes_many_val, " \
           "synthetic_shapes_novel_train" in str(info.value)
    with pytest.raises(ValueError) as info:
        register_datasets_from_config(_cfg(TRAIN=("zzz",)))
    assert str(info.value).startswith("DATASETS.TRAIN: unknown dataset 'zzz'. This project's "
                                      "datasets: synthetic_shapes_many_train")
