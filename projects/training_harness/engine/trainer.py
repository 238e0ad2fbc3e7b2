"""
The core's Trainer with the harness: the training-health checks (health/), resumable runs and
trustworthy checkpoints (reliability/), and data loaders that check the datasets and skip
(training) or name (evaluation) the images they cannot use (data/).
"""

import logging
import os
import re
from collections import OrderedDict
from typing import List, Optional, Tuple

import torch
from balanced_rcnn.engine.trainer import Trainer
from detectron2.config import CfgNode
from detectron2.engine import HookBase, hooks
from detectron2.utils import comm
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


def _insert_before(built: List[HookBase], anchors: Tuple[type, ...],
                   new: List[HookBase]) -> None:
    """``new`` before the first hook of a type in ``anchors``, or at the end."""
    at = next((i for i, h in enumerate(built) if isinstance(h, anchors)), len(built))
    built[at:at] = new


class GuardedTrainer(Trainer):
    """
    The core's Trainer (balanced_rcnn.engine.trainer) with atomic checkpoints that must fit the
    model, the checked and skipping data loaders, and, with HEALTH.ENABLED, the health checks
    (health/) and the stop on a non-finite or exploding loss (health/nonfinite.py).
    """

    @classmethod
    def build_checkpointer(cls, cfg: CfgNode, model, **checkpointables) -> AtomicCheckpointer:
        """Atomic writes. Without a trainer's state (evaluation) every model tensor must come
        from the file: no AP for weights not loaded; a training run decides in
        :meth:`resume_or_load`."""
        return AtomicCheckpointer(model, cfg.OUTPUT_DIR, require_full_model=not checkpointables,
                                  **checkpointables)

    def build_hooks(self) -> List[Optional[HookBase]]:
        """
        The core's hooks (detectron2's) with the harness's, each where it must run:

        - the health checks after the LR scheduler and before the checkpointer, evaluation and
          writer: a checkpoint then holds their state of the same step, and the writer their
          scalars;
        - the checkpoint on a signal after the periodic one (which may have saved this very
          step) and before any evaluation;
        - the watchdog last: its ``after_train`` comes after the final evaluation, which it
          watches too (reliability/watchdog.py).
        """
        cfg = self.cfg
        built = super().build_hooks()
        health = [
            # Its after_backward stops a non-finite or exploding step before it is applied.
            NonFiniteStop(LossDivergenceRule.from_config(cfg)),
            TrainingHealthMonitor.from_config(cfg),
        ] if cfg.HEALTH.ENABLED else []
        _insert_before(built, (hooks.PeriodicCheckpointer, hooks.EvalHook, hooks.PeriodicWriter),
                       health)
        _insert_before(built, (hooks.EvalHook, hooks.PeriodicWriter),
                       [CheckpointOnSignal(self.checkpointer)])
        skipped = getattr(self.data_loader, "skipped", None)  # data/mapper.py
        if skipped is not None:
            built.append(hooks.CallbackHook(after_train=lambda _: skipped.log_summary()))
        built.append(PeerWatchdogHook(cfg.RELIABILITY.PEER_TIMEOUT_S))
        return built

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
