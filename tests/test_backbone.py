"""build_swin_fpn_backbone: names, channels, strides and sizes of detectron2's Swin + FPN."""

import math

import pytest
import torch
import torch.nn.functional as F
from balanced_rcnn.modeling.backbone import D2SwinTransformer
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY, build_backbone
from detectron2.modeling.backbone import FPN
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.swin import SwinTransformer

STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}
FPN_STRIDES = {"p2": 4, "p3": 8, "p4": 16, "p5": 32, "p6": 64}


@pytest.fixture
def swin_cfg(tiny_cfg):
    # Two blocks per stage, so that the shifted-window block (every second one) runs too.
    tiny_cfg.MODEL.SWIN.DEPTHS = [2, 2, 2, 2]
    return tiny_cfg


def test_registered_and_built_from_detectron2_swin(swin_cfg):
    assert "build_swin_fpn_backbone" in BACKBONE_REGISTRY
    backbone = build_backbone(swin_cfg)
    assert type(backbone) is FPN
    assert isinstance(backbone.top_block, LastLevelMaxPool)
    assert isinstance(backbone.bottom_up, SwinTransformer)
    assert [len(layer.blocks) for layer in backbone.bottom_up.layers] == [2, 2, 2, 2]


def test_an_unknown_fpn_fuse_type_is_refused_naming_the_key(swin_cfg):
    # detectron2's FPN would raise a bare AssertionError.
    swin_cfg.MODEL.FPN.FUSE_TYPE = "mean"
    with pytest.raises(ValueError, match=r"^MODEL.FPN.FUSE_TYPE must be one of 'avg', 'sum'; "
                                         r"got 'mean'.$"):
        build_backbone(swin_cfg)


def test_names_channels_strides_tiny(swin_cfg):
    backbone = build_backbone(swin_cfg)
    bottom_up = backbone.bottom_up.output_shape()
    assert {k: (v.channels, v.stride) for k, v in bottom_up.items()} == {
        "res2": (32, 4),
        "res3": (64, 8),
        "res4": (128, 16),
        "res5": (256, 32),
    }
    assert {k: (v.channels, v.stride) for k, v in backbone.output_shape().items()} == {
        name: (64, stride) for name, stride in FPN_STRIDES.items()
    }
    assert backbone.size_divisibility == 32
    assert backbone.bottom_up.size_divisibility == 32


def test_swin_t_channels():
    swin = D2SwinTransformer(out_features=["res3", "res4", "res5"], embed_dim=96)
    assert swin.output_shape() == {
        "res3": ShapeSpec(channels=192, stride=8),
        "res4": ShapeSpec(channels=384, stride=16),
        "res5": ShapeSpec(channels=768, stride=32),
    }
    # One LayerNorm per requested stage, under detectron2's names.
    assert not hasattr(swin, "norm0")
    assert [swin.norm1.normalized_shape, swin.norm3.normalized_shape] == [(192,), (768,)]


@pytest.mark.parametrize("size", [(64, 64), (100, 77), (33, 250), (31, 31), (224, 160)])
def test_any_input_size(swin_cfg, size):
    backbone = build_backbone(swin_cfg)
    height, width = size
    padded = (32 * math.ceil(height / 32), 32 * math.ceil(width / 32))
    features = backbone.bottom_up(torch.randn(2, 3, height, width))
    assert list(features) == ["res2", "res3", "res4", "res5"]
    for name, feature in features.items():
        s = STRIDES[name]
        channels = backbone.bottom_up.output_shape()[name].channels
        assert tuple(feature.shape) == (2, channels, padded[0] // s, padded[1] // s), name
    pyramid = backbone(torch.randn(2, 3, height, width))
    assert list(pyramid) == ["p2", "p3", "p4", "p5", "p6"]
    for name, feature in pyramid.items():
        s = FPN_STRIDES[name]
        # p6 is a stride-2 max-pool of p5: ceil(p5 / 2).
        expected = [math.ceil(p / s) if name == "p6" else p // s for p in padded]
        assert tuple(feature.shape) == (2, 64, *expected), name


def test_input_is_zero_padded_to_32(swin_cfg):
    backbone = build_backbone(swin_cfg).eval()
    image = torch.randn(1, 3, 100, 77)
    with torch.no_grad():
        features = backbone(image)
        padded = backbone(F.pad(image, (0, 96 - 77, 0, 128 - 100)))
    for name in features:
        assert torch.equal(features[name], padded[name]), name


def test_frozen_stages_stay_frozen_in_train_mode(swin_cfg):
    swin_cfg.MODEL.SWIN.FROZEN_STAGES = 2  # patch embedding and stage 1
    swin = build_backbone(swin_cfg).bottom_up.train()
    frozen = [swin.patch_embed, swin.layers[0]]
    assert all(not p.requires_grad for m in frozen for p in m.parameters())
    assert all(p.requires_grad for m in swin.layers[1:] for p in m.parameters())
    assert [m.training for m in frozen + list(swin.layers[1:])] == [False, False, True, True, True]


def test_out_features_subset_and_unknown_name(swin_cfg):
    swin_cfg.MODEL.SWIN.OUT_FEATURES = ["res3", "res4", "res5"]
    swin_cfg.MODEL.FPN.IN_FEATURES = ["res3", "res4", "res5"]
    backbone = build_backbone(swin_cfg)
    assert list(backbone.bottom_up.output_shape()) == ["res3", "res4", "res5"]
    assert list(backbone.output_shape()) == ["p3", "p4", "p5", "p6"]
    swin_cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "p3"]
    with pytest.raises(ValueError, match=r"MODEL.SWIN.OUT_FEATURES .*\['p3'\]"):
        build_backbone(swin_cfg)
