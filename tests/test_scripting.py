"""TorchScript: the balanced heads script as their stock parents do (each head compiles under
detectron2's scripting patches; a whole Mask R-CNN scripted with scripting_with_instances gives
the eager model's detections, so every head's scripted inference does); the losses run outside
an EventStorage; detectron2's Swin backbone does not script (stock either)."""

import pytest
import torch
from detectron2.export import scripting_with_instances
from detectron2.export.torchscript_patch import freeze_training_mode, patch_instances
from detectron2.modeling import build_model
from detectron2.structures import Instances
from training_harness.deploy import SCRIPT_FIELDS

from test_balanced_model import _batch, _cfg

FIELDS = SCRIPT_FIELDS  # every Instances field of a Mask R-CNN's inference


@pytest.fixture(scope="module")
def models():
    """The R18-FPN Mask R-CNN of test_balanced_model, balanced and stock heads, same weights."""
    torch.manual_seed(0)
    balanced = build_model(_cfg(True, NORMALIZER_MOMENTUM=0.9)).eval()
    stock = build_model(_cfg(False)).eval()
    state = {k: v for k, v in balanced.state_dict().items() if "running_counts" not in k}
    stock.load_state_dict(state)
    return balanced, stock


def _images():
    return [{"image": x["image"]} for x in _batch()]


def _assert_same(a: Instances, b: Instances):
    assert len(a) == len(b) > 0
    for field in ("scores", "pred_classes", "pred_masks"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)


def test_whole_model_scripts_as_with_stock_heads(models):
    balanced, stock = models
    with torch.no_grad():
        for model in (balanced, stock):
            scripted = scripting_with_instances(model, FIELDS)
            for ours, eager in zip(scripted.inference(_images(), do_postprocess=False),
                                   model.inference(_images(), do_postprocess=False)):
                _assert_same(ours, eager)


def _script(module):
    with freeze_training_mode(module), patch_instances(FIELDS):
        return torch.jit.script(module)


@pytest.mark.parametrize("head", ["proposal_generator", "roi_heads", "roi_heads.mask_head",
                                  "roi_heads.box_predictor"])
def test_each_head_compiles_as_its_stock_parent(models, head):
    for model in models:
        module = model
        for name in head.split("."):
            module = getattr(module, name)
        scripted = _script(module)
        assert isinstance(scripted, torch.jit.ScriptModule), type(module).__name__


def test_losses_outside_an_event_storage():
    # What stock's losses allow for an empty batch; the balanced ones then log nothing.
    from balanced_rcnn import BalancedFastRCNNOutputLayers
    from conftest import (BOX_FEATURES, box_predictions, build_rpn, mask_heads, mask_instances,
                          random_proposals, roi_cfg, rpn_cfg, rpn_loss_inputs)

    head = build_rpn(rpn_cfg(ADAPTIVE_POS_WEIGHT=True))
    losses = head.losses(*rpn_loss_inputs(head))
    predictor = BalancedFastRCNNOutputLayers(roi_cfg(), BOX_FEATURES)
    losses.update(predictor.losses(box_predictions(21), random_proposals()))
    cfg = roi_cfg()
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    _, mask_head = mask_heads(cfg)
    losses.update(mask_head(torch.randn(5, 8, 7, 7), mask_instances()))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())


def test_swin_backbone_does_not_script_neither_does_detectron2s(tiny_cfg):
    from detectron2.modeling.backbone.swin import SwinTransformer
    from training_harness import GuardedTrainer

    model = GuardedTrainer.build_model(tiny_cfg).eval()
    with pytest.raises(RuntimeError):
        _script(model.backbone)
    with pytest.raises(RuntimeError):
        _script(SwinTransformer(embed_dim=32, depths=[1, 1, 1, 1], num_heads=[1, 2, 4, 8]).eval())
