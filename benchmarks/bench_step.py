"""
Time a full training step and inference, balanced heads vs detectron2's stock heads, in one run.

    python benchmarks/bench_step.py                    # tiny CPU config and Swin-T config
    python benchmarks/bench_step.py --configs tiny     # only the tiny config
    python benchmarks/bench_step.py --tiny             # seconds; what the test suite runs

What is timed, per config, with both models holding identical weights:

- "train step": the project Trainer's ``run_step`` (forward, losses, backward, gradient-norm clip,
  the non-finite stop's check, detectron2's metric write, optimizer step, the once-per-step
  scalar flush) on one fixed batch; no data loading, no per-iteration hooks. Before every timed
  step the weights are restored and the random seed reset, so both models run the same anchor
  and proposal sampling on the same weights: the loss code is the only difference.
- "inference": ``model(images)`` in eval mode with SCORE_THRESH_TEST 0 (every kept box goes
  through the mask head). The outputs of the two models must be identical; the script fails
  otherwise.

Stock and balanced steps alternate (A B, B A, ...) and the medians are compared: drifts of a
shared machine hit both. The loss path (RPN.losses, the box predictor's losses, the mask head's
training forward) of one extra step is also checked for host-device synchronizations: on CUDA with
``torch.cuda.set_sync_debug_mode("warn")``; on the CPU that mode sees nothing, so the script counts
the Python-level calls that would synchronize on a GPU (Tensor.item/tolist/bool/float/int,
nonzero), like the tests' refuse_host_sync fixture.

Configs: "tiny" is configs/quick_schedules/Base-BalancedRCNN-TinySwin-CPU.yaml (128 px, batch 4,
3 classes); "swin-t" is configs/swin_balanced.yaml (80 classes, random init), 256 px and batch 2
on the CPU, 800 px and batch 2 with AMP on CUDA. Images: the first images with the most objects of
synthetic_shapes_val (synthetic_shapes_tiny_val with --tiny), resized by the config.
"""

import argparse
import contextlib
import copy
import itertools
import logging
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.utils.events import EventStorage
from detectron2.utils.logger import setup_logger
from torch.nn.parallel import DistributedDataParallel

from training_harness import GuardedTrainer
from training_harness.config import load_project_config
from training_harness.data import register_builtin_synthetic
from training_harness.health import NonFiniteStop

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
import common  # noqa: E402

NAME = "bench_step"
CONFIGS = ("tiny", "swin-t")
STOCK_HEADS = {
    "MODEL.PROPOSAL_GENERATOR.NAME": "RPN",
    "MODEL.ROI_HEADS.NAME": "StandardROIHeads",
    "MODEL.ROI_MASK_HEAD.NAME": "MaskRCNNConvUpsampleHead",
}
# Per config and mode: config file, image side, images per batch, timed repeats, warm-up rounds.
SETUPS = {
    ("tiny", "cpu"): ("quick_schedules/Base-BalancedRCNN-TinySwin-CPU.yaml", 128, 4, 20, 3),
    ("tiny", "cuda"): ("quick_schedules/Base-BalancedRCNN-TinySwin-CPU.yaml", 128, 4, 50, 5),
    ("swin-t", "cpu"): ("swin_balanced.yaml", 256, 2, 6, 1),
    ("swin-t", "cuda"): ("swin_balanced.yaml", 800, 2, 30, 5),
    ("tiny", "tiny"): ("quick_schedules/Base-BalancedRCNN-TinySwin-CPU.yaml", 64, 2, 1, 0),
    ("swin-t", "tiny"): ("swin_balanced.yaml", 64, 1, 1, 0),
}


def build_cfg(config: str, mode: str, device: str, balanced: bool, output_dir: str) -> CfgNode:
    config_file, side, batch, _, _ = SETUPS[config, mode]
    cfg = load_project_config(str(common.REPO / "configs" / config_file))
    if not balanced:
        cfg.merge_from_list([x for kv in STOCK_HEADS.items() for x in kv])
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""  # speed does not depend on the weights; none are downloaded
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0  # the most detections: the mask head's full load
    cfg.INPUT.MIN_SIZE_TRAIN = (side,)
    cfg.INPUT.MIN_SIZE_TEST = side
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.SOLVER.IMS_PER_BATCH = batch
    cfg.SOLVER.AMP.ENABLED = device == "cuda" and config == "swin-t"  # the Swin recipe's AMP
    cfg.DATASETS.TEST = ()  # no evaluation hook; the batch is fed directly
    cfg.HEALTH.PERIOD = 0  # hooks do not run here; no detection-check images to prepare
    cfg.OUTPUT_DIR = output_dir
    return cfg


