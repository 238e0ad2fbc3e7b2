"""
The project's data loaders: detectron2's, fed with checked dataset dicts (data/train_dicts.py), a
mapper that skips or names the images it cannot use (data/mapper.py) and, with DATALOADER.
SAMPLER_TRAIN "ObjectShareTrainingSampler" or "ClassAwareObjectShareTrainingSampler", the
project's image rebalancing (data/samplers.py), and with INPUT.COPY_PASTE.PROBABILITY > 0 objects
pasted onto empty training images (data/copy_paste.py).
"""

import logging

from detectron2.config import CfgNode
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.utils import comm
from torch.utils.data import DataLoader

from .copy_paste import CopyPasteDatasetMapper
from .mapper import SkippingDatasetMapper, SkipTrackingLoader
from .samplers import build_object_share_sampler
from .train_dicts import load_train_dicts

__all__ = ["build_test_loader", "build_train_loader"]

logger = logging.getLogger(__name__)


def build_train_loader(cfg: CfgNode) -> SkipTrackingLoader:
    """The training loader; its ``skipped`` attribute tallies the images skipped so far."""
    dicts, skipped = load_train_dicts(cfg)
    if comm.is_main_process():
        _log_preflight_summary(cfg, dicts)
    # Each mapper may skip what the up-front check has left of the allowance.
    if cfg.INPUT.COPY_PASTE.PROBABILITY != 0:  # the mapper refuses values outside [0, 1]
        mapper = CopyPasteDatasetMapper(cfg, True, max_skipped=skipped.remaining(), donors=dicts)
    else:
        mapper = SkippingDatasetMapper(cfg, True, max_skipped=skipped.remaining())
    # None: detectron2 builds the sampler DATALOADER.SAMPLER_TRAIN names.
    sampler = build_object_share_sampler(cfg, dicts)
    loader = build_detection_train_loader(cfg, dataset=dicts, mapper=mapper, sampler=sampler)
    return SkipTrackingLoader(loader, skipped)


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
    return build_detection_test_loader(cfg, dataset_name, mapper=SkippingDatasetMapper(cfg, False))
