"""
The project's DefaultTrainer: AdamW/SGD parameter groups, whole-model gradient clipping and a
gradient-norm log, the heads' tensor scalars flushed once per step, the training-health checks
(health/), COCO bbox+segm evaluation through pycocotools, resumable runs (reliability/) and DDP
on the CPU.
"""

import logging
import os
import re
import weakref
from collections import OrderedDict
from typing import List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.engine import (
    AMPTrainer,
    DefaultTrainer,
    HookBase,
    SimpleTrainer,
    TrainerBase,
    create_ddp_model,
    hooks,
)
from detectron2.evaluation import DatasetEvaluator, DatasetEvaluators
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from fvcore.nn.precise_bn import get_bn_modules
from torch.nn.parallel import DistributedDataParallel

from ..data.loader import build_test_loader, build_train_loader
from ..errors import (EXIT_PEER_LOST, DataLoaderWorkerLost, LossExplosionError,
                      NonFiniteTrainingError)
from ..evaluation import FrequencyGroupCOCOEvaluator, ImageLevelEvaluator
from ..health import (
    GuardedAMPTrainer,
    GuardedSimpleTrainer,
    LossDivergenceRule,
    TrainingHealthMonitor,
)
from ..reliability import AtomicCheckpointer, CheckpointOnSignal, PeerWatchdogHook
from ..reliability.checkpoint import save_checkpoint_and_synchronize
from ..utils.events import flush_tensor_scalars
from .grad_norm import GradientNormHook
from .optimizer import build_optimizer
from .resume_hparams import apply_config_hyperparameters

# torch's words for a worker that died: "DataLoader worker (pid(s) 123) exited unexpectedly",
# "DataLoader worker (pid 123) is killed by signal: Killed."
_LOST_LOADER_WORKER = re.compile(r"DataLoader worker \(pid")

__all__ = ["AMP_PRECISIONS", "Trainer", "amp_precision"]

# SOLVER.AMP.PRECISION: the autocast dtype of detectron2's AMPTrainer.
AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_precision(name: str) -> torch.dtype:
    if name not in AMP_PRECISIONS:
        raise ValueError(
            f"SOLVER.AMP.PRECISION must be one of {tuple(AMP_PRECISIONS)}, got {name!r}")
    return AMP_PRECISIONS[name]


