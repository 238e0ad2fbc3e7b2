"""BalancedROIHeads as built from a config: the balanced box predictor and mask head with
StandardROIHeads' initial weights for one seed, PRIOR_PROB's class biases, and running counts as
the only state that the stock heads lack."""

import math

import pytest
import torch
from conftest import FEATURE_SHAPES, K, roi_heads_cfg
from detectron2.modeling.roi_heads import build_roi_heads

from balanced_rcnn import (
    BalancedFastRCNNOutputLayers,
    BalancedMaskRCNNConvUpsampleHead,
    BalancedROIHeads,
)

pytestmark = pytest.mark.core


def test_roi_heads_build_with_balanced_parts_and_stock_initial_weights():
    torch.manual_seed(0)
    heads = build_roi_heads(roi_heads_cfg(), FEATURE_SHAPES)
    torch.manual_seed(0)
    stock = build_roi_heads(
        roi_heads_cfg("StandardROIHeads", "MaskRCNNConvUpsampleHead"), FEATURE_SHAPES
    )
    assert type(heads) is BalancedROIHeads
    assert type(heads.box_predictor) is BalancedFastRCNNOutputLayers
    assert type(heads.mask_head) is BalancedMaskRCNNConvUpsampleHead
    assert heads.box_predictor.loss_weight == {"loss_cls": 1.0, "loss_box_reg": 1.0}
    ours, theirs = heads.state_dict(), stock.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_prior_prob_sets_the_class_biases_of_the_built_heads():
    cfg = roi_heads_cfg()
    cfg.MODEL.BALANCED_LOSS.PRIOR_PROB = 0.01
    torch.manual_seed(0)
    heads = build_roi_heads(cfg, FEATURE_SHAPES)
    bias = heads.box_predictor.cls_score.bias
    expected = torch.tensor([math.log(0.01 / K)] * K + [math.log(0.99)])
    torch.testing.assert_close(bias, expected)
    # With zero features the softmax starts at 1% foreground, spread over the K classes.
    torch.testing.assert_close(torch.softmax(bias, 0), torch.tensor([0.01 / K] * K + [0.99]))
    torch.manual_seed(0)
    plain = build_roi_heads(roi_heads_cfg(), FEATURE_SHAPES).state_dict()
    for name, value in heads.state_dict().items():
        if name != "box_predictor.cls_score.bias":
            assert torch.equal(value, plain[name]), name


def test_running_counts_are_the_only_state_the_stock_heads_lack():
    cfg = roi_heads_cfg()
    cfg.MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM = 0.9
    heads = build_roi_heads(cfg, FEATURE_SHAPES)
    stock = build_roi_heads(
        roi_heads_cfg("StandardROIHeads", "MaskRCNNConvUpsampleHead"), FEATURE_SHAPES
    )
    extra = set(heads.state_dict()) - set(stock.state_dict())
    assert extra == {"box_predictor.normalizer.running_counts",
                     "mask_head.normalizer_running_counts"}
