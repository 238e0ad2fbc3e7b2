"""The built-in synthetic datasets and their registration: registered lazily, generated once
into a folder shared by every process (a file lock, an atomic rename), regenerated when the
parameters change, never over a name other code holds, and evaluated by detectron2's
COCOEvaluator."""
import json
import multiprocessing
import re
from pathlib import Path

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import COCOEvaluator
from training_harness import register_datasets_from_config
from training_harness.data import (
    BUILTIN_SYNTHETIC,
    SyntheticShapesParams,
    builtin,
    prepare_synthetic_shapes,
    register_builtin_synthetic,
    register_synthetic_shapes,
)
from training_harness.data.cache import build_cached, read_manifest

from coco_builders import (
    coco_cfg,
    forgetting_datasets,
    ground_truth_as_predictions,
    tiny_synthetic_cfg,
    write_coco,
)

TINY = SyntheticShapesParams(num_images=4, image_size=(32, 32), object_size=(6, 12), seed=1)


@pytest.fixture
def catalog_names():
    """Names a test registers; removed afterwards."""
    with forgetting_datasets() as names:
        yield names


@pytest.fixture
def synthetic_root(tmp_path: Path):
    """Point the built-in synthetic datasets at a temporary folder, then back at the default."""
    register_builtin_synthetic(tmp_path)
    yield tmp_path
    register_builtin_synthetic()


def test_builtin_datasets_have_the_documented_sizes_classes_and_distinct_seeds():
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


def test_a_users_coco_name_is_not_taken_by_a_synthetic_dataset(tmp_path: Path, catalog_names):
    json_file, image_root = write_coco(tmp_path)
    catalog_names.append("mine_coco")
    register_datasets_from_config(coco_cfg("mine_coco", json_file, image_root))
    with pytest.raises(ValueError, match=re.escape(
            "Dataset name 'mine_coco' is already registered by other code; choose another "
            "name for the synthetic dataset")):
        register_synthetic_shapes("mine_coco", TINY, tmp_path)
    assert MetadataCatalog.get("mine_coco").json_file == str(json_file.resolve())
    assert len(DatasetCatalog.get("mine_coco")) == 4


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


def test_builtin_val_ground_truth_scores_ap_100_with_coco_evaluator(synthetic_root):
    """Ground truth fed back as predictions scores AP 100: metadata, ids and masks agree."""
    name = "synthetic_shapes_tiny_val"
    register_datasets_from_config(tiny_synthetic_cfg(SYNTHETIC_ROOT=str(synthetic_root)))
    dicts = DatasetCatalog.get(name)
    assert MetadataCatalog.get(name).json_file.startswith(str(synthetic_root))
    evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False,
                              use_fast_impl=False)
    evaluator.reset()
    for d in dicts:
        evaluator.process([{"image_id": d["image_id"]}],
                          [{"instances": ground_truth_as_predictions(d, with_masks=True)}])
    results = evaluator.evaluate()
    assert results["bbox"]["AP"] == pytest.approx(100.0)
    assert results["segm"]["AP"] == pytest.approx(100.0)
