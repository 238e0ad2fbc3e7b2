"""
What only a GPU can show, in one run of about 8 minutes on one CUDA device:

    bash benchmarks/gpu_check.sh                       # = make setup + this script --update-md
    python benchmarks/gpu_check.py                     # on a CUDA machine; output/benchmarks/
    python benchmarks/gpu_check.py --cpu-dry-run       # the same code paths on the CPU, tiny (tests)

1. The losses alone on COCO-sized inputs (bench_losses.py --device cuda: 2 x 800x1333, 512 ROIs
   per image, 80 classes), balanced vs stock, medians with CUDA synchronization around each.
2. A full AMP training step of Swin-T at 800 px, batch 2, random init, swin_balanced.yaml vs the
   same with stock heads (bench_step.py --configs swin-t): the time ratio from interleaved
   repetitions after warm-up, the peak memory of one step of each, and the host-device
   synchronizations in each head's loss path, counted with
   ``torch.cuda.set_sync_debug_mode("warn")``.
3. AMP training that must stay healthy: train_net.py with swin_balanced.yaml on the synthetic
   shapes resized to 800 px (3 classes, random init), 300 iterations, once with float16 and once
   with bfloat16 autocast (SOLVER.AMP.PRECISION). Checked: the total loss decreases (median of the
   last 3 logged values below that of the first 3; metrics.json logs every 20 iterations), no
   logged loss is non-finite, the GradScaler
   skipped few steps (log2 of its scale's fall: it starts at 2^16 and does not grow within 2000
   steps), and the health monitor reported no collapse (its confident rule off: 300 iterations
   from random init hold no confident detection yet).

Writes gpu_check.json and .md (device, torch and CUDA versions, commit) to output/benchmarks/, or
with --update-md (as gpu_check.sh runs it) to benchmarks/results/, replacing the GPU section of
BENCHMARKS.md. With --cpu-dry-run: the tiny sizes of both
benchmarks, the instant-test config for 40 iterations without AMP (detectron2's AMPTrainer needs
CUDA), Python-level synchronization counts, and results only where --results-dir says.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py and the benchmarks beside
import bench_losses  # noqa: E402
import bench_step  # noqa: E402
import common  # noqa: E402

NAME = "gpu_check"
TRAIN_NET = common.REPO / "train_net.py"
GRAD_SCALER_INITIAL = 2.0 ** 16  # torch.amp.GradScaler's init_scale

TRAINING = {
    # config, iterations, image side, extra overrides
    "gpu": ("configs/swin_balanced.yaml", 300, 800, []),
    "dry": ("configs/quick_schedules/swin_tiny_balanced_instant_test.yaml", 40, 64,
            ["SOLVER.AMP.ENABLED", "False"]),
}


def training_run(mode: str, precision: Optional[str], output: Path) -> dict:
    """One train_net.py run (module docstring, 3.) and what its metrics.json shows."""
    config, iters, side, extra = TRAINING[mode]
    dataset = ("synthetic_shapes_train", "synthetic_shapes_val") if mode == "gpu" else (
        "synthetic_shapes_tiny_train", "synthetic_shapes_tiny_val")
    opts = [
        "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", "3",
        "DATASETS.TRAIN", f"('{dataset[0]}',)", "DATASETS.TEST", f"('{dataset[1]}',)",
        "DATALOADER.FILTER_EMPTY_ANNOTATIONS", "False",
        "INPUT.MIN_SIZE_TRAIN", f"({side},)", "INPUT.MIN_SIZE_TEST", str(side),
        "SOLVER.MAX_ITER", str(iters), "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS",
        str(min(50, iters // 3)), "SOLVER.STEPS", "()", "SOLVER.CHECKPOINT_PERIOD", "100000",
        "TEST.EVAL_PERIOD", "0", "HEALTH.PERIOD", str(max(iters // 6, 1)),
        "HEALTH.WARMUP_ITERS", str(iters // 3), "SEED", "0", "OUTPUT_DIR", str(output), *extra,
        # A run this short from random init has no confident detections yet: the check is about
        # AMP's numerics, judged by the detection-count and no-foreground rules.
        "HEALTH.CONFIDENT_FRACTION", "0.0",
    ]
    if precision:
        opts += ["SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(output.parent / f"{output.name}.log", "w") as log:
        returncode = subprocess.run([sys.executable, str(TRAIN_NET), "--config-file",
                                     str(common.REPO / config), *opts], cwd=common.REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT).returncode
    records = []
    if (output / "metrics.json").exists():
        records = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()
                   if line.strip()]
    losses = [r["total_loss"] for r in records if "total_loss" in r]
    final = next((r for r in reversed(records) if "bbox/AP" in r), {})
    skipped = None
    if precision and (output / "model_final.pth").exists():
        state = torch.load(output / "model_final.pth", map_location="cpu", weights_only=True)
        # DefaultTrainer.state_dict -> its AMPTrainer's -> the GradScaler's.
        scale = state.get("trainer", {}).get("_trainer", {}).get("grad_scaler", {}).get("scale")
        if scale:
            skipped = round(math.log2(GRAD_SCALER_INITIAL / scale))
    result = {
        "precision": precision or "float32",
        "returncode": returncode,
        "iterations": iters,
        "image_side": side,
        # Up to 3 logged values at each end, never the same ones (metrics.json logs every 20).
        "first_losses": losses[:max(1, min(3, len(losses) // 2))],
        "last_losses": losses[-max(1, min(3, len(losses) // 2)):],
        "non_finite_losses": sum(not math.isfinite(v) for v in losses),
        "grad_scaler_skips": skipped,
        "collapses": int(max((r.get("health/num_collapses", 0) for r in records), default=-1)),
        "last_dets_per_image": next((r["health/dets_per_image"] for r in reversed(records)
                                     if "health/dets_per_image" in r), None),
        "bbox_ap": final.get("bbox/AP"),
        "seconds_per_iter": next((r["time"] for r in reversed(records) if "time" in r), None),
    }
    result["loss_decreased"] = len(losses) >= 2 and (
        statistics.median(result["last_losses"]) < statistics.median(result["first_losses"]))
    result["healthy"] = (returncode == 0 and result["loss_decreased"]
                         and result["non_finite_losses"] == 0 and result["collapses"] == 0
                         and (skipped is None or skipped <= 10))
    return result


def render(device_name: str, device: torch.device, losses: Dict, step: dict,
           runs: List[dict]) -> Tuple[str, List[str]]:
    loss_rows = [[name, mode, f"{s:.2f}", f"{b:.2f}", f"{b / s:.3f}"]
                 for (name, mode), (s, b) in losses.items()]
    body = "Losses alone, COCO-sized inputs:\n\n" + common.markdown_table(
        ["head", "pass", "stock ms", "balanced ms", "balanced/stock"], loss_rows)
    train, infer = step["train_step"], step["inference"]
    peak = step.get("peak_memory_mb") or {}
    step_rows = [
        ["train step", f"{train['stock']['median'] * 1e3:.1f}",
         f"{train['balanced']['median'] * 1e3:.1f}",
         f"{train['balanced']['median'] / train['stock']['median']:.3f}",
         *(f"{peak[h]:.0f}" if h in peak else "-" for h in ("stock", "balanced"))],
        ["inference", f"{infer['stock']['median'] * 1e3:.1f}",
         f"{infer['balanced']['median'] * 1e3:.1f}",
         f"{infer['balanced']['median'] / infer['stock']['median']:.3f}", "-", "-"],
    ]
    body += (f"\n\nA training step, {step['config']} config ({step['image_side']} px, batch {step['images_per_batch']}, "
             f"{step['repeats']} interleaved repetitions after {step['warmup']} warm-up):\n\n"
             + common.markdown_table(["pass", "stock ms", "balanced ms", "balanced/stock",
                                      "stock peak MiB", "balanced peak MiB"], step_rows))
    syncs = step["loss_path_syncs"]
    sync_rows = [[head, bench_step._sync_cell(syncs["stock"].get(head, {}), device),
                  bench_step._sync_cell(syncs["balanced"].get(head, {}), device)]
                 for head in ("rpn", "roi_box", "mask")]
    body += ("\n\nHost-device synchronizations in the loss path of one step:\n\n"
             + common.markdown_table(["head", "stock", "balanced"], sync_rows))
    run_rows = [[r["precision"], str(r["iterations"]), f"{r['image_side']} px",
                 " / ".join(f"{v:.2f}" for v in r["first_losses"]) or "-",
                 " / ".join(f"{v:.2f}" for v in r["last_losses"]) or "-",
                 str(r["non_finite_losses"]),
                 "-" if r["grad_scaler_skips"] is None else str(r["grad_scaler_skips"]),
                 str(r["collapses"]), "-" if r["bbox_ap"] is None else f"{r['bbox_ap']:.1f}",
                 "yes" if r["healthy"] else "NO"] for r in runs]
    body += ("\n\nTraining with the balanced heads (train_net.py, synthetic shapes, random "
             "init):\n\n" + common.markdown_table(
                 ["precision", "iterations", "size", "first losses", "last losses",
                  "non-finite", "GradScaler skips", "collapses", "bbox AP", "healthy"], run_rows))
    notes = [f"device {device_name}; torch {torch.__version__}, CUDA {torch.version.cuda}"]
    if device.type != "cuda":
        notes.append("On the CPU the synchronization counts are Python-level calls "
                     "(item/tolist/bool/float/int/nonzero), not CUDA synchronizations.")
    return body, notes


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="the same code paths on the CPU at tiny sizes (the test suite)")
    parser.add_argument("--output-dir", type=Path, help="training runs (default: a temp folder)")
    common.add_output_arguments(parser, NAME)
    args = parser.parse_args(argv)
    dry = args.cpu_dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; on the CPU run --cpu-dry-run", file=sys.stderr)
        sys.exit(2)
    device = "cpu" if dry else "cuda"
    device_name = "cpu (dry run)" if dry else torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        print("1. losses alone", flush=True)
        losses = bench_losses.main((["--tiny"] if dry else []) + [
            "--device", device, "--results-dir", str(scratch)])
        print("2. training step", flush=True)
        step = bench_step.main((["--tiny"] if dry else []) + [
            "--device", device, "--configs", "tiny" if dry else "swin-t",
            "--results-dir", str(scratch)])[0]
        print("3. training runs", flush=True)
        output = (args.output_dir or scratch / "runs").resolve()
        output.mkdir(parents=True, exist_ok=True)
        precisions = [None] if dry else ["float16", "bfloat16"]
        runs = [training_run("dry" if dry else "gpu", p, output / (p or "float32"))
                for p in precisions]
    body, notes = render(device_name, torch.device(device), losses, step, runs)
    print("\n" + body)
    data = {"device": device_name, "cuda": torch.version.cuda, "dry_run": dry,
            "losses_ms": [{"head": h, "pass": m, "stock": s, "balanced": b}
                          for (h, m), (s, b) in losses.items()],
            "step": step, "training": runs}
    common.publish(args, NAME, "GPU check (gpu_check.py)", body, data, __file__, argv, notes,
                   tiny=dry)
    if not all(r["healthy"] for r in runs):
        print("gpu_check: a training run was not healthy (table above)", file=sys.stderr)
    return data


if __name__ == "__main__":
    main()
