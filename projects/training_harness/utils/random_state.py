"""Set-up checks that draw random numbers without changing the run."""

import contextlib
import random
from typing import Iterator

import numpy as np
import torch

__all__ = ["preserved_random_state"]


@contextlib.contextmanager
def preserved_random_state() -> Iterator[None]:
    """
    Restore Python's, NumPy's and torch's (CPU) global random state on exit. The set-up checks
    draw from them: detectron2's test-time ResizeShortestEdge is built with (size, size) and
    draws one of the two with ``np.random.choice``, and building a model draws its
    initialization. The training sampler's
    seed is drawn from NumPy's state later (``comm.shared_random_seed``), so without this a
    seeded run would see other data than the same run without the checks.
    """
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
