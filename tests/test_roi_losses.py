"""The balanced box predictor (BalancedFastRCNNOutputLayers): hand-computed losses, exact
relations to detectron2's FastRCNNOutputLayers, foreground weighting, edge cases, logged scalars,
stock inference, and its loss options. The mask head is tested in test_mask_head_losses.py, the
built BalancedROIHeads in test_roi_heads_build.py, the refusals in test_build_refusals.py."""

import math

import pytest
import torch
from conftest import (
    BOX_FEATURES,
    EPS,
    K,
    LN2,
    LN3,
    ROI_IMAGE_SIZE,
    box_predictions,
    box_predictors,
    fg_count,
    random_proposals,
    roi_cfg,
)
from detectron2.structures import Boxes, Instances

from balanced_rcnn import BalancedFastRCNNOutputLayers
from balanced_rcnn.utils.events import flush_tensor_scalars

pytestmark = pytest.mark.core


def test_box_losses_equal_hand_computed_values_and_log_the_counts(event_storage):
    cfg = roi_cfg(REG_NORMALIZER="positives", ROI_CLS_POS_WEIGHT=3.0)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 2  # class 2 is the background
    predictor = BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES)
    first = Instances(ROI_IMAGE_SIZE)  # two foreground proposals
    first.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]]))
    first.gt_boxes = Boxes(torch.tensor([[2.0, 0.0, 12.0, 10.0], [0.0, 0.0, 10.0, 10.0]]))
    first.gt_classes = torch.tensor([0, 1])
    second = Instances(ROI_IMAGE_SIZE)  # no annotations: one background proposal, no gt_boxes
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
def test_loss_cls_is_stocks_and_loss_box_reg_stocks_times_r_over_f(
    event_storage, agnostic, loss_type, beta
):
    cfg = roi_cfg(REG_NORMALIZER="positives")
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = agnostic
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = loss_type
    cfg.MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA = beta
    stock, balanced = box_predictors(cfg)
    proposals = random_proposals()
    num_rois, num_fg = 21, fg_count(proposals)
    assert 0 < num_fg < num_rois
    predictions = box_predictions(num_rois, agnostic)
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
    proposals = random_proposals()
    predictions = box_predictions(21)
    results = {
        w: BalancedFastRCNNOutputLayers(roi_cfg(ROI_CLS_POS_WEIGHT=w), BOX_FEATURES).losses(
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
    proposals, predictions = random_proposals(), box_predictions(21)
    base = BalancedFastRCNNOutputLayers(roi_cfg(), BOX_FEATURES).losses(predictions, proposals)
    cfg = roi_cfg(ROI_LOSS_CLS_WEIGHT=3.0, ROI_LOSS_BBOX_WEIGHT=0.25)
    weighted = BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES).losses(predictions, proposals)
    torch.testing.assert_close(weighted["loss_cls"], 3 * base["loss_cls"])
    torch.testing.assert_close(weighted["loss_box_reg"], 0.25 * base["loss_box_reg"])


@pytest.mark.parametrize("loss_type", ["smooth_l1", "giou", "ciou"])
def test_no_foreground_gives_zero_box_loss_and_finite_grads(event_storage, loss_type):
    cfg = roi_cfg(REG_NORMALIZER="positives", ROI_CLS_POS_WEIGHT=4.0)
    cfg.MODEL.ROI_BOX_HEAD.BBOX_REG_LOSS_TYPE = loss_type
    predictor = BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES)
    proposals = random_proposals(with_gt=(False, False))  # F = 0, no gt_boxes at all
    predictions = box_predictions(21)
    losses = predictor.losses(predictions, proposals)
    grads = torch.autograd.grad(sum(losses.values()), predictions)
    assert losses["loss_box_reg"].item() == 0.0
    assert torch.isfinite(losses["loss_cls"]) and losses["loss_cls"].item() > 0
    assert all(torch.isfinite(g).all() for g in grads) and grads[1].abs().sum() == 0
    scalars = flush_tensor_scalars(event_storage)
    assert scalars["roi_head/box_normalizer"] == pytest.approx(1 + EPS)
    assert scalars["fast_rcnn/fg_cls_accuracy"] == 0.0  # logged as 0, not left out


