"""SYNC_NORMALIZERS with two CPU workers (gloo): every head normalizes by the counts averaged
over workers, so the DDP-averaged gradient equals the one-process gradient on the
concatenated batch."""

import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from balanced_rcnn import (
    BalancedFastRCNNOutputLayers,
    BalancedMaskRCNNConvUpsampleHead,
    BalancedRPN,
    add_balanced_rcnn_config,
)
from balanced_rcnn.utils.events import flush_tensor_scalars

pytestmark = pytest.mark.core

EPS = 1e-6
D = 6  # feature size of the toy predictors
K = 3  # foreground classes
IMAGE_SIZE = (32, 32)
ANCHORS = [  # two levels: 6 + 2 anchors
    torch.tensor([[x, y, x + 8.0, y + 8.0] for x in (0.0, 8.0, 16.0) for y in (0.0, 12.0)]),
    torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0]]),
]
# Per worker: RPN labels (P, Q = 3, 5 and 1, 6), ROI gt classes (R, F = 6, 4 and 4, 1) and the
# number of foreground masks (3 and 0).
RPN_LABELS = [[1, 1, 1, 0, 0, 0, 0, 0], [0, 1, 0, -1, 0, 0, 0, 0]]
ROI_CLASSES = [[0, 1, 2, 0, 3, 3], [3, 3, 1, 3]]
NUM_MASKS = [3, 0]


def _cfg(momentum=0.0):
    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    cfg.MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM = momentum
    cfg.MODEL.BALANCED_LOSS.REG_NORMALIZER = "positives"  # the design: the counts divide every loss
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[8], [16]]
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 8
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    cfg.MODEL.ROI_MASK_HEAD.NUM_CONV = 0
    cfg.MODEL.ROI_MASK_HEAD.CONV_DIM = 4
    assert cfg.MODEL.BALANCED_LOSS.SYNC_NORMALIZERS
    return cfg


class _ToyHeads(nn.Module):
    """Tiny predictors feeding the three balanced losses."""

    def __init__(self, momentum=0.0):
        super().__init__()
        cfg = _cfg(momentum)
        torch.manual_seed(0)
        self.objectness = nn.Linear(D, 1)
        self.anchor_deltas = nn.Linear(D, 4)
        self.box_predictor = BalancedFastRCNNOutputLayers(cfg, ShapeSpec(channels=D))
        self.mask_head = BalancedMaskRCNNConvUpsampleHead(
            cfg, ShapeSpec(channels=4, height=7, width=7)
        )
        shapes = {"p2": ShapeSpec(channels=4, stride=4), "p3": ShapeSpec(channels=4, stride=8)}
        self._rpn = [BalancedRPN(cfg, shapes)]  # only its losses; kept out of the parameters

    def forward(self, batch):
        anchor_features, labels, matched, box_features, proposals, mask_features, masks = batch
        logits = self.objectness(anchor_features).squeeze(-1)  # (N, R)
        deltas = self.anchor_deltas(anchor_features)  # (N, R, 4)
        split = [len(a) for a in ANCHORS]
        losses = self._rpn[0].losses(
            [Boxes(a) for a in ANCHORS],
            list(logits.split(split, dim=1)),
            labels,
            list(deltas.split(split, dim=1)),
            matched,
        )
        losses.update(self.box_predictor.losses(self.box_predictor(box_features), proposals))
        losses.update(self.mask_head(mask_features, masks))
        return losses


def _worker_batch(rank, empty=False):
    """The data of one worker: one image, different counts on each worker (``empty``: all of
    its anchors and proposals negative, no mask)."""
    g = torch.Generator().manual_seed(100 + rank)
    all_anchors = torch.cat(ANCHORS)
    labels = torch.tensor(RPN_LABELS[rank])
    if empty:
        labels = torch.where(labels == 1, 0, labels)
    matched = all_anchors + torch.rand(len(all_anchors), 4, generator=g)

    classes = torch.tensor(ROI_CLASSES[rank])
    if empty:
        classes = torch.full_like(classes, K)
    proposals = Instances(IMAGE_SIZE)
    xy = torch.rand(len(classes), 2, generator=g) * 16
    proposals.proposal_boxes = Boxes(
        torch.cat([xy, xy + 8 + torch.rand(len(classes), 2, generator=g) * 8], 1)
    )
    proposals.gt_boxes = Boxes(
        proposals.proposal_boxes.tensor + torch.rand(len(classes), 4, generator=g)
    )
    proposals.gt_classes = classes

    n_masks = 0 if empty else NUM_MASKS[rank]
    masks = Instances(IMAGE_SIZE)
    masks.proposal_boxes = Boxes(torch.tensor([[2.0, 2.0, 20.0, 24.0]]).repeat(n_masks, 1))
    masks.gt_classes = torch.arange(n_masks) % K
    masks.gt_masks = BitMasks(torch.rand(n_masks, *IMAGE_SIZE, generator=g) > 0.5)
    return (
        torch.randn(1, len(all_anchors), D, generator=g),
        [labels],
        [matched],
        torch.randn(len(classes), D, generator=g),
        [proposals],
        torch.randn(n_masks, 4, 7, 7, generator=g),
        [masks],
    )


