"""
Swin Transformer + FPN backbone, built from ``cfg.MODEL.SWIN`` and ``cfg.MODEL.FPN``.

Shape shorthand: N images, input (N, 3, H, W); Hp, Wp = H, W rounded up to a multiple of 32.
Swin stage i (0..3) has stride s = 2 ** (i + 2) and C * 2 ** i channels (C = EMBED_DIM); we
name it ``res{i + 2}`` (detectron2's ResNet convention) because detectron2's Swin calls it
``p{i}``, which collides with FPN's p2..p6 outputs. FPN then gives p2..p5 (strides 4..32) and
p6 (stride 64, LastLevelMaxPool), each with FPN.OUT_CHANNELS channels and size (Hp/s, Wp/s).
"""

from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, FPN, Backbone
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.swin import SwinTransformer

from ..config import check_choice

__all__ = ["D2SwinTransformer", "FPN_FUSE_TYPES", "build_swin_backbone",
           "build_swin_fpn_backbone", "check_fpn_fuse_type"]

# What detectron2's FPN accepts; it only asserts it (a bare AssertionError), with no table to ask.
FPN_FUSE_TYPES = ("sum", "avg")


def check_fpn_fuse_type(cfg: CfgNode) -> None:
    check_choice("MODEL.FPN.FUSE_TYPE", cfg.MODEL.FPN.FUSE_TYPE, FPN_FUSE_TYPES)

# FPN's top-down path upsamples by exactly 2 and adds the lateral map, so every stage must be
# exactly half the size of the previous one: the input must be a multiple of the last stride.
_SWIN_MAX_STRIDE = 32


class D2SwinTransformer(SwinTransformer):
    """
    detectron2's :class:`SwinTransformer` with outputs named res2..res5 and inputs of any size.

    Parameter names are those of ``SwinTransformer`` (which follow the official Swin code), so
    converted ImageNet checkpoints load without renaming.
    """

    def __init__(self, *, out_features: List[str], **kwargs):
        """
        Args:
            out_features: a subset of ["res2", "res3", "res4", "res5"].
            kwargs: the arguments of :class:`SwinTransformer` except ``out_indices``.
        """
        unknown = sorted(set(out_features) - {"res2", "res3", "res4", "res5"})
        if unknown:
            raise ValueError(
                f"MODEL.SWIN.OUT_FEATURES may only name res2..res5 (Swin's 4 stages), got {unknown}"
            )
        out_indices = tuple(sorted(int(name[len("res") :]) - 2 for name in out_features))
        super().__init__(out_indices=out_indices, **kwargs)
        self._out_features = [f"res{i + 2}" for i in out_indices]
        self._out_feature_channels = {f"res{i + 2}": self.num_features[i] for i in out_indices}
        self._out_feature_strides = {f"res{i + 2}": 2 ** (i + 2) for i in out_indices}
        # The parent stores this under a misspelt attribute (`_size_devisibility`), so its
        # `size_divisibility` property would raise AttributeError.
        self._size_divisibility = _SWIN_MAX_STRIDE

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: (N, 3, H, W), any H and W.

        Returns:
            res{i+2}: (N, C * 2**i, Hp / 2**(i+2), Wp / 2**(i+2)) for each requested stage.
        """
        # Swin itself pads to its patch and window sizes, but rounds odd stage sizes up, which
        # breaks FPN's exact 2x upsampling; padding to 32 first (a no-op inside GeneralizedRCNN,
        # which pads to FPN's size_divisibility already) keeps every stage exactly half the last.
        h, w = x.shape[-2:]
        pad_h = (-h) % self._size_divisibility
        pad_w = (-w) % self._size_divisibility
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        outputs = super().forward(x)
        return {f"res{int(name[1:]) + 2}": feature for name, feature in outputs.items()}

    def train(self, mode: bool = True) -> "D2SwinTransformer":
        # The parent puts frozen stages in eval mode only once, at construction; re-apply it
        # so that model.train() does not turn drop-path back on in frozen stages.
        super().train(mode)
        self._freeze_stages()
        return self


def build_swin_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> D2SwinTransformer:
    """The Swin Transformer described by ``cfg.MODEL.SWIN`` (no FPN)."""
    swin = cfg.MODEL.SWIN
    return D2SwinTransformer(
        pretrain_img_size=swin.PRETRAIN_IMG_SIZE,
        patch_size=swin.PATCH_SIZE,
        in_chans=input_shape.channels,
        embed_dim=swin.EMBED_DIM,
        depths=tuple(swin.DEPTHS),
        num_heads=tuple(swin.NUM_HEADS),
        window_size=swin.WINDOW_SIZE,
        mlp_ratio=swin.MLP_RATIO,
        qkv_bias=swin.QKV_BIAS,
        drop_rate=swin.DROP_RATE,
        attn_drop_rate=swin.ATTN_DROP_RATE,
        drop_path_rate=swin.DROP_PATH_RATE,
        ape=swin.APE,
        patch_norm=swin.PATCH_NORM,
        out_features=list(swin.OUT_FEATURES),
        frozen_stages=swin.FROZEN_STAGES,
        use_checkpoint=swin.USE_CHECKPOINT,
    )


@BACKBONE_REGISTRY.register()
def build_swin_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> Backbone:
    """Swin + FPN with P2-P6 (P6 by LastLevelMaxPool), as detectron2's Base-RCNN-FPN."""
    check_fpn_fuse_type(cfg)
    return FPN(
        bottom_up=build_swin_backbone(cfg, input_shape),
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelMaxPool(),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
