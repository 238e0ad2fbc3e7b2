"""The balanced box predictor, mask head and BalancedROIHeads: hand-computed losses, exact
relations to detectron2's FastRCNNOutputLayers / mask_rcnn_loss, foreground weighting, edge
cases, logged scalars and build-time refusals."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead, mask_rcnn_loss
from detectron2.structures import BitMasks, Boxes, Instances

from balanced_rcnn import (
    BalancedFastRCNNOutputLayers,
    BalancedMaskRCNNConvUpsampleHead,
    BalancedROIHeads,
    add_balanced_rcnn_config,
)
from balanced_rcnn.modeling import balanced_mask_rcnn_loss
from balanced_rcnn.utils.events import flush_tensor_scalars

EPS = 1e-6
LN2, LN3 = math.log(2.0), math.log(3.0)
K = 3  # foreground classes; class 3 is the background
BOX_FEATURES = ShapeSpec(channels=16)
IMAGE_SIZE = (48, 64)


def _cfg(**balanced):
    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    for key, value in balanced.items():
        cfg.MODEL.BALANCED_LOSS[key] = value
    return cfg


def _predictors(cfg):
    torch.manual_seed(0)
    stock = FastRCNNOutputLayers(cfg, BOX_FEATURES)
    torch.manual_seed(0)
    return stock, BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES)


def _random_proposals(num_per_image=(12, 9), seed=1, with_gt=(True, True)):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, has_gt in zip(num_per_image, with_gt):
        xy = torch.rand(n, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 15 + 2], dim=1)
        inst = Instances(IMAGE_SIZE)
        inst.proposal_boxes = Boxes(boxes)
        if has_gt:
            inst.gt_boxes = Boxes(boxes + torch.randn(n, 4, generator=g))
            inst.gt_classes = torch.randint(0, K + 1, (n,), generator=g)  # K: background
        else:
            inst.gt_classes = torch.full((n,), K)  # what detectron2 gives images without gt
        out.append(inst)
    return out


def _predictions(num_rois, agnostic=False, seed=2):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_rois, K + 1, generator=g).requires_grad_()
    deltas = (torch.randn(num_rois, 4 if agnostic else 4 * K, generator=g) * 0.3).requires_grad_()
    return scores, deltas


def _fg_count(proposals):
    return int(sum(((p.gt_classes >= 0) & (p.gt_classes < K)).sum() for p in proposals))


# ---- box predictor -------------------------------------------------------------------------


def test_box_losses_hand_computed(event_storage):
    cfg = _cfg(ROI_CLS_POS_WEIGHT=3.0)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2  # class 2 is the background
    predictor = BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES)
    first = Instances(IMAGE_SIZE)  # two foreground proposals
    first.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]]))
    first.gt_boxes = Boxes(torch.tensor([[2.0, 0.0, 12.0, 10.0], [0.0, 0.0, 10.0, 10.0]]))
    first.gt_classes = torch.tensor([0, 1])
    second = Instances(IMAGE_SIZE)  # no annotations: one background proposal, no gt_boxes
    second.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 20.0, 10.0]]))
    second.gt_classes = torch.tensor([2])
    scores = torch.tensor([[0.0, 0.0, 0.0], [LN2, 0.0, 0.0], [0.0, 0.0, 0.0]])
    deltas = torch.zeros(3, 8)  # (R, K * 4), K = 2
    deltas[0, 4:] = 9.0  # other class: no effect
    deltas[1, 4:] = torch.tensor([0.5, -0.25, 0.0, 0.0])  # gt class 1
    deltas[1, :4] = 9.0
    deltas[2] = 9.0  # background
    losses = predictor.losses((scores, deltas), [first, second])

    # CE: row 0 ln 3; row 1 (gt 1): -ln(1 / (2 + 1 + 1)) = ln 4; row 2 (background): ln 3.
    # Foreground weighs 3; R = 3.
    expected_cls = (3 * LN3 + 3 * math.log(4.0) + LN3) / (3 + EPS)
    # Box weights (10, 10, 5, 5): row 0 target dx = 10 * (7 - 5) / 10 = 2, pred 0 -> 2;
    # row 1 target 0, pred (0.5, -0.25, 0, 0) -> 0.75. F = 2.
    expected_box = (2.0 + 0.75) / (2 + EPS)
    assert losses["loss_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    assert losses["loss_box_reg"].item() == pytest.approx(expected_box, rel=1e-6)

    scalars = flush_tensor_scalars(event_storage)
    assert scalars["roi_head/num_sampled"] == 1.5  # 3 proposals / 2 images
    assert scalars["roi_head/num_fg"] == 1.0
    assert scalars["roi_head/fg_fraction"] == pytest.approx(2 / 3)
    assert scalars["roi_head/cls_normalizer"] == pytest.approx(3 + EPS)
    assert scalars["roi_head/box_normalizer"] == pytest.approx(2 + EPS)
    # argmax: class 0 in every row -> rows 0 right, 1 and 2 wrong.
    assert scalars["fast_rcnn/cls_accuracy"] == pytest.approx(1 / 3)
    assert scalars["fast_rcnn/fg_cls_accuracy"] == 0.5
    assert scalars["fast_rcnn/false_negative"] == 0.0


LOSS_TYPES = [("smooth_l1", 0.0), ("smooth_l1", 0.5), ("giou", 0.0), ("diou", 0.0), ("ciou", 0.0)]


@pytest.mark.parametrize("agnostic", [False, True])
@pytest.mark.parametrize("loss_type,beta", LOSS_TYPES)
def test_relation_to_stock_predictor(event_storage, agnostic, loss_type, beta):
    cfg = _cfg()
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = agnostic
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = loss_type
    cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = beta
    stock, balanced = _predictors(cfg)
    proposals = _random_proposals()
    num_rois, num_fg = 21, _fg_count(proposals)
    assert 0 < num_fg < num_rois
    predictions = _predictions(num_rois, agnostic)
    stock_losses = stock.losses(predictions, proposals)
    stock_stats = {k: v.latest() for k, v in event_storage.histories().items()}
    ours = balanced.losses(predictions, proposals)

    # loss_cls equals stock's; loss_box_reg = stock x R / max(F, 1)
    torch.testing.assert_close(ours["loss_cls"], stock_losses["loss_cls"])
    torch.testing.assert_close(
        ours["loss_box_reg"], stock_losses["loss_box_reg"] * num_rois / (num_fg + EPS)
    )
    grads_stock = torch.autograd.grad(stock_losses["loss_box_reg"], predictions[1])[0]
    grads_ours = torch.autograd.grad(ours["loss_box_reg"], predictions[1])[0]
    torch.testing.assert_close(grads_ours, grads_stock * num_rois / (num_fg + EPS))

    # detectron2's classification statistics, logged without waiting for the device.
    scalars = flush_tensor_scalars(event_storage)
    for name in ("fast_rcnn/cls_accuracy", "fast_rcnn/fg_cls_accuracy", "fast_rcnn/false_negative"):
        assert scalars[name] == pytest.approx(stock_stats[name]), name


def test_pos_weight_scales_exactly_the_foreground_terms(event_storage):
    proposals = _random_proposals()
    predictions = _predictions(21)
    results = {
        w: BalancedFastRCNNOutputLayers(_cfg(ROI_CLS_POS_WEIGHT=w), BOX_FEATURES).losses(
            predictions, proposals
        )
        for w in (0.0, 1.0, 2.5)
    }
    background = results[0.0]["loss_cls"]
    foreground = results[1.0]["loss_cls"] - background
    torch.testing.assert_close(results[2.5]["loss_cls"], background + 2.5 * foreground)
    torch.testing.assert_close(results[2.5]["loss_box_reg"], results[1.0]["loss_box_reg"])
    gt = torch.cat([p.gt_classes for p in proposals])
    bg = gt == K
    expected = torch.nn.functional.cross_entropy(predictions[0][bg], gt[bg], reduction="sum")
    torch.testing.assert_close(background, expected / (21 + EPS))


def test_loss_weights_multiply(event_storage):
    proposals, predictions = _random_proposals(), _predictions(21)
    base = BalancedFastRCNNOutputLayers(_cfg(), BOX_FEATURES).losses(predictions, proposals)
    cfg = _cfg(ROI_LOSS_CLS_WEIGHT=3.0, ROI_LOSS_BBOX_WEIGHT=0.25)
    weighted = BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES).losses(predictions, proposals)
    torch.testing.assert_close(weighted["loss_cls"], 3 * base["loss_cls"])
    torch.testing.assert_close(weighted["loss_box_reg"], 0.25 * base["loss_box_reg"])


@pytest.mark.parametrize("loss_type", ["smooth_l1", "giou", "ciou"])
def test_no_foreground(event_storage, loss_type):
    cfg = _cfg(ROI_CLS_POS_WEIGHT=4.0)
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = loss_type
    predictor = BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES)
    proposals = _random_proposals(with_gt=(False, False))  # F = 0, no gt_boxes at all
    predictions = _predictions(21)
    losses = predictor.losses(predictions, proposals)
    grads = torch.autograd.grad(sum(losses.values()), predictions)
    assert losses["loss_box_reg"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"].item() > 0
    assert all(torch.isfinite(g).all() for g in grads) and grads[1].abs().sum() == 0
    scalars = flush_tensor_scalars(event_storage)
    assert scalars["roi_head/box_normalizer"] == pytest.approx(1 + EPS)
    assert scalars["fast_rcnn/fg_cls_accuracy"] == 0.0  # logged as 0, not left out


def test_no_proposals(event_storage):
    predictor = BalancedFastRCNNOutputLayers(_cfg(), BOX_FEATURES)
    proposals = _random_proposals(num_per_image=(0, 0))
    predictions = _predictions(0)
    losses = predictor.losses(predictions, proposals)
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    grads = torch.autograd.grad(sum(losses.values()), predictions)
    assert all(g.shape == p.shape for g, p in zip(grads, predictions))


def test_box_losses_do_not_wait_for_the_device(event_storage, refuse_host_sync):
    predictor = BalancedFastRCNNOutputLayers(_cfg(), BOX_FEATURES)
    proposals, predictions = _random_proposals(), _predictions(21)
    with refuse_host_sync():
        sum(predictor.losses(predictions, proposals).values()).backward()


def test_inference_is_stock(event_storage):
    stock, balanced = _predictors(_cfg())
    balanced.load_state_dict(stock.state_dict())
    proposals = _random_proposals()
    features = torch.randn(21, 16)
    ours, _ = balanced.inference(balanced(features), proposals)
    theirs, _ = stock.inference(stock(features), proposals)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


# ---- mask head -----------------------------------------------------------------------------


def _mask_instances(num_per_image=(3, 2), seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in num_per_image:
        inst = Instances(IMAGE_SIZE)
        xy = torch.rand(n, 2, generator=g) * 20
        inst.proposal_boxes = Boxes(
            torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], 1)
        )
        inst.gt_classes = torch.randint(0, K, (n,), generator=g)
        inst.gt_masks = BitMasks(torch.rand(n, *IMAGE_SIZE, generator=g) > 0.6)
        out.append(inst)
    return out


@pytest.mark.parametrize("num_classes", [K, 1])  # class-specific, class-agnostic
def test_mask_loss_equals_stock(event_storage, num_classes):
    instances = _mask_instances()
    logits = torch.randn(5, num_classes, 14, 14, requires_grad=True)
    stock = mask_rcnn_loss(logits, instances)
    stock_stats = {k: v.latest() for k, v in event_storage.histories().items()}
    ours = balanced_mask_rcnn_loss(logits, instances, eps=EPS)
    torch.testing.assert_close(ours, stock)  # F = 5 either way
    torch.testing.assert_close(
        torch.autograd.grad(ours, logits)[0], torch.autograd.grad(stock, logits)[0]
    )
    scalars = flush_tensor_scalars(event_storage)
    assert scalars["mask/normalizer"] == pytest.approx(5 + EPS)
    for name in ("mask_rcnn/accuracy", "mask_rcnn/false_positive", "mask_rcnn/false_negative"):
        assert scalars[name] == pytest.approx(stock_stats[name]), name


def test_mask_loss_hand_computed(event_storage):
    inst = Instances(IMAGE_SIZE)
    inst.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]]))
    inst.gt_classes = torch.tensor([1, 0])
    masks = torch.zeros(2, *IMAGE_SIZE, dtype=torch.bool)
    masks[0, :8, :8] = True  # fills proposal 0: every target pixel 1
    inst.gt_masks = BitMasks(masks)  # mask 1 is empty: every target pixel 0
    logits = torch.zeros(2, K, 4, 4)
    logits[0, 1] = math.log(3.0)  # gt class of proposal 0
    logits[1, 1] = 9.0  # not proposal 1's class: no effect
    # Mask 0: BCE(ln 3, 1) = ln(4/3) per pixel; mask 1: BCE(0, 0) = ln 2. F = 2.
    expected = (math.log(4 / 3) + LN2) / (2 + EPS)
    loss = balanced_mask_rcnn_loss(logits, [inst], eps=EPS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_mask_loss_without_foreground(event_storage):
    logits = torch.randn(0, K, 14, 14, requires_grad=True)
    loss = balanced_mask_rcnn_loss(logits, _mask_instances(num_per_image=(0, 0)))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.shape == logits.shape
    assert flush_tensor_scalars(event_storage)["mask/normalizer"] == pytest.approx(1 + EPS)


def test_mask_loss_does_not_wait_for_the_device(event_storage, refuse_host_sync):
    instances = _mask_instances()
    logits = torch.randn(5, K, 14, 14, requires_grad=True)
    with refuse_host_sync():
        balanced_mask_rcnn_loss(logits, instances).backward()


def _mask_heads(cfg):
    shape = ShapeSpec(channels=8, height=7, width=7)
    torch.manual_seed(0)
    stock = MaskRCNNConvUpsampleHead(cfg, shape)
    torch.manual_seed(0)
    return stock, BalancedMaskRCNNConvUpsampleHead(cfg, shape)


def test_mask_head_training_and_inference(event_storage):
    cfg = _cfg(ROI_LOSS_MASK_WEIGHT=2.0)
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    stock, balanced = _mask_heads(cfg)
    features = torch.randn(5, 8, 7, 7)
    instances = _mask_instances()
    losses = balanced(features, instances)
    # Weight 2 x stock's loss (one worker, F = 5).
    torch.testing.assert_close(losses["loss_mask"], 2 * stock(features, instances)["loss_mask"])

    balanced.eval()
    stock.eval()
    predicted = []
    for head in (balanced, stock):
        inst = Instances(IMAGE_SIZE)
        inst.pred_classes = torch.tensor([0, 2, 1])
        predicted.append(head(features[:3], [inst])[0].pred_masks)
    assert torch.equal(*predicted)


# ---- build-time rules ----------------------------------------------------------------------


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
def test_roi_heads_build_refuses(key, value, message):
    cfg = _roi_heads_cfg()
    cfg.DATASETS.TRAIN = ("not_registered",)  # fed loss must be refused before it is looked up
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=message):
        build_roi_heads(cfg, _FEATURE_SHAPES)


def test_hand_built_predictor_refuses_unimplemented_options():
    kwargs = {"box2box_transform": Box2BoxTransform((10.0, 10.0, 5.0, 5.0)), "num_classes": K}
    with pytest.raises(ValueError, match="USE_SIGMOID_CE"):
        BalancedFastRCNNOutputLayers(BOX_FEATURES, use_sigmoid_ce=True, **kwargs)
    with pytest.raises(ValueError, match="USE_FED_LOSS"):
        BalancedFastRCNNOutputLayers(
            BOX_FEATURES, use_fed_loss=True, get_fed_loss_cls_weights=None, **kwargs
        )


_FEATURE_SHAPES = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}


def _roi_heads_cfg(name="BalancedROIHeads", mask_head="BalancedMaskRCNNConvUpsampleHead"):
    cfg = _cfg()
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.ROI_HEADS.NAME = name
    cfg.MODEL.ROI_HEADS.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.ROI_BOX_HEAD.NAME = "FastRCNNConvFCHead"
    cfg.MODEL.ROI_BOX_HEAD.NUM_FC = 1
    cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 16
    cfg.MODEL.ROI_MASK_HEAD.NAME = mask_head
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    return cfg


def test_roi_heads_build_with_balanced_parts_and_stock_initial_weights():
    torch.manual_seed(0)
    heads = build_roi_heads(_roi_heads_cfg(), _FEATURE_SHAPES)
    torch.manual_seed(0)
    stock = build_roi_heads(
        _roi_heads_cfg("StandardROIHeads", "MaskRCNNConvUpsampleHead"), _FEATURE_SHAPES
    )
    assert type(heads) is BalancedROIHeads
    assert type(heads.box_predictor) is BalancedFastRCNNOutputLayers
    assert type(heads.mask_head) is BalancedMaskRCNNConvUpsampleHead
    assert heads.box_predictor.loss_weight == {"loss_cls": 1.0, "loss_box_reg": 1.0}
    ours, theirs = heads.state_dict(), stock.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


# ---- the loss options ----------------------------------------------------------------------


@pytest.mark.parametrize("agnostic", [False, True])
def test_samples_normalizer_equals_stock(event_storage, agnostic):
    cfg = _cfg(REG_NORMALIZER="samples")
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = agnostic
    stock, balanced = _predictors(cfg)
    proposals, predictions = _random_proposals(), _predictions(21, agnostic)
    ours, theirs = balanced.losses(predictions, proposals), stock.losses(predictions, proposals)
    for key in ("loss_cls", "loss_box_reg"):  # both divided by R (+ EPS)
        torch.testing.assert_close(ours[key], theirs[key] * 21 / (21 + EPS), rtol=1e-6, atol=0)
    grads_ours = torch.autograd.grad(sum(ours.values()), predictions)
    grads_stock = torch.autograd.grad(sum(theirs.values()), predictions)
    for g_o, g_s in zip(grads_ours, grads_stock):
        torch.testing.assert_close(g_o, g_s * 21 / (21 + EPS))
    assert flush_tensor_scalars(event_storage)["roi_head/box_normalizer"] == pytest.approx(21 + EPS)


def test_adaptive_pos_weight_fills_the_positive_fraction(event_storage):
    proposals, predictions = _random_proposals(), _predictions(21)
    num_fg = _fg_count(proposals)
    adaptive = BalancedFastRCNNOutputLayers(_cfg(ADAPTIVE_POS_WEIGHT=True), BOX_FEATURES)
    assert adaptive.positive_fraction == 0.25  # MODEL.ROI_HEADS.POSITIVE_FRACTION
    losses = adaptive.losses(predictions, proposals)
    weight = max(1.0, (21 - num_fg) / num_fg / 3)  # f / (1 - f) = 1/3
    assert flush_tensor_scalars(event_storage)["roi_head/pos_weight"] == pytest.approx(weight)
    fixed = BalancedFastRCNNOutputLayers(_cfg(ROI_CLS_POS_WEIGHT=weight), BOX_FEATURES)
    torch.testing.assert_close(losses["loss_cls"], fixed.losses(predictions, proposals)["loss_cls"])

    # One foreground proposal among 21: it carries a quarter of the classification weight.
    one_fg = _random_proposals()
    for p in one_fg:
        p.gt_classes = torch.full_like(p.gt_classes, K)
    one_fg[0].gt_classes[0] = 1
    adaptive.losses(predictions, one_fg)
    assert flush_tensor_scalars(event_storage)["roi_head/pos_weight"] == pytest.approx(20 / 3)


def test_running_counts_of_the_box_and_mask_heads(event_storage):
    predictor = BalancedFastRCNNOutputLayers(_cfg(NORMALIZER_MOMENTUM=0.5), BOX_FEATURES)
    proposals, predictions = _random_proposals(), _predictions(21)
    num_fg = _fg_count(proposals)
    predictor.losses(predictions, proposals)
    no_fg = _random_proposals(with_gt=(False, False))
    predictor.losses(predictions, no_fg)
    scalars = flush_tensor_scalars(event_storage)
    assert scalars["roi_head/box_normalizer"] == pytest.approx(max(num_fg / 2, 1) + EPS)
    torch.testing.assert_close(predictor.normalizer.running_counts,
                               torch.tensor([21.0, num_fg / 2]))

    cfg = _cfg(NORMALIZER_MOMENTUM=0.5)
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    stock, head = _mask_heads(cfg)
    features = torch.randn(5, 8, 7, 7)
    first = head(features, _mask_instances())["loss_mask"]
    torch.testing.assert_close(first, stock(features, _mask_instances())["loss_mask"] * 5 / (5 + EPS))
    head(features[:1], _mask_instances(num_per_image=(1, 0)))
    torch.testing.assert_close(head.normalizer_running_counts, torch.tensor([3.0]))  # (5 + 1) / 2
    assert "normalizer_running_counts" in head.state_dict()
    # The normalizer is no layer of the head's nn.Sequential: inference is stock's.
    head.eval()
    stock.eval()
    inst = Instances(IMAGE_SIZE)
    inst.pred_classes = torch.tensor([0, 2])
    inst_stock = Instances(IMAGE_SIZE)
    inst_stock.pred_classes = torch.tensor([0, 2])
    assert torch.equal(head(features[:2], [inst])[0].pred_masks,
                       stock(features[:2], [inst_stock])[0].pred_masks)


def test_prior_prob_sets_the_class_biases_of_the_built_heads():
    cfg = _roi_heads_cfg()
    cfg.MODEL.BALANCED_LOSS.PRIOR_PROB = 0.01
    torch.manual_seed(0)
    heads = build_roi_heads(cfg, _FEATURE_SHAPES)
    bias = heads.box_predictor.cls_score.bias
    expected = torch.tensor([math.log(0.01 / K)] * K + [math.log(0.99)])
    torch.testing.assert_close(bias, expected)
    # With zero features the softmax starts at 1% foreground, spread over the K classes.
    torch.testing.assert_close(torch.softmax(bias, 0), torch.tensor([0.01 / K] * K + [0.99]))
    torch.manual_seed(0)
    plain = build_roi_heads(_roi_heads_cfg(), _FEATURE_SHAPES).state_dict()
    for name, value in heads.state_dict().items():
        if name != "box_predictor.cls_score.bias":
            assert torch.equal(value, plain[name]), name


def test_running_counts_are_the_only_state_the_stock_heads_lack():
    cfg = _roi_heads_cfg()
    cfg.MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM = 0.9
    heads = build_roi_heads(cfg, _FEATURE_SHAPES)
    stock = build_roi_heads(
        _roi_heads_cfg("StandardROIHeads", "MaskRCNNConvUpsampleHead"), _FEATURE_SHAPES
    )
    extra = set(heads.state_dict()) - set(stock.state_dict())
    assert extra == {"box_predictor.normalizer.running_counts",
                     "mask_head.normalizer_running_counts"}
