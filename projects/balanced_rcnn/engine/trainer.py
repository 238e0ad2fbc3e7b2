"""
The project's DefaultTrainer: AdamW/SGD parameter groups, whole-model gradient clipping and a
gradient-norm log, the heads' tensor scalars flushed once per step, the rebalancing sampler and
copy-paste loader, COCO bbox+segm evaluation through pycocotools with AP by class frequency and
the image-level metrics, and DDP on the CPU.
"""

import logging
import os
import weakref
from typing import List, Optional

import torch
from detectron2.checkpoint import DetectionCheckpointer
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

from ..config import check_choice
from ..data.loader import build_train_loader
from ..evaluation import FrequencyGroupCOCOEvaluator, ImageLevelEvaluator
from ..utils.events import flush_tensor_scalars
from .grad_norm import GradientNormHook
from .optimizer import build_optimizer

__all__ = ["AMP_PRECISIONS", "Trainer", "amp_precision"]

# SOLVER.AMP.PRECISION: the autocast dtype of detectron2's AMPTrainer.
AMP_PRECISIONS = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def amp_precision(name: str) -> torch.dtype:
    check_choice("SOLVER.AMP.PRECISION", name, tuple(AMP_PRECISIONS))
    return AMP_PRECISIONS[name]


class _PassAfterBackwardOn(HookBase):
    """detectron2 calls ``after_backward`` on the hooks of the inner SimpleTrainer / AMPTrainer
    only; this passes it on to the outer trainer's hooks, which then see the gradients complete
    (DDP-averaged, clipped) and not yet applied."""

    def __init__(self, outer: TrainerBase):
        self._outer = weakref.proxy(outer)

    def after_backward(self) -> None:
        self._outer.after_backward()


class Trainer(DefaultTrainer):
    """
    DefaultTrainer with the project's optimizer, gradient-norm hook, loader and evaluators; its
    hooks get ``after_backward`` too (detectron2 calls it on the inner trainer's hooks only).

    Configured by SOLVER.OPTIMIZER / BETAS / NO_WEIGHT_DECAY_KEYS, SOLVER.CLIP_GRADIENTS (incl.
    CLIP_TYPE "full_model"), SOLVER.AMP.ENABLED / PRECISION, DATALOADER.SAMPLER_TRAIN /
    OBJECT_IMAGE_SHARE, INPUT.COPY_PASTE and TEST.DEPLOYMENT_SCORE_THRESH. Logs
    "optim/grad_norm" every step.
    """

    def __init__(self, cfg: CfgNode):
        # DefaultTrainer.__init__'s assembly, from the same builders, with three pieces it
        # hard-codes made builders: DDP of a CPU model (device_ids=None, which DDP requires there
        # and create_ddp_model does not pass), the inner trainer (build_inner_trainer) and the
        # checkpointer (build_checkpointer, which PeriodicCheckpointer must hold from the start).
        # test_trainer.py fails if DefaultTrainer.__init__ comes to set an attribute that this
        # one does not.
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
        self._trainer.register_hooks([_PassAfterBackwardOn(self)])  # after the inner hooks
        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = self.build_checkpointer(cfg, model, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg
        self.register_hooks(self.build_hooks())

    @property
    def grad_scaler(self) -> Optional[torch.amp.GradScaler]:
        """The GradScaler of the inner AMPTrainer (SOLVER.AMP), None without AMP: DefaultTrainer
        exposes the model, data loader and optimizer of its inner trainer, not this."""
        return getattr(self._trainer, "grad_scaler", None)

    @classmethod
    def build_checkpointer(cls, cfg: CfgNode, model, **checkpointables) -> DetectionCheckpointer:
        """The checkpointer of the run (DefaultTrainer's)."""
        return DetectionCheckpointer(model, cfg.OUTPUT_DIR, **checkpointables)

    @classmethod
    def build_inner_trainer(cls, cfg: CfgNode, model, data_loader, optimizer) -> SimpleTrainer:
        """SimpleTrainer or AMPTrainer (SOLVER.AMP), with :meth:`build_inner_hooks`."""
        if cfg.SOLVER.AMP.ENABLED:
            trainer = AMPTrainer(model, data_loader, optimizer,
                                 precision=amp_precision(cfg.SOLVER.AMP.PRECISION))
        else:
            trainer = SimpleTrainer(model, data_loader, optimizer)
        trainer.register_hooks(cls.build_inner_hooks(cfg))
        return trainer

    @classmethod
    def build_inner_hooks(cls, cfg: CfgNode) -> List[HookBase]:
        """Hooks of the inner SimpleTrainer/AMPTrainer: detectron2 calls after_backward only on
        these, and after_backward is where gradients are complete (DDP-averaged) but not yet
        applied."""
        return [GradientNormHook.from_config(cfg)]

    def build_hooks(self) -> List[Optional[HookBase]]:
        """DefaultTrainer's hooks, without the evaluation when DATASETS.TEST is empty."""
        return [h for h in super().build_hooks()
                if self.cfg.DATASETS.TEST or not isinstance(h, hooks.EvalHook)]

    def run_step(self) -> None:
        super().run_step()
        # The heads (and GradientNormHook) record scalars as tensors; move them all to
        # EventStorage with one device-to-host copy per step.
        flush_tensor_scalars()

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        return build_train_loader(cfg)

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
