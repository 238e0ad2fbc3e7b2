"""BalancedRPN: hand-computed losses, exact relations to detectron2's RPN on identical inputs,
foreground weighting, edge cases, logged scalars and build-time refusals."""

import math

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import Boxes, ImageList, Instances

from balanced_rcnn import BalancedRPN, add_balanced_rcnn_config
from balanced_rcnn.utils.events import flush_tensor_scalars

EPS = 1e-6
LN2 = math.log(2.0)
SHAPES = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}
IMAGE_SIZE = (64, 64)


def _cfg(name="BalancedRPN", **balanced):
    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = name
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32]]
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    for key, value in balanced.items():
        cfg.MODEL.BALANCED_LOSS[key] = value
    return cfg


def _build(cfg):
    torch.manual_seed(0)
    return build_proposal_generator(cfg, SHAPES)


def _features(num_images=2):
    g = torch.Generator().manual_seed(1)
    return {
        "p2": torch.randn(num_images, 8, 16, 16, generator=g),
        "p3": torch.randn(num_images, 8, 8, 8, generator=g),
    }


def _gt_instances(boxes_per_image):
    out = []
    for boxes in boxes_per_image:
        inst = Instances(IMAGE_SIZE)
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.int64)
        out.append(inst)
    return out


GT = [[[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 62.0]], [[10.0, 10.0, 26.0, 50.0]]]


def _inputs(rpn, gt=GT):
    """Anchors, labels and random predictions, the arguments of RPN.losses."""
    features = [_features(len(gt))[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(features)
    torch.manual_seed(2)  # anchor sampling
    labels, matched = rpn.label_and_sample_anchors(anchors, _gt_instances(gt))
    g = torch.Generator().manual_seed(3)
    n = len(gt)
    logits = [torch.randn(n, len(a), generator=g).requires_grad_() for a in anchors]
    deltas = [(torch.randn(n, len(a), 4, generator=g) * 0.2).requires_grad_() for a in anchors]
    return anchors, logits, labels, deltas, matched


def _counts(labels):
    labels = torch.stack(labels)
    return int((labels == 1).sum()), int((labels == 0).sum())


def test_registered_and_built_from_config():
    rpn = _build(_cfg())
    assert type(rpn) is BalancedRPN
    assert rpn.loss_weight == {"loss_rpn_cls": 1.0, "loss_rpn_loc": 1.0}


def test_hand_computed(event_storage):
    cfg = _cfg(RPN_CLS_POS_WEIGHT=2.0)
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 4  # 2 sampled anchors + 2 padding slots per image
    rpn = _build(cfg)
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
def test_relation_to_stock_rpn(event_storage, loss_type, beta):
    cfgs = [_cfg("RPN"), _cfg("BalancedRPN")]
    for cfg in cfgs:
        cfg.MODEL.RPN.BBOX_REG_LOSS_TYPE = loss_type
        cfg.MODEL.RPN.SMOOTH_L1_BETA = beta
    stock, balanced = _build(cfgs[0]), _build(cfgs[1])
    inputs = _inputs(stock)
    num_pos, num_neg = _counts(inputs[2])
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
        rpn = _build(_cfg(RPN_CLS_POS_WEIGHT=w))
        inputs = inputs or _inputs(rpn)
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
    num_pos, num_neg = _counts(inputs[2])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        logits[neg], torch.zeros(num_neg), reduction="sum"
    ) / (num_pos + num_neg + EPS)
    torch.testing.assert_close(negatives, expected)


def test_loss_weights_multiply(event_storage):
    plain = _build(_cfg())
    inputs = _inputs(plain)
    base = plain.losses(*inputs)
    weighted = _build(_cfg(RPN_LOSS_CLS_WEIGHT=2.0, RPN_LOSS_BBOX_WEIGHT=0.5)).losses(*inputs)
    torch.testing.assert_close(weighted["loss_rpn_cls"], 2 * base["loss_rpn_cls"])
    torch.testing.assert_close(weighted["loss_rpn_loc"], 0.5 * base["loss_rpn_loc"])


def _finite_loss_and_grads(losses, inputs):
    logits, deltas = inputs[1], inputs[3]
    grads = torch.autograd.grad(sum(losses.values()), logits + deltas)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(g).all() for g in grads)
    return grads


