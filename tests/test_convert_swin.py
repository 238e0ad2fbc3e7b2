"""Starting points for MODEL.WEIGHTS: converted ImageNet Swin checkpoints, and COCO-trained
Mask R-CNN checkpoints loaded into a model with another number of classes."""

import importlib.util

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from training_harness import GuardedTrainer

# A small Swin in the official release's layout: C = 32, two blocks per stage (so the shifted
# ones carry an attn_mask), window 7, trained at 224 px.
EMBED_DIM, DEPTHS, NUM_HEADS, WINDOW = 32, (2, 2, 2, 2), (1, 2, 4, 8), 7
STAGE_NORMS = [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]


@pytest.fixture(scope="module")
def converter(repo_root):
    spec = importlib.util.spec_from_file_location(
        "convert_swin_checkpoint", repo_root / "tools" / "convert_swin_checkpoint.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_swin_state_dict(num_classes: int = 1000):
    """Random tensors under the keys and shapes of the official Swin ImageNet code."""
    g = torch.Generator().manual_seed(1)
    state = {}

    def put(key, *shape):
        state[key] = torch.randn(*shape, generator=g)

    c = EMBED_DIM
    put("patch_embed.proj.weight", c, 3, 4, 4)
    put("patch_embed.proj.bias", c)
    put("patch_embed.norm.weight", c)
    put("patch_embed.norm.bias", c)
    coords = torch.stack(torch.meshgrid(torch.arange(WINDOW), torch.arange(WINDOW), indexing="ij"))
    coords = coords.flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + WINDOW - 1
    relative_index = relative[..., 0] * (2 * WINDOW - 1) + relative[..., 1]
    resolution = 224 // 4
    for i, (depth, heads) in enumerate(zip(DEPTHS, NUM_HEADS)):
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            for norm in ("norm1", "norm2"):
                put(b + norm + ".weight", c)
                put(b + norm + ".bias", c)
            put(b + "attn.relative_position_bias_table", (2 * WINDOW - 1) ** 2, heads)
            state[b + "attn.relative_position_index"] = relative_index.clone()
            put(b + "attn.qkv.weight", 3 * c, c)
            put(b + "attn.qkv.bias", 3 * c)
            put(b + "attn.proj.weight", c, c)
            put(b + "attn.proj.bias", c)
            put(b + "mlp.fc1.weight", 4 * c, c)
            put(b + "mlp.fc1.bias", 4 * c)
            put(b + "mlp.fc2.weight", c, 4 * c)
            put(b + "mlp.fc2.bias", c)
            if j % 2 == 1 and resolution > WINDOW:  # shifted windows, fixed input size
                windows = (resolution // WINDOW) ** 2
                state[b + "attn_mask"] = torch.zeros(windows, WINDOW**2, WINDOW**2)
        if i < len(DEPTHS) - 1:
            put(f"layers.{i}.downsample.norm.weight", 4 * c)
            put(f"layers.{i}.downsample.norm.bias", 4 * c)
            put(f"layers.{i}.downsample.reduction.weight", 2 * c, 4 * c)
            c, resolution = 2 * c, resolution // 2
    put("norm.weight", c)
    put("norm.bias", c)
    put("head.weight", num_classes, c)
    put("head.bias", num_classes)
    return state


def test_converted_checkpoint_fills_every_backbone_parameter(converter, tiny_cfg, tmp_path, capsys):
    official = official_swin_state_dict()
    source, converted = tmp_path / "swin_official.pth", tmp_path / "swin_d2.pth"
    torch.save({"model": official}, source)

    report = converter.main([str(source), str(converted)])

    printed = capsys.readouterr().out
    assert "EMBED_DIM 32, DEPTHS [2, 2, 2, 2], NUM_HEADS [1, 2, 4, 8], WINDOW_SIZE 7" in printed
    assert report.dropped_classifier == ["head.weight", "head.bias"]
    # Stage resolutions 56, 28, 14, 7: the last one is a single window, without shift.
    assert report.dropped_attn_masks == [f"layers.{i}.blocks.1.attn_mask" for i in range(3)]
    assert report.unmatched_in_checkpoint == ["norm.weight", "norm.bias"]
    assert report.shape_mismatches == []
    assert report.missing_in_checkpoint == STAGE_NORMS
    assert "In the backbone, not in the checkpoint (keep their initialization): 8:" in printed
    assert len(report.converted) == len(official) - 7

    tiny_cfg.MODEL.SWIN.DEPTHS = list(DEPTHS)
    tiny_cfg.MODEL.WEIGHTS = str(converted)
    model = GuardedTrainer.build_model(tiny_cfg)
    DetectionCheckpointer(model).resume_or_load(tiny_cfg.MODEL.WEIGHTS, resume=False)

    swin = model.backbone.bottom_up
    tensors = dict(swin.named_parameters(), **dict(swin.named_buffers()))
    loaded = {name for name in tensors if name in official}
    assert set(tensors) - loaded == set(STAGE_NORMS)
    for name in loaded:
        assert torch.equal(tensors[name], official[name]), name
    # Every parameter but the per-stage output norms, which keep LayerNorm's initialization.
    assert len(loaded & {n for n, _ in swin.named_parameters()}) == len(list(swin.parameters())) - 8
    for i in range(4):
        assert torch.equal(getattr(swin, f"norm{i}").weight, torch.ones(EMBED_DIM * 2**i))
        assert torch.equal(getattr(swin, f"norm{i}").bias, torch.zeros(EMBED_DIM * 2**i))


def test_output_must_be_a_pth_file(converter, tmp_path):
    with pytest.raises(SystemExit):
        converter.main([str(tmp_path / "in.pth"), str(tmp_path / "out.pkl")])


def test_output_equal_to_the_input_is_refused(converter, tmp_path, capsys):
    download = tmp_path / "swin_tiny.pth"
    download.write_bytes(b"the download")
    with pytest.raises(SystemExit):
        converter.main([str(download), str(tmp_path / "." / "swin_tiny.pth")])
    assert "it would overwrite the download" in capsys.readouterr().err
    assert download.read_bytes() == b"the download"


def test_not_a_swin_checkpoint(converter, tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}}, path)
    with pytest.raises(ValueError, match="not a Swin Transformer checkpoint"):
        converter.read_state_dict(str(path))


def test_coco_checkpoint_into_a_model_with_other_classes(tiny_cfg, tmp_path):
    tiny_cfg.MODEL.ROI_HEADS.NUM_CLASSES = 80
    coco_model = GuardedTrainer.build_model(tiny_cfg)
    DetectionCheckpointer(coco_model, save_dir=str(tmp_path)).save("coco")
    coco = coco_model.state_dict()

    tiny_cfg.MODEL.ROI_HEADS.NUM_CLASSES = 3
    model = GuardedTrainer.build_model(tiny_cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    DetectionCheckpointer(model).resume_or_load(str(tmp_path / "coco.pth"), resume=False)

    class_dependent = {
        f"roi_heads.box_predictor.{layer}.{p}"
        for layer in ("cls_score", "bbox_pred")
        for p in ("weight", "bias")
    } | {"roi_heads.mask_head.predictor.weight", "roi_heads.mask_head.predictor.bias"}
    for name, value in model.state_dict().items():
        if name in class_dependent:
            assert torch.equal(value, initial[name]), name
        else:
            assert torch.equal(value, coco[name]), name
