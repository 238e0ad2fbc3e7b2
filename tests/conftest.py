"""Shared fixtures: deterministic seeds, an EventStorage, and quiet logs."""
import random

import numpy as np
import pytest
import torch
from detectron2.utils.events import EventStorage


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def event_storage():
    """Detectron2 heads log through get_event_storage(); give them one."""
    with EventStorage(start_iter=0) as storage:
        yield storage
