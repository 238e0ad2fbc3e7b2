"""The configs: they load, their _BASE_ chains stay in configs/, they follow the published
Swin recipe, and every full COCO config builds on the CPU and takes one training step."""

import math

import cv2
import numpy as np
import pytest
import torch
import yaml
from balanced_rcnn.engine import clip_and_measure_grad_norm
from detectron2.data import DatasetMapper
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from training_harness import GuardedTrainer

FULL_CONFIGS = {
    # file: (embed dim, depths, heads, drop path, heads' registered names)
    "swin_balanced.yaml": (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2, "balanced"),
    "swin_balanced_3x.yaml": (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2, "balanced"),
    "swin_s_balanced.yaml": (96, [2, 2, 18, 2], [3, 6, 12, 24], 0.2, "balanced"),
    "swin_b_balanced.yaml": (128, [2, 2, 18, 2], [4, 8, 16, 32], 0.3, "balanced"),
    "swin_stock.yaml": (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2, "stock"),
    "swin_balanced_design.yaml": (96, [2, 2, 6, 2], [3, 6, 12, 24], 0.2, "balanced"),
}
# The original design's values (configs/swin_balanced_design.yaml and its CPU twin).
DESIGN = {
    "MODEL.BALANCED_LOSS.RPN_CLS_POS_WEIGHT": 2.0,
    "MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT": 2.0,
    "MODEL.BALANCED_LOSS.RPN_LOSS_CLS_WEIGHT": 1.0,
    "MODEL.BALANCED_LOSS.RPN_LOSS_BBOX_WEIGHT": 1.0,
    "MODEL.BALANCED_LOSS.ROI_LOSS_CLS_WEIGHT": 1.0,
    "MODEL.BALANCED_LOSS.ROI_LOSS_BBOX_WEIGHT": 1.0,
    "MODEL.BALANCED_LOSS.ROI_LOSS_MASK_WEIGHT": 1.0,
    "MODEL.BALANCED_LOSS.REG_NORMALIZER": "positives",
    "MODEL.BALANCED_LOSS.NORMALIZER_MOMENTUM": 0.0,
    "MODEL.BALANCED_LOSS.ADAPTIVE_POS_WEIGHT": False,
    "MODEL.BALANCED_LOSS.PRIOR_PROB": 0.0,
    "DATALOADER.SAMPLER_TRAIN": "TrainingSampler",
    "INPUT.COPY_PASTE.PROBABILITY": 0.0,
}
HEAD_NAMES = {
    "balanced": ("BalancedRPN", "BalancedROIHeads", "BalancedMaskRCNNConvUpsampleHead"),
    "stock": ("RPN", "StandardROIHeads", "MaskRCNNConvUpsampleHead"),
}
LOSSES = {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
EPOCH = math.ceil(118287 / 16)  # COCO train2017 images / images per batch = 7393 iterations


def all_config_files(repo_root):
    return sorted((repo_root / "configs").rglob("*.yaml"))


def test_every_config_loads_and_its_bases_stay_in_configs(repo_root, load_project_config):
    configs = (repo_root / "configs").resolve()
    files = all_config_files(repo_root)
    assert {f.name for f in files} >= set(FULL_CONFIGS) | {
        "Base-BalancedRCNN-Swin-FPN.yaml",
        "swin_tiny_balanced_instant_test.yaml",
    }
    for path in files:
        load_project_config(path.relative_to(configs))
        base = yaml.safe_load(path.read_text()).get("_BASE_")
        while base is not None:
            resolved = (path.parent / base).resolve()
            assert resolved.is_relative_to(configs), f"{path.name}: _BASE_ {base} leaves configs/"
            path, base = resolved, yaml.safe_load(resolved.read_text()).get("_BASE_")


def _flatten(cfg, prefix=""):
    out = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize(
    "shipped, stock",
    [("swin_balanced.yaml", "swin_stock.yaml"),
     ("quick_schedules/swin_tiny_balanced_demo.yaml", "quick_schedules/swin_tiny_stock_demo.yaml"),
     ("quick_schedules/swin_tiny_balanced_sparse_demo.yaml",
      "quick_schedules/swin_tiny_stock_sparse_demo.yaml")],
)
def test_stock_differs_from_shipped_only_in_heads_sampler_and_copy_paste(load_project_config,
                                                                         shipped, stock):
    ours = _flatten(load_project_config(shipped))
    theirs = _flatten(load_project_config(stock))
    differing = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
    assert differing.pop("OUTPUT_DIR")
    assert differing == {
        "MODEL.PROPOSAL_GENERATOR.NAME": ("BalancedRPN", "RPN"),
        "MODEL.ROI_HEADS.NAME": ("BalancedROIHeads", "StandardROIHeads"),
        "MODEL.ROI_MASK_HEAD.NAME": (
            "BalancedMaskRCNNConvUpsampleHead",
            "MaskRCNNConvUpsampleHead",
        ),
        "DATALOADER.SAMPLER_TRAIN": ("ClassAwareObjectShareTrainingSampler", "TrainingSampler"),
        "INPUT.COPY_PASTE.PROBABILITY": (0.5, 0.0),
    }


# What ships (README, Results): stock's losses through the balanced heads, half the sampled images
# holding objects, drawn by their rarest class's repeat factor at threshold 1, and copy-paste 0.5
# onto the empty ones (the quality study's samples_cshare_paste arm).
SHIPPED = {**DESIGN, **{f"MODEL.BALANCED_LOSS.{k}_POS_WEIGHT": 1.0 for k in ("RPN_CLS", "ROI_CLS")},
           "MODEL.BALANCED_LOSS.REG_NORMALIZER": "samples",
           "DATALOADER.SAMPLER_TRAIN": "ClassAwareObjectShareTrainingSampler",
           "DATALOADER.OBJECT_IMAGE_SHARE": 0.5,
           "DATALOADER.REPEAT_THRESHOLD": 1.0,
           "DATALOADER.REPEAT_SQRT": True,
           "INPUT.COPY_PASTE.PROBABILITY": 0.5}


@pytest.mark.parametrize("name", ["swin_balanced.yaml", "swin_balanced_3x.yaml",
                                  "swin_s_balanced.yaml", "swin_b_balanced.yaml",
                                  "quick_schedules/swin_tiny_balanced_demo.yaml",
                                  "quick_schedules/swin_tiny_balanced_sparse_demo.yaml",
                                  "my_data/imbalanced_coco.yaml",
                                  "my_data/imbalanced_coco_cpu.yaml"])
def test_shipped_configs_have_the_measured_configuration(load_project_config, name):
    ours = _flatten(load_project_config(name))
    assert {k: ours[k] for k in SHIPPED} == SHIPPED
    assert ours["MODEL.ROI_HEADS.NAME"] == "BalancedROIHeads"


@pytest.mark.parametrize(
    "design, shipped",
    [("swin_balanced_design.yaml", "swin_balanced.yaml"),
     ("quick_schedules/swin_tiny_balanced_design_demo.yaml",
      "quick_schedules/swin_tiny_balanced_demo.yaml")],
)
def test_design_config_is_the_design_exactly(load_project_config, design, shipped):
    ours = _flatten(load_project_config(design))
    assert {k: ours[k] for k in DESIGN} == DESIGN
    # Everything else is the shipped config's: the design differs in its loss options only.
    base = _flatten(load_project_config(shipped))
    differing = {k for k in ours if ours[k] != base[k]} - {"OUTPUT_DIR"}
    assert differing <= set(DESIGN)


@pytest.mark.parametrize(
    "name, epochs, steps",
    [
        ("swin_balanced.yaml", 12, (8, 11)),
        ("swin_s_balanced.yaml", 12, (8, 11)),
        ("swin_b_balanced.yaml", 12, (8, 11)),
        ("swin_balanced_3x.yaml", 36, (27, 33)),
    ],
)
def test_published_recipe(load_project_config, name, epochs, steps):
    cfg = load_project_config(name)
    solver = cfg.SOLVER
    assert (solver.MAX_ITER, solver.STEPS) == (epochs * EPOCH, tuple(s * EPOCH for s in steps))
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.WEIGHT_DECAY) == ("AdamW", 1e-4, 0.05)
    assert (solver.WEIGHT_DECAY_NORM, solver.IMS_PER_BATCH) == (0.0, 16)
    assert solver.NO_WEIGHT_DECAY_KEYS == ["relative_position_bias_table", "absolute_pos_embed"]
    assert (solver.WARMUP_ITERS, solver.WARMUP_FACTOR, solver.WARMUP_METHOD) == (
        500,
        0.001,
        "linear",
    )
    clip = solver.CLIP_GRADIENTS
    assert (clip.ENABLED, clip.CLIP_TYPE, clip.CLIP_VALUE) == (True, "full_model", 10.0)
    assert cfg.INPUT.MIN_SIZE_TRAIN == tuple(range(480, 801, 32))
    assert (cfg.INPUT.MAX_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING) == (1333, "choice")
    assert (cfg.DATASETS.TRAIN, cfg.DATASETS.TEST) == (("coco_2017_train",), ("coco_2017_val",))
    assert cfg.MODEL.PIXEL_MEAN == [123.675, 116.28, 103.53] and cfg.INPUT.FORMAT == "RGB"


