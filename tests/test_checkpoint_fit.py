"""Checkpoints that must hold the whole model (evaluation, resume, predict, export) are refused,
before anything real is built, when they do not fit the config's model."""

from pathlib import Path

import pytest
import torch
from detectron2.modeling import build_model
from training_harness.errors import CheckpointError, CheckpointMismatchError
from training_harness.reliability.checkpoint import AtomicCheckpointer
from training_harness.reliability.checkpoint_fit import misfit_message
from training_harness.reliability.weights_files import check_weights_file


def _tiny_checkpoint(cfg, folder: Path, num_classes: int, name: str = "model_final") -> Path:
    cfg = cfg.clone()
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    AtomicCheckpointer(build_model(cfg), str(folder)).save(name, iteration=7)
    return folder / f"{name}.pth"


def test_misfit_message_lists_shapes_and_missing_tensors_and_the_class_count():
    message = misfit_message(
        "m.pth", " (named by MODEL.WEIGHTS)",
        missing=["roi_heads.box_predictor.cls_score.weight", "backbone.extra.weight"],
        unexpected=[],
        incorrect_shapes=[("roi_heads.box_predictor.cls_score.weight", (4, 8), (3, 8))],
        num_model_tensors=10)
    assert message == (
        "Checkpoint 'm.pth' (named by MODEL.WEIGHTS) does not fit the config's model: 1 tensors "
        "have another shape (roi_heads.box_predictor.cls_score.weight (4, 8) in the checkpoint, "
        "(3, 8) in the model). 1 tensors are missing (backbone.extra.weight). The checkpoint has "
        "3 classes, the config 2: set MODEL.ROI_HEADS.NUM_CLASSES 3. Use the config the "
        "checkpoint was trained with (its OUTPUT_DIR/config.yaml); to fine-tune from it instead, "
        "train with MODEL.WEIGHTS.")
    assert misfit_message("m.pth", "", [], ["extra.weight"], [], 10) is None  # extras are fine


def test_eval_only_refuses_a_checkpoint_of_another_class_count_before_building(tiny_cfg,
                                                                                tmp_path):
    configured = tiny_cfg.MODEL.ROI_HEADS.NUM_CLASSES
    trained = configured + 1
    tiny_cfg.MODEL.WEIGHTS = str(_tiny_checkpoint(tiny_cfg, tmp_path, num_classes=trained))
    tiny_cfg.OUTPUT_DIR = str(tmp_path / "eval")
    with pytest.raises(CheckpointMismatchError) as info:
        check_weights_file(tiny_cfg, resume=False, eval_only=True)
    message = str(info.value)
    assert message.startswith(f"Checkpoint '{tiny_cfg.MODEL.WEIGHTS}' (named by MODEL.WEIGHTS) "
                              "does not fit the config's model: 6 tensors have another shape ("
                              "roi_heads.box_predictor.cls_score.weight (")
    assert (f"The checkpoint has {trained} classes, the config {configured}: set "
            f"MODEL.ROI_HEADS.NUM_CLASSES {trained}.") in message
    # Fine-tuning from it is what detectron2 intends: class layers re-initialized, no error.
    check_weights_file(tiny_cfg, resume=False, eval_only=False)
    # The same checkpoint with the matching class count is accepted.
    tiny_cfg.MODEL.ROI_HEADS.NUM_CLASSES = trained
    check_weights_file(tiny_cfg, resume=False, eval_only=True)


def test_resume_refuses_a_checkpoint_of_another_architecture(tiny_cfg, tmp_path):
    other = torch.nn.Sequential(torch.nn.Linear(4, 4))
    AtomicCheckpointer(other, str(tmp_path)).save("model_0000009", iteration=9)
    tiny_cfg.OUTPUT_DIR = str(tmp_path)
    with pytest.raises(CheckpointMismatchError) as info:
        check_weights_file(tiny_cfg, resume=True)
    num_tensors = len(build_model(tiny_cfg).state_dict())
    assert str(info.value).startswith(
        f"Checkpoint '{tmp_path / 'model_0000009.pth'}' (named by "
        f"{tmp_path / 'last_checkpoint'}) does not fit the config's model: none of the model's "
        f"{num_tensors} tensors is in it (the checkpoint's names: 0.bias, 0.weight, ...). It is "
        "a checkpoint of another architecture.")
    # Without --resume MODEL.WEIGHTS (empty: a fresh start) is loaded, not the folder's file.
    check_weights_file(tiny_cfg, resume=False)


def test_the_real_load_refuses_too(tiny_cfg, tmp_path):
    # What train_net --eval-only and Trainer.resume_or_load run after the set-up check.
    trained = tiny_cfg.MODEL.ROI_HEADS.NUM_CLASSES + 1
    path = _tiny_checkpoint(tiny_cfg, tmp_path, num_classes=trained)
    model = build_model(tiny_cfg)
    before = model.roi_heads.box_predictor.cls_score.weight.clone()
    with pytest.raises(CheckpointMismatchError,
                       match=f"set MODEL.ROI_HEADS.NUM_CLASSES {trained}"):
        AtomicCheckpointer(model, str(tmp_path), require_full_model=True).load(str(path))
    AtomicCheckpointer(model, str(tmp_path)).load(str(path))  # fine-tuning: partial load
    assert torch.equal(model.roi_heads.box_predictor.cls_score.weight, before)


def test_model_weights_that_are_not_a_checkpoint_are_refused_at_set_up(tiny_cfg, tmp_path):
    notes = tmp_path / "notes.pth"
    notes.write_text("not a checkpoint")
    tiny_cfg.MODEL.WEIGHTS = str(notes)
    tiny_cfg.OUTPUT_DIR = str(tmp_path / "out")
    with pytest.raises(CheckpointError, match=rf"^Cannot load checkpoint '{notes}' \(named by "
                                              r"MODEL.WEIGHTS\): it is truncated, corrupt or not "
                                              r"a checkpoint \(torch.load failed: "):
        check_weights_file(tiny_cfg, resume=False)


def test_fine_tuning_from_weights_that_fill_no_backbone_tensor_is_refused():
    from training_harness.reliability.checkpoint_fit import empty_backbone_message

    backbone = ["backbone.bottom_up.patch_embed.proj.weight", "backbone.fpn_lateral2.weight"]
    # An official Swin checkpoint: its names (layers.0..., patch_embed...) match nothing.
    assert empty_backbone_message("swin_tiny.pth", backbone, [*backbone, "roi_heads.x"]) == (
        "MODEL.WEIGHTS 'swin_tiny.pth' loads none of the backbone's 2 tensors, so training would "
        "start from a random backbone. If it is an official Swin checkpoint, convert it first: "
        "python tools/convert_swin_checkpoint.py swin_tiny.pth swin_converted.pth, and set "
        "MODEL.WEIGHTS swin_converted.pth. To train from scratch on purpose, set MODEL.WEIGHTS "
        "\"\".")
    # One backbone tensor loaded (a converted ImageNet checkpoint fills the bottom-up part).
    assert empty_backbone_message("converted.pth", backbone, backbone[1:]) is None
