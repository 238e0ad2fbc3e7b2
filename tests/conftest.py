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


# --- Project configs and the tiny CPU model (configs/quick_schedules). ---
TINY_CONFIG = "quick_schedules/swin_tiny_balanced_instant_test.yaml"


@pytest.fixture(scope="session")
def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


@pytest.fixture
def load_project_config(repo_root):
    """``load_project_config("swin_balanced.yaml")``: a file of configs/ merged over detectron2's
    defaults and the project's keys (unfrozen)."""
    from balanced_rcnn import add_balanced_rcnn_config
    from detectron2.config import get_cfg

    def load(relative_path):
        cfg = get_cfg()
        add_balanced_rcnn_config(cfg)
        cfg.merge_from_file(str(repo_root / "configs" / relative_path))
        return cfg

    return load


@pytest.fixture
def tiny_cfg(load_project_config):
    """The instant-test config: tiny Swin-FPN Mask R-CNN with the balanced heads, CPU, unfrozen."""
    return load_project_config(TINY_CONFIG)


@pytest.fixture
def refuse_host_sync(monkeypatch):
    """
    ``with refuse_host_sync(): ...``: inside, the Python-level ways of waiting for the device
    (Tensor.item / tolist / bool / float / int, nonzero) raise AssertionError.
    """
    import contextlib

    def refuse(*args, **kwargs):
        raise AssertionError("host-device synchronization")

    @contextlib.contextmanager
    def context():
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
                patch.setattr(torch.Tensor, name, refuse)
            patch.setattr(torch, "nonzero", refuse)
            yield

    return context


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """detectron2's setup_logger, called in-process by some tests, attaches handlers to the stream
    pytest captured for that test; once that stream is closed, every later log record would print
    a "Logging error" traceback into the next test's output. Drop those handlers."""
    import logging

    loggers = [logging.getLogger()] + [logging.getLogger(name)
                                       for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
    yield


@pytest.fixture
def forget_bad_datasets():
    """Datasets a test registers under names starting with "bad_" are removed afterwards."""
    yield
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in [n for n in DatasetCatalog.list() if n.startswith("bad_")]:
        DatasetCatalog.remove(name)
        if name in MetadataCatalog:
            MetadataCatalog.remove(name)
