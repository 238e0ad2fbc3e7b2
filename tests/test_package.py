"""Importing the package registers the project's names and adds its config keys."""
import balanced_rcnn
from detectron2.config import get_cfg


def test_add_config_is_idempotent_and_keeps_values():
    cfg = get_cfg()
    balanced_rcnn.add_balanced_rcnn_config(cfg)
    cfg.MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT = 3.0
    cfg.SOLVER.OPTIMIZER = "AdamW"
    balanced_rcnn.add_balanced_rcnn_config(cfg)
    assert cfg.MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT == 3.0
    assert cfg.SOLVER.OPTIMIZER == "AdamW"
    assert cfg.MODEL.BALANCED_LOSS.EPS == 1e-6
    assert cfg.MODEL.BALANCED_LOSS.SYNC_NORMALIZERS is True
