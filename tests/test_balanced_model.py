"""A GeneralizedRCNN with the balanced heads (tiny ResNet-18-FPN, CPU): same initial weights as
stock heads for one seed, a few training steps with decreasing loss, inference identical to
stock heads with the same weights, stock's losses with REG_NORMALIZER "samples" and weights 1,
and running counts that survive a checkpoint."""

import copy

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from balanced_rcnn import (
    BalancedFastRCNNOutputLayers,
    BalancedMaskRCNNConvUpsampleHead,
    BalancedROIHeads,
    BalancedRPN,
    add_balanced_rcnn_config,
)
from balanced_rcnn.utils.events import flush_tensor_scalars

pytestmark = pytest.mark.core

HEIGHT, WIDTH = 96, 128
STEPS = 8
LOGGED = [
    "rpn/num_pos_anchors",
    "rpn/num_neg_anchors",
    "rpn/fg_fraction",
    "rpn/cls_normalizer",
    "rpn/loc_normalizer",
    "roi_head/num_sampled",
    "roi_head/num_fg",
    "roi_head/fg_fraction",
    "roi_head/cls_normalizer",
    "roi_head/box_normalizer",
    "mask/normalizer",
]


def _cfg(balanced: bool, **balanced_loss):
    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    # Random weights: GroupNorm keeps the activations of an untrained ResNet in range.
    cfg.MODEL.RESNETS.NORM = "GN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3", "p4", "p5", "p6"]
    cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN = cfg.MODEL.RPN.PRE_NMS_TOPK_TEST = 300
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 100
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3", "p4", "p5"]
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # keep detections from a barely trained model
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 2
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 7
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 32
    cfg.MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION = 7
    if balanced:
        cfg.MODEL.PROPOSAL_GENERATOR.NAME = "BalancedRPN"
        cfg.MODEL.ROI_HEADS.NAME = "BalancedROIHeads"
        cfg.MODEL.ROI_MASK_HEAD.NAME = "BalancedMaskRCNNConvUpsampleHead"
        cfg.MODEL.BALANCED_LOSS.RPN_CLS_POS_WEIGHT = 2.0
        cfg.MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT = 2.0
        for key, value in balanced_loss.items():
            cfg.MODEL.BALANCED_LOSS[key] = value
    else:
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    return cfg


def _build(balanced: bool, **balanced_loss):
    torch.manual_seed(0)
    return build_model(_cfg(balanced, **balanced_loss))


def _batch():
    """Two images: one with two objects (box-shaped masks), one without annotations."""
    g = torch.Generator().manual_seed(7)
    out = []
    for boxes, classes in (([[10, 12, 50, 60], [60, 20, 120, 88]], [0, 2]), ([], [])):
        image = torch.rand(3, HEIGHT, WIDTH, generator=g) * 255
        masks = torch.zeros(len(boxes), HEIGHT, WIDTH, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):
            mask[y0:y1, x0:x1] = True
            image[:, y0:y1, x0:x1] = image[:, y0:y1, x0:x1] * 0.3 + 150  # visible objects
        instances = Instances((HEIGHT, WIDTH))
        instances.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        instances.gt_classes = torch.tensor(classes, dtype=torch.int64)
        instances.gt_masks = BitMasks(masks)
        out.append({"image": image, "instances": instances, "height": HEIGHT, "width": WIDTH})
    return out


@pytest.fixture(scope="module")
def trained():
    """The balanced model after STEPS SGD steps on one batch; its losses and logged scalars."""
    # Layers this small run faster on one thread, and two threads competing with other
    # processes for two cores slow OpenMP down many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = _build(balanced=True)
    initial = copy.deepcopy(model.state_dict())
    batch = _batch()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    totals = []
    with EventStorage() as storage:
        for step in range(STEPS):
            torch.manual_seed(0)  # the same anchor and proposal sampling every step
            losses = model(batch)
            total = sum(losses.values())
            optimizer.zero_grad()
            total.backward()
            optimizer.step()
            totals.append(total.item())
            flush_tensor_scalars(storage)  # what the trainer does once per step
            storage.step()
        histories = storage.histories()
    model.eval()
    yield {"model": model, "initial": initial, "totals": totals, "histories": histories}
    torch.set_num_threads(threads)