def fixed_batch(cfg: CfgNode, dataset: str) -> List[dict]:
    """IMS_PER_BATCH mapped training records: those with the most objects, first ones first."""
    records = DatasetCatalog.get(dataset)
    records = sorted(records, key=lambda r: -len(r["annotations"]))[: cfg.SOLVER.IMS_PER_BATCH]
    mapper = DatasetMapper(cfg, is_train=True)
    return [mapper(copy.deepcopy(r)) for r in records]


def build_trainer(cfg: CfgNode, batch: List[dict]) -> GuardedTrainer:
    class FixedBatchTrainer(GuardedTrainer):
        @classmethod
        def build_train_loader(cls, cfg):
            return itertools.repeat(batch)  # the same images every step, no loading cost

    torch.manual_seed(0)
    trainer = FixedBatchTrainer(cfg)
    # The non-finite stop checks every step; its loss capture starts with training.
    for hook in trainer._hooks:
        if isinstance(hook, NonFiniteStop):
            hook.before_train()
    return trainer


def _module(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def loss_path_counted(model: torch.nn.Module, device: torch.device):
    """
    Inside, every call of the heads' loss code is watched; yields {head: Counter} of the
    synchronizations seen ("python:<method>" calls, and "cuda" syncs on a CUDA device).
    """
    counts: Dict[str, Counter] = {}
    targets = {
        "rpn": (model.proposal_generator, "losses"),
        "roi_box": (model.roi_heads.box_predictor, "losses"),
        "mask": (model.roi_heads.mask_head, "forward"),  # the training forward computes the loss
    }

    def watched(head: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            with contextlib.ExitStack() as stack:
                python = stack.enter_context(common.count_python_syncs())
                on_gpu = device.type == "cuda"
                cuda = stack.enter_context(common.count_cuda_syncs()) if on_gpu else []
                out = fn(*args, **kwargs)
            counter = counts.setdefault(head, Counter())
            counter.update({f"python:{k}": v for k, v in python.items()})
            counter["cuda"] += len(cuda)
            return out

        return wrapper

    try:
        for head, (obj, attr) in targets.items():
            setattr(obj, attr, watched(head, getattr(obj, attr)))
        yield counts
    finally:
        for obj, attr in targets.values():
            obj.__dict__.pop(attr, None)  # back to the class's method


def _same_instances(a, b) -> Tuple[bool, int]:
    a, b = a["instances"].to("cpu"), b["instances"].to("cpu")
    fields = ("scores", "pred_classes", "pred_masks")
    equal = len(a) == len(b) and torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
    equal = equal and all(torch.equal(a.get(f), b.get(f)) for f in fields if a.has(f))
    return equal, len(a)


def measure_config(
    config: str, mode: str, device: torch.device, dataset: str, repeats: Optional[int] = None
) -> dict:
    _, side, batch_size, default_repeats, warmup = SETUPS[config, mode]
    repeats = repeats or default_repeats
    with tempfile.TemporaryDirectory() as output_dir:
        cfgs = {
            heads: build_cfg(config, mode, device.type, heads == "balanced", output_dir)
            for heads in ("stock", "balanced")
        }
        batch = fixed_batch(cfgs["balanced"], dataset)
        trainers = {heads: build_trainer(cfg, batch) for heads, cfg in cfgs.items()}
        models = {heads: _module(t.model) for heads, t in trainers.items()}
        # Identical weights in both (the same seed already gives them; this makes it certain).
        initial = copy.deepcopy(models["balanced"].state_dict())
        step = itertools.count()

        def restore(heads: str) -> None:
            models[heads].load_state_dict(initial)
            torch.manual_seed(0)  # the same sampling of anchors and proposals

        def train_step(heads: str) -> Callable[[], None]:
            def run() -> None:
                trainers[heads].iter = next(step)
                trainers[heads].run_step()

            return run

        with EventStorage(0):
            train = common.interleaved_medians(
                {h: train_step(h) for h in trainers}, repeats, warmup, restore, device
            )
            syncs = {}
            for heads, model in models.items():
                restore(heads)
                with loss_path_counted(model, device) as counts:
                    train_step(heads)()
                syncs[heads] = counts
            peak_mb = {}
            if device.type == "cuda":  # one step each, from the same weights and sampling
                for heads in models:
                    restore(heads)
                    torch.cuda.synchronize(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    train_step(heads)()
                    torch.cuda.synchronize(device)
                    peak_mb[heads] = torch.cuda.max_memory_allocated(device) / 2**20

        images = [{k: x[k] for k in ("image", "height", "width")} for x in batch]
        for heads, model in models.items():
            restore(heads)
            model.eval()

        def infer(heads: str) -> Callable[[], None]:
            return torch.no_grad()(lambda: models[heads](images))

        inference = common.interleaved_medians(
            {h: infer(h) for h in models}, repeats, warmup, None, device
        )
        with torch.no_grad():
            outputs = {h: models[h](images) for h in models}
        compared = [_same_instances(a, b) for a, b in zip(outputs["stock"], outputs["balanced"])]
    return {
        "config": config,
        "image_side": side,
        "images_per_batch": batch_size,
        "repeats": repeats,
        "warmup": warmup,
        "train_step": train,
        "inference": inference,
        "inference_equal": all(eq for eq, _ in compared),
        "detections_compared": sum(n for _, n in compared),
        "loss_path_syncs": {h: {k: dict(v) for k, v in c.items()} for h, c in syncs.items()},
        "peak_memory_mb": peak_mb,  # CUDA only: torch.cuda.max_memory_allocated of a step
    }


def _sync_cell(counter: Dict[str, int], device: torch.device) -> str:
    python = sum(v for k, v in counter.items() if k.startswith("python:"))
    if device.type == "cuda":
        return f"{counter.get('cuda', 0)} (Python-level calls {python})"
    return str(python)


def render(results: List[dict], device: torch.device, threads: int) -> Tuple[str, List[str]]:
    rows = []
    for r in results:
        label = f"{r['config']} ({r['image_side']} px, batch {r['images_per_batch']})"
        for kind in ("train_step", "inference"):
            stock, balanced = r[kind]["stock"]["median"], r[kind]["balanced"]["median"]
            equal = (
                f"{'yes' if r['inference_equal'] else 'NO'} ({r['detections_compared']} dets)"
                if kind == "inference"
                else "-"
            )
            rows.append(
                [label, kind.replace("_", " "), f"{stock * 1e3:.1f}", f"{balanced * 1e3:.1f}",
                 f"{balanced / stock:.3f}", equal, r["repeats"]]
            )
    speed = common.markdown_table(
        ["config", "pass", "stock ms", "balanced ms", "balanced/stock", "outputs equal",
         "repeats"],
        rows,
    )
    sync_rows = []
    for r in results:
        for head in ("rpn", "roi_box", "mask"):
            stock = r["loss_path_syncs"]["stock"].get(head, {})
            balanced = r["loss_path_syncs"]["balanced"].get(head, {})
            sync_rows.append([r["config"], head, _sync_cell(stock, device),
                              _sync_cell(balanced, device)])
    what = (
        "CUDA synchronizations (sync debug mode) in the loss path of one step"
        if device.type == "cuda"
        else "Python-level synchronizing calls (item/tolist/bool/float/int/nonzero) in the loss "
        "path of one step; CUDA synchronizations are not measurable on the CPU"
    )
    syncs = common.markdown_table(["config", "head", "stock", "balanced"], sync_rows)
    balanced_syncs = sum(
        sum(c.values()) for r in results for c in r["loss_path_syncs"]["balanced"].values()
    )
    notes = [
        f"device {device.type}, {threads} thread(s); medians of interleaved repetitions "
        "(stock and balanced alternate); identical weights and random seed before every step.",
        "train step = Trainer.run_step on a fixed batch (forward, losses, backward, clip, "
        "non-finite check, metric write, optimizer step, scalar flush); inference = eval "
        "forward with SCORE_THRESH_TEST 0.",
        f"Balanced loss path without host synchronization: "
        f"{'yes' if balanced_syncs == 0 else f'NO ({balanced_syncs} found)'}.",
    ]
    body = f"{speed}\n\n{what}:\n\n{syncs}"
    return body, notes


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="64-px images, 1 repeat (tests)")
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--repeats", type=int, help="timed repetitions (default: per config)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (cuda if present)")
    common.add_output_arguments(parser, NAME)
    args = parser.parse_args(argv)

    device_name = args.device
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device_name)
    mode = "tiny" if args.tiny else device.type
    threads = common.set_threads(args.threads)
    register_builtin_synthetic()
    dataset = "synthetic_shapes_tiny_val" if args.tiny else "synthetic_shapes_val"

    setup_logger()  # cached: the GuardedTrainer's own call then keeps the level set here
    logger = logging.getLogger("detectron2")
    level = logger.level
    logger.setLevel(logging.WARNING)  # the model summaries of 4 trainers would bury the table
    try:
        results = []
        for config in args.configs:
            print(f"measuring {config} on {device} ...", flush=True)
            results.append(measure_config(config, mode, device, dataset, args.repeats))
    finally:
        logger.setLevel(level)

    body, notes = render(results, device, threads)
    print(body + "\n\n" + "\n".join(f"- {n}" for n in notes))
    common.publish(
        args, NAME, "Training step and inference: balanced vs stock heads (bench_step.py)", body,
        {"device": str(device), "threads": threads, "tiny": args.tiny, "results": results},
        __file__, argv, notes, tiny=args.tiny,
    )
    if not all(r["inference_equal"] for r in results):
        raise AssertionError("balanced and stock heads gave different inference outputs")
    return results


if __name__ == "__main__":
    main()
