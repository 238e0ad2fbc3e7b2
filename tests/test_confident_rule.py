"""The collapse rules beside the detection count (health/collapse.py): the confident rule
(deployable detections far below the objects of the check images, judged from HEALTH.
CONFIDENT_AFTER of the schedule on) and the no-foreground rule (most steps of a period sampled
no foreground anchor or ROI), on hand-made check sequences and through the monitor."""

import logging
from types import SimpleNamespace

import pytest
from conftest import harness_cfg
from training_harness.config_checks import check_config_choices
from training_harness.config_ranges import check_config_ranges
from training_harness.health import TrainingHealthMonitor
from training_harness.health.collapse import (CollapseTracker, count_collapses,
                                           is_starved_of_foreground, is_unconfident_check)
from training_harness.health.collapse import confident_score

OBJECTS = 0.9375  # the sparse setting's 16 check images hold 15 objects
RULE = dict(warmup_iters=100, fraction=0.05, patience=3, objects=OBJECTS,
            confident_fraction=0.1, confident_after_iters=400)


def _checks(confident, dets=5.0, starved=()):
    """Checks every 50 iterations (49, 99, ...): ``dets`` at the main score throughout (clutter
    that keeps the detections rule quiet), ``confident`` per check, starved at these indices."""
    return [(50 * k + 49, dets, c, k in starved) for k, c in enumerate(confident)]


def test_single_check_rules_by_hand():
    # 0.1 x 0.9375 = 0.09375 confident detections per check image is the line.
    assert is_unconfident_check(0.0625, OBJECTS, 0.1)
    assert not is_unconfident_check(0.09375, OBJECTS, 0.1)
    assert not is_unconfident_check(0.0, 0.0, 0.1)  # no objects to miss
    assert not is_unconfident_check(0.0, OBJECTS, 0.0)  # rule off
    assert is_starved_of_foreground(11, 20) and not is_starved_of_foreground(10, 20)
    assert not is_starved_of_foreground(0, 0)  # no step measured


def test_confident_rule_flags_a_run_whose_deployable_detections_never_come():
    # Stock on the sparse setting: clutter at 0.05, nothing at 0.5, in all 16 checks.
    assert count_collapses(_checks([0.0] * 16), **RULE) == 1
    tracker = CollapseTracker(**{k: v for k, v in RULE.items()})
    flagged = [c[0] for c in _checks([0.0] * 16)
               if tracker.record(c[0], c[1], confident=c[2])]
    # Judged from iteration 400 on (checks 399, 449, 499): reported at the third, then still.
    assert flagged[0] == 499 and flagged[:2] == [499, 549]
    assert tracker.state["why"] == [
        "0.00 confident detections per image, below 0.1 x the 0.94 objects per check image"]


def test_confident_rule_is_silent_on_a_run_that_learns_late():
    # The shipped configuration on the sparse setting (seed 1's checks at score 0.5): nothing
    # confident before iteration 349, then 0.44 and up.
    shipped = [0.0, 0.0, 0.0, 0.0, 0.06, 0.06, 0.44, 0.31, 0.5, 0.62, 0.69, 0.69, 0.56, 0.62,
               0.62, 0.62]
    assert count_collapses(_checks(shipped), **RULE) == 0
    # Judged from the start, the same run would be flagged: what CONFIDENT_AFTER is for.
    assert count_collapses(_checks(shipped), **dict(RULE, confident_after_iters=0)) == 1
    # A dip of two checks is below the patience of 3.
    dip = [0.5] * 9 + [0.0, 0.0] + [0.5] * 5
    assert count_collapses(_checks(dip), **RULE) == 0
    assert count_collapses(_checks(dip[:9] + [0.0] * 7), **RULE) == 1


def test_no_foreground_rule_counts_after_the_warm_up():
    confident = [1.0] * 16
    # Starved in checks 0-2 (iterations 49, 99, 149): the check after iteration 49 falls in
    # the warm-up (100 iterations), so the streak is 2; checks 1-3 make 3.
    assert count_collapses(_checks(confident, starved={0, 1, 2}), **RULE) == 0
    assert count_collapses(_checks(confident, starved={1, 2, 3}), **RULE) == 1
    # Rules mix in one streak: starved, then unconfident after 400.
    mixed = _checks([1.0] * 8 + [0.0] * 8, starved={6, 7})
    tracker = CollapseTracker(**RULE)
    reported = [it for it, dets, conf, starved in mixed
                if tracker.record(it, dets, confident=conf, starved=starved)]
    assert reported[0] == 449  # 349 and 399 starved, 449 unconfident: the third in a row
    assert tracker.state["num_collapses"] == 1


