"""Determinism on the CPU: the same SEED gives the same losses, bit for bit, twice in a row.

Seeded as train_net.py seeds (detectron2's default_setup: seed_all_rng(SEED + rank)), with a
DataLoader worker process, whose augmentations draw from its own generators.
"""

from typing import Dict, List

from detectron2.utils.env import seed_all_rng
from training_harness import GuardedTrainer
from training_harness.data import register_datasets_from_config

LOSSES = ("total_loss", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask")


def _losses(cfg) -> Dict[str, List[float]]:
    seed_all_rng(cfg.SEED)
    trainer = GuardedTrainer(cfg)
    trainer.train()
    return {name: [v for v, _ in trainer.storage.history(name).values()] for name in LOSSES}


def test_same_seed_same_losses_twice(tiny_cfg, tmp_path):
    tiny_cfg.DATASETS.SYNTHETIC_ROOT = str(tmp_path / "datasets")
    tiny_cfg.DATASETS.TEST = ()
    tiny_cfg.OUTPUT_DIR = str(tmp_path / "output")
    tiny_cfg.SOLVER.MAX_ITER = 3
    tiny_cfg.DATALOADER.NUM_WORKERS = 1
    assert tiny_cfg.SEED == 0  # the CPU base config fixes it; detectron2's default -1 does not
    register_datasets_from_config(tiny_cfg)

    first, second = _losses(tiny_cfg), _losses(tiny_cfg)
    assert all(len(values) == 3 for values in first.values())
    assert first == second  # exact: same floats
