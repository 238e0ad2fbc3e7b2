"""
CountNormalizer: one head's sample counts -> the loss normalizers, with the optional mean over
workers and running average that modeling/losses.py defines (its module docstring holds the
formulas). Every balanced head owns one, so the three heads share this plumbing.
"""

from typing import Tuple

import torch
from torch import nn

from .losses import ema_counts, worker_mean_counts

__all__ = ["CountNormalizer"]


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
        if not 0.0 <= momentum < 1.0:
            raise ValueError(
                f"MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM must be in [0, 1), got {momentum}"
            )
        self.eps = eps
        self.sync = sync
        self.momentum = momentum
        if momentum > 0:
            self.register_buffer("running_counts", torch.full((num_counts,), -1.0))

    def forward(self, counts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            counts: (C,) this worker's counts of the batch (any dtype).

        Returns:
            (C,) float32 counts after averaging over workers and time, and (C,) normalizers
            ``max(count, 1) + eps``; both detached from autograd.
        """
        counts = worker_mean_counts(counts, self.sync)
        if self.momentum > 0:
            counts = ema_counts(self.running_counts, counts, self.momentum)
            self.running_counts.copy_(counts)
        return counts, counts.clamp(min=1.0) + self.eps

    def extra_repr(self) -> str:
        return f"eps={self.eps}, sync={self.sync}, momentum={self.momentum}"