def _monitor(event_storage, **overrides):
    kwargs = dict(period=10, dataset_name="scripted", num_images=4, mapper=lambda r: r,
                  batch_size=2, score_thresholds=(0.05,), main_threshold=0.05,
                  collapse_fraction=0.1, patience=2, warmup_iters=0, action="warn",
                  confident_threshold=0.5, confident_fraction=0.1, confident_after_iters=0,
                  foreground_rule=True)
    kwargs.update(overrides)
    monitor = TrainingHealthMonitor(**kwargs)
    monitor.trainer = SimpleNamespace(storage=event_storage, iter=0, model=None)
    monitor._num_check_images = 4
    monitor._collapses.objects = 1.0
    # 4 images: 8 detections at 0.05 per image, none at 0.5.
    monitor._count_detections = lambda: {"images": 4.0, "detections": [32.0, 0.0],
                                         "images_with_detections": 4.0}
    return monitor


def _steps(monitor, event_storage, positives, start=0):
    """One training step per value from iteration ``start``: that many positive anchors of 256
    (ROIs: the same)."""
    for it, pos in enumerate(positives, start):
        event_storage.iter = monitor.trainer.iter = it
        event_storage.put_scalars(**{"rpn/num_pos_anchors": pos, "rpn/num_neg_anchors": 256 - pos,
                                     "roi_head/num_fg_samples": pos,
                                     "roi_head/num_bg_samples": 512 - pos})
        monitor.after_step()


def test_monitor_counts_steps_without_foreground_and_says_which_check_counts(
        event_storage, caplog):
    monitor = _monitor(event_storage, confident_fraction=0.0)
    with caplog.at_level(logging.INFO, logger="training_harness.health.monitor"):
        # Period 1 (iterations 0-9): 5 of 10 steps without foreground, not more than half.
        _steps(monitor, event_storage, [0, 3] * 5)
        assert monitor.state_dict()["streak"] == 0
        # Period 2: 6 of 10 -> counts (1 of 2); period 3: 10 of 10 -> a collapse.
        _steps(monitor, event_storage, [0] * 6 + [3] * 4 + [0] * 10, start=10)
    assert monitor.state_dict()["num_collapses"] == 1
    assert ("counts towards a collapse (1 of 2): no foreground among the sampled anchors or "
            "ROIs in most steps since the previous check") in caplog.text
    assert "Detection collapse at iteration 29: 8.00 detections per image" in caplog.text


def test_monitor_judges_confident_detections_from_the_configured_iteration(event_storage):
    monitor = _monitor(event_storage, foreground_rule=False, confident_after_iters=30)
    _steps(monitor, event_storage, [3] * 30)  # checks at 9, 19 (not judged), 29 (1 of 2)
    assert monitor.state_dict()["streak"] == 1 and monitor.state_dict()["num_collapses"] == 0
    _steps(monitor, event_storage, [3] * 10, start=30)  # 39: 2 of 2
    assert monitor.state_dict()["num_collapses"] == 1


def test_monitor_says_when_it_checks_fewer_images_than_asked(event_storage, caplog):
    monitor = _monitor(event_storage, num_images=32, object_images_only=True)
    records = [{"image_id": i, "annotations": [{"bbox": [0, 0, 4, 4]}]} for i in range(20)]
    monitor._check_records = lambda: records
    monitor.trainer.model = SimpleNamespace()
    with caplog.at_level(logging.INFO, logger="training_harness.health.monitor"):
        monitor.before_train()
    assert ("Training health: HEALTH.NUM_IMAGES is 32 but scripted has only 20 images that "
            "hold objects (HEALTH.OBJECT_IMAGES_ONLY): the checks run on those 20.") in caplog.text


def test_confident_score_follows_the_deployment_threshold_and_bad_keys_are_named():
    cfg = harness_cfg()
    cfg.TEST.DEPLOYMENT_SCORE_THRESH = 0.7
    assert confident_score(cfg) == 0.7
    cfg.HEALTH.CONFIDENT_SCORE = 0.3
    assert confident_score(cfg) == 0.3
    for key, value, check, message in (
            ("CONFIDENT_SCORE", 1.5, check_config_choices, "HEALTH.CONFIDENT_SCORE must be a "
             "score in [0, 1], or -1 for TEST.DEPLOYMENT_SCORE_THRESH; got 1.5"),
            ("CONFIDENT_FRACTION", -0.1, check_config_ranges,
             "HEALTH.CONFIDENT_FRACTION must be in [0, 1], got -0.1"),
            ("CONFIDENT_AFTER", 2.0, check_config_ranges,
             "HEALTH.CONFIDENT_AFTER must be in [0, 1], got 2.0")):
        bad = harness_cfg()
        bad.MODEL.DEVICE = "cpu"
        bad.HEALTH[key] = value
        with pytest.raises(ValueError) as info:
            check(bad)
        assert str(info.value) == message
