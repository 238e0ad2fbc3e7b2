"""The training-health monitor: the collapse rule, the non-finite stop, and train_net.py runs
driven into a collapse or a NaN on purpose (one and two processes).

The faults are injected into the train_net.py subprocesses by a ``sitecustomize`` module this
file writes into a temporary folder on PYTHONPATH: Python imports it at start-up, in the
launcher and in every worker it spawns, so the product code has no test-only path.
"""

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional, Sequence

import pytest
import torch
from balanced_rcnn import Trainer
from balanced_rcnn.data import register_datasets_from_config
from balanced_rcnn.engine import (
    EXIT_COLLAPSE,
    EXIT_NON_FINITE,
    DetectionCollapseError,
    NonFiniteTrainingError,
    TrainingHealthMonitor,
)
from balanced_rcnn.engine.grad_norm import GRAD_NORM_SCALAR
from balanced_rcnn.engine.health import count_collapses, is_collapsed_check, objects_per_image
from balanced_rcnn.engine.nonfinite import _non_finite_report, write_metrics
from balanced_rcnn.utils.events import put_tensor_scalars
from detectron2.engine import hooks

TINY_CONFIG = "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml"

# -- the collapse rule, on scripted detection counts --


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
        monitor._count_detections = lambda: [4.0, total, total / 2, images_with]
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
        monitor._objects_per_image = 0.5
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


# -- the non-finite stop, on hand-made loss dicts --


def test_finite_step_writes_detectron2s_metrics(event_storage):
    put_tensor_scalars(**{GRAD_NORM_SCALAR: torch.tensor(3.0)})
    losses = {"loss_cls": torch.tensor(0.5), "loss_mask": torch.tensor(0.25)}
    write_metrics(losses, data_time=0.01, cur_iter=0)
    latest = {k: v for k, (v, _) in event_storage.latest().items()}
    assert latest["total_loss"] == 0.75 and latest["loss_mask"] == 0.25
    assert latest["data_time"] == 0.01 and latest["rank_data_time"] == 0.01


@pytest.mark.parametrize(
    "loss_mask, grad_norm, expected",
    [
        (float("nan"), 1.0, "loss_mask = nan"),
        (float("inf"), float("nan"), "loss_mask = inf, total gradient norm = nan"),
        (0.3, float("inf"), "total gradient norm = inf"),
    ],
)
def test_non_finite_step_names_the_term_and_the_iteration(
    event_storage, loss_mask, grad_norm, expected
):
    put_tensor_scalars(**{GRAD_NORM_SCALAR: torch.tensor(grad_norm)})
    losses = {"loss_cls": torch.tensor(0.5), "loss_mask": torch.tensor(loss_mask)}
    with pytest.raises(NonFiniteTrainingError, match=f"at iteration 7: {expected}\\. ") as error:
        write_metrics(losses, data_time=0.0, cur_iter=7)
    assert "loss_cls" not in str(error.value)
    assert isinstance(error.value, FloatingPointError)  # what detectron2 raises, for callers
    assert error.value.exit_code == EXIT_NON_FINITE


def test_amp_overflow_gradients_are_not_an_error(event_storage):
    put_tensor_scalars(**{GRAD_NORM_SCALAR: torch.tensor(float("inf"))})
    write_metrics({"loss_cls": torch.tensor(0.5)}, 0.0, cur_iter=0, check_grad_norm=False)


def test_report_names_the_worker():
    workers = [
        {"losses": {"loss_cls": 0.5, "loss_mask": 0.2}, "grad_norm": float("nan")},
        {"losses": {"loss_cls": 0.4, "loss_mask": float("nan")}, "grad_norm": float("nan")},
    ]
    report = _non_finite_report(workers, ["loss_cls", "loss_mask"], check_grad_norm=True)
    assert report == ["loss_mask = nan (worker 1)", "total gradient norm = nan"]


# -- the hook in the Trainer --


def test_trainer_runs_the_monitor_before_the_checkpointer_and_writer(tiny_cfg, tmp_path):
    tiny_cfg.OUTPUT_DIR = str(tmp_path)
    tiny_cfg.DATASETS.SYNTHETIC_ROOT = str(tmp_path / "datasets")
    register_datasets_from_config(tiny_cfg)
    kinds = [type(h) for h in Trainer(tiny_cfg)._hooks]
    position = kinds.index(TrainingHealthMonitor)
    assert position < kinds.index(hooks.PeriodicCheckpointer)
    assert position < kinds.index(hooks.PeriodicWriter)

    tiny_cfg.HEALTH.ENABLED = False
    assert TrainingHealthMonitor not in [type(h) for h in Trainer(tiny_cfg)._hooks]


# -- train_net.py runs with injected faults --