def test_images_without_annotations(event_storage):
    rpn = _build(_cfg(RPN_CLS_POS_WEIGHT=5.0))
    inputs = _inputs(rpn, gt=[[], []])  # P = 0: only negatives
    num_pos, num_neg = _counts(inputs[2])
    assert num_pos == 0 and num_neg == 2 * rpn.batch_size_per_image
    losses = rpn.losses(*inputs)
    grads = _finite_loss_and_grads(losses, inputs)
    assert losses["loss_rpn_loc"].item() == 0.0
    assert all(g.abs().sum() == 0 for g in grads[len(inputs[1]) :])  # no delta gradient
    assert losses["loss_rpn_cls"].item() > 0
    assert flush_tensor_scalars(event_storage)["rpn/loc_normalizer"] == pytest.approx(1 + EPS)


def test_one_image_without_annotations(event_storage):
    rpn = _build(_cfg())
    inputs = _inputs(rpn, gt=[GT[0], []])
    _finite_loss_and_grads(rpn.losses(*inputs), inputs)


def test_no_valid_anchor(event_storage):
    rpn = _build(_cfg())
    anchors, logits, labels, deltas, matched = _inputs(rpn)
    labels = [torch.full_like(l, -1) for l in labels]
    inputs = (anchors, logits, labels, deltas, matched)
    losses = rpn.losses(*inputs)
    grads = _finite_loss_and_grads(losses, inputs)
    assert losses["loss_rpn_cls"].item() == 0.0 and losses["loss_rpn_loc"].item() == 0.0
    assert all(g.abs().sum() == 0 for g in grads)
    scalars = flush_tensor_scalars(event_storage)
    assert scalars["rpn/fg_fraction"] == 0.0
    assert scalars["rpn/cls_normalizer"] == pytest.approx(1 + EPS)


def _copies(labels):
    return [label.clone() for label in labels]


def test_the_two_paths_give_the_same_losses(event_storage, monkeypatch):
    # The sampler's very tensors are gathered into B slots per image; equal copies of them are
    # "another labelling" and go through every anchor.
    from balanced_rcnn.modeling import rpn as rpn_module

    paths = []
    for name in ("_sampled_rows", "_all_rows"):
        original = getattr(rpn_module, name)
        monkeypatch.setattr(rpn_module, name,
                            lambda *a, _f=original, _n=name, **k: paths.append(_n) or _f(*a, **k))
    rpn = _build(_cfg(RPN_CLS_POS_WEIGHT=2.0))
    anchors, logits, labels, deltas, matched = _inputs(rpn)
    copies = _copies(labels)
    gathered = rpn.losses(anchors, logits, labels, deltas, matched)
    dense = rpn.losses(anchors, logits, copies, deltas, matched)
    assert paths == ["_sampled_rows", "_all_rows"]
    for key in ("loss_rpn_cls", "loss_rpn_loc"):
        torch.testing.assert_close(gathered[key], dense[key])


def test_every_anchor_labelled_is_accepted_as_by_stock(event_storage):
    # Sampling-free labelling: every anchor positive or negative (more than B per image).
    stock, balanced = _build(_cfg("RPN")), _build(_cfg(REG_NORMALIZER="samples"))
    anchors, logits, labels, deltas, matched = _inputs(stock)
    labels = [torch.where(label == 1, 1, 0) for label in labels]
    num_pos, num_neg = _counts(labels)
    assert num_pos + num_neg > 2 * stock.batch_size_per_image
    theirs = stock.losses(anchors, logits, labels, deltas, matched)
    ours = balanced.losses(anchors, logits, labels, deltas, matched)
    # "samples": the regression has stock's divisor B * N; classification divides by P + Q.
    n_b = stock.batch_size_per_image * 2
    torch.testing.assert_close(ours["loss_rpn_loc"], theirs["loss_rpn_loc"] * n_b / (n_b + EPS))
    torch.testing.assert_close(
        ours["loss_rpn_cls"], theirs["loss_rpn_cls"] * n_b / (num_pos + num_neg + EPS)
    )


