"""The stop on a loss that explodes while finite (health/divergence.py): the rule on hand-made
loss sequences, and a real run with a far too high learning rate ending with exit code 4."""

import os
import subprocess
import sys

import pytest
import torch
from training_harness.errors import LossExplosionError
from training_harness.errors import EXIT_NON_FINITE
from training_harness.health.divergence import LossDivergenceRule, explosion_message

from conftest import TINY_CONFIG


def test_ceiling_names_the_total_and_the_term_that_rose_most():
    message = explosion_message(5, {"loss_cls": 1.0, "loss_box_reg": 2000.0}, {},
                                ceiling=1000.0, jump_factor=100.0)
    assert message == (
        "Loss exploded at iteration 5: total_loss = 2e+03 is above HEALTH.LOSS_CEILING = 1000 "
        "(term that rose most: loss_box_reg = 2e+03). The optimizer step was not applied; lower "
        "SOLVER.BASE_LR or enable SOLVER.CLIP_GRADIENTS.")
    assert explosion_message(5, {"loss_cls": 999.0}, {}, 1000.0, 100.0) is None
    assert explosion_message(5, {"loss_cls": 2000.0}, {}, 0.0, 100.0) is None  # off


def test_jump_is_measured_against_the_largest_earlier_total():
    previous = {"total_loss": 2.0, "loss_cls": 1.5, "loss_box_reg": 0.5}
    losses = {"loss_cls": 1.0, "loss_box_reg": 250.0}  # total 251 > 100 x 2
    assert explosion_message(300, losses, previous, 1000.0, 100.0) == (
        "Loss exploded at iteration 300: total_loss = 251 is 126 x the largest total before it "
        "(2), more than HEALTH.LOSS_JUMP_FACTOR = 100 (term that rose most: loss_box_reg = 250, "
        "500 x its previous largest). The optimizer step was not applied; lower SOLVER.BASE_LR "
        "or enable SOLVER.CLIP_GRADIENTS.")
    assert explosion_message(300, {"loss_cls": 199.0}, previous, 1000.0, 100.0) is None
    assert explosion_message(300, losses, previous, 1000.0, 0.0) is None  # off


def test_mostly_empty_batches_with_rare_object_batches_never_stop():
    # The pattern of 95%-empty data: an untrained start near 2, then a tiny loss on most steps
    # and 300 x more on the rare batches with objects.
    rule = LossDivergenceRule(ceiling=1000.0, jump_factor=100.0)
    rule.check(0, {"loss_rpn_cls": 0.7, "loss_cls": 1.0})
    for step in range(1, 2000):
        value = 1.8 if step % 397 == 0 else 0.006
        rule.check(step, {"loss_rpn_cls": value, "loss_cls": value / 10})


def test_fine_tuning_on_mostly_empty_data_does_not_stop_at_the_first_object_batch():
    # A trained model: near-zero loss on the first (empty) batches, then 300 x on one with objects.
    rule = LossDivergenceRule(ceiling=1000.0, jump_factor=100.0)
    for step, value in enumerate([0.006, 0.005, 1.8, 0.006, 2.5]):
        rule.check(step, {"loss_cls": value})
    with pytest.raises(LossExplosionError, match=r"is 101 x the largest total before it \(2.5\)"):
        rule.check(5, {"loss_cls": 252.0})
    # Below the floor of 1 the reference is 1: a total above 100 is a jump.
    for value, stops in ((99.0, False), (101.0, True)):
        rule = LossDivergenceRule(ceiling=0.0, jump_factor=100.0)
        rule.check(0, {"loss_cls": 0.01})
        if stops:
            with pytest.raises(LossExplosionError, match=r"is 101 x the largest total before "
                                                         r"it \(0.01, taken as 1\)"):
                rule.check(1, {"loss_cls": value})
        else:
            rule.check(1, {"loss_cls": value})


def test_a_jump_stops_and_the_refused_step_is_not_kept_as_reference():
    rule = LossDivergenceRule(ceiling=0.0, jump_factor=10.0)
    for step, value in enumerate([2.0, 1.0, 19.0]):  # 19 < 10 x 2
        rule.check(step, {"loss_cls": value})
    with pytest.raises(LossExplosionError, match=r"at iteration 3: total_loss = 200 is 10.5 x "
                                                 r"the largest total before it \(19\)"):
        rule.check(3, {"loss_cls": 200.0})
    rule.check(4, {"loss_cls": 180.0})  # 200 was not kept: 180 < 10 x 19
    assert LossExplosionError(".").exit_code == EXIT_NON_FINITE


def test_the_reference_survives_a_checkpoint():
    rule = LossDivergenceRule(ceiling=0.0, jump_factor=10.0)
    rule.check(0, {"loss_cls": 2.0})
    resumed = LossDivergenceRule(ceiling=0.0, jump_factor=10.0)
    resumed.load_state_dict(rule.state_dict())
    with pytest.raises(LossExplosionError):
        resumed.check(1, {"loss_cls": 21.0})


def test_rule_keys_are_checked():
    with pytest.raises(ValueError, match=r"HEALTH.LOSS_CEILING and HEALTH.LOSS_JUMP_FACTOR must "
                                         r"be >= 0 \(0: off\), got 1000.0 and -1.0"):
        LossDivergenceRule(1000.0, -1.0)


def test_far_too_high_learning_rate_stops_with_exit_code_4(repo_root, tmp_path):
    # The ceiling alone (the jump rule off): which of the two fires first depends on the batches
    # the sampler draws.
    command = [sys.executable, "train_net.py", "--config-file", f"configs/{TINY_CONFIG}",
               "SOLVER.BASE_LR", "50.0", "SOLVER.MAX_ITER", "30", "HEALTH.PERIOD", "0",
               "HEALTH.LOSS_JUMP_FACTOR", "0.0", "DATASETS.TEST", "()",
               "OUTPUT_DIR", str(tmp_path / "out")]
    env = dict(os.environ, BALANCED_RCNN_DATASETS=str(tmp_path / "datasets"))
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=300)
    log = result.stdout + result.stderr
    assert result.returncode == EXIT_NON_FINITE, log[-3000:]
    assert "LossExplosionError: Loss exploded at iteration " in log
    assert "is above HEALTH.LOSS_CEILING = 1000 (term that rose most: loss_" in log
    saved = sorted((tmp_path / "out").glob("model_diverged_*.pth"))
    assert len(saved) == 1
    checkpoint = torch.load(saved[0], map_location="cpu", weights_only=False)
    assert all(torch.isfinite(t).all() for t in checkpoint["model"].values())
    # The rule's reference, the largest earlier total, is in it for --resume.
    rule = checkpoint["trainer"]["hooks"]["NonFiniteStop"]["loss_divergence"]
    assert 0 < rule["largest"]["total_loss"] < 1000
