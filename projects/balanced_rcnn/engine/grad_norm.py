"""
The total gradient norm: logged every step, and clipped when SOLVER.CLIP_GRADIENTS.CLIP_TYPE is
"full_model" (one ``torch.nn.utils.clip_grad_norm_`` over all parameters, with max norm
CLIP_VALUE, as the original design trained with).

It runs in the ``after_backward`` hook of the inner SimpleTrainer / AMPTrainer: after DDP has
averaged the gradients and before ``optimizer.step()``. Under AMP it first unscales the
gradients (``GradScaler.unscale_``; the scaler's own ``step`` then does not unscale again), so
the logged norm and the clip threshold are in true gradient units; on a step where the scaler
finds inf/NaN gradients, the logged norm is that non-finite value and the scaler skips the
update. detectron2's per-parameter clipping ("value", "norm") runs later, inside
``optimizer.step()``, so the logged norm is always the pre-clip one.
"""

import math
from typing import Iterable, Optional

import torch
from detectron2.config import CfgNode
from detectron2.engine import HookBase

from ..utils.events import put_tensor_scalars
from .optimizer import FULL_MODEL_CLIP

__all__ = ["GRAD_NORM_SCALAR", "GradientNormHook", "clip_and_measure_grad_norm"]

# The EventStorage scalar holding the pre-clip total L2 norm of all gradients.
GRAD_NORM_SCALAR = "optim/grad_norm"


@torch.no_grad()
def clip_and_measure_grad_norm(
    parameters: Iterable[torch.Tensor], max_norm: Optional[float] = None, norm_type: float = 2.0
) -> torch.Tensor:
    """
    Returns the total L2 norm of the gradients of ``parameters`` (a 0-dim tensor, on the
    gradients' device, no host synchronization) and, if ``max_norm`` is given, scales the
    gradients in place exactly as ``torch.nn.utils.clip_grad_norm_(parameters, max_norm,
    norm_type)`` does.
    """
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    l2_norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if max_norm is not None:
        clip_norm = l2_norm if norm_type == 2.0 else torch.nn.utils.get_total_norm(grads, norm_type)
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, clip_norm)
    return l2_norm


class GradientNormHook(HookBase):
    """
    Logs :data:`GRAD_NORM_SCALAR` every step and applies the "full_model" clip.

    Register it on the trainer that runs backward (``DefaultTrainer._trainer``): detectron2
    calls ``after_backward`` only on that trainer's hooks.
    """

    def __init__(self, max_norm: Optional[float] = None, norm_type: float = 2.0):
        """
        Args:
            max_norm: clip the total norm to this value; None: only measure.
            norm_type: the p of the p-norm the clip uses (the logged norm is always L2).
        """
        if max_norm is not None and not (math.isfinite(max_norm) and max_norm > 0):
            raise ValueError(
                f"The {FULL_MODEL_CLIP} clip needs a finite max norm > 0 "
                f"(SOLVER.CLIP_GRADIENTS.CLIP_VALUE), got {max_norm}"
            )
        self._max_norm = max_norm
        self._norm_type = norm_type

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "GradientNormHook":
        clip = cfg.SOLVER.CLIP_GRADIENTS
        full_model = clip.ENABLED and clip.CLIP_TYPE == FULL_MODEL_CLIP
        return cls(max_norm=clip.CLIP_VALUE if full_model else None, norm_type=clip.NORM_TYPE)

    def after_backward(self) -> None:
        optimizer = self.trainer.optimizer
        grad_scaler = getattr(self.trainer, "grad_scaler", None)
        if grad_scaler is not None and grad_scaler.is_enabled():
            grad_scaler.unscale_(optimizer)
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        norm = clip_and_measure_grad_norm(parameters, self._max_norm, self._norm_type)
        put_tensor_scalars(**{GRAD_NORM_SCALAR: norm})
