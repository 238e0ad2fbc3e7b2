"""Shared fixtures: deterministic seeds, an EventStorage, and quiet logs; the builders of the
balanced heads' inputs that the loss tests share (``from conftest import ...``)."""
import importlib.util
import math
import random
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage


REPO = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture
def event_storage():
    """Detectron2 heads log through get_event_storage(); give them one."""
    with EventStorage(start_iter=0) as storage:
        yield storage


# --- Project configs and the tiny CPU model (configs/quick_schedules). ---
TINY_CONFIG = "quick_schedules/swin_tiny_balanced_instant_test.yaml"


@pytest.fixture(scope="session")
def repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


@pytest.fixture
def load_project_config(repo_root):
    """``load_project_config("swin_balanced.yaml")``: a file of configs/ merged over detectron2's
    defaults and the project's keys (unfrozen)."""
    from training_harness.config import load_project_config

    def load(relative_path):
        return load_project_config(str(repo_root / "configs" / relative_path))

    return load


@pytest.fixture
def tiny_cfg(load_project_config):
    """The instant-test config: tiny Swin-FPN Mask R-CNN with the balanced heads, CPU, unfrozen."""
    return load_project_config(TINY_CONFIG)


@pytest.fixture
def tiny_core_cfg(repo_root):
    """:func:`tiny_cfg` with the core's keys only, loaded as a project without the harness
    would: detectron2's defaults, ``add_balanced_rcnn_config`` and the file."""
    from balanced_rcnn import add_balanced_rcnn_config
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    cfg.merge_from_file(str(repo_root / "configs" / TINY_CONFIG), allow_unsafe=False)
    return cfg


@pytest.fixture
def refuse_host_sync(monkeypatch):
    """
    ``with refuse_host_sync(): ...``: inside, the Python-level ways of waiting for the device
    (Tensor.item / tolist / bool / float / int, nonzero) raise AssertionError.
    """
    import contextlib

    def refuse(*args, **kwargs):
        raise AssertionError("host-device synchronization")

    @contextlib.contextmanager
    def context():
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero"):
                patch.setattr(torch.Tensor, name, refuse)
            patch.setattr(torch, "nonzero", refuse)
            yield

    return context


@pytest.fixture(autouse=True)
def _no_stale_log_handlers():
    """detectron2's setup_logger, called in-process by some tests, attaches handlers to the stream
    pytest captured for that test; once that stream is closed, every later log record would print
    a "Logging error" traceback into the next test's output. Drop those handlers."""
    import logging

    loggers = [logging.getLogger()] + [logging.getLogger(name)
                                       for name in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
    yield


@pytest.fixture
def forget_bad_datasets():
    """Datasets a test registers under names starting with "bad_" are removed afterwards."""
    yield
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for name in [n for n in DatasetCatalog.list() if n.startswith("bad_")]:
        DatasetCatalog.remove(name)
        if name in MetadataCatalog:
            MetadataCatalog.remove(name)


# --- Builders shared by the loss tests: configs, heads and their inputs, on the CPU. ---
EPS = 1e-6  # MODEL.BALANCED_LOSS.EPS's default
LN2, LN3 = math.log(2.0), math.log(3.0)


# Box deltas with weights 1: the plain offsets and log-ratios.
UNIT_BOX_TRANSFORM = Box2BoxTransform(weights=(1.0, 1.0, 1.0, 1.0))


def assert_scalar_close(actual, expected, rtol=1e-6):
    """``actual`` is a 0-dim float32 tensor equal to the number ``expected``."""
    assert actual.dtype == torch.float32 and actual.dim() == 0
    assert actual.item() == pytest.approx(expected, rel=rtol, abs=1e-7)


def random_boxes(n, generator):
    """(n, 4) XYXY boxes: corners in [0, 50), sides in [1, 41)."""
    xy = torch.rand(n, 2, generator=generator) * 50
    wh = torch.rand(n, 2, generator=generator) * 40 + 1
    return torch.cat([xy, xy + wh], dim=1)


def balanced_cfg(**balanced_loss):
    """detectron2's defaults and the project's keys, with MODEL.BALANCED_LOSS.<key> = value."""
    from balanced_rcnn import add_balanced_rcnn_config
    from detectron2.config import get_cfg

    cfg = get_cfg()
    add_balanced_rcnn_config(cfg)
    for key, value in balanced_loss.items():
        cfg.MODEL.BALANCED_LOSS[key] = value
    return cfg


def harness_cfg():
    """:func:`balanced_cfg` with the training harness's keys."""
    from training_harness import add_training_harness_config

    cfg = balanced_cfg()
    add_training_harness_config(cfg)
    return cfg


# Two feature levels; the RPN's are 16 x 16 and 8 x 8 (one anchor size each) on 64 x 64 images.
FEATURE_SHAPES = {"p2": ShapeSpec(channels=8, stride=4), "p3": ShapeSpec(channels=8, stride=8)}
RPN_IMAGE_SIZE = (64, 64)
RPN_GT = [[[4.0, 6.0, 30.0, 40.0], [30.0, 30.0, 60.0, 62.0]], [[10.0, 10.0, 26.0, 50.0]]]


def rpn_cfg(name="BalancedRPN", **balanced_loss):
    """The config of an RPN (``name``: the registered proposal generator) with B = 64."""
    cfg = balanced_cfg(**balanced_loss)
    cfg.MODEL.PROPOSAL_GENERATOR.NAME = name
    cfg.MODEL.RPN.IN_FEATURES = ["p2", "p3"]
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32]]
    cfg.MODEL.RPN.BATCH_SIZE_PER_IMAGE = 64
    return cfg


