"""Numeric config values out of range, list keys that disagree, a device the machine lacks:
refused at set-up naming the key and the range (config_ranges.py); ignored values warned about."""

import subprocess
import sys

import pytest
import torch
from balanced_rcnn.config_checks import config_value
from balanced_rcnn.config_ranges import RANGES, check_config_ranges, ignored_key_warnings

from conftest import balanced_cfg


def _cpu_cfg():
    cfg = balanced_cfg()
    cfg.MODEL.DEVICE = "cpu"
    return cfg


def _set(cfg, key, value):
    *path, last = key.split(".")
    node = cfg
    for part in path:
        node = node[part]
    node[last] = value


def test_the_defaults_pass():
    check_config_ranges(_cpu_cfg())
    assert ignored_key_warnings(_cpu_cfg()) == []


@pytest.mark.parametrize("key", sorted(RANGES))
def test_each_key_out_of_range_is_named_with_its_range(key):
    words = RANGES[key][0]
    # A value just outside the range: 0 for "> 0", -1 for ">= 0", 2 or 1.5 for fractions.
    bad = {"> 0": 0, ">= 0": -1, ">= 1": 0, "in (0, 1]": 0, "in [0, 1]": 1.5,
           "in [0, 1)": 1}[words]
    cfg = _cpu_cfg()
    _set(cfg, key, type(config_value(cfg, key))(bad))
    with pytest.raises(ValueError) as info:
        check_config_ranges(cfg)
    assert str(info.value) == f"{key} must be {words}, got {type(config_value(cfg, key))(bad)}"


@pytest.mark.parametrize("key, value, message", [
    ("SOLVER.STEPS", (300, 200), "SOLVER.STEPS must be increasing iterations > 0, got (300, 200)"),
    ("SOLVER.BASE_LR", float("nan"), "SOLVER.BASE_LR must be > 0, got nan"),
    ("MODEL.SWIN.NUM_HEADS", [3, 6, 12], "MODEL.SWIN.DEPTHS and MODEL.SWIN.NUM_HEADS must give "
     "one positive number per stage, got [2, 2, 6, 2] and [3, 6, 12]"),
    ("MODEL.SWIN.EMBED_DIM", 100, "MODEL.SWIN.EMBED_DIM (100) must be divisible by "
     "MODEL.SWIN.NUM_HEADS[0] (3)"),
])
def test_list_keys_that_disagree(key, value, message):
    cfg = _cpu_cfg()
    _set(cfg, key, value)
    with pytest.raises(ValueError) as info:
        check_config_ranges(cfg)
    assert str(info.value) == message


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_cuda_settings_on_a_machine_without_cuda_name_the_cpu_overrides():
    cfg = balanced_cfg()  # detectron2's default device: cuda
    with pytest.raises(ValueError, match="MODEL.DEVICE is cuda but this machine has no CUDA GPU: "
                       "run on a GPU machine, or add `MODEL.DEVICE cpu SOLVER.AMP.ENABLED False`"):
        check_config_ranges(cfg)
    cfg = _cpu_cfg()
    cfg.SOLVER.AMP.ENABLED = True
    with pytest.raises(ValueError, match="SOLVER.AMP.ENABLED needs CUDA"):
        check_config_ranges(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")
def test_train_net_refuses_a_gpu_config_before_starting_workers(repo_root):
    result = subprocess.run(
        [sys.executable, "train_net.py", "--config-file", "configs/swin_balanced.yaml",
         "--num-gpus", "8"], cwd=repo_root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        "train_net.py: error: MODEL.DEVICE is cuda but this machine has no CUDA GPU: run on a GPU "
        "machine, or add `MODEL.DEVICE cpu SOLVER.AMP.ENABLED False` (and no --num-gpus), or use "
        "the CPU twin configs (README)")
    assert "Rank of current process" not in result.stdout + result.stderr


def test_ignored_values_are_warned_about():
    cfg = _cpu_cfg()
    cfg.DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"
    cfg.DATALOADER.OBJECT_IMAGE_SHARE = 0.8
    cfg.HEALTH.NUM_IMAGES = 0
    assert ignored_key_warnings(cfg) == [
        "DATALOADER.OBJECT_IMAGE_SHARE 0.8 is ignored: DATALOADER.SAMPLER_TRAIN is "
        "RepeatFactorTrainingSampler, not ObjectShareTrainingSampler or "
        "ClassAwareObjectShareTrainingSampler",
        "HEALTH.NUM_IMAGES is 0: no detection checks, so no collapse can be reported "
        "(HEALTH.PERIOD 0 says that on purpose)"]