def test_a_sampler_labelling_changed_in_place_beyond_b_is_refused(event_storage):
    rpn = _build(_cfg())
    anchors, logits, labels, deltas, matched = _inputs(rpn)
    for label in labels:
        label.zero_()  # the sampler's own tensors, now with every anchor sampled
    with pytest.raises(RuntimeError, match="batch_size_per_image"):
        rpn.losses(anchors, logits, labels, deltas, matched)


def test_all_anchor_path_does_not_wait_for_the_device(event_storage, refuse_host_sync):
    rpn = _build(_cfg(ADAPTIVE_POS_WEIGHT=True, NORMALIZER_MOMENTUM=0.9))
    anchors, logits, labels, deltas, matched = _inputs(rpn)
    labels = _copies(labels)
    with refuse_host_sync():
        losses = rpn.losses(anchors, logits, labels, deltas, matched)
        sum(losses.values()).backward()
    assert torch.isfinite(losses["loss_rpn_cls"])


def test_losses_do_not_wait_for_the_device(event_storage, refuse_host_sync):
    rpn = _build(_cfg())
    inputs = _inputs(rpn)
    with refuse_host_sync():
        losses = rpn.losses(*inputs)
        sum(losses.values()).backward()
    assert torch.isfinite(losses["loss_rpn_cls"])


def test_forward_trains_and_inference_is_stock(event_storage):
    balanced, stock = _build(_cfg()), _build(_cfg("RPN"))
    stock.load_state_dict(balanced.state_dict())
    images = ImageList(torch.zeros(2, 3, *IMAGE_SIZE), [IMAGE_SIZE] * 2)
    _, losses = balanced(images, _features(), _gt_instances(GT))
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc"}
    assert all(torch.isfinite(v) for v in losses.values())
    balanced.eval()
    stock.eval()
    with torch.no_grad():
        ours, no_losses = balanced(images, _features())
        theirs, _ = stock(images, _features())
    assert no_losses == {}
    for a, b in zip(ours, theirs):
        assert torch.equal(a.proposal_boxes.tensor, b.proposal_boxes.tensor)
        assert torch.equal(a.objectness_logits, b.objectness_logits)


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
         r"REG_NORMALIZER must be one of \('positives', 'samples'\), got 'mean'"),
        ("MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM", 1.0,
         r"NORMALIZER_MOMENTUM must be in \[0, 1\), got 1.0"),
        ("MODEL.BALANCED_LOSS.PRIOR_PROB", 1.0, r"PRIOR_PROB must be in \[0, 1\)"),
        ("MODEL.RPN.POSITIVE_FRACTION", 1.0,
         r"ADAPTIVE_POS_WEIGHT needs MODEL.RPN.POSITIVE_FRACTION in \(0, 1\), got 1.0"),
    ],
)
def test_build_refuses(key, value, message):
    cfg = _cfg(ADAPTIVE_POS_WEIGHT=key == "MODEL.RPN.POSITIVE_FRACTION")
    cfg.merge_from_list([key, value])
    with pytest.raises(ValueError, match=message):
        _build(cfg)


def test_build_without_project_keys_says_what_to_call():
    cfg = get_cfg()
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = "BalancedRPN"
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
    with pytest.raises(KeyError, match="add_balanced_rcnn_config"):
        _build(cfg)


# ---- the loss options ----------------------------------------------------------------------


