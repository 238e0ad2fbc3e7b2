"""The balanced mask loss (balanced_mask_rcnn_loss) and BalancedMaskRCNNConvUpsampleHead:
detectron2's mask_rcnn_loss and its statistics, hand-computed values, no foreground, no host
sync, the loss weight, stock inference, and the running count of NORMALIZER_MOMENTUM."""

import math

import pytest
import torch
from conftest import EPS, K, LN2, ROI_IMAGE_SIZE, mask_heads, mask_instances, roi_cfg
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.structures import BitMasks, Boxes, Instances

from balanced_rcnn.modeling import balanced_mask_rcnn_loss
from balanced_rcnn.utils.events import flush_tensor_scalars

pytestmark = pytest.mark.core


@pytest.mark.parametrize("num_classes", [K, 1])  # class-specific, class-agnostic
def test_mask_loss_and_its_statistics_equal_stocks(event_storage, num_classes):
    instances = mask_instances()
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


def test_mask_loss_equals_hand_computed_value(event_storage):
    inst = Instances(ROI_IMAGE_SIZE)
    inst.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 8.0, 8.0]]))
    inst.gt_classes = torch.tensor([1, 0])
    masks = torch.zeros(2, *ROI_IMAGE_SIZE, dtype=torch.bool)
    masks[0, :8, :8] = True  # fills proposal 0: every target pixel 1
    inst.gt_masks = BitMasks(masks)  # mask 1 is empty: every target pixel 0
    logits = torch.zeros(2, K, 4, 4)
    logits[0, 1] = math.log(3.0)  # gt class of proposal 0
    logits[1, 1] = 9.0  # not proposal 1's class: no effect
    # Mask 0: BCE(ln 3, 1) = ln(4/3) per pixel; mask 1: BCE(0, 0) = ln 2. F = 2.
    expected = (math.log(4 / 3) + LN2) / (2 + EPS)
    loss = balanced_mask_rcnn_loss(logits, [inst], eps=EPS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_mask_loss_without_foreground_is_zero_with_shaped_grads(event_storage):
    logits = torch.randn(0, K, 14, 14, requires_grad=True)
    loss = balanced_mask_rcnn_loss(logits, mask_instances(num_per_image=(0, 0)))
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits)
    assert grad.shape == logits.shape
    assert flush_tensor_scalars(event_storage)["mask/normalizer"] == pytest.approx(1 + EPS)


def test_mask_loss_does_not_wait_for_the_device(event_storage, refuse_host_sync):
    instances = mask_instances()
    logits = torch.randn(5, K, 14, 14, requires_grad=True)
    with refuse_host_sync():
        balanced_mask_rcnn_loss(logits, instances).backward()


def test_mask_head_trains_with_the_weighted_loss_and_infers_as_stock(event_storage):
    cfg = roi_cfg(ROI_LOSS_MASK_WEIGHT=2.0)
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    stock, balanced = mask_heads(cfg)
    features = torch.randn(5, 8, 7, 7)
    instances = mask_instances()
    losses = balanced(features, instances)
    # Weight 2 x stock's loss (one worker, F = 5).
    torch.testing.assert_close(losses["loss_mask"], 2 * stock(features, instances)["loss_mask"])

    balanced.eval()
    stock.eval()
    predicted = []
    for head in (balanced, stock):
        inst = Instances(ROI_IMAGE_SIZE)
        inst.pred_classes = torch.tensor([0, 2, 1])
        predicted.append(head(features[:3], [inst])[0].pred_masks)
    assert torch.equal(*predicted)


def test_running_counts_of_the_mask_head_average_over_steps_and_leave_inference_stock(
    event_storage,
):
    cfg = roi_cfg(NORMALIZER_MOMENTUM=0.5)
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 1
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 8
    stock, head = mask_heads(cfg)
    features = torch.randn(5, 8, 7, 7)
    first = head(features, mask_instances())["loss_mask"]
    stock_loss = stock(features, mask_instances())["loss_mask"]
    torch.testing.assert_close(first, stock_loss * 5 / (5 + EPS))
    head(features[:1], mask_instances(num_per_image=(1, 0)))
    torch.testing.assert_close(head.normalizer_running_counts, torch.tensor([3.0]))  # (5 + 1) / 2
    assert "normalizer_running_counts" in head.state_dict()
    # The normalizer is no layer of the head's nn.Sequential: inference is stock's.
    head.eval()
    stock.eval()
    inst = Instances(ROI_IMAGE_SIZE)
    inst.pred_classes = torch.tensor([0, 2])
    inst_stock = Instances(ROI_IMAGE_SIZE)
    inst_stock.pred_classes = torch.tensor([0, 2])
    assert torch.equal(head(features[:2], [inst])[0].pred_masks,
                       stock(features[:2], [inst_stock])[0].pred_masks)
