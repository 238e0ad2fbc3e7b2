"""
The per-step stop on a non-finite loss term or gradient norm, before the optimizer applies it.

detectron2's SimpleTrainer already raises ``FloatingPointError`` on a non-finite *total* loss, but
only on the main worker (the others run on into the next collective and wait there) and without
saying which term went bad. :class:`NonFiniteGuardMixin` replaces the trainer's per-step metric
write, which runs after ``after_backward`` and before ``optimizer.step()``:

- every loss term and the total gradient norm (``optim/grad_norm``, recorded by
  GradientNormHook in ``after_backward``) reach the host in one transfer, where detectron2 does
  one ``.item()`` per term: no synchronization is added;
- the workers exchange their values with one ``all_gather`` where detectron2 does one
  ``gather``, so every worker sees every worker's values and all of them take the same decision;
- a non-finite value raises :class:`~training_harness.errors.NonFiniteTrainingError`, on
  every worker at the same step, naming the terms, the workers and the iteration. The optimizer
  step is not applied, so the weights are still those of the last finite step; the Trainer saves
  them before letting the error through.

The same values feed the stop on a loss that explodes while finite (health/divergence.py).

Under AMP a non-finite gradient norm is a legitimate overflow step (the GradScaler skips it and
lowers its scale), so only the losses are checked there. The metrics it writes are detectron2's:
``total_loss``, each ``loss_*`` averaged over workers, ``data_time`` (the slowest worker) and
``rank_data_time``.
"""

import math
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch
from balanced_rcnn.engine.grad_norm import GRAD_NORM_SCALAR
from balanced_rcnn.utils.events import pending_tensor_scalar
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..errors import NonFiniteTrainingError
from .divergence import LossDivergenceRule

__all__ = ["GuardedAMPTrainer", "GuardedSimpleTrainer", "NonFiniteGuardMixin", "write_metrics"]


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


def write_metrics(
    loss_dict: Mapping[str, torch.Tensor],
    data_time: float,
    cur_iter: int,
    prefix: str = "",
    check_grad_norm: bool = True,
    divergence: Optional[LossDivergenceRule] = None,
) -> None:
    """
    detectron2's ``SimpleTrainer.write_metrics`` plus the non-finite stop described in the module
    docstring, and ``divergence``'s stop on a finite explosion (health/divergence.py). Must be
    called by every worker at the same step (one collective).

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
    values = torch.stack(tensors).cpu().tolist()  # the step's one device-to-host copy
    local = {
        "losses": dict(zip(names, values)),
        "grad_norm": values[-1] if grad_norm is not None else None,
        "data_time": data_time,
    }
    storage = get_event_storage()
    storage.put_scalar("rank_data_time", data_time, cur_iter=cur_iter)
    gathered = comm.all_gather(local)

    bad = _non_finite_report(gathered, names, check_grad_norm)
    if bad:
        raise NonFiniteTrainingError(
            f"Non-finite training values at iteration {cur_iter}: {', '.join(bad)}. The "
            "optimizer step was not applied."
        )
    # As detectron2: losses averaged over workers; the same values, so the same decision, on all.
    means = {k: float(np.mean([w["losses"][k] for w in gathered])) for k in names}
    if divergence is not None:
        divergence.check(cur_iter, means)
    if comm.is_main_process():
        storage.put_scalar("data_time", max(w["data_time"] for w in gathered), cur_iter=cur_iter)
        storage.put_scalar(f"{prefix}total_loss", sum(means.values()), cur_iter=cur_iter)
        if len(means) > 1:
            storage.put_scalars(cur_iter=cur_iter, **means)


class NonFiniteGuardMixin:
    """Mixed into SimpleTrainer / AMPTrainer: their metric write becomes :func:`write_metrics`,
    with ``divergence`` (a LossDivergenceRule, or None) checked every step."""

    def __init__(self, *args, divergence: Optional[LossDivergenceRule] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.divergence = divergence

    # The divergence rule's reference travels in checkpoints (DefaultTrainer saves "_trainer").
    def state_dict(self) -> dict:
        ret = super().state_dict()
        if self.divergence is not None:
            ret["loss_divergence"] = self.divergence.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if self.divergence is not None and "loss_divergence" in state_dict:
            self.divergence.load_state_dict(state_dict["loss_divergence"])

    # detectron2's only call between after_backward and optimizer.step() with the step's loss
    # dict: no public hook sees the losses before the step is applied. A private method, so the
    # tests pin the behaviour relied on: a NaN loss term stops before the weights change
    # (tests/test_nonfinite_guard.py; tests/test_health_runs.py through train_net.py).
    def _write_metrics(
        self,
        loss_dict: Mapping[str, torch.Tensor],
        data_time: float,
        prefix: str = "",
        iter: Optional[int] = None,
    ) -> None:
        # detectron2 can write metrics from a thread (async_write_metrics), where an exception
        # would be lost instead of stopping training.
        assert not self.async_write_metrics, "the non-finite stop needs synchronous metric writes"
        iter = self.iter if iter is None else iter
        if (iter + 1) % self.gather_metric_period == 0:
            write_metrics(
                loss_dict,
                data_time,
                iter,
                prefix,
                check_grad_norm=not isinstance(self, AMPTrainer),
                divergence=self.divergence,
            )


class GuardedSimpleTrainer(NonFiniteGuardMixin, SimpleTrainer):
    """SimpleTrainer that stops on a non-finite loss term or gradient norm."""


class GuardedAMPTrainer(NonFiniteGuardMixin, AMPTrainer):
    """AMPTrainer that stops on a non-finite loss term (overflowing gradients are AMP's)."""
