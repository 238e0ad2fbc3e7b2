"""
The core's Trainer with the harness: the training-health checks (health/), resumable runs and
trustworthy checkpoints (reliability/), and data loaders that check the datasets and skip
(training) or name (evaluation) the images they cannot use (data/).
"""

import logging
import os
import re
from collections import OrderedDict
from typing import List, Optional

import torch
from balanced_rcnn.engine.trainer import Trainer
from detectron2.config import CfgNode
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
from fvcore.nn.precise_bn import get_bn_modules
from torch.nn.parallel import DistributedDataParallel

from ..data.loader import build_test_loader, build_train_loader
from ..errors import EXIT_PEER_LOST, DataLoaderWorkerLost
from ..health import LossDivergenceRule, NonFiniteStop, TrainingHealthMonitor
from ..reliability import AtomicCheckpointer, CheckpointOnSignal, PeerWatchdogHook
from .resume_hparams import apply_config_hyperparameters

# torch's words for a worker that died: "DataLoader worker (pid(s) 123) exited unexpectedly",
# "DataLoader worker (pid 123) is killed by signal: Killed."
_LOST_LOADER_WORKER = re.compile(r"DataLoader worker \(pid")

__all__ = ["GuardedTrainer"]


class GuardedTrainer(Trainer):
    """
    The core's Trainer (balanced_rcnn.engine.trainer) with atomic checkpoints that must fit the
    model, the checked and skipping data loaders, and, with HEALTH.ENABLED, the health checks
    (health/) and the stop on a non-finite or exploding loss (health/nonfinite.py).
    """

    @classmethod
    def build_checkpointer(cls, cfg: CfgNode, model, **checkpointables) -> AtomicCheckpointer:
        return AtomicCheckpointer(model, cfg.OUTPUT_DIR, **checkpointables)

    def build_hooks(self) -> List[Optional[HookBase]]:
        """
        DefaultTrainer's hooks and the project's, in the order they run after each step
        (detectron2 skips the None entries).
        """
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as DefaultTrainer: PreciseBN's loader, less memory
        main = comm.is_main_process()
        skipped = getattr(self.data_loader, "skipped", None)  # data/mapper.py

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        return [
            hooks.IterationTimer(),
            # Its after_backward stops a non-finite or exploding step before it is applied.
            NonFiniteStop(LossDivergenceRule.from_config(cfg)) if cfg.HEALTH.ENABLED else None,
            hooks.LRScheduler(),
            # Before the checkpointer, which saves the statistics it updates.
            hooks.PreciseBN(cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg),
                            cfg.TEST.PRECISE_BN.NUM_ITER)
            if cfg.TEST.PRECISE_BN.ENABLED and get_bn_modules(self.model) else None,
            # Before the checkpointer (a checkpoint holds the monitor's state of the same
            # iteration) and the writer (which writes the monitor's scalars).
            TrainingHealthMonitor.from_config(self.cfg) if cfg.HEALTH.ENABLED else None,
            hooks.PeriodicCheckpointer(self.checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD)
            if main else None,
            # SIGTERM / Ctrl-C: a checkpoint at the end of the step, after the scheduler step
            # and the periodic checkpoint, before any evaluation.
            CheckpointOnSignal(self.checkpointer),
            # After the checkpointer: a failed evaluation leaves a checkpoint to debug. With no
            # test set there is nothing to evaluate (and `test` refuses an empty DATASETS.TEST).
            hooks.EvalHook(cfg.TEST.EVAL_PERIOD, test_and_save_results)
            if cfg.DATASETS.TEST else None,
            # Last of detectron2's: the writers then see the evaluation's metrics.
            hooks.PeriodicWriter(self.build_writers(), period=20) if main else None,
            hooks.CallbackHook(after_train=lambda _: skipped.log_summary())
            if skipped is not None else None,
            PeerWatchdogHook(cfg.RELIABILITY.PEER_TIMEOUT_S),  # last: see reliability/watchdog.py
        ]

    def resume_or_load(self, resume: bool = True) -> None:
        # A resumed run continues this run's model: a checkpoint of another one is refused
        # (fine-tuning from MODEL.WEIGHTS keeps detectron2's partial load).
        resuming = resume and self.checkpointer.has_checkpoint()
        self.checkpointer.require_full_model = resuming
        super().resume_or_load(resume=resume)
        if resuming:  # the config's hyperparameters, not the checkpoint's (resume_hparams.py)
            model = self.model.module if isinstance(self.model, DistributedDataParallel) \
                else self.model
            config_groups = self.build_optimizer(self.cfg, model).param_groups
            for line in apply_config_hyperparameters(self.optimizer, self.scheduler,
                                                     config_groups):
                logging.getLogger(__name__).info(f"Resumed with the config's {line}")
        # A run killed after the last periodic checkpoint (iteration MAX_ITER - 1) and before
        # model_final.pth was written: there is no iteration left to train, so the checkpointer
        # hook would never write it. The loaded weights are exactly those model_final holds.
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if resume and self.start_iter >= self.max_iter and not os.path.exists(final):
            logging.getLogger(__name__).info(
                f"Training ended at iteration {self.iter}; writing the missing {final}"
            )
            self.checkpointer.save("model_final", iteration=self.iter)  # main process only
            comm.synchronize()

    def run_step(self) -> None:
        try:
            super().run_step()
        except RuntimeError as e:
            if not _LOST_LOADER_WORKER.search(str(e)):
                raise
            self._stop_on_lost_loader_worker(e)

    def _stop_on_lost_loader_worker(self, error: RuntimeError) -> None:
        # The step failed fetching its batch: the weights are those of the last completed step,
        # saved (by the main worker, without a barrier: the other workers may be in a
        # collective) before the process exits with 75 and --resume continues there.
        last = self.iter - 1
        saved = ""
        if last >= 0 and comm.is_main_process():
            self.checkpointer.save(f"model_{last:07d}", iteration=last)
            saved = f" The last completed iteration, {last}, is saved: rerun with --resume."
        message = (f"A data-loader worker process died at iteration {self.iter} ({error}); "
                   "the usual cause is the OOM killer: lower DATALOADER.NUM_WORKERS or "
                   f"SOLVER.IMS_PER_BATCH.{saved} Exit code {EXIT_PEER_LOST}.")
        logging.getLogger(__name__).error(message)
        raise DataLoaderWorkerLost(message) from error

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None) -> OrderedDict:
        if not cfg.DATASETS.TEST:
            raise ValueError(
                "DATASETS.TEST is empty: there is no dataset to evaluate on. Name a registered "
                "dataset, e.g. `DATASETS.TEST \"('coco_2017_val',)\"` on the command line."
            )
        return super().test(cfg, model, evaluators)
