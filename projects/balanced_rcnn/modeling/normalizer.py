"""
One head's sample counts -> the loss normalizers, with the optional mean over workers and running
average that modeling/losses.py defines (its module docstring holds the formulas):
:func:`normalize_counts`, and :class:`CountNormalizer`, the module that holds its running counts.
The RPN and the box predictor own a CountNormalizer; the mask head, an nn.Sequential of its
layers that must stay one for TorchScript, keeps the buffer itself and calls the function.
"""

from typing import Optional, Tuple

import torch
from torch import nn

from .checks import check_momentum
from .losses import ema_counts, worker_mean_counts

__all__ = ["CountNormalizer", "normalize_counts"]


def normalize_counts(
    counts: torch.Tensor,
    *,
    eps: float,
    sync: bool = True,
    momentum: float = 0.0,
    running: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """
    Args:
        counts: (C,) this worker's counts of the batch (any dtype).
        eps, sync, momentum: MODEL.BALANCED_LOSS.EPS, SYNC_NORMALIZERS, NORMALIZER_MOMENTUM.
        running: with ``momentum > 0``, the (C,) running counts (-1: no batch yet), updated in
            place.

    Returns:
        (C,) float32 counts after averaging over workers and time (X_t), and their (C,)
        normalizers (norm); both detached from autograd.
    """
    counts = worker_mean_counts(counts, sync)
    if momentum > 0:
        counts = ema_counts(running, counts, momentum)
        running.copy_(counts)
    return counts, counts.clamp(min=1.0) + eps


def unset_running_counts(num_counts: int) -> torch.Tensor:
    """The initial running counts: -1, which ema_counts reads as "no batch yet"."""
    return torch.full((num_counts,), -1.0)


class CountNormalizer(nn.Module):
    """
    Turns the (C,) counts of a batch into the counts the losses use and their normalizers.

    With ``momentum > 0`` it keeps the running counts in the buffer ``running_counts``: saved in
    checkpoints and restored by ``--resume``, updated from the worker-averaged counts (with
    ``sync``) so that every worker holds the same values. It starts at -1, which
    :func:`~balanced_rcnn.modeling.losses.ema_counts` reads as "no batch yet": the first batch's
    counts are taken as they are. With ``momentum == 0`` there is no buffer, so checkpoints look
    exactly as without this option.
    """

    running_counts: torch.Tensor

    def __init__(self, num_counts: int, *, eps: float, sync: bool = True, momentum: float = 0.0):
        """
        Args:
            num_counts: C, the number of counts of the head.
            eps: added to every normalizer (MODEL.BALANCED_LOSS.EPS).
            sync: average the counts over workers (MODEL.BALANCED_LOSS.SYNC_NORMALIZERS).
            momentum: in [0, 1), of the running average (MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM).
        """
        super().__init__()
        check_momentum(momentum)
        self.eps = eps
        self.sync = sync
        self.momentum = momentum
        if momentum > 0:
            self.register_buffer("running_counts", unset_running_counts(num_counts))

    @torch.jit.unused  # training only: TorchScript compiles inference, which never calls it
    def forward(self, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """:func:`normalize_counts` with this module's settings and running counts."""
        running = self.running_counts if self.momentum > 0 else None
        return normalize_counts(counts, eps=self.eps, sync=self.sync, momentum=self.momentum,
                                running=running)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, sync={self.sync}, momentum={self.momentum}"
