"""The Trainer: optimizer parameter groups, gradient clipping, the gradient-norm log, evaluation."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from balanced_rcnn.engine import GRAD_NORM_SCALAR, GradientNormHook, build_optimizer
from balanced_rcnn.evaluation import FrequencyGroupCOCOEvaluator, ImageLevelEvaluator
from balanced_rcnn.utils.events import flush_tensor_scalars
from detectron2.data import DatasetCatalog
from detectron2.engine import HookBase, SimpleTrainer, hooks
from detectron2.evaluation import COCOEvaluator
from training_harness import GuardedTrainer
from training_harness.data import register_datasets_from_config


def _weight_decay_by_name(model, optimizer):
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    return {name: group_of[id(p)]["weight_decay"] for name, p in model.named_parameters()}


def test_adamw_groups_follow_the_swin_recipe(tiny_cfg):
    model = GuardedTrainer.build_model(tiny_cfg)
    optimizer = GuardedTrainer.build_optimizer(tiny_cfg, model)
    # full_model clipping is not an optimizer wrapper: the optimizer is a plain AdamW.
    assert type(optimizer) is torch.optim.AdamW
    assert {(g["lr"], g["betas"]) for g in optimizer.param_groups} == {(0.0008, (0.9, 0.999))}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))

    decay = _weight_decay_by_name(model, optimizer)
    norms = {
        f"{m}.{p}"
        for m, mod in model.named_modules()
        if isinstance(mod, torch.nn.LayerNorm)
        for p, _ in mod.named_parameters(recurse=False)
    }
    for name, wd in decay.items():
        no_decay = name in norms or name.endswith(".relative_position_bias_table")
        assert wd == (0.0 if no_decay else 0.05), name
    # A few by name, so that the rule above cannot pass vacuously.
    swin = "backbone.bottom_up."
    assert decay[swin + "layers.0.blocks.0.attn.relative_position_bias_table"] == 0.0
    assert decay[swin + "patch_embed.norm.bias"] == 0.0
    assert decay[swin + "norm3.weight"] == 0.0
    assert decay[swin + "layers.2.downsample.norm.weight"] == 0.0
    assert decay[swin + "layers.0.blocks.0.attn.qkv.bias"] == 0.05
    assert decay["backbone.fpn_lateral2.weight"] == 0.05
    assert decay["roi_heads.box_head.fc1.weight"] == 0.05


def test_sgd_and_per_parameter_clipping_are_detectron2s(tiny_cfg):
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    tiny_cfg.SOLVER.OPTIMIZER = "SGD"
    tiny_cfg.SOLVER.MOMENTUM = 0.8
    tiny_cfg.SOLVER.NESTEROV = True
    tiny_cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "value"
    optimizer = build_optimizer(tiny_cfg, model)
    assert type(optimizer).__name__ == "SGDWithGradientClip"
    assert isinstance(optimizer, torch.optim.SGD)
    assert {(g["momentum"], g["nesterov"]) for g in optimizer.param_groups} == {(0.8, True)}
    assert sorted(_weight_decay_by_name(model, optimizer).items()) == [
        ("0.bias", 0.05),
        ("0.weight", 0.05),
        ("1.bias", 0.0),
        ("1.weight", 0.0),
    ]


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("OPTIMIZER", "Adam", r"^SOLVER.OPTIMIZER must be one of 'AdamW', 'SGD'; got 'Adam'. "
                              r"Did you mean 'AdamW'\?$"),
        ("CLIP_GRADIENTS.CLIP_TYPE", "global", "CLIP_TYPE must be one of .*got 'global'"),
    ],
)
def test_unknown_optimizer_or_clip_type(tiny_cfg, key, value, message):
    tiny_cfg.merge_from_list([f"SOLVER.{key}", value])
    with pytest.raises(ValueError, match=message):
        build_optimizer(tiny_cfg, torch.nn.Linear(2, 2))


def test_gradient_norm_hook_from_config(tiny_cfg):
    assert GradientNormHook.from_config(tiny_cfg)._max_norm == 10.0
    tiny_cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "norm"  # per-parameter: detectron2 clips
    assert GradientNormHook.from_config(tiny_cfg)._max_norm is None
    tiny_cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE = "full_model"
    tiny_cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    assert GradientNormHook.from_config(tiny_cfg)._max_norm is None
    tiny_cfg.SOLVER.CLIP_GRADIENTS.ENABLED = True
    tiny_cfg.SOLVER.CLIP_GRADIENTS.CLIP_VALUE = 0.0
    with pytest.raises(ValueError, match=r"SOLVER.CLIP_GRADIENTS.CLIP_VALUE\), got 0.0"):
        GradientNormHook.from_config(tiny_cfg)


class _HugeGradientModel(torch.nn.Module):
    """Returns a loss dict whose gradients have a total norm of about 1e7."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
        )

    def forward(self, x):
        return {"loss": self.net(x).pow(2).sum() * 1e6}


