"""BalancedRPN.losses gathers the anchors that detectron2's sampler labelled into B static slots
per image and takes any other labelling over every anchor: both give the same losses, neither
waits for the device, and a sampler labelling changed beyond B anchors is refused on the device
(torch._assert_async, whose behaviour on the CPU is pinned here)."""

import pytest
import torch
from conftest import EPS, anchor_counts, build_rpn, rpn_cfg, rpn_loss_inputs

pytestmark = pytest.mark.core


def _copies(labels):
    return [label.clone() for label in labels]


def test_sampled_and_all_anchor_paths_give_the_same_losses(event_storage, monkeypatch):
    # The sampler's very tensors are gathered into B slots per image; equal copies of them are
    # "another labelling" and go through every anchor.
    from balanced_rcnn.modeling import rpn as rpn_module

    paths = []
    for name in ("_sampled_rows", "_all_rows"):
        original = getattr(rpn_module, name)
        monkeypatch.setattr(rpn_module, name,
                            lambda *a, _f=original, _n=name, **k: paths.append(_n) or _f(*a, **k))
    rpn = build_rpn(rpn_cfg(RPN_CLS_POS_WEIGHT=2.0))
    anchors, logits, labels, deltas, matched = rpn_loss_inputs(rpn)
    copies = _copies(labels)
    gathered = rpn.losses(anchors, logits, labels, deltas, matched)
    dense = rpn.losses(anchors, logits, copies, deltas, matched)
    assert paths == ["_sampled_rows", "_all_rows"]
    for key in ("loss_rpn_cls", "loss_rpn_loc"):
        torch.testing.assert_close(gathered[key], dense[key])


def test_every_anchor_labelled_is_accepted_with_stocks_divisors(event_storage):
    # Sampling-free labelling: every anchor positive or negative (more than B per image).
    stock, balanced = build_rpn(rpn_cfg("RPN")), build_rpn(rpn_cfg(REG_NORMALIZER="samples"))
    anchors, logits, labels, deltas, matched = rpn_loss_inputs(stock)
    labels = [torch.where(label == 1, 1, 0) for label in labels]
    num_pos, num_neg = anchor_counts(labels)
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
    rpn = build_rpn(rpn_cfg())
    anchors, logits, labels, deltas, matched = rpn_loss_inputs(rpn)
    for label in labels:
        label.zero_()  # the sampler's own tensors, now with every anchor sampled
    with pytest.raises(RuntimeError, match="batch_size_per_image"):
        rpn.losses(anchors, logits, labels, deltas, matched)


def test_all_anchor_path_does_not_wait_for_the_device(event_storage, refuse_host_sync):
    rpn = build_rpn(rpn_cfg(ADAPTIVE_POS_WEIGHT=True, NORMALIZER_MOMENTUM=0.9))
    anchors, logits, labels, deltas, matched = rpn_loss_inputs(rpn)
    labels = _copies(labels)
    with refuse_host_sync():
        losses = rpn.losses(anchors, logits, labels, deltas, matched)
        sum(losses.values()).backward()
    assert torch.isfinite(losses["loss_rpn_cls"])


def test_assert_async_raises_on_the_cpu_for_false_and_passes_for_true():
    # What _sampled_anchor_slots relies on: a private API (there is no public assert on a tensor
    # that does not wait for the device), so its behaviour is pinned here.
    torch._assert_async(torch.tensor(True), "never raised")
    torch._assert_async(torch.tensor(3) <= 4, "never raised")
    with pytest.raises(RuntimeError, match="more anchors than B"):
        torch._assert_async(torch.tensor(5) <= 4, "more anchors than B")
