"""The image-level evaluator (evaluation/image_level.py) on hand-made detections: false-alarm
images, object images detected, recall at IoU 0.5 with one match per object, detections per empty
image; hand-computed values."""

import math

import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, Instances

from balanced_rcnn.evaluation.image_level import (
    ImageLevelEvaluator,
    image_counts,
    image_level_metrics,
)


def _ann(x, y, w, h, category, crowd=0):
    return {"bbox": [x, y, w, h], "bbox_mode": BoxMode.XYWH_ABS, "category_id": category,
            "iscrowd": crowd}


RECORDS = [
    {"image_id": 1, "height": 64, "width": 64, "annotations": []},
    {"image_id": 2, "height": 64, "width": 64, "annotations": []},
    {"image_id": 3, "height": 64, "width": 64,
     "annotations": [_ann(0, 0, 10, 10, 0), _ann(20, 20, 10, 10, 1)]},
    {"image_id": 4, "height": 64, "width": 64, "annotations": [_ann(5, 5, 10, 10, 1)]},
    {"image_id": 5, "height": 64, "width": 64, "annotations": [_ann(0, 0, 30, 30, 0, crowd=1)]},
]
# (XYXY box, score, class) per image
DETECTIONS = {
    1: [((0, 0, 8, 8), 0.9, 0), ((0, 0, 8, 8), 0.3, 1)],  # one at >= 0.5: a false alarm
    2: [((0, 0, 8, 8), 0.4, 0)],  # below the threshold: no detection
    3: [((0, 0, 10, 10), 0.9, 0),  # finds object 0
        ((1, 1, 11, 11), 0.8, 0),  # IoU 0.68 with object 0, already found: no second match
        ((20, 20, 30, 30), 0.7, 0)],  # on object 1, of the wrong class
    4: [((5, 5, 15, 15), 0.4, 1)],  # the right box below the threshold
    5: [((0, 0, 30, 30), 0.9, 0)],  # on a crowd region: counted nowhere
}


def _instances(image_id):
    dets = DETECTIONS[image_id]
    inst = Instances((64, 64))
    inst.pred_boxes = Boxes(torch.tensor([d[0] for d in dets], dtype=torch.float32))
    inst.scores = torch.tensor([d[1] for d in dets])
    inst.pred_classes = torch.tensor([d[2] for d in dets])
    return inst


@pytest.mark.core
def test_counts_per_image_by_hand():
    def counts(image_id):
        inst = _instances(image_id)
        return image_counts(RECORDS[image_id - 1], inst.pred_boxes.tensor, inst.scores,
                            inst.pred_classes, 0.5)

    assert counts(1) == ("empty", 1, 0, 0)
    assert counts(2) == ("empty", 0, 0, 0)
    assert counts(3) == ("objects", 3, 2, 1)
    assert counts(4) == ("objects", 0, 1, 0)
    assert counts(5) == ("crowd_only", 1, 0, 0)


@pytest.mark.core
def test_evaluator_metrics_by_hand(forget_bad_datasets, caplog):
    DatasetCatalog.register("bad_image_level", lambda: RECORDS)
    evaluator = ImageLevelEvaluator("bad_image_level", 0.5)
    for record in RECORDS:
        evaluator.process([{"image_id": record["image_id"]}],
                          [{"instances": _instances(record["image_id"])}])
    with caplog.at_level("INFO", logger="balanced_rcnn.evaluation.image_level"):
        results = evaluator.evaluate()["image_level"]
    assert results == {
        "false_alarm_images": 50.0,  # image 1 of the empty images 1, 2
        "object_images_detected": 50.0,  # image 3 of the object images 3, 4
        "recall50": pytest.approx(100 / 3),  # 1 of the 3 objects
        "dets_per_empty_image": 0.5,  # 1 detection on 2 empty images
    }
    assert ("at score >= 0.5 (TEST.DEPLOYMENT_SCORE_THRESH; 2 images without annotations, 2 "
            "with objects)") in caplog.text
    # A lower threshold: image 2 fires too, image 4's object is found.
    evaluator = ImageLevelEvaluator("bad_image_level", 0.3)
    for record in RECORDS:
        evaluator.process([{"image_id": record["image_id"]}],
                          [{"instances": _instances(record["image_id"])}])
    results = evaluator.evaluate()["image_level"]
    assert results["false_alarm_images"] == 100.0
    assert results["dets_per_empty_image"] == 1.5
    assert results["recall50"] == pytest.approx(200 / 3)
    evaluator.reset()
    assert math.isnan(evaluator.evaluate()["image_level"]["false_alarm_images"])  # no image


@pytest.mark.core
def test_metrics_without_images_of_a_kind_are_nan():
    metrics = image_level_metrics([image_counts(RECORDS[0], torch.zeros(0, 4), torch.zeros(0),
                                                torch.zeros(0, dtype=torch.long), 0.5)])
    assert metrics["false_alarm_images"] == 0.0 and metrics["dets_per_empty_image"] == 0.0
    assert math.isnan(metrics["object_images_detected"]) and math.isnan(metrics["recall50"])


@pytest.mark.core
@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_threshold_outside_zero_one_is_refused(threshold, forget_bad_datasets):
    DatasetCatalog.register("bad_image_level", lambda: RECORDS)
    with pytest.raises(ValueError, match=rf"TEST.DEPLOYMENT_SCORE_THRESH must be a score in "
                                         rf"\[0, 1\], got {threshold}"):
        ImageLevelEvaluator("bad_image_level", threshold)


@pytest.mark.core
def test_records_without_their_own_image_id_are_refused(forget_bad_datasets):
    shared = [dict(RECORDS[0], file_name="a.png"), dict(RECORDS[0], file_name="b.png")]
    DatasetCatalog.register("bad_shared_id", lambda: shared)
    with pytest.raises(ValueError, match=r"Image-level evaluation of bad_shared_id: 'b.png' has "
                                         r"image_id 1, as 'a.png'; every image needs its own"):
        ImageLevelEvaluator("bad_shared_id", 0.5)
    DatasetCatalog.register("bad_no_id", lambda: [{"file_name": "c.png", "annotations": []}])
    with pytest.raises(ValueError, match="'c.png' has no image_id"):
        ImageLevelEvaluator("bad_no_id", 0.5)


def test_a_bad_threshold_is_refused_at_set_up(tiny_cfg):
    from training_harness.config_checks import check_config_choices

    tiny_cfg.TEST.DEPLOYMENT_SCORE_THRESH = 5.0
    with pytest.raises(ValueError, match=r"TEST.DEPLOYMENT_SCORE_THRESH must be a score in "
                                         r"\[0, 1\], got 5.0"):
        check_config_choices(tiny_cfg)