class _RecordGradients(HookBase):
    """Copies the gradients as the optimizer will see them (after the hooks before it)."""

    def __init__(self, grads):
        self.grads = grads

    def after_backward(self):
        self.grads.update({n: p.grad.clone() for n, p in self.trainer.model.named_parameters()})


def _reference_step(model, x, max_norm):
    """What the clip must equal: torch.nn.utils.clip_grad_norm_ then plain SGD."""
    reference = copy.deepcopy(model)
    sum(reference(x).values()).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
    clipped = [p.grad.clone() for p in reference.parameters()]
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    return norm, clipped, reference


@pytest.mark.parametrize("max_norm", [10.0, None])
def test_full_model_clip_in_the_training_loop(event_storage, max_norm):
    model = _HugeGradientModel()
    x = torch.randn(5, 8)
    norm, clipped, reference = _reference_step(model, x, max_norm or float("inf"))
    assert norm.item() > 1e6

    # As GuardedTrainer wires it: the hook on the SimpleTrainer that runs backward.
    trainer = SimpleTrainer(model, [x], torch.optim.SGD(model.parameters(), lr=0.1))
    grads = {}
    trainer.register_hooks([GradientNormHook(max_norm=max_norm), _RecordGradients(grads)])
    trainer.iter = 0
    trainer.run_step()
    flush_tensor_scalars()

    logged, iteration = event_storage.latest()[GRAD_NORM_SCALAR]
    assert (logged, iteration) == (norm.item(), 0)
    for (name, p), expected_grad, expected in zip(
        model.named_parameters(), clipped, reference.parameters()
    ):
        assert torch.equal(grads[name], expected_grad), name
        assert torch.equal(p, expected), name
    total_after = torch.nn.utils.get_total_norm(list(grads.values())).item()
    if max_norm is None:
        assert total_after == pytest.approx(norm.item(), rel=1e-6)
    else:
        assert total_after == pytest.approx(10.0, rel=1e-5)


def test_hook_unscales_amp_gradients_once(event_storage):
    model = _HugeGradientModel()
    x = torch.randn(5, 8)
    norm, clipped, reference = _reference_step(model, x, 10.0)

    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**-20)  # a power of 2: exact unscaling
    hook = GradientNormHook(max_norm=10.0)
    hook.trainer = SimpleNamespace(optimizer=optimizer, grad_scaler=scaler)
    optimizer.zero_grad()
    scaler.scale(sum(model(x).values())).backward()
    hook.after_backward()
    scaler.step(optimizer)  # must not unscale a second time
    scaler.update()
    flush_tensor_scalars()

    assert event_storage.latest()[GRAD_NORM_SCALAR][0] == pytest.approx(norm.item(), rel=1e-6)
    for p, expected_grad, expected in zip(model.parameters(), clipped, reference.parameters()):
        torch.testing.assert_close(p.grad, expected_grad)
        torch.testing.assert_close(p, expected)


@pytest.fixture
def synthetic_cfg(tiny_cfg, tmp_path):
    tiny_cfg.DATASETS.SYNTHETIC_ROOT = str(tmp_path / "datasets")
    tiny_cfg.OUTPUT_DIR = str(tmp_path / "output")
    tiny_cfg.SOLVER.MAX_ITER = 3
    register_datasets_from_config(tiny_cfg)
    return tiny_cfg


def test_trainer_logs_grad_norm_every_step_and_skips_eval_without_test_set(synthetic_cfg):
    synthetic_cfg.DATASETS.TEST = ()
    trainer = GuardedTrainer(synthetic_cfg)
    # GradientNormHook first: the outer hooks' after_backward sees the clipped gradients.
    assert [type(h).__name__ for h in trainer._trainer._hooks] == ["GradientNormHook",
                                                                  "_PassAfterBackwardOn"]
    assert not any(isinstance(h, hooks.EvalHook) for h in trainer._hooks)
    assert trainer.grad_scaler is None  # no AMP
    trainer.train()

    logged = trainer.storage.history(GRAD_NORM_SCALAR).values()
    assert [iteration for _, iteration in logged] == [0, 1, 2]
    assert all(value > 0 for value, _ in logged)
    # The heads' tensor scalars are flushed once per step, at their own iteration.
    for name in ("rpn/cls_normalizer", "roi_head/cls_normalizer", "mask/normalizer"):
        assert [i for _, i in trainer.storage.history(name).values()] == [0, 1, 2], name
    # Everything the heads and the hook recorded as tensors reached EventStorage.
    assert not getattr(trainer.storage, "_balanced_rcnn_pending_scalars")
    with pytest.raises(ValueError, match="DATASETS.TEST is empty"):
        GuardedTrainer.test(synthetic_cfg, trainer.model)


