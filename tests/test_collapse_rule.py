"""The monitor's collapse rule on scripted detection counts (health/monitor.py,
health/collapse.py): patience, warm-up, the fraction rule, the cap at the objects of the check
images, the state kept in checkpoints, and the choice of the check images."""

from types import SimpleNamespace
from typing import List, Optional, Sequence

import pytest
from training_harness.errors import DetectionCollapseError
from training_harness.health import TrainingHealthMonitor
from training_harness.health.collapse import count_collapses, is_collapsed_check, objects_per_image


class _Checkpointer:
    save_dir = "/nowhere"

    def __init__(self):
        self.saved: List[str] = []

    def save(self, name: str, iteration: int) -> None:
        self.saved.append(name)


def _monitor(event_storage, **overrides) -> TrainingHealthMonitor:
    kwargs = dict(
        period=10,
        dataset_name="scripted",
        num_images=4,
        mapper=lambda record: record,
        batch_size=2,
        score_thresholds=(0.05, 0.5),
        main_threshold=0.05,
        collapse_fraction=0.1,
        patience=2,
        warmup_iters=20,
        action="warn",
    )
    kwargs.update(overrides)
    monitor = TrainingHealthMonitor(**kwargs)
    monitor.trainer = SimpleNamespace(storage=event_storage, checkpointer=_Checkpointer())
    monitor._num_check_images = 4
    return monitor


def _run_checks(monitor, event_storage, dets_per_image: Sequence[float]) -> Optional[int]:
    """Checks after iterations 9, 19, 29, ... with these detections per image at 0.05 (4 images,
    half of them at score >= 0.5); returns the iteration of a DetectionCollapseError or None."""
    for k, dets in enumerate(dets_per_image):
        iteration = 10 * k + 9
        event_storage.iter = iteration
        total = 4 * dets
        images_with = 4.0 if dets > 0 else 0.0
        monitor._count_detections = lambda: {"images": 4.0, "detections": [total, total / 2],
                                             "images_with_detections": images_with}
        try:
            monitor._check(iteration)
        except DetectionCollapseError:
            return iteration
    return None


def test_collapse_needs_patience_consecutive_checks_after_the_warm_up(event_storage):
    monitor = _monitor(event_storage)
    # 9: warm-up, not judged although zero. 19: best 20. 29: 1.5 < 0.1 x 20 (streak 1).
    # 39: 5 recovers (streak 0). 49, 59: zero twice -> one collapse. 69: still collapsed.
    _run_checks(monitor, event_storage, [0.0, 20.0, 1.5, 5.0, 0.0, 0.0, 0.0])
    latest = {k: v for k, (v, _) in event_storage.latest().items()}
    assert latest["health/num_collapses"] == 1
    assert latest["health/collapse_streak"] == 3
    assert latest["health/best_dets_per_image"] == 20.0
    assert latest["health/min_dets_per_image"] == 0.0
    assert latest["health/dets_per_image@0.5"] == 0.0
    assert monitor.trainer.checkpointer.saved == []  # "warn" saves nothing

    history = event_storage.history("health/collapse_streak").values()
    assert [v for v, _ in history] == [0, 0, 1, 0, 1, 2, 3]  # the warm-up check is not judged
    assert [v for v, _ in event_storage.history("health/dets_per_image").values()] == [
        0.0, 20.0, 1.5, 5.0, 0.0, 0.0, 0.0
    ]


def test_fraction_rule_and_stop_action(event_storage):
    monitor = _monitor(event_storage, action="stop", collapse_fraction=0.5, patience=3)
    # 19: best 10. 29: 4 < 5 (1). 39: 6 (0). 49: 4.9 (1). 59: 1 (2). 69: 2 (3) -> stop.
    stopped = _run_checks(monitor, event_storage, [99.0, 10.0, 4.0, 6.0, 4.9, 1.0, 2.0, 50.0])
    assert stopped == 69
    assert monitor.trainer.checkpointer.saved == ["model_collapse_0000069"]
    assert monitor.state_dict()["num_collapses"] == 1


