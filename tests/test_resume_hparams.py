"""--resume trains with the config's optimizer hyperparameters (engine/resume_hparams.py), and
refuses a checkpoint of another optimizer type at set-up."""

import json
import subprocess
import sys

import pytest
import torch
from detectron2.solver import LRMultiplier
from fvcore.common.param_scheduler import MultiStepParamScheduler
from training_harness.engine.resume_hparams import apply_config_hyperparameters

from conftest import TINY_CONFIG


def _optimizer_and_scheduler(lr, weight_decay, iteration):
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW([{"params": [model.weight], "weight_decay": weight_decay},
                                   {"params": [model.bias], "weight_decay": 0.0}], lr=lr)
    # x1 until iteration 10, then x0.1
    scheduler = LRMultiplier(optimizer, MultiStepParamScheduler([1.0, 0.1], milestones=[10],
                                                                    num_updates=20),
                             max_iter=20)
    for _ in range(iteration):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_config_values_replace_the_checkpoints_at_the_schedules_position():
    # Resumed at iteration 12 (multiplier 0.1) of a run with lr 0.8 and weight decay 0.05.
    old_optimizer, old_scheduler = _optimizer_and_scheduler(0.8, 0.05, 12)
    optimizer, scheduler = _optimizer_and_scheduler(0.8, 0.05, 0)
    optimizer.load_state_dict(old_optimizer.state_dict())
    scheduler.load_state_dict(old_scheduler.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.08)
    config, _ = _optimizer_and_scheduler(0.01, 0.1, 0)
    lines = apply_config_hyperparameters(optimizer, scheduler, config.param_groups)
    assert lines == ["SOLVER.BASE_LR 0.01 (checkpoint: 0.8)",
                     "SOLVER.WEIGHT_DECAY 0.1 (checkpoint: 0.05)"]
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.001, 0.001])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    assert scheduler.base_lrs == [0.01, 0.01]
    scheduler.step()  # the next iterations follow the new base
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.001, 0.001])
    # The moment estimates are kept.
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"],
                       old_optimizer.state_dict()["state"][0]["exp_avg"])
    # The same config again: nothing to say.
    assert apply_config_hyperparameters(optimizer, scheduler, config.param_groups) == []


def _train(repo_root, out, *opts):
    result = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", f"configs/{TINY_CONFIG}",
         *(["--resume"] if "--resume" in opts else []),
         "SOLVER.MAX_ITER", "5", "HEALTH.PERIOD", "0", "DATASETS.TEST", "()",
         "SOLVER.CHECKPOINT_PERIOD", "2", "OUTPUT_DIR", str(out),
         *(o for o in opts if o != "--resume")],
        cwd=repo_root, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


def test_the_divergence_stops_advice_works_end_to_end(repo_root, tmp_path):
    """Train, resume with a far too high SOLVER.BASE_LR (honoured: it explodes), then resume
    with a lower one as the stop advises: training goes on from the checkpoint before the
    explosion to the end."""
    out = tmp_path / "out"
    code, log = _train(repo_root, out, "SOLVER.MAX_ITER", "2")
    assert code == 0, log[-3000:]
    code, log = _train(repo_root, out, "--resume", "SOLVER.MAX_ITER", "6",
                       "SOLVER.BASE_LR", "50.0", "SOLVER.CHECKPOINT_PERIOD", "100")
    assert code == 4, log[-3000:]
    assert "Resumed with the config's SOLVER.BASE_LR 50.0 (checkpoint: 0.0008)" in log
    assert "Loss exploded at iteration 4" in log and "lower SOLVER.BASE_LR" in log
    assert f"--resume continues from {out / 'model_final.pth'} (last_checkpoint)" in log
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert (out / "model_diverged_0000004.pth").is_file()  # kept to inspect
    code, log = _train(repo_root, out, "--resume", "SOLVER.MAX_ITER", "6",
                       "SOLVER.BASE_LR", "0.0008")
    assert code == 0, log[-3000:]
    assert "Starting training from iteration 2" in log
    steps = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert max(s["iteration"] for s in steps) == 5
    assert (out / "last_checkpoint").read_text() == "model_final.pth"


def test_resume_under_another_optimizer_is_refused_at_set_up(repo_root, tmp_path):
    out = tmp_path / "out"
    code, log = _train(repo_root, out, "SOLVER.MAX_ITER", "2")
    assert code == 0, log[-3000:]
    code, log = _train(repo_root, out, "--resume", "SOLVER.OPTIMIZER", "SGD")
    assert code != 0
    assert (f"--resume: SOLVER.OPTIMIZER is SGD but the checkpoint "
            f"'{out / 'model_final.pth'}' was trained with AdamW, whose state SGD cannot "
            "continue. Resume with SOLVER.OPTIMIZER AdamW, or start a new run from its weights "
            f"(MODEL.WEIGHTS {out / 'model_final.pth'}, another OUTPUT_DIR, no --resume).") in log
