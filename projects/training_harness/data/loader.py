"""
The harness's data loaders: the core's training loader (balanced_rcnn/data/loader.py) fed with
checked dataset dicts (data/train_dicts.py) through a mapper that skips the images it cannot use
(data/mapper.py), and detectron2's test loader, which names them.
"""

import logging

from balanced_rcnn.data.loader import build_train_loader as build_core_train_loader
from balanced_rcnn.data.loader import build_train_mapper
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, build_detection_test_loader
from detectron2.utils import comm
from torch.utils.data import DataLoader

from .mapper import SkippingMapper, SkipTrackingLoader
from .train_dicts import load_train_dicts

__all__ = ["build_test_loader", "build_train_loader"]

logger = logging.getLogger(__name__)


def build_train_loader(cfg: CfgNode) -> SkipTrackingLoader:
    """The training loader; its ``skipped`` attribute tallies the images skipped so far."""
    dicts, skipped = load_train_dicts(cfg)
    if comm.is_main_process():
        _log_preflight_summary(cfg, dicts)
    # Each mapper may skip what the up-front check has left of the allowance.
    mapper = SkippingMapper(build_train_mapper(cfg, dicts), max_skipped=skipped.remaining())
    return SkipTrackingLoader(build_core_train_loader(cfg, dicts, mapper), skipped)


def _log_preflight_summary(cfg: CfgNode, dicts) -> None:
    # Imported here: preflight/ reads the data package. A diagnostic never stops a run.
    from ..preflight.report import preflight_summary

    try:
        logger.info(preflight_summary(cfg, dicts))
    except Exception as e:  # noqa: BLE001
        logger.warning(f"Pre-flight summary not computed ({type(e).__name__}: {e}); "
                       "tools/analyze_data.py gives the full report")


def build_test_loader(cfg: CfgNode, dataset_name: str) -> DataLoader:
    """detectron2's test loader; an unusable image is an error naming the file."""
    return build_detection_test_loader(cfg, dataset_name,
                                       mapper=SkippingMapper(DatasetMapper(cfg, False)))
