"""BalancedRPN: hand-computed losses, exact relations to detectron2's RPN on identical inputs,
foreground weighting, edge cases, logged scalars, and inference that is stock's. Its two ways of
gathering the loss rows are tested in test_rpn_anchor_paths.py, its options in
test_rpn_loss_options.py, its build-time refusals in test_build_refusals.py."""

import math

import pytest
import torch
from conftest import (
    EPS,
    LN2,
    RPN_GT,
    RPN_IMAGE_SIZE,
    anchor_counts,
    build_rpn,
    gt_instances,
    rpn_cfg,
    rpn_features,
    rpn_loss_inputs,
)
from detectron2.structures import Boxes, ImageList

from balanced_rcnn import BalancedRPN
from balanced_rcnn.utils.events import flush_tensor_scalars

pytestmark = pytest.mark.core


def test_registered_and_takes_its_loss_weights_from_config():
    rpn = build_rpn(rpn_cfg())
    assert type(rpn) is BalancedRPN
    assert rpn.loss_weight == {"loss_rpn_cls": 1.0, "loss_rpn_loc": 1.0}


def test_losses_equal_hand_computed_values_and_log_the_counts(event_storage):
    cfg = rpn_cfg(REG_NORMALIZER="positives", RPN_CLS_POS_WEIGHT=2.0)
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 4  # 2 sampled anchors + 2 padding slots per image
    rpn = build_rpn(cfg)
    # Two levels: anchors 0, 1 on the first, anchor 2 on the second; two images.
    anchors = [
        Boxes(torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 20.0, 10.0]])),
        Boxes(torch.tensor([[0.0, 0.0, 40.0, 40.0]])),
    ]
    labels = [torch.tensor([1, 0, -1]), torch.tensor([-1, 0, 1])]
    matched = [torch.zeros(3, 4), torch.zeros(3, 4)]  # undefined where the label is not 1
    matched[0][0] = torch.tensor([2.0, 0.0, 12.0, 10.0])
    matched[1][2] = torch.tensor([0.0, 0.0, 40.0, 40.0])
    logits = [torch.tensor([[0.0, math.log(3.0)], [9.0, 0.0]]), torch.tensor([[7.0], [0.0]])]
    deltas = [torch.zeros(2, 2, 4), torch.zeros(2, 1, 4)]
    deltas[0][1, 0] = 9.0  # an ignored anchor: no effect
    deltas[1][1, 0] = torch.tensor([0.5, 0.0, 0.0, -0.25])
    losses = rpn.losses(anchors, logits, labels, deltas, matched)

    # P = 2, Q = 2. Objectness: image 0 anchor 0 (positive, logit 0): ln 2, weight 2;
    # image 0 anchor 1 (negative, logit ln 3): -ln(1 - 3/4) = ln 4; image 1 anchor 1
    # (negative, logit 0): ln 2; image 1 anchor 2 (positive, logit 0): ln 2, weight 2.
    expected_cls = (2 * LN2 + math.log(4.0) + LN2 + 2 * LN2) / (4 + EPS)
    # Localization (weights 1): image 0 anchor 0: target dx = (7 - 5) / 10 = 0.2, pred 0 -> 0.2;
    # image 1 anchor 2: target 0, pred (0.5, 0, 0, -0.25) -> 0.75.
    expected_loc = (0.2 + 0.75) / (2 + EPS)
    assert losses["loss_rpn_cls"].item() == pytest.approx(expected_cls, rel=1e-6)
    assert losses["loss_rpn_loc"].item() == pytest.approx(expected_loc, rel=1e-6)

    scalars = flush_tensor_scalars(event_storage)
    assert scalars["rpn/num_pos_anchors"] == 1.0  # 2 positives / 2 images
    assert scalars["rpn/num_neg_anchors"] == 1.0
    assert scalars["rpn/fg_fraction"] == 0.5
    assert scalars["rpn/cls_normalizer"] == pytest.approx(4 + EPS)
    assert scalars["rpn/loc_normalizer"] == pytest.approx(2 + EPS)


LOSS_TYPES = [("smooth_l1", 0.0), ("smooth_l1", 0.1), ("giou", 0.0), ("diou", 0.0), ("ciou", 0.0)]


@pytest.mark.parametrize("loss_type,beta", LOSS_TYPES)
def test_losses_and_grads_are_stocks_times_b_n_over_the_counts(event_storage, loss_type, beta):
    cfgs = [rpn_cfg("RPN"), rpn_cfg("BalancedRPN", REG_NORMALIZER="positives")]
    for cfg in cfgs:
        cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE = loss_type
        cfg.MODEL.RPN.SMOOTH_L1_BETA = beta
    stock, balanced = build_rpn(cfgs[0]), build_rpn(cfgs[1])
    inputs = rpn_loss_inputs(stock)
    num_pos, num_neg = anchor_counts(inputs[2])
    assert num_pos > 0 and num_neg > 0
    stock_losses = stock.losses(*inputs)
    ours = balanced.losses(*inputs)
    n_b = stock.batch_size_per_image * 2  # BATCH_SIZE_PER_IMAGE * N
    # loss_rpn_cls = stock x B*N / max(P + Q, 1); loss_rpn_loc = stock x B*N / max(P, 1)
    torch.testing.assert_close(
        ours["loss_rpn_cls"], stock_losses["loss_rpn_cls"] * n_b / (num_pos + num_neg + EPS)
    )
    torch.testing.assert_close(
        ours["loss_rpn_loc"], stock_losses["loss_rpn_loc"] * n_b / (num_pos + EPS)
    )

    # The gradients keep the same relation.
    logits, deltas = inputs[1], inputs[3]
    grads_stock = torch.autograd.grad(sum(stock_losses.values()), logits + deltas)
    grads_ours = torch.autograd.grad(sum(ours.values()), logits + deltas)
    scales = [n_b / (num_pos + num_neg + EPS)] * len(logits) + [n_b / (num_pos + EPS)] * len(deltas)
    for g_s, g_o, scale in zip(grads_stock, grads_ours, scales):
        torch.testing.assert_close(g_o, g_s * scale)


