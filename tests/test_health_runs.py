"""train_net.py runs driven into a collapse or a NaN on purpose (one and two processes): the
exit code, the message, the checkpoint and metrics.json of each stop, and a healthy run of the
same length that is not flagged.

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
from typing import List

import pytest
import torch
from training_harness.errors import EXIT_COLLAPSE, EXIT_NON_FINITE

TINY_CONFIG = "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml"

# Loaded at interpreter start (PYTHONPATH) by train_net.py and by every worker it spawns.
SITECUSTOMIZE = textwrap.dedent(
    """
    import os

    if os.environ.get("HEALTH_TEST_FAULT"):
        import torch
        from detectron2.engine import HookBase
        from detectron2.modeling import GeneralizedRCNN
        from detectron2.utils.events import get_event_storage

        from training_harness.engine.trainer import GuardedTrainer

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

            build_hooks = GuardedTrainer.build_hooks
            GuardedTrainer.build_hooks = lambda self: build_hooks(self) + [ForceBackground()]

        if fault in ("nan", "nan_on_worker_1"):
            from detectron2.utils import comm

            forward = GeneralizedRCNN.forward

            def nan_mask_loss(self, batched_inputs):
                losses = forward(self, batched_inputs)
                poisoned = fault == "nan" or comm.get_rank() == 1  # the rank of the launched worker
                if self.training and poisoned and get_event_storage().iter == at:
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
    # The detections rule alone: the tiny model has no confident detection in 16 iterations
    # (the other rules: tests/test_confident_rule.py).
    "HEALTH.CONFIDENT_FRACTION", "0.0",
    "HEALTH.NO_FOREGROUND_RULE", "False",
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
    # The HEALTH.NUM_IMAGES=4 check images: 3 with objects, 1 without, counted apart at the
    # main threshold.
    assert "4 images of synthetic_shapes_tiny_val (4 on this worker; " in log
    assert "1 images without objects)" in log
    last = checks[-1]
    assert 4 * last["health/dets_per_image"] == pytest.approx(
        3 * last["health/dets_per_object_image"] + 1 * last["health/dets_per_empty_image"])
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


def test_two_processes_stop_together_on_a_nan_in_one_of_them(repo_root, fault_env, tmp_path):
    result, log = _train(repo_root, fault_env, tmp_path, "SOLVER.MAX_ITER", "8",
                         "HEALTH.PERIOD", "0", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()",
                         fault="nan_on_worker_1:3", num_gpus=2, timeout=300)
    assert result.returncode == EXIT_NON_FINITE, log[-4000:]
    stopped = "Non-finite training values at iteration 3: loss_mask = nan (worker 1)"
    assert stopped in log
    # Worker 0, whose losses were finite, stopped at the same step, before the optimizer step.
    assert stopped in (tmp_path / "log.txt.rank1").read_text()
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