def test_build_evaluator_is_pycocotools_bbox_and_segm_and_image_level(synthetic_cfg):
    DatasetCatalog.get("synthetic_shapes_tiny_val")  # generates the images and the json
    synthetic_cfg.TEST.DEPLOYMENT_SCORE_THRESH = 0.7
    coco, image_level = GuardedTrainer.build_evaluator(synthetic_cfg,
                                                "synthetic_shapes_tiny_val")._evaluators
    assert isinstance(coco, FrequencyGroupCOCOEvaluator) and isinstance(coco, COCOEvaluator)
    assert coco._tasks == ("bbox", "segm")
    assert coco._use_fast_impl is False
    assert coco._output_dir.endswith("output/inference/synthetic_shapes_tiny_val")
    assert isinstance(image_level, ImageLevelEvaluator)
    assert (image_level.dataset_name, image_level.score_threshold) == (
        "synthetic_shapes_tiny_val", 0.7)
    synthetic_cfg.MODEL.MASK_ON = False
    coco, _ = GuardedTrainer.build_evaluator(synthetic_cfg, "synthetic_shapes_tiny_val")._evaluators
    assert coco._tasks == ("bbox",)


def test_resume_after_the_last_iteration_writes_the_missing_model_final(synthetic_cfg):
    """Killed between the last periodic checkpoint and model_final.pth: --resume finishes it."""
    synthetic_cfg.DATASETS.TEST = ()
    synthetic_cfg.SOLVER.CHECKPOINT_PERIOD = 1
    synthetic_cfg.HEALTH.ENABLED = False
    GuardedTrainer(synthetic_cfg).train()
    output = Path(synthetic_cfg.OUTPUT_DIR)
    last_periodic = torch.load(output / "model_0000002.pth", weights_only=False)
    (output / "model_final.pth").unlink()
    (output / "last_checkpoint").write_text("model_0000002.pth")

    trainer = GuardedTrainer(synthetic_cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == synthetic_cfg.SOLVER.MAX_ITER == 3
    assert (output / "last_checkpoint").read_text() == "model_final.pth"
    final = torch.load(output / "model_final.pth", weights_only=False)
    assert final["iteration"] == 2
    assert final["model"].keys() == last_periodic["model"].keys()
    assert all(torch.equal(final["model"][k], last_periodic["model"][k]) for k in final["model"])
    trainer.train()  # nothing left to train, and nothing breaks
    again = torch.load(output / "model_final.pth", weights_only=False)
    assert all(torch.equal(again["model"][k], final["model"][k]) for k in final["model"])


def test_trainer_sets_every_attribute_default_trainer_sets(synthetic_cfg):
    """GuardedTrainer.__init__ assembles DefaultTrainer's pieces itself (engine/trainer.py): an
    attribute that a new detectron2 adds to DefaultTrainer.__init__ must be added there too."""
    from detectron2.engine import DefaultTrainer

    ours = GuardedTrainer(synthetic_cfg)
    # What detectron2's own builders know (its loader, its gradient clipping):
    synthetic_cfg.DATALOADER.SAMPLER_TRAIN = "TrainingSampler"
    synthetic_cfg.SOLVER.CLIP_GRADIENTS.ENABLED = False
    stock = DefaultTrainer(synthetic_cfg)
    assert set(vars(stock)) <= set(vars(ours))
    assert type(ours.checkpointer).__name__ == "AtomicCheckpointer"
    assert type(ours._trainer).__name__ == "SimpleTrainer"


def test_the_harness_places_its_hooks_among_detectron2s(synthetic_cfg):
    from balanced_rcnn import Trainer
    from training_harness.health import NonFiniteStop, TrainingHealthMonitor
    from training_harness.reliability import CheckpointOnSignal, PeerWatchdogHook

    kinds = [type(h) for h in GuardedTrainer(synthetic_cfg)._hooks]
    harness = (NonFiniteStop, TrainingHealthMonitor, CheckpointOnSignal, hooks.CallbackHook,
               PeerWatchdogHook)
    # detectron2's hooks (the core Trainer's) keep their order; the harness adds its own.
    assert [k for k in kinds if k not in harness] == [type(h) for h in Trainer(synthetic_cfg)._hooks]
    assert set(harness) <= set(kinds)  # CallbackHook: the summary of the skipped images
    at = kinds.index
    # The health checks see the step before the checkpointer saves it and the writer writes it.
    assert at(hooks.LRScheduler) < at(NonFiniteStop) < at(TrainingHealthMonitor) \
        < at(hooks.PeriodicCheckpointer) < at(CheckpointOnSignal) < at(hooks.EvalHook) \
        < at(hooks.PeriodicWriter)
    assert kinds[-1] is PeerWatchdogHook
    synthetic_cfg.HEALTH.ENABLED = False
    synthetic_cfg.DATASETS.TEST = ()
    kinds = [type(h) for h in GuardedTrainer(synthetic_cfg)._hooks]
    assert TrainingHealthMonitor not in kinds and hooks.EvalHook not in kinds
    assert NonFiniteStop not in kinds
    assert kinds.index(CheckpointOnSignal) == kinds.index(hooks.PeriodicCheckpointer) + 1