@pytest.fixture(scope="module")
def dataset_dicts(tmp_path_factory):
    """Two 96x128 images on disk, one with a rectangle and a triangle, one empty."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    dicts = []
    for i, annotated in enumerate([True, False]):
        image = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
        annotations = []
        if annotated:
            triangle = [70, 10, 120, 10, 95, 60]
            cv2.rectangle(image, (8, 12), (48, 70), (255, 0, 0), -1)
            cv2.fillPoly(image, [np.array(triangle).reshape(-1, 2)], (0, 255, 0))
            annotations = [
                dict(
                    bbox=[8, 12, 48, 70],
                    bbox_mode=BoxMode.XYXY_ABS,
                    category_id=0,
                    segmentation=[[8, 12, 48, 12, 48, 70, 8, 70]],
                ),
                dict(
                    bbox=[70, 10, 120, 60],
                    bbox_mode=BoxMode.XYXY_ABS,
                    category_id=1,
                    segmentation=[triangle],
                ),
            ]
        path = root / f"{i}.png"
        cv2.imwrite(str(path), image)
        dicts.append(
            dict(file_name=str(path), image_id=i, height=96, width=128, annotations=annotations)
        )
    return dicts


@pytest.mark.parametrize("name", sorted(FULL_CONFIGS))
def test_full_config_builds_and_trains_one_step_on_cpu(load_project_config, dataset_dicts, name):
    embed_dim, depths, num_heads, drop_path, heads = FULL_CONFIGS[name]
    cfg = load_project_config(name)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "INPUT.MIN_SIZE_TRAIN", (64,)])
    swin = cfg.MODEL.SWIN
    assert (swin.EMBED_DIM, swin.DEPTHS, swin.NUM_HEADS, swin.WINDOW_SIZE, swin.DROP_PATH_RATE) == (
        embed_dim,
        depths,
        num_heads,
        7,
        drop_path,
    )

    model = GuardedTrainer.build_model(cfg)
    backbone = model.backbone.bottom_up
    assert backbone.embed_dim == embed_dim
    assert [len(layer.blocks) for layer in backbone.layers] == depths
    assert [layer.blocks[0].attn.num_heads for layer in backbone.layers] == num_heads
    assert (
        type(model.proposal_generator).__name__,
        type(model.roi_heads).__name__,
        type(model.roi_heads.mask_head).__name__,
    ) == HEAD_NAMES[heads]

    mapper = DatasetMapper(cfg, is_train=True)
    batch = [mapper(dict(d)) for d in dataset_dicts]
    assert [tuple(b["image"].shape[1:]) for b in batch] == [(64, 85), (64, 85)]
    optimizer = GuardedTrainer.build_optimizer(cfg, model)
    params = dict(model.named_parameters())
    checked = (
        "backbone.bottom_up.patch_embed.proj.weight",
        "roi_heads.box_predictor.cls_score.weight",
    )
    before = {name: params[name].detach().clone() for name in checked}
    with EventStorage(0):
        losses = model(batch)
        assert set(losses) == LOSSES
        assert all(torch.isfinite(v) for v in losses.values()), losses
        sum(losses.values()).backward()
    norm = clip_and_measure_grad_norm(model.parameters(), cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE)
    assert torch.isfinite(norm) and norm > 0
    optimizer.step()
    for name in checked:
        assert not torch.equal(params[name], before[name]), name
