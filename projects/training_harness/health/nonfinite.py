"""
The per-step stop on a non-finite loss term or gradient norm, before the optimizer applies it,
built from public hook points.

detectron2's SimpleTrainer already raises ``FloatingPointError`` on a non-finite *total* loss, but
only on the main worker (the others run on into the next collective and wait there) and without
saying which term went bad. :class:`NonFiniteStop` is a trainer hook:

- a forward hook on the model (torch's ``register_forward_hook``) keeps the step's loss dict;
- in ``after_backward``, where the gradients are complete (DDP-averaged, clipped) and not yet
  applied (the core Trainer passes after_backward on to its hooks), every loss term and the
  total gradient norm (``optim/grad_norm``, recorded by GradientNormHook) reach the host in one
  transfer, and the workers exchange them with one ``all_gather``, so every worker sees every
  worker's values and all of them take the same decision;
- a non-finite value raises :class:`~training_harness.errors.NonFiniteTrainingError` on every
  worker at the same step, naming the terms, the workers and the iteration. The optimizer step is
  not applied, so the weights are still those of the last finite step: the hook saves them
  (``model_nonfinite_<iter>.pth``) before letting the error through.

The same values feed the stop on a loss that explodes while finite (health/divergence.py), whose
reference travels in checkpoints as this hook's state. Under AMP (an enabled ``grad_scaler``) a
non-finite gradient norm is a legitimate overflow step (the GradScaler skips it and lowers its
scale), so only the losses are checked there.
"""

import logging
import math
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from balanced_rcnn.engine.grad_norm import GRAD_NORM_SCALAR
from balanced_rcnn.utils.events import pending_tensor_scalar
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..errors import LossExplosionError, NonFiniteTrainingError
from ..reliability.checkpoint import save_checkpoint_and_synchronize
from .divergence import LossDivergenceRule

__all__ = ["NonFiniteStop", "check_step"]


def _non_finite_report(gathered: List[Dict], names: List[str], check_grad_norm: bool) -> List[str]:
    """'name = value (worker r)' for every non-finite value; empty if all are finite."""
    multi = len(gathered) > 1
    bad = []
    for name in names:
        for rank, worker in enumerate(gathered):
            value = worker["losses"][name]
            if not math.isfinite(value):
                bad.append(f"{name} = {value}" + (f" (worker {rank})" if multi else ""))
    if check_grad_norm:
        # DDP averages the gradients, so the norm is the same on every worker: report it once.
        norms = [w["grad_norm"] for w in gathered if w["grad_norm"] is not None]
        bad += [f"total gradient norm = {n}" for n in norms[:1] if not math.isfinite(n)]
    return bad


def check_step(loss_dict: Mapping[str, torch.Tensor], cur_iter: int, check_grad_norm: bool = True,
               divergence: Optional[LossDivergenceRule] = None) -> None:
    """
    The checks of the module docstring on one step's losses; ``divergence``'s stop on a finite
    explosion on their means over the workers. Must be called by every worker at the same step
    (one collective).

    Raises:
        NonFiniteTrainingError: on every worker, if any worker has a non-finite loss term or
            (with ``check_grad_norm``) the gradient norm is not finite.
        LossExplosionError: on every worker, if the worker-averaged losses break ``divergence``.
    """
    names = list(loss_dict)
    tensors = [loss_dict[k].detach().to(torch.float32).reshape(()) for k in names]
    grad_norm = pending_tensor_scalar(GRAD_NORM_SCALAR) if check_grad_norm else None
    if grad_norm is not None:
        tensors.append(grad_norm.to(device=tensors[0].device, dtype=torch.float32))
    values = torch.stack(tensors).cpu().tolist()  # the check's one device-to-host copy
    local = {"losses": dict(zip(names, values)),
             "grad_norm": values[-1] if grad_norm is not None else None}
    gathered = comm.all_gather(local) if comm.get_world_size() > 1 else [local]
    bad = _non_finite_report(gathered, names, check_grad_norm)
    if bad:
        raise NonFiniteTrainingError(
            f"Non-finite training values at iteration {cur_iter}: {', '.join(bad)}. The "
            "optimizer step was not applied."
        )
    if divergence is not None:
        # The same means on every worker, so the same decision.
        divergence.check(cur_iter, {k: float(np.mean([w["losses"][k] for w in gathered]))
                                    for k in names})


class NonFiniteStop(HookBase):
    """The hook of the module docstring; register it on every worker. ``divergence``: a
    LossDivergenceRule checked every step, or None."""

    def __init__(self, divergence: Optional[LossDivergenceRule] = None):
        self.divergence = divergence
        self._losses: Optional[Mapping[str, torch.Tensor]] = None
        self._capture = None

    def before_train(self) -> None:
        if self._capture is None:
            self._capture = self.trainer.model.register_forward_hook(self._keep_losses)

    def after_train(self) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def _keep_losses(self, module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if module.training and isinstance(output, Mapping):
            self._losses = output

    def after_backward(self) -> None:
        losses, self._losses = self._losses, None
        if losses is None:
            return
        scaler = getattr(self.trainer, "grad_scaler", None)
        amp = scaler is not None and scaler.is_enabled()
        try:
            check_step(losses, self.trainer.iter, check_grad_norm=not amp,
                       divergence=self.divergence)
        except NonFiniteTrainingError as e:
            if getattr(self.trainer, "checkpointer", None) is not None:
                self._save_weights_before_the_step(e)
            raise

    def _save_weights_before_the_step(self, error: NonFiniteTrainingError) -> None:
        # On every worker, before optimizer.step(): the weights are those of the last finite
        # step, worth keeping. After a non-finite value (often one bad batch) --resume continues
        # from them, past this iteration. After an explosion they are what the high learning rate
        # made of the model: kept to inspect, while last_checkpoint keeps naming the checkpoint
        # before, from which --resume with a lower SOLVER.BASE_LR continues.
        checkpointer, iteration = self.trainer.checkpointer, self.trainer.iter
        exploded = isinstance(error, LossExplosionError)
        path = save_checkpoint_and_synchronize(
            checkpointer, f"{error.checkpoint_prefix}_{iteration:07d}", iteration,
            tag_last=not exploded)
        logger = logging.getLogger(__name__)
        logger.error(f"Saved the weights before the step to {path}")
        if exploded:
            before = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else ""
            logger.error(
                f"--resume continues from {before} (last_checkpoint), with the config's "
                "SOLVER.BASE_LR" if before else "No checkpoint was written before: --resume "
                "starts anew from MODEL.WEIGHTS, with the config's SOLVER.BASE_LR")

    # The divergence rule's reference travels in checkpoints (TrainerBase saves hook states).
    def state_dict(self) -> Dict[str, Any]:
        return {"loss_divergence": self.divergence.state_dict()} if self.divergence else {}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if self.divergence is not None and "loss_divergence" in state_dict:
            self.divergence.load_state_dict(state_dict["loss_divergence"])
