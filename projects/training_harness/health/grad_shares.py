"""
Which loss term drives the shared features: the gradient norm of each loss term on the parameters
that every head shares (the backbone, FPN included), as a share of their sum.

Loss shares (``health/loss_share/*``) do not tell it: a term with a small value can have the
largest gradient, and the terms' gradients on the shared features are what compete. Measuring it
takes one extra backward pass per term through the backbone, so it is done on chosen steps only
(the health monitor's check period), from a forward hook on the model: the hook sees the loss
dict with its graph before the trainer's backward. ``torch.autograd.grad`` returns the gradients
without accumulating them into ``.grad`` (nor triggering DDP's reducer), so training is unchanged.
Under float16 AMP the terms are multiplied by the GradScaler's scale first, as the real backward
is, so that small terms do not underflow (the shares are ratios: the scale cancels). Reentrant
activation checkpointing (detectron2's Swin with MODEL.SWIN.USE_CHECKPOINT) does not support
``torch.autograd.grad``: the monitor then leaves the shares out, with a warning.

    health/grad_share/<loss>   ||d loss / d shared|| / sum over the terms of the same norm
"""

from typing import Callable, Dict, List

import logging

import torch
from detectron2.engine import TrainerBase
from detectron2.utils.events import get_event_storage
from torch import nn

__all__ = ["GRAD_SHARE_PREFIX", "LossGradientShares", "loss_gradient_shares", "loss_scale",
           "shares_measurable"]

logger = logging.getLogger(__name__)

GRAD_SHARE_PREFIX = "health/grad_share/"


def loss_gradient_shares(
    losses: Dict[str, torch.Tensor], shared: List[torch.Tensor], scale: float = 1.0
) -> Dict[str, torch.Tensor]:
    """
    {name: 0-dim tensor}: the L2 norm of each loss term's gradient on ``shared`` divided by the sum
    of these norms (all 0 when every norm is 0). The losses' graphs are kept for the real backward.
    ``scale`` multiplies every term before differentiating (the GradScaler's, under AMP).
    """
    norms = {}
    for name, loss in losses.items():
        if not loss.requires_grad:
            norms[name] = torch.zeros((), device=loss.device)
            continue
        grads = torch.autograd.grad(loss * scale, shared, retain_graph=True, allow_unused=True)
        grads = [g for g in grads if g is not None]
        norms[name] = (
            torch.nn.utils.get_total_norm(grads, 2.0) if grads else loss.new_zeros(())
        ).float()
    total = torch.stack(list(norms.values())).sum().clamp(min=1e-12)
    return {name: norm / total for name, norm in norms.items()}


class LossGradientShares:
    """
    A forward hook on the (unwrapped) model that, in training mode, on the steps where
    ``measure_now()`` is true, puts :data:`GRAD_SHARE_PREFIX` + <loss> scalars into the event
    storage (exact values, no smoothing). ``remove()`` takes the hook off.
    """

    def __init__(self, model: nn.Module, shared: nn.Module, measure_now: Callable[[], bool],
                 loss_scale: Callable[[], float] = lambda: 1.0):
        """
        Args:
            model: its training forward returns the loss dict.
            shared: the module whose parameters every head's loss reaches (the backbone).
            measure_now: whether this step is measured (asked after each training forward).
            loss_scale: the factor for the terms before differentiating (AMP's loss scale).
        """
        self._shared = [p for p in shared.parameters() if p.requires_grad]
        self._measure_now = measure_now
        self._loss_scale = loss_scale
        self._handle = model.register_forward_hook(self._after_forward)

    def _after_forward(self, module: nn.Module, inputs, output) -> None:
        if not (module.training and isinstance(output, dict) and self._shared):
            return
        if not self._measure_now():
            return
        losses = {k: v for k, v in output.items() if k.startswith("loss")}
        if not losses:
            return
        shares = loss_gradient_shares(losses, self._shared, self._loss_scale())
        names = list(shares)
        # Every check period only: one transfer for all terms.
        values = torch.stack([shares[n] for n in names]).cpu().tolist()
        get_event_storage().put_scalars(
            smoothing_hint=False, **{GRAD_SHARE_PREFIX + n: v for n, v in zip(names, values)}
        )

    def remove(self) -> None:
        self._handle.remove()


def shares_measurable(backbone: nn.Module) -> bool:
    """False, with a warning, if the backbone uses reentrant activation checkpointing."""
    # detectron2's Swin stages carry the flag (BasicLayer.use_checkpoint).
    if any(getattr(m, "use_checkpoint", False) for m in backbone.modules()):
        logger.warning(
            "Training health: no health/grad_share/* scalars: the backbone uses activation "
            "checkpointing (MODEL.SWIN.USE_CHECKPOINT), whose reentrant backward "
            "torch.autograd.grad does not support"
        )
        return False
    return True


def loss_scale(trainer: TrainerBase) -> float:
    """The GradScaler's scale of the core's Trainer under AMP (its ``grad_scaler``), else 1
    (call it once per measured step: its value waits for the device)."""
    scaler = getattr(trainer, "grad_scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())