def test_model_uses_the_balanced_heads(trained):
    model = trained["model"]
    assert type(model.proposal_generator) is BalancedRPN
    assert type(model.roi_heads) is BalancedROIHeads
    assert type(model.roi_heads.box_predictor) is BalancedFastRCNNOutputLayers
    assert type(model.roi_heads.mask_head) is BalancedMaskRCNNConvUpsampleHead


def test_same_seed_gives_the_stock_initial_weights(trained):
    stock = _build(balanced=False).state_dict()
    initial = trained["initial"]
    assert initial.keys() == stock.keys()
    assert all(torch.equal(initial[k], stock[k]) for k in stock)


def test_training_decreases_the_loss(trained):
    totals = trained["totals"]
    assert all(torch.isfinite(torch.tensor(totals)))
    assert totals[-1] < totals[0], totals


def test_every_step_logs_counts_and_normalizers(trained):
    histories = trained["histories"]
    for name in LOGGED:
        assert len(histories[name].values()) == STEPS, name
    # The second image has no annotations: at most half the sampled proposals per image.
    assert all(0 < v <= 64 for v, _ in histories["roi_head/num_sampled"].values())
    assert all(v >= 1 for v, _ in histories["mask/normalizer"].values())


def test_inference_equals_stock_heads_with_the_same_weights(trained):
    model = trained["model"]
    stock = _build(balanced=False)
    stock.load_state_dict(model.state_dict())
    stock.eval()
    inputs = [{"image": x["image"], "height": HEIGHT, "width": WIDTH} for x in _batch()]
    with torch.no_grad():
        ours, theirs = model(inputs), stock(inputs)
    assert sum(len(o["instances"]) for o in ours) > 0
    for a, b in zip(ours, theirs):
        a, b = a["instances"], b["instances"]
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores)
        assert torch.equal(a.pred_classes, b.pred_classes)
        assert torch.equal(a.pred_masks, b.pred_masks)


def _losses(model, batch):
    with EventStorage():
        torch.manual_seed(0)  # the same anchor and proposal sampling
        return model(batch)


def test_samples_normalizer_and_weights_one_give_stock_losses():
    balanced = _build(True, REG_NORMALIZER="samples", RPN_CLS_POS_WEIGHT=1.0,
                      ROI_CLS_POS_WEIGHT=1.0)
    stock = _build(balanced=False)
    batch = _batch()
    ours, theirs = _losses(balanced, batch), _losses(stock, batch)
    assert ours.keys() == theirs.keys()
    for key in theirs:  # equal up to EPS in the divisors
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=0, msg=key)
    # and so are the gradients on the shared backbone
    def shared(model):
        return [p for p in model.backbone.parameters() if p.requires_grad]

    g_ours = torch.autograd.grad(sum(ours.values()), shared(balanced))
    g_theirs = torch.autograd.grad(sum(theirs.values()), shared(stock))
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_running_counts_are_saved_and_resumed(tmp_path):
    from detectron2.checkpoint import DetectionCheckpointer

    model = _build(True, NORMALIZER_MOMENTUM=0.9)
    batch = _batch()
    for _ in range(2):
        _losses(model, batch)
    names = ["proposal_generator.normalizer.running_counts",
             "roi_heads.box_predictor.normalizer.running_counts",
             "roi_heads.mask_head.normalizer_running_counts"]
    state = model.state_dict()
    assert all(name in state and (state[name] >= 0).all() for name in names)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model")
    resumed = _build(True, NORMALIZER_MOMENTUM=0.9)
    assert all((resumed.state_dict()[name] == -1).all() for name in names)  # no batch yet
    DetectionCheckpointer(resumed).load(str(tmp_path / "model.pth"))
    for name in names:
        assert torch.equal(resumed.state_dict()[name], state[name]), name
    ours, theirs = _losses(resumed, batch), _losses(model, batch)
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], msg=key)
