"""Ctrl-C (SIGINT) during training: the step completes, a checkpoint is saved, exit code 130;
and where the GuardedTrainer puts the reliability hooks.

SIGTERM through train_net.py, with --resume afterwards: tests/test_interrupted_training.py.
"""

import logging
import os
import signal

import pytest
import torch
from detectron2.engine import HookBase, hooks
from training_harness import GuardedTrainer
from training_harness.data import register_datasets_from_config
from training_harness.errors import TrainingInterrupted
from training_harness.reliability.signals import CheckpointOnSignal
from training_harness.reliability.watchdog import PeerWatchdogHook


class _SendSignal(HookBase):
    """Sends ``signum`` to this process in the middle of step ``at`` (before its backward)."""

    def __init__(self, at: int, signum: int):
        self.at, self.signum = at, signum

    def before_step(self) -> None:
        if self.trainer.iter == self.at:
            os.kill(os.getpid(), self.signum)


def _ten_step_trainer(tiny_cfg, tmp_path) -> GuardedTrainer:
    """The tiny model for 10 steps into tmp_path/output, no evaluation, no periodic checkpoint."""
    tiny_cfg.DATASETS.SYNTHETIC_ROOT = str(tmp_path / "datasets")
    tiny_cfg.DATASETS.TEST = ()
    tiny_cfg.OUTPUT_DIR = str(tmp_path / "output")
    tiny_cfg.SOLVER.MAX_ITER = 10
    tiny_cfg.SOLVER.CHECKPOINT_PERIOD = 100
    register_datasets_from_config(tiny_cfg)
    return GuardedTrainer(tiny_cfg)


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGHUP, 129)])
def test_ctrl_c_or_a_closed_terminal_saves_the_completed_step(tiny_cfg, tmp_path, caplog,
                                                              signum, code):
    trainer = _ten_step_trainer(tiny_cfg, tmp_path)
    # After the scheduler and the periodic checkpoint, before the writer; the watchdog last.
    order = [type(h) for h in trainer._hooks]
    assert order.index(hooks.LRScheduler) < order.index(CheckpointOnSignal)
    assert order.index(hooks.PeriodicCheckpointer) < order.index(CheckpointOnSignal)
    assert order.index(CheckpointOnSignal) < order.index(hooks.PeriodicWriter)
    assert order[-1] is PeerWatchdogHook
    trainer.register_hooks([_SendSignal(at=2, signum=signum)])
    previous = signal.getsignal(signum)
    # A skip recorded while training is summarized at its end, interrupted or not.
    trainer._trainer.data_loader.skipped.add("broken.png", "OSError: image file is truncated",
                                             check=False)

    with pytest.raises(TrainingInterrupted) as info, caplog.at_level(logging.WARNING):
        trainer.train()
    assert ("Skipped 1 of 16 training images that cannot be used (RELIABILITY.MAX_SKIPPED_IMAGE_"
            "FRACTION = 0.01): 'broken.png' (OSError: image file is truncated)") in caplog.text
    assert info.value.code == code and info.value.iteration == 2
    # Step 2 ran to its end (no KeyboardInterrupt in the middle of it) and was saved.
    assert trainer.iter == 2
    path = tmp_path / "output" / "model_0000002.pth"
    assert info.value.checkpoint == str(path)
    assert (tmp_path / "output" / "last_checkpoint").read_text() == "model_0000002.pth"
    saved = torch.load(path, map_location="cpu", weights_only=False)
    assert saved["iteration"] == 2 and saved["trainer"]["iteration"] == 2
    model = trainer.model.state_dict()
    assert all(torch.equal(saved["model"][k], v) for k, v in model.items())
    assert signal.getsignal(signum) is previous  # the default action is back


def test_a_dead_data_loader_worker_saves_the_last_step_and_exits_75(tiny_cfg, tmp_path, caplog):
    """torch raises this RuntimeError in the training process when the OOM killer ends one of
    its loader workers; the process is alive and can still save."""
    from training_harness.errors import DataLoaderWorkerLost

    trainer = _ten_step_trainer(tiny_cfg, tmp_path)
    batches = iter(trainer._trainer.data_loader)

    def dies_at_the_fourth_batch():
        for _ in range(3):
            yield next(batches)
        raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

    trainer._trainer._data_loader_iter_obj = dies_at_the_fourth_batch()
    with pytest.raises(DataLoaderWorkerLost) as info, caplog.at_level(logging.ERROR):
        trainer.train()
    assert info.value.code == 75
    assert ("A data-loader worker process died at iteration 3 (DataLoader worker (pid(s) 4242) "
            "exited unexpectedly); the usual cause is the OOM killer: lower "
            "DATALOADER.NUM_WORKERS or SOLVER.IMS_PER_BATCH. The last completed iteration, 2, is "
            "saved: rerun with --resume. Exit code 75.") in caplog.text
    assert (tmp_path / "output" / "last_checkpoint").read_text() == "model_0000002.pth"
    saved = torch.load(tmp_path / "output" / "model_0000002.pth", weights_only=True)
    assert saved["iteration"] == 2