def test_pos_weight_scales_exactly_the_positive_terms(event_storage):
    inputs = None
    results = {}
    for w in (0.0, 1.0, 3.0):
        rpn = build_rpn(rpn_cfg(RPN_CLS_POS_WEIGHT=w))
        inputs = inputs or rpn_loss_inputs(rpn)
        results[w] = rpn.losses(*inputs)
    negatives = results[0.0]["loss_rpn_cls"]
    positives = results[1.0]["loss_rpn_cls"] - negatives
    torch.testing.assert_close(results[3.0]["loss_rpn_cls"], negatives + 3 * positives)
    # The counts (normalizers) and the localization loss are not weighted.
    torch.testing.assert_close(results[3.0]["loss_rpn_loc"], results[1.0]["loss_rpn_loc"])

    # Negatives alone, by hand from the labels.
    labels = torch.cat([l for l in inputs[2]])
    logits = torch.cat([x for x in inputs[1]], dim=1).flatten()
    neg = labels == 0
    num_pos, num_neg = anchor_counts(inputs[2])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[neg], torch.zeros(num_neg), reduction="sum"
    ) / (num_pos + num_neg + EPS)
    torch.testing.assert_close(negatives, expected)


def test_loss_weights_multiply(event_storage):
    plain = build_rpn(rpn_cfg())
    inputs = rpn_loss_inputs(plain)
    base = plain.losses(*inputs)
    weighted = build_rpn(rpn_cfg(RPN_LOSS_CLS_WEIGHT=2.0, RPN_LOSS_BBOX_WEIGHT=0.5)).losses(*inputs)
    torch.testing.assert_close(weighted["loss_rpn_cls"], 2 * base["loss_rpn_cls"])
    torch.testing.assert_close(weighted["loss_rpn_loc"], 0.5 * base["loss_rpn_loc"])


def _finite_loss_and_grads(losses, inputs):
    logits, deltas = inputs[1], inputs[3]
    grads = torch.autograd.grad(sum(losses.values()), logits + deltas)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(g).all() for g in grads)
    return grads


def test_images_without_annotations_give_zero_loc_loss_and_finite_grads(event_storage):
    rpn = build_rpn(rpn_cfg(REG_NORMALIZER="positives", RPN_CLS_POS_WEIGHT=5.0))
    inputs = rpn_loss_inputs(rpn, gt=[[], []])  # P = 0: only negatives
    num_pos, num_neg = anchor_counts(inputs[2])
    assert num_pos == 0 and num_neg == 2 * rpn.batch_size_per_image
    losses = rpn.losses(*inputs)
    grads = _finite_loss_and_grads(losses, inputs)
    assert losses["loss_rpn_loc"].item() == 0.0
    assert all(g.abs().sum() == 0 for g in grads[len(inputs[1]) :])  # no delta gradient
    assert losses["loss_rpn_cls"].item() > 0
    assert flush_tensor_scalars(event_storage)["rpn/loc_normalizer"] == pytest.approx(1 + EPS)


def test_one_image_without_annotations_gives_finite_losses_and_grads(event_storage):
    rpn = build_rpn(rpn_cfg())
    inputs = rpn_loss_inputs(rpn, gt=[RPN_GT[0], []])
    _finite_loss_and_grads(rpn.losses(*inputs), inputs)


def test_no_valid_anchor_gives_zero_losses_and_grads(event_storage):
    rpn = build_rpn(rpn_cfg())
    anchors, logits, labels, deltas, matched = rpn_loss_inputs(rpn)
    labels = [torch.full_like(l, -1) for l in labels]
    inputs = (anchors, logits, labels, deltas, matched)
    losses = rpn.losses(*inputs)
    grads = _finite_loss_and_grads(losses, inputs)
    assert losses["loss_rpn_cls"].item() == 0.0 and losses["loss_rpn_loc"].item() == 0.0
    assert all(g.abs().sum() == 0 for g in grads)
    scalars = flush_tensor_scalars(event_storage)
    assert scalars["rpn/fg_fraction"] == 0.0
    assert scalars["rpn/cls_normalizer"] == pytest.approx(1 + EPS)


def test_sampled_anchor_losses_do_not_wait_for_the_device(event_storage, refuse_host_sync):
    rpn = build_rpn(rpn_cfg())
    inputs = rpn_loss_inputs(rpn)
    with refuse_host_sync():
        losses = rpn.losses(*inputs)
        sum(losses.values()).backward()
    assert torch.isfinite(losses["loss_rpn_cls"])


def test_forward_trains_and_inference_is_stock(event_storage):
    balanced, stock = build_rpn(rpn_cfg()), build_rpn(rpn_cfg("RPN"))
    stock.load_state_dict(balanced.state_dict())
    images = ImageList(torch.zeros(2, 3, *RPN_IMAGE_SIZE), [RPN_IMAGE_SIZE] * 2)
    _, losses = balanced(images, rpn_features(), gt_instances(RPN_GT))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    balanced.eval()
    stock.eval()
    with torch.no_grad():
        ours, no_losses = balanced(images, rpn_features())
        theirs, _ = stock(images, rpn_features())
    assert no_losses == {}
    for a, b in zip(ours, theirs):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)