def test_no_proposals_give_zero_losses_and_shaped_grads(event_storage):
    predictor = BalancedFastRCNNOutputLayers(roi_cfg(), BOX_FEATURES)
    proposals = random_proposals(num_per_image=(0, 0))
    predictions = box_predictions(0)
    losses = predictor.losses(predictions, proposals)
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box_reg"].item() == 0.0
    grads = torch.autograd.grad(sum(losses.values()), predictions)
    assert all(g.shape == p.shape for g, p in zip(grads, predictions))


def test_box_losses_do_not_wait_for_the_device(event_storage, refuse_host_sync):
    predictor = BalancedFastRCNNOutputLayers(roi_cfg(), BOX_FEATURES)
    proposals, predictions = random_proposals(), box_predictions(21)
    with refuse_host_sync():
        sum(predictor.losses(predictions, proposals).values()).backward()


def test_inference_is_stocks(event_storage):
    stock, balanced = box_predictors(roi_cfg())
    balanced.load_state_dict(stock.state_dict())
    proposals = random_proposals()
    features = torch.randn(21, 16)
    ours, _ = balanced.inference(balanced(features), proposals)
    theirs, _ = stock.inference(stock(features), proposals)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
        assert torch.equal(a.scores, b.scores) and torch.equal(a.pred_classes, b.pred_classes)


# ---- the loss options ----------------------------------------------------------------------


@pytest.mark.parametrize("agnostic", [False, True])
def test_samples_normalizer_gives_stocks_losses_and_grads(event_storage, agnostic):
    cfg = roi_cfg(REG_NORMALIZER="samples")
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = agnostic
    stock, balanced = box_predictors(cfg)
    proposals, predictions = random_proposals(), box_predictions(21, agnostic)
    ours, theirs = balanced.losses(predictions, proposals), stock.losses(predictions, proposals)
    for key in ("loss_cls", "loss_box_reg"):  # both divided by R (+ EPS)
        torch.testing.assert_close(ours[key], theirs[key] * 21 / (21 + EPS), rtol=1e-6, atol=0)
    grads_ours = torch.autograd.grad(sum(ours.values()), predictions)
    grads_stock = torch.autograd.grad(sum(theirs.values()), predictions)
    for g_o, g_s in zip(grads_ours, grads_stock):
        torch.testing.assert_close(g_o, g_s * 21 / (21 + EPS))
    assert flush_tensor_scalars(event_storage)["roi_head/box_normalizer"] == pytest.approx(21 + EPS)


def test_adaptive_pos_weight_fills_the_positive_fraction(event_storage):
    proposals, predictions = random_proposals(), box_predictions(21)
    num_fg = fg_count(proposals)
    adaptive = BalancedFastRCNNOutputLayers(roi_cfg(ADAPTIVE_POS_WEIGHT=True), BOX_FEATURES)
    assert adaptive.positive_fraction == 0.25  # MODEL.ROI_HEADS.POSITIVE_FRACTION
    losses = adaptive.losses(predictions, proposals)
    weight = max(1.0, (21 - num_fg) / num_fg / 3)  # f / (1 - f) = 1/3
    assert flush_tensor_scalars(event_storage)["roi_head/pos_weight"] == pytest.approx(weight)
    fixed = BalancedFastRCNNOutputLayers(roi_cfg(ROI_CLS_POS_WEIGHT=weight), BOX_FEATURES)
    torch.testing.assert_close(losses["loss_cls"], fixed.losses(predictions, proposals)["loss_cls"])

    # One foreground proposal among 21: it carries a quarter of the classification weight.
    one_fg = random_proposals()
    for p in one_fg:
        p.gt_classes = torch.full_like(p.gt_classes, K)
    one_fg[0].gt_classes[0] = 1
    adaptive.losses(predictions, one_fg)
    assert flush_tensor_scalars(event_storage)["roi_head/pos_weight"] == pytest.approx(20 / 3)


def test_running_counts_of_the_box_predictor_average_over_steps(event_storage):
    cfg = roi_cfg(REG_NORMALIZER="positives", NORMALIZER_MOMENTUM=0.5)
    predictor = BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES)
    proposals, predictions = random_proposals(), box_predictions(21)
    num_fg = fg_count(proposals)
    predictor.losses(predictions, proposals)
    no_fg = random_proposals(with_gt=(False, False))
    predictor.losses(predictions, no_fg)
    scalars = flush_tensor_scalars(event_storage)
    assert scalars["roi_head/box_normalizer"] == pytest.approx(max(num_fg / 2, 1) + EPS)
    torch.testing.assert_close(predictor.normalizer.running_counts,
                               torch.tensor([21.0, num_fg / 2]))