class Trainer(DefaultTrainer):
    """
    DefaultTrainer with the project's optimizer, gradient-norm hook and COCO evaluator.

    Configured by SOLVER.OPTIMIZER / BETAS / NO_WEIGHT_DECAY_KEYS, SOLVER.CLIP_GRADIENTS (incl.
    CLIP_TYPE "full_model") and SOLVER.AMP.ENABLED / PRECISION. Logs "optim/grad_norm" every
    step. With HEALTH.ENABLED, runs the health checks (health/).
    """

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__'s assembly, from the same builders, with three pieces it
        # hard-codes replaced: DDP of a CPU model (device_ids=None, which DDP requires there),
        # the inner trainer (build_inner_trainer) and the checkpointer (AtomicCheckpointer, which
        # PeriodicCheckpointer must hold from the start). test_trainer.py fails if
        # DefaultTrainer.__init__ comes to set an attribute that this one does not.
        TrainerBase.__init__(self)
        if not logging.getLogger("detectron2").isEnabledFor(logging.INFO):
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())
        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)
        on_gpu = next(model.parameters()).device.type == "cuda"
        model = create_ddp_model(model, broadcast_buffers=False,
                                 device_ids=[comm.get_local_rank()] if on_gpu else None)
        self._trainer = self.build_inner_trainer(cfg, model, data_loader, optimizer)
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @classmethod
    def build_inner_trainer(cls, cfg: CfgNode, model, data_loader, optimizer) -> SimpleTrainer:
        """
        SimpleTrainer or AMPTrainer (SOLVER.AMP); with HEALTH.ENABLED the guarded one, which
        stops every worker before the optimizer step on a non-finite or exploding loss
        (health/nonfinite.py, health/divergence.py). Its hooks are :meth:`build_inner_hooks`.
        """
        guard = {"divergence": LossDivergenceRule.from_config(cfg)} if cfg.HEALTH.ENABLED else {}
        if cfg.SOLVER.AMP.ENABLED:
            inner = GuardedAMPTrainer if cfg.HEALTH.ENABLED else AMPTrainer
            trainer = inner(model, data_loader, optimizer,
                            precision=amp_precision(cfg.SOLVER.AMP.PRECISION), **guard)
        else:
            inner = GuardedSimpleTrainer if cfg.HEALTH.ENABLED else SimpleTrainer
            trainer = inner(model, data_loader, optimizer, **guard)
        trainer.register_hooks(cls.build_inner_hooks(cfg))
        return trainer

    @classmethod
    def build_inner_hooks(cls, cfg: CfgNode) -> List[HookBase]:
        """Hooks of the inner SimpleTrainer/AMPTrainer: detectron2 calls after_backward only on
        these, and after_backward is where gradients are complete (DDP-averaged) but not yet
        applied."""
        return [GradientNormHook.from_config(cfg)]

    def build_hooks(self) -> List[Optional[HookBase]]:
        """
        DefaultTrainer's hooks and the project's, in the order they run after each step
        (detectron2 skips the None entries).
        """
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as DefaultTrainer: PreciseBN's loader, less memory
        main = comm.is_main_process()
        skipped = getattr(self._trainer.data_loader, "skipped", None)  # data/mapper.py

        def test_and_save_results():
            self._last_eval_results = self.test(self.cfg, self.model)
            return self._last_eval_results

        return [
            hooks.IterationTimer(),
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
        except NonFiniteTrainingError as e:
            # Raised on every worker before optimizer.step(): the weights are those of the last
            # finite step, worth keeping. After a non-finite value (often one bad batch) --resume
            # continues from them, past this iteration. After an explosion they are what the
            # high learning rate made of the model: kept to inspect, while last_checkpoint keeps
            # naming the checkpoint before, from which --resume with a lower SOLVER.BASE_LR
            # continues.
            exploded = isinstance(e, LossExplosionError)
            path = save_checkpoint_and_synchronize(
                self.checkpointer, f"{e.checkpoint_prefix}_{self.iter:07d}", self.iter,
                tag_last=not exploded)
            logger = logging.getLogger(__name__)
            logger.error(f"Saved the weights before the step to {path}")
            if exploded:
                before = self.checkpointer.get_checkpoint_file() if \
                    self.checkpointer.has_checkpoint() else ""
                logger.error(
                    f"--resume continues from {before} (last_checkpoint), with the config's "
                    "SOLVER.BASE_LR" if before else "No checkpoint was written before: --resume "
                    "starts anew from MODEL.WEIGHTS, with the config's SOLVER.BASE_LR")
            raise
        except RuntimeError as e:
            if not _LOST_LOADER_WORKER.search(str(e)):
                raise
            self._stop_on_lost_loader_worker(e)
        # The heads (and GradientNormHook) record scalars as tensors; move them all to
        # EventStorage with one device-to-host copy per step.
        flush_tensor_scalars()

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
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_train_loader(cfg)

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        return build_test_loader(cfg, dataset_name)

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None
    ) -> DatasetEvaluator:
        """COCO AP with AP by class frequency (APr/APc/APf, evaluation/frequency_groups.py) and
        the image-level metrics at TEST.DEPLOYMENT_SCORE_THRESH (evaluation/image_level.py)."""
        # use_fast_impl=False: the compiled COCO-eval speed-up lives in detectron2._C, which
        # the pure-Python install lacks; pycocotools gives the reference numbers.
        coco = FrequencyGroupCOCOEvaluator(
            dataset_name,
            train_datasets=cfg.DATASETS.TRAIN,
            tasks=("bbox", "segm") if cfg.MODEL.MASK_ON else ("bbox",),
            output_dir=output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name),
            use_fast_impl=False,
        )
        return DatasetEvaluators([coco, ImageLevelEvaluator(
            dataset_name, cfg.TEST.DEPLOYMENT_SCORE_THRESH)])

    @classmethod
    def test(cls, cfg: CfgNode, model: torch.nn.Module, evaluators=None) -> OrderedDict:
        if not cfg.DATASETS.TEST:
            raise ValueError(
                "DATASETS.TEST is empty: there is no dataset to evaluate on. Name a registered "
                "dataset, e.g. `DATASETS.TEST \"('coco_2017_val',)\"` on the command line."
            )
        return super().test(cfg, model, evaluators)