def _concatenated_batch():
    batches = [_worker_batch(rank) for rank in (0, 1)]
    return tuple(
        (
            torch.cat([b[i] for b in batches])
            if torch.is_tensor(batches[0][i])
            else batches[0][i] + batches[1][i]
        )
        for i in range(len(batches[0]))
    )


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _worker(rank, port, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=60),
    )
    try:
        model = DistributedDataParallel(_ToyHeads())
        with EventStorage():
            losses = model(_worker_batch(rank))
            sum(losses.values()).backward()  # DDP averages the gradients over the workers
            scalars = flush_tensor_scalars()
        # Running counts: two steps, the second worker's batch without any foreground.
        smoothed = _ToyHeads(momentum=0.5)
        with EventStorage():
            smoothed(_worker_batch(rank))
            smoothed(_worker_batch(rank, empty=rank == 1))
        running = {
            "rpn": smoothed._rpn[0].normalizer.running_counts,
            "box": smoothed.box_predictor.normalizer.running_counts,
            "mask": smoothed.mask_head.normalizer_running_counts,
        }
        torch.save({"scalars": scalars, "grads": _grads(model.module), "running": running},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("sync")
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=2)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in (0, 1)]


def test_each_worker_uses_the_mean_counts(worker_results):
    # RPN: P + Q = 8 and 7, P = 3 and 1. ROI: R = 6 and 4, F = 4 and 1. Masks: F = 3 and 0.
    expected = {
        "rpn/cls_normalizer": (8 + 7) / 2 + EPS,
        "rpn/loc_normalizer": (3 + 1) / 2 + EPS,
        "roi_head/cls_normalizer": (6 + 4) / 2 + EPS,
        "roi_head/box_normalizer": (4 + 1) / 2 + EPS,
        "mask/normalizer": (3 + 0) / 2 + EPS,
    }
    for rank, result in enumerate(worker_results):
        for name, value in expected.items():
            assert result["scalars"][name] == pytest.approx(value, rel=1e-7), (rank, name)
    # The per-image counts stay this worker's own.
    assert worker_results[0]["scalars"]["rpn/num_pos_anchors"] == 3.0
    assert worker_results[1]["scalars"]["rpn/num_pos_anchors"] == 1.0
    assert worker_results[0]["scalars"]["roi_head/num_fg"] == 4.0
    assert worker_results[1]["scalars"]["roi_head/num_fg"] == 1.0


def test_ddp_gradient_equals_one_process_on_the_concatenated_batch(worker_results, event_storage):
    reference = _ToyHeads()
    sum(reference(_concatenated_batch()).values()).backward()
    expected = _grads(reference)
    assert all(g.abs().sum() > 0 for g in expected.values())
    for rank, result in enumerate(worker_results):
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_running_counts_agree_over_workers(worker_results):
    # Step 1: the means of the workers' counts. Step 2: worker 1 has no foreground, so the means
    # are RPN P + Q = 7.5, P = 1.5 (3 and 0), ROI R = 5, F = 2 (4 and 0), masks 1.5 (3 and 0);
    # with momentum 0.5 the running counts are the averages of the two steps.
    expected = {
        "rpn": [7.5, (2.0 + 1.5) / 2, 8.0],  # the third count: B x N = 8 x 1 on each worker
        "box": [5.0, (2.5 + 2.0) / 2],
        "mask": [1.5],
    }
    for rank, result in enumerate(worker_results):
        for head, values in expected.items():
            torch.testing.assert_close(result["running"][head], torch.tensor(values),
                                       msg=f"{head} on worker {rank}")
