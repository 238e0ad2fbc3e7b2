"""AP by class frequency (evaluation/frequency_groups.py): class image counts, the thirds rule,
the group means by hand, and FrequencyGroupCOCOEvaluator on perfect detections of a real
synthetic dataset."""

import logging
import math

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog

from balanced_rcnn.data.class_counts import class_image_counts
from balanced_rcnn.evaluation.frequency_groups import (
    FrequencyGroupCOCOEvaluator,
    frequency_groups,
    group_ap,
)
from coco_builders import ground_truth_as_predictions


@pytest.mark.core
def test_class_image_counts_count_images_not_objects():
    ann = lambda c, crowd=0: {"category_id": c, "iscrowd": crowd}  # noqa: E731
    dicts = [{"annotations": [ann(0), ann(0), ann(2)]}, {"annotations": [ann(0)]},
             {"annotations": [ann(1, crowd=1)]}, {"annotations": []}]
    assert class_image_counts(dicts, 3) == [2, 0, 1]  # crowd regions do not count


@pytest.mark.core
def test_thirds_by_count_most_frequent_first():
    # counts by class id: sorted 0 (50), 2 (10), 4 (7), 1 (3), 3 (1)
    assert frequency_groups([50, 3, 10, 1, 7]) == {"APf": [0, 2], "APc": [1, 4], "APr": [3]}
    groups = frequency_groups(list(range(20, 0, -1)))  # class 0 the most frequent
    assert [len(groups[g]) for g in ("APf", "APc", "APr")] == [7, 7, 6]
    assert groups["APr"] == list(range(14, 20))
    assert frequency_groups([5, 9]) == {"APf": [1], "APc": [0], "APr": []}
    assert frequency_groups([4, 4, 4]) == {"APf": [0], "APc": [1], "APr": [2]}  # ties by id


@pytest.mark.core
def test_group_ap_by_hand():
    groups = {"APr": [3], "APc": [1, 4], "APf": [0, 2]}
    ap = group_ap([40.0, math.nan, 20.0, 10.0, 30.0], groups)
    assert ap == {"APr": 10.0, "APc": 30.0, "APf": 30.0}  # class 1 has no AP: left out
    assert math.isnan(group_ap([1.0], {"APr": []})["APr"])


def _perfect_outputs(records):
    return [{"instances": ground_truth_as_predictions(r)} for r in records]


def test_evaluator_adds_the_groups_to_coco_results(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path))
    records = DatasetCatalog.get("synthetic_shapes_tiny_val")
    with caplog.at_level(logging.INFO, logger="balanced_rcnn.evaluation.frequency_groups"):
        evaluator = FrequencyGroupCOCOEvaluator(
            "synthetic_shapes_tiny_val", train_datasets=("synthetic_shapes_tiny_train",),
            tasks=("bbox",), distributed=False, use_fast_impl=False)
    classes = MetadataCatalog.get("synthetic_shapes_tiny_val").thing_classes
    counts = class_image_counts(DatasetCatalog.get("synthetic_shapes_tiny_train"), len(classes))
    groups = frequency_groups(counts)
    assert "APf: " + ", ".join(f"{classes[c]} {counts[c]}" for c in groups["APf"]) in caplog.text
    evaluator.reset()
    evaluator.process([{"image_id": r["image_id"]} for r in records], _perfect_outputs(records))
    bbox = evaluator.evaluate()["bbox"]
    # Perfect detections: every class with a val object has AP 100, so every group has 100.
    assert bbox["AP"] == pytest.approx(100.0)
    for group in ("APr", "APc", "APf"):
        assert bbox[group] == pytest.approx(100.0), group


def test_training_classes_that_differ_leave_the_groups_out(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path))
    DatasetCatalog.get("synthetic_shapes_tiny_val")
    with caplog.at_level(logging.WARNING, logger="balanced_rcnn.evaluation.frequency_groups"):
        evaluator = FrequencyGroupCOCOEvaluator(
            "synthetic_shapes_tiny_val", train_datasets=("synthetic_shapes_tiny_novel_train",),
            tasks=("bbox",), distributed=False, use_fast_impl=False)
    assert ("the classes of training set 'synthetic_shapes_tiny_novel_train' differ from those "
            "of 'synthetic_shapes_tiny_val'; not computed") in caplog.text
    records = DatasetCatalog.get("synthetic_shapes_tiny_val")
    evaluator.reset()
    evaluator.process([{"image_id": r["image_id"]} for r in records], _perfect_outputs(records))
    assert "APr" not in evaluator.evaluate()["bbox"]


def test_federated_loss_gets_the_class_image_counts_it_reads(tmp_path, monkeypatch, tiny_cfg):
    # detectron2's federated loss reads metadata only its LVIS registration sets.
    from detectron2.data.detection_utils import get_fed_loss_cls_weights
    from training_harness.data import register_datasets_from_config

    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path))
    tiny_cfg.DATASETS.TRAIN = ("synthetic_shapes_tiny_train",)
    tiny_cfg.MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE = True
    tiny_cfg.MODEL.ROI_BOX_HEAD.USE_FED_LOSS = True
    register_datasets_from_config(tiny_cfg)
    counts = class_image_counts(DatasetCatalog.get("synthetic_shapes_tiny_train"), 3)
    assert [c["image_count"] for c in MetadataCatalog.get(
        "synthetic_shapes_tiny_train").class_image_count] == counts
    weights = get_fed_loss_cls_weights(("synthetic_shapes_tiny_train",), 0.5)
    torch.testing.assert_close(weights, torch.tensor(counts, dtype=torch.float32) ** 0.5)


def test_an_unreadable_training_set_leaves_the_groups_out(tmp_path, monkeypatch, caplog,
                                                          forget_bad_datasets):
    # --eval-only on a machine that holds the val json only.
    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path))
    DatasetCatalog.get("synthetic_shapes_tiny_val")

    def missing():
        raise FileNotFoundError("/data/train.json")

    DatasetCatalog.register("bad_train", missing)
    MetadataCatalog.get("bad_train").thing_classes = list(
        MetadataCatalog.get("synthetic_shapes_tiny_val").thing_classes)
    with caplog.at_level(logging.WARNING, logger="balanced_rcnn.evaluation.frequency_groups"):
        evaluator = FrequencyGroupCOCOEvaluator(
            "synthetic_shapes_tiny_val", train_datasets=("bad_train",), tasks=("bbox",),
            distributed=False, use_fast_impl=False)
    assert ("AP by class frequency: cannot read the training set (/data/train.json); not "
            "computed") in caplog.text
    records = DatasetCatalog.get("synthetic_shapes_tiny_val")
    evaluator.reset()
    evaluator.process([{"image_id": r["image_id"]} for r in records], _perfect_outputs(records))
    assert evaluator.evaluate()["bbox"]["AP"] == pytest.approx(100.0)