def test_samples_normalizer_equals_stock(event_storage):
    stock, balanced = _build(_cfg("RPN")), _build(_cfg(REG_NORMALIZER="samples"))
    anchors, logits, labels, deltas, matched = _inputs(balanced)  # the sampler's own labels
    n_b = balanced.batch_size_per_image * 2
    assert all(int((label >= 0).sum()) == n_b // 2 for label in labels)  # B sampled per image
    ours = balanced.losses(anchors, logits, labels, deltas, matched)
    theirs = stock.losses(anchors, logits, labels, deltas, matched)
    for key in ("loss_rpn_cls", "loss_rpn_loc"):  # both divided by B * N (+ EPS)
        torch.testing.assert_close(ours[key], theirs[key] * n_b / (n_b + EPS), rtol=1e-6, atol=0)
    grads_ours = torch.autograd.grad(sum(ours.values()), logits + deltas)
    grads_stock = torch.autograd.grad(sum(theirs.values()), logits + deltas)
    for g_o, g_s in zip(grads_ours, grads_stock):
        torch.testing.assert_close(g_o, g_s * n_b / (n_b + EPS))
    assert flush_tensor_scalars(event_storage)["rpn/loc_normalizer"] == pytest.approx(n_b + EPS)


def test_running_counts_normalize_over_steps(event_storage):
    rpn = _build(_cfg(NORMALIZER_MOMENTUM=0.5))
    first = _inputs(rpn)
    num_pos, num_neg = _counts(first[2])
    rpn.losses(*first)
    assert flush_tensor_scalars(event_storage)["rpn/loc_normalizer"] == pytest.approx(num_pos + EPS)
    empty = _inputs(rpn, gt=[[], []])  # P = 0 in this batch
    losses = rpn.losses(*empty)
    # P: 0.5 * num_pos + 0.5 * 0; the batch has no positive, so loss_rpn_loc is 0 anyway.
    scalars = flush_tensor_scalars(event_storage)
    assert scalars["rpn/loc_normalizer"] == pytest.approx(max(num_pos / 2, 1) + EPS)
    assert scalars["rpn/cls_normalizer"] == pytest.approx(num_pos + num_neg + EPS)
    assert losses["loss_rpn_loc"].item() == 0.0
    torch.testing.assert_close(
        rpn.normalizer.running_counts,
        torch.tensor([num_pos + num_neg, num_pos / 2, 2.0 * rpn.batch_size_per_image]))
    assert "normalizer.running_counts" in rpn.state_dict()


def test_adaptive_pos_weight_fills_the_positive_fraction(event_storage):
    adaptive = _build(_cfg(ADAPTIVE_POS_WEIGHT=True))
    inputs = _inputs(adaptive)
    num_pos, num_neg = _counts(inputs[2])
    assert 0 < num_pos < num_neg  # the RPN aims at half positives; here too few
    losses = adaptive.losses(*inputs)
    weight = flush_tensor_scalars(event_storage)["rpn/pos_weight"]
    assert weight == pytest.approx(num_neg / num_pos, rel=1e-6)  # f = 0.5: f / (1 - f) = 1
    fixed = _build(_cfg(RPN_CLS_POS_WEIGHT=num_neg / num_pos)).losses(*inputs)
    torch.testing.assert_close(losses["loss_rpn_cls"], fixed["loss_rpn_cls"])
    torch.testing.assert_close(losses["loss_rpn_loc"], fixed["loss_rpn_loc"])


def test_prior_prob_sets_the_objectness_bias_only():
    plain, prior = _build(_cfg()), _build(_cfg(PRIOR_PROB=0.01))
    bias = prior.rpn_head.objectness_logits.bias
    torch.testing.assert_close(bias, torch.full_like(bias, math.log(0.01 / 0.99)))
    theirs = plain.state_dict()
    for name, value in prior.state_dict().items():
        if name != "rpn_head.objectness_logits.bias":
            assert torch.equal(value, theirs[name]), name
