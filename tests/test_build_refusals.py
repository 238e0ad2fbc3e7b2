"""Build-time refusals of the balanced heads: every bad key is refused when the model is built,
with a message that names it, whether the head is built within a model or on its own, from a
config or by hand."""

import pytest
from conftest import (
    BOX_FEATURES,
    FEATURE_SHAPES,
    K,
    build_rpn,
    mask_heads,
    roi_cfg,
    roi_heads_cfg,
    rpn_cfg,
)
from detectron2.config import get_cfg
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import build_roi_heads

from balanced_rcnn import BalancedFastRCNNOutputLayers
from balanced_rcnn.modeling import BalancedLossSettings

pytestmark = pytest.mark.core


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("MODEL.RPN.LOSS_WEIGHT", 2.0, "MODEL.BALANCED_LOSS.RPN_LOSS_CLS_WEIGHT"),
        ("MODEL.RPN.BBOX_REG_LOSS_WEIGHT", 0.5, "MODEL.BALANCED_LOSS.RPN_LOSS_BBOX_WEIGHT"),
        ("MODEL.BALANCED_LOSS.RPN_CLS_POS_WEIGHT", -1.0, r"RPN_CLS_POS_WEIGHT.*-1\.0"),
        ("MODEL.BALANCED_LOSS.RPN_LOSS_CLS_WEIGHT", float("nan"), "RPN_LOSS_CLS_WEIGHT.*nan"),
        ("MODEL.BALANCED_LOSS.RPN_LOSS_BBOX_WEIGHT", float("inf"), "RPN_LOSS_BBOX_WEIGHT.*inf"),
        ("MODEL.BALANCED_LOSS.EPS", 0.0, r"MODEL.BALANCED_LOSS.EPS.*0\.0"),
        ("MODEL.BALANCED_LOSS.EPS", -1e-6, "MODEL.BALANCED_LOSS.EPS"),
        ("MODEL.RPN.BBOX_REG_LOSS_TYPE", "l2", "MODEL.RPN.BBOX_REG_LOSS_TYPE.*l2"),
        ("MODEL.BALANCED_LOSS.REG_NORMALIZER", "mean",
         r"REG_NORMALIZER must be one of 'positives', 'samples'; got 'mean'.$"),
        ("MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM", 1.0,
         r"NORMALIZER_MOMENTUM must be in \[0, 1\), got 1.0"),
        ("MODEL.BALANCED_LOSS.PRIOR_PROB", 1.0, r"PRIOR_PROB must be in \[0, 1\)"),
        ("MODEL.RPN.POSITIVE_FRACTION", 1.0,
         r"ADAPTIVE_POS_WEIGHT needs MODEL.RPN.POSITIVE_FRACTION in \(0, 1\), got 1.0"),
    ],
)
def test_rpn_build_refuses_a_bad_key_naming_it(key, value, message):
    cfg = rpn_cfg(ADAPTIVE_POS_WEIGHT=key == "MODEL.RPN.POSITIVE_FRACTION")
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=message):
        build_rpn(cfg)


def test_rpn_build_without_the_project_keys_says_what_to_call():
    cfg = get_cfg()
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "BalancedRPN"
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
    with pytest.raises(KeyError, match="add_balanced_rcnn_config"):
        build_rpn(cfg)


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT",
            2.0,
            "MODEL.BALANCED_LOSS.ROI_LOSS_BBOX_WEIGHT",
        ),
        ("MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE", True, "MODEL.ROI_BOX_HEAD.USE_SIGMOID_CE"),
        ("MODEL.ROI_BOX_HEAD.USE_FED_LOSS", True, "MODEL.ROI_BOX_HEAD.USE_FED_LOSS"),
        ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE", "l2", "MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE"),
        ("MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT", -0.5, r"ROI_CLS_POS_WEIGHT.*-0\.5"),
        ("MODEL.BALANCED_LOSS.ROI_LOSS_CLS_WEIGHT", float("nan"), "ROI_LOSS_CLS_WEIGHT.*nan"),
        ("MODEL.BALANCED_LOSS.ROI_LOSS_BBOX_WEIGHT", float("-inf"), "ROI_LOSS_BBOX_WEIGHT.*inf"),
        ("MODEL.BALANCED_LOSS.ROI_LOSS_MASK_WEIGHT", -1.0, r"ROI_LOSS_MASK_WEIGHT.*-1\.0"),
        ("MODEL.BALANCED_LOSS.EPS", 0.0, "MODEL.BALANCED_LOSS.EPS"),
        ("MODEL.ROI_MASK_HEAD.NAME", "MaskRCNNConvUpsampleHead", "MODEL.ROI_MASK_HEAD.NAME"),
    ],
)
def test_roi_heads_build_refuses_a_bad_key_naming_it(key, value, message):
    cfg = roi_heads_cfg()
    cfg.DATASETS.TRAIN = ("not_registered",)  # fed loss must be refused before it is looked up
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=message):
        build_roi_heads(cfg, FEATURE_SHAPES)


def test_hand_built_predictor_refuses_unimplemented_options():
    kwargs = {"box2box_transform": Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), "num_classes": K}
    with pytest.raises(ValueError, match="USE_SIGMOID_CE"):
        BalancedFastRCNNOutputLayers(BOX_FEATURES, use_sigmoid_ce=True, **kwargs)
    with pytest.raises(ValueError, match="USE_FED_LOSS"):
        BalancedFastRCNNOutputLayers(
            BOX_FEATURES, use_fed_loss=True, get_fed_loss_cls_weights=None, **kwargs
        )


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_WEIGHT", 2.0, "BALANCED_LOSS.ROI_LOSS_BBOX_WEIGHT"),
        ("MODEL.ROI_BOX_HEAD.USE_FED_LOSS", True, "MODEL.ROI_BOX_HEAD.USE_FED_LOSS"),
        ("MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT", -0.5, r"ROI_CLS_POS_WEIGHT.*-0\.5"),
        ("MODEL.BALANCED_LOSS.EPS", 0.0, "MODEL.BALANCED_LOSS.EPS"),
        ("MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM", 1.0, "NORMALIZER_MOMENTUM"),
    ],
)
def test_box_predictor_built_on_its_own_refuses_a_bad_key(key, value, message):
    cfg = roi_cfg()
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=message):
        BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("MODEL.BALANCED_LOSS.ROI_LOSS_MASK_WEIGHT", -1.0, r"ROI_LOSS_MASK_WEIGHT.*-1\.0"),
        ("MODEL.BALANCED_LOSS.EPS", float("nan"), "MODEL.BALANCED_LOSS.EPS"),
        ("MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM", -0.5, "NORMALIZER_MOMENTUM"),
    ],
)
def test_mask_head_built_on_its_own_refuses_a_bad_key(key, value, message):
    cfg = roi_cfg()
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=message):
        mask_heads(cfg)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"eps": 0.0}, "MODEL.BALANCED_LOSS.EPS must be finite and > 0"),
        ({"reg_normalizer": "mean"}, "REG_NORMALIZER must be one of"),
        ({"prior_prob": 1.0}, r"PRIOR_PROB must be in \[0, 1\)"),
    ],
)
def test_hand_built_settings_refuse_what_the_config_keys_refuse(settings, message):
    with pytest.raises(ValueError, match=message):
        BalancedLossSettings(**settings)