# Loaded at interpreter start (PYTHONPATH) by train_net.py and by every worker it spawns.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os

    if os.environ.get("HEALTH_TEST_FAULT"):
        import torch
        from detectron2.engine import HookBase
        from detectron2.modeling import GeneralizedRCNN
        from detectron2.utils.events import get_event_storage

        from balanced_rcnn.engine.trainer import Trainer

        fault, at = os.environ["HEALTH_TEST_FAULT"].split(":")
        at = int(at)

        if fault == "collapse":
            class ForceBackground(HookBase):
                # Background logit bias +30 on every worker: foreground scores ~exp(-30).
                def after_step(self):
                    if self.trainer.iter == at:
                        model = getattr(self.trainer.model, "module", self.trainer.model)
                        with torch.no_grad():
                            model.roi_heads.box_predictor.cls_score.bias[-1] = 30.0

            build_hooks = Trainer.build_hooks
            Trainer.build_hooks = lambda self: build_hooks(self) + [ForceBackground()]

        if fault == "nan":
            forward = GeneralizedRCNN.forward

            def nan_mask_loss(self, batched_inputs):
                losses = forward(self, batched_inputs)
                if self.training and get_event_storage().iter == at:
                    losses["loss_mask"] = losses["loss_mask"] * float("nan")
                return losses

            GeneralizedRCNN.forward = nan_mask_loss
    """
)

# Checks after iterations 1, 3, 5, ...; judged from the one after iteration 3. Counting at
# score >= 0.001 (the model's own threshold lowered to match) keeps a young healthy model's
# count above zero, so only the forced background makes a collapse.
HEALTH_OPTS = [
    "HEALTH.PERIOD", "2",
    "HEALTH.WARMUP_ITERS", "4",
    "HEALTH.PATIENCE", "2",
    "HEALTH.COLLAPSE_FRACTION", "0.0",
    "HEALTH.MAIN_THRESHOLD", "0.001",
    "HEALTH.SCORE_THRESHOLDS", "(0.001, 0.05)",
    "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.001",
    "HEALTH.ACTION", "stop",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "TEST.EVAL_PERIOD", "0",
    "DATASETS.TEST", "()",  # no final evaluation: the check set is HEALTH.DATASET
    "HEALTH.DATASET", "synthetic_shapes_tiny_val",
    "HEALTH.NUM_IMAGES", "4",
    # The losses and sampler these iteration numbers were calibrated with (the design's), whose
    # tiny model keeps detections above zero from the first check on.
    "MODEL.BALANCED_LOSS.REG_NORMALIZER", "positives",
    "DATALOADER.SAMPLER_TRAIN", "TrainingSampler",
]
FORCED_AT = 7  # the background bias is forced after iteration 7's check
# The first collapsed check is the one after iteration 9; PATIENCE 2 -> the one after 11.
COLLAPSE_DETECTED_AT = 11


@pytest.fixture(scope="module")
def fault_env(tmp_path_factory):
    inject = tmp_path_factory.mktemp("inject")
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    pythonpath = [str(inject)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(pythonpath),
        BALANCED_RCNN_DATASETS=str(tmp_path_factory.mktemp("datasets")),
    )


def _train(repo_root, env, output: Path, *opts, fault=None, num_gpus=1, timeout=240):
    env = dict(env, OMP_NUM_THREADS="1" if num_gpus > 1 else env.get("OMP_NUM_THREADS", "2"))
    if fault:
        env["HEALTH_TEST_FAULT"] = fault
    command = [sys.executable, "train_net.py", "--config-file", TINY_CONFIG,
               "--num-gpus", str(num_gpus), *opts, "OUTPUT_DIR", str(output)]
    # A hang would end in TimeoutExpired: the bound the DDP test asserts.
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=timeout)
    return result, result.stdout + result.stderr


def _metrics(output: Path) -> List[dict]:
    return [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]


def test_forced_collapse_stops_with_exit_code_and_message(repo_root, fault_env, tmp_path):
    result, log = _train(repo_root, fault_env, tmp_path, "SOLVER.MAX_ITER", "16", *HEALTH_OPTS,
                         fault=f"collapse:{FORCED_AT}")
    assert result.returncode == EXIT_COLLAPSE, log[-4000:]
    assert f"Detection collapse at iteration {COLLAPSE_DETECTED_AT}: 0.00 detections" in log
    assert "(none at all) for 2 consecutive checks" in log
    assert f"Training stopped, exit code {EXIT_COLLAPSE}" in log
    assert (tmp_path / f"model_collapse_{COLLAPSE_DETECTED_AT:07d}.pth").is_file()
    # The metrics of the last check reached metrics.json although training stopped there.
    checks = [m for m in _metrics(tmp_path) if "health/dets_per_image" in m]
    assert checks[-1]["iteration"] == COLLAPSE_DETECTED_AT
    assert checks[-1]["health/num_collapses"] == 1 and checks[-1]["health/min_dets_per_image"] == 0
    assert "Training health summary" in log and "collapses reported: 1" in log


def test_healthy_run_of_the_same_length_is_not_flagged(repo_root, fault_env, tmp_path):
    max_iter = COLLAPSE_DETECTED_AT + 1
    result, log = _train(repo_root, fault_env, tmp_path, "SOLVER.MAX_ITER", str(max_iter),
                         *HEALTH_OPTS, "HEALTH.CHECK_AT_START", "True")
    assert result.returncode == 0, log[-4000:]
    assert "Detection collapse" not in log
    assert "collapses reported: 0" in log
    # The check before training is logged, not judged (its count is no "best" to fall from).
    assert "Training health check before training: " in log
    start = [m for m in _metrics(tmp_path) if "health/start_dets_per_image" in m]
    assert len(start) == 1 and start[0]["iteration"] == 0
    assert "detections per image at score >= 0.001: before training " in log

    # Every documented name is in metrics.json. detectron2 writes it every 20 iterations, with
    # the latest value of each scalar: here the last check's, whose running values (lowest,
    # best, number of collapses) cover all checks.
    metrics = _metrics(tmp_path)
    checks = [m for m in metrics if "health/dets_per_image" in m]
    assert checks[-1]["iteration"] == max_iter - 1
    for name in ("health/dets_per_image@0.001", "health/dets_per_image@0.05",
                 "health/images_with_dets", "health/best_dets_per_image",
                 "health/min_dets_per_image", "health/collapse_streak",
                 "health/num_collapses"):
        assert name in checks[-1], name
    assert checks[-1]["health/num_collapses"] == 0
    assert checks[-1]["health/min_dets_per_image"] > 0
    # Each loss term's gradient share on the backbone, measured in the step of every check.
    for check in checks:
        shares = {k: v for k, v in check.items() if k.startswith("health/grad_share/")}
        assert set(shares) == {f"health/grad_share/{n}" for n in (
            "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")}
        assert sum(shares.values()) == pytest.approx(1.0, abs=1e-4), check["iteration"]
    steps = [m for m in metrics if "total_loss" in m]
    for name in ("health/anchor_fg_share", "health/roi_fg_share", "health/grad_norm",
                 "health/loss_share/loss_cls", "health/loss_share/loss_box_reg",
                 "health/loss_share/loss_mask", "health/loss_share/loss_rpn_cls",
                 "health/loss_share/loss_rpn_loc"):
        assert all(math.isfinite(m[name]) for m in steps), name
    shares = [v for k, v in steps[-1].items() if k.startswith("health/loss_share/")]
    assert len(shares) == 5 and all(0 < v < 1 for v in shares)
    assert 0 < steps[-1]["health/roi_fg_share"] < 1


def test_nan_in_one_loss_term_stops_with_its_name(repo_root, fault_env, tmp_path):
    result, log = _train(repo_root, fault_env, tmp_path, "SOLVER.MAX_ITER", "8",
                         "HEALTH.PERIOD", "0", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
                         fault="nan:3")
    assert result.returncode == EXIT_NON_FINITE, log[-4000:]
    assert "Non-finite training values at iteration 3: loss_mask = nan" in log
    assert f"Training stopped, exit code {EXIT_NON_FINITE}" in log
    for healthy_term in ("loss_cls =", "loss_box_reg =", "loss_rpn_cls =", "loss_rpn_loc ="):
        assert healthy_term not in log
    # The weights before the bad step were saved: iteration 3's checkpoint holds iteration 3.
    saved = torch.load(tmp_path / "model_nonfinite_0000003.pth", map_location="cpu",
                       weights_only=False)
    assert saved["iteration"] == 3
    assert all(torch.isfinite(t).all() for t in saved["model"].values())


def test_two_processes_stop_together_on_a_collapse(repo_root, fault_env, tmp_path):
    result, log = _train(repo_root, fault_env, tmp_path, "SOLVER.MAX_ITER", "16", *HEALTH_OPTS,
                         fault=f"collapse:{FORCED_AT}", num_gpus=2, timeout=300)
    assert result.returncode == EXIT_COLLAPSE, log[-4000:]
    assert "World size: 2" in log
    assert f"Detection collapse at iteration {COLLAPSE_DETECTED_AT}" in log
    # The other worker took the same decision at the same iteration (its own log file).
    rank1 = (tmp_path / "log.txt.rank1").read_text()
    assert f"Detection collapse at iteration {COLLAPSE_DETECTED_AT}" in rank1
    assert f"Training stopped, exit code {EXIT_COLLAPSE}" in rank1
    assert (tmp_path / f"model_collapse_{COLLAPSE_DETECTED_AT:07d}.pth").is_file()