def build_rpn(cfg):
    torch.manual_seed(0)
    return build_proposal_generator(cfg, FEATURE_SHAPES)


def rpn_features(num_images=2):
    g = torch.Generator().manual_seed(1)
    return {
        "p2": torch.randn(num_images, 8, 16, 16, generator=g),
        "p3": torch.randn(num_images, 8, 8, 8, generator=g),
    }


def gt_instances(boxes_per_image):
    """One Instances of class-0 ground truth per image, from its list of XYXY boxes."""
    out = []
    for boxes in boxes_per_image:
        inst = Instances(RPN_IMAGE_SIZE)
        inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.int64)
        out.append(inst)
    return out


def rpn_loss_inputs(rpn, gt=RPN_GT):
    """Anchors, labels and random predictions, the arguments of RPN.losses."""
    features = [rpn_features(len(gt))[f] for f in rpn.in_features]
    anchors = rpn.anchor_generator(features)
    torch.manual_seed(2)  # anchor sampling
    labels, matched = rpn.label_and_sample_anchors(anchors, gt_instances(gt))
    g = torch.Generator().manual_seed(3)
    n = len(gt)
    logits = [torch.randn(n, len(a), generator=g).requires_grad_() for a in anchors]
    deltas = [(torch.randn(n, len(a), 4, generator=g) * 0.2).requires_grad_() for a in anchors]
    return anchors, logits, labels, deltas, matched


def anchor_counts(labels):
    """(P, Q): positive and negative anchors of N (R,) label tensors."""
    labels = torch.stack(labels)
    return int((labels == 1).sum()), int((labels == 0).sum())


# ROI heads: K foreground classes (class K is the background), 16-channel box features.
K = 3
BOX_FEATURES = ShapeSpec(channels=16)
ROI_IMAGE_SIZE = (48, 64)


def roi_cfg(**balanced_loss):
    cfg = balanced_cfg(**balanced_loss)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = K
    return cfg


def roi_heads_cfg(name="BalancedROIHeads", mask_head="BalancedMaskRCNNConvUpsampleHead"):
    """Mask R-CNN ROI heads on FEATURE_SHAPES, one small FC and one mask convolution."""
    cfg = roi_cfg()
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


def box_predictors(cfg):
    """detectron2's box predictor and the balanced one, with the same initial weights."""
    from balanced_rcnn import BalancedFastRCNNOutputLayers
    from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

    torch.manual_seed(0)
    stock = FastRCNNOutputLayers(cfg, BOX_FEATURES)
    torch.manual_seed(0)
    return stock, BalancedFastRCNNOutputLayers(cfg, BOX_FEATURES)


def random_proposals(num_per_image=(12, 9), seed=1, with_gt=(True, True)):
    """Sampled proposals with random gt classes in [0, K] (and gt boxes where ``with_gt``)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, has_gt in zip(num_per_image, with_gt):
        xy = torch.rand(n, 2, generator=g) * 30
        boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 15 + 2], dim=1)
        inst = Instances(ROI_IMAGE_SIZE)
        inst.proposal_boxes = Boxes(boxes)
        if has_gt:
            inst.gt_boxes = Boxes(boxes + torch.randn(n, 4, generator=g))
            inst.gt_classes = torch.randint(0, K + 1, (n,), generator=g)  # K: background
        else:
            inst.gt_classes = torch.full((n,), K)  # what detectron2 gives images without gt
        out.append(inst)
    return out


def box_predictions(num_rois, agnostic=False, seed=2):
    """Random scores (R, K + 1) and deltas (R, 4 K) or (R, 4) that require gradients."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(num_rois, K + 1, generator=g).requires_grad_()
    deltas = (torch.randn(num_rois, 4 if agnostic else 4 * K, generator=g) * 0.3).requires_grad_()
    return scores, deltas


def fg_count(proposals):
    return int(sum(((p.gt_classes >= 0) & (p.gt_classes < K)).sum() for p in proposals))


def mask_instances(num_per_image=(3, 2), seed=3):
    """Foreground proposals with gt classes in [0, K) and random gt masks."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in num_per_image:
        inst = Instances(ROI_IMAGE_SIZE)
        xy = torch.rand(n, 2, generator=g) * 20
        inst.proposal_boxes = Boxes(
            torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 20], 1)
        )
        inst.gt_classes = torch.randint(0, K, (n,), generator=g)
        inst.gt_masks = BitMasks(torch.rand(n, *ROI_IMAGE_SIZE, generator=g) > 0.6)
        out.append(inst)
    return out


def mask_heads(cfg):
    """detectron2's mask head and the balanced one on 8 x 7 x 7 features, same weights."""
    from balanced_rcnn import BalancedMaskRCNNConvUpsampleHead
    from detectron2.modeling.roi_heads.mask_head import MaskRCNNConvUpsampleHead

    shape = ShapeSpec(channels=8, height=7, width=7)
    torch.manual_seed(0)
    stock = MaskRCNNConvUpsampleHead(cfg, shape)
    torch.manual_seed(0)
    return stock, BalancedMaskRCNNConvUpsampleHead(cfg, shape)