def test_reference_is_capped_at_the_objects_of_the_check_images(event_storage):
    # Check images holding 0.5 objects each: after a burst of 31 false positives per image, 1.4
    # is still 3x the objects (healthy); 0.01 is below 0.1 x 0.5 (collapsed).
    healthy = [0.0, 31.0, 1.4, 1.5, 1.6]
    lost = [0.0, 31.0, 0.01, 0.01, 0.01]
    for series, collapses in ((healthy, 0), (lost, 1)):
        monitor = _monitor(event_storage)
        monitor._collapses.objects = 0.5
        _run_checks(monitor, event_storage, series)
        assert monitor.state_dict()["num_collapses"] == collapses
        checks = [(10 * k + 9, d) for k, d in enumerate(series)]
        assert count_collapses(checks, warmup_iters=20, fraction=0.1, patience=2,
                               objects=0.5) == collapses
    # Without ground truth on the check images, the best count alone is the reference.
    checks = [(10 * k + 9, d) for k, d in enumerate(healthy)]
    assert count_collapses(checks, warmup_iters=20, fraction=0.1, patience=2, objects=0.0) == 1
    assert is_collapsed_check(0.0, None, 0.5, 0.1) and not is_collapsed_check(0.2, None, 0.5, 0.1)
    assert is_collapsed_check(0.04, 31.0, 0.5, 0.1) and not is_collapsed_check(0.05, 31.0, 0.5, 0.1)
    assert objects_per_image([{"annotations": [{}, {"iscrowd": 1}]}, {"annotations": []}]) == 0.5


def test_monitor_state_survives_a_resume(event_storage):
    monitor = _monitor(event_storage)
    _run_checks(monitor, event_storage, [0.0, 20.0, 0.0])
    resumed = _monitor(event_storage)
    resumed.load_state_dict(monitor.state_dict())
    assert resumed.state_dict() == monitor.state_dict()
    assert resumed.state_dict()["streak"] == 1 and resumed.state_dict()["best"] == (20.0, 19)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("action", "abort", "HEALTH.ACTION must be one of"),
        ("patience", 0, "HEALTH.PATIENCE must be >= 1"),
        ("collapse_fraction", 1.5, "HEALTH.COLLAPSE_FRACTION must be in"),
        ("score_thresholds", (0.05, 2.0), "must be scores in"),
    ],
)
def test_invalid_settings_name_the_key(event_storage, key, value, message):
    with pytest.raises(ValueError, match=message):
        _monitor(event_storage, **{key: value})


def test_check_images_can_be_taken_among_the_images_with_objects(event_storage):
    from detectron2.data import DatasetCatalog

    def record(i, annotations):
        return {"image_id": i, "annotations": annotations}

    box = {"bbox": [0, 0, 4, 4], "category_id": 0}
    records = [record(0, []), record(1, [box]), record(2, [{**box, "iscrowd": 1}]),
               record(3, []), record(4, [box, {**box, "iscrowd": 1}]), record(5, [box])]
    DatasetCatalog.register("health_object_images", lambda: records)
    DatasetCatalog.register("health_no_object_images", lambda: [record(0, []), records[2]])
    try:
        every = _monitor(event_storage, dataset_name="health_object_images", num_images=2)
        assert [r["image_id"] for r in every._check_records()] == [0, 1]
        objects = _monitor(event_storage, dataset_name="health_object_images", num_images=2,
                           object_images_only=True)
        assert [r["image_id"] for r in objects._check_records()] == [1, 4]  # crowd-only: none
        none = _monitor(event_storage, dataset_name="health_no_object_images",
                        object_images_only=True)
        with pytest.raises(ValueError, match="HEALTH.OBJECT_IMAGES_ONLY: dataset "
                           "'health_no_object_images' .* has no image with a non-crowd"):
            none._check_records()
    finally:
        DatasetCatalog.remove("health_object_images")
        DatasetCatalog.remove("health_no_object_images")
