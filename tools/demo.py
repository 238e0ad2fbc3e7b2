#!/usr/bin/env python
"""
The CPU demo (``make demo``): train the tiny Swin Mask R-CNN with the shipped configuration on
built-in synthetic data where 95% of the training images are empty (the study's sparse setting,
configs/quick_schedules/swin_tiny_balanced_sparse_demo.yaml), evaluate it, and collect
everything in one output folder.

Steps: train_net.py (generates the dataset on first use, trains with progress and ETA, evaluates
COCO bbox + segm AP and the image-level metrics on the val split after the last iteration) ->
tools/plot_metrics.py (PNG curves) -> a few val images with the ground truth drawn beside the
predictions -> a summary (console and summary.txt): AP, what a deployment sees, the health
monitor's verdict, where to look next.

    python tools/demo.py [--config-file CFG] [--output-dir DIR] [--num-vis 6] [KEY VALUE ...]

Other configs: swin_tiny_stock_sparse_demo.yaml (stock detectron2 on the same data),
swin_tiny_balanced_demo.yaml (the mild data: 10% empty images, 3 classes, 2000 iterations).
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils.visualizer import Visualizer
from training_harness import register_datasets_from_config
from training_harness.config import load_project_config
from training_harness.deploy import build_predictor, readable_images, skipped_images_line
from training_harness.reliability.tool_outputs import prepare_output_folder

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "quick_schedules" / "swin_tiny_balanced_sparse_demo.yaml"
LABEL_HEIGHT = 28  # px of the band that names each side of a drawing
sys.path.insert(0, str(REPO / "tools"))  # plot_metrics.py beside this file
import plot_metrics  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="default: the config's OUTPUT_DIR")
    parser.add_argument("--num-vis", type=int, default=6, help="val images to draw")
    parser.add_argument("--vis-threshold", type=float, default=0.5,
                        help="lowest score drawn (evaluation keeps the config's threshold)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs")
    return parser.parse_args(argv)


def train_and_evaluate(args: argparse.Namespace, output_dir: Path, own_folder: bool) -> None:
    """train_net.py into ``output_dir``; exits with its status when it fails."""
    command = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(args.config_file)]
    if args.resume:
        command.append("--resume")
    elif own_folder:
        # A rerun of the demo trains anew in the config's own folder (train_net.py alone refuses
        # that). A folder given with --output-dir may hold another run: train_net.py refuses to
        # train over its checkpoints, and says how to go on.
        command += ["RELIABILITY.OVERWRITE_OUTPUT", "True"]
    command += [*args.opts, "OUTPUT_DIR", str(output_dir)]
    print("+ " + " ".join(command), flush=True)
    status = subprocess.run(command, cwd=REPO).returncode
    if status:
        sys.exit(status)  # train_net.py has said why (docs/reliability.md, "Exit codes")


def final_metrics(metrics_json: Path) -> Dict[str, float]:
    """The last evaluation's numbers in metrics.json (written by the trainer's EvalHook)."""
    last: Dict[str, float] = {}
    for line in metrics_json.read_text().splitlines():
        record = json.loads(line)
        if "bbox/AP" in record:
            last = record
    return last


def _labelled(image: np.ndarray, label: str) -> np.ndarray:
    """``image`` (RGB) under a white band that says what it shows."""
    band = np.full((LABEL_HEIGHT, image.shape[1], 3), 255, dtype=np.uint8)
    font, scale = cv2.FONT_HERSHEY_SIMPLEX, 0.5
    width = cv2.getTextSize(label, font, scale, 1)[0][0]
    scale *= min(1.0, (image.shape[1] - 12) / width)  # the whole label on narrow drawings
    cv2.putText(band, label, (6, LABEL_HEIGHT - 9), font, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, image], axis=0)


def draw_ground_truth_beside_predictions(output_dir: Path, num_images: int,
                                         score_threshold: float) -> List[Path]:
    cfg = load_project_config(str(output_dir / "config.yaml"),
                              weights=str(output_dir / "model_final.pth"))
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    register_datasets_from_config(cfg)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    predictor = build_predictor(cfg)
    vis_dir = output_dir / "vis"
    vis_dir.mkdir(exist_ok=True)
    # Prefer images with objects: an empty image shows little of what the model learned.
    records = sorted(DatasetCatalog.get(dataset), key=lambda r: len(r["annotations"]) == 0)
    records = records[:num_images]
    written, skipped = [], []
    for i, image in readable_images([r["file_name"] for r in records], "RGB", skipped):
        record = records[i]
        predictions = predictor(image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image)
        instances = predictions["instances"].to("cpu")
        truth = _labelled(Visualizer(image, metadata, scale=3.0).draw_dataset_dict(
            record).get_image(), f"ground truth ({len(record['annotations'])})")
        drawn = _labelled(Visualizer(image, metadata, scale=3.0).draw_instance_predictions(
            instances).get_image(), f"predictions, score >= {score_threshold:g} "
                                    f"({len(instances)})")
        gap = np.full((truth.shape[0], 8, 3), 255, dtype=np.uint8)
        path = vis_dir / f"{Path(record['file_name']).stem}_truth_vs_prediction.png"
        cv2.imwrite(str(path), np.concatenate([truth, gap, drawn], axis=1)[:, :, ::-1])
        written.append(path)
    if skipped:  # the summary still comes: the drawings are an extra
        print(skipped_images_line([records[i]["file_name"] for i in skipped], len(records)))
    return written


def health_verdict(records: List[dict]) -> str:
    """The monitor's verdict from metrics.json: its collapses, and the last check."""
    checks = [r for r in records if "health/num_collapses" in r]
    if not checks:
        return "no detection checks ran (HEALTH.PERIOD 0 or no check dataset)"
    last = checks[-1]
    collapses = int(last["health/num_collapses"])
    first = next((r["iteration"] for r in checks if r["health/num_collapses"] > 0), None)
    verdict = ("healthy: no collapse reported" if not collapses else
               f"{collapses} collapse(s) reported, the first at iteration {first}; see the "
               "training log and docs/health.md")
    return (f"{verdict} ({len(checks)} checks; at the last, iteration {last['iteration']}: "
            f"{last['health/dets_per_image']:.2f} detections per check image)")


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    own_folder = args.output_dir is None
    if own_folder:
        args.output_dir = REPO / load_project_config(str(args.config_file), args.opts).OUTPUT_DIR
    try:
        output_dir = prepare_output_folder(args.output_dir, "--output-dir", ["summary.txt"],
                                           {"--config-file": args.config_file}).resolve()
    except ValueError as e:
        sys.exit(f"demo: error: {e}")
    train_and_evaluate(args, output_dir, own_folder)

    plots = plot_metrics.plot_metrics(output_dir / "metrics.json", output_dir / "plots")
    drawings = draw_ground_truth_beside_predictions(output_dir, args.num_vis, args.vis_threshold)
    records = [json.loads(line) for line in
               (output_dir / "metrics.json").read_text().splitlines()]
    metrics = final_metrics(output_dir / "metrics.json")
    events = sorted(output_dir.glob("events.out.tfevents.*"))
    cfg = load_project_config(str(output_dir / "config.yaml"))
    summary = {k: metrics[k] for k in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50") if k in metrics}
    deployed = {k.split("/")[1]: metrics[k] for k in metrics if k.startswith("image_level/")}
    lines = [
        f"Done. Everything is in {output_dir}",
        "  val AP            " + ", ".join(f"{k} {v:.1f}" for k, v in summary.items()),
    ]
    if deployed:
        lines.append(f"  at score >= {cfg.TEST.DEPLOYMENT_SCORE_THRESH:g}  " + ", ".join(
            f"{name} {value:.2f}" if name.startswith("dets") else f"{name} {value:.1f}%"
            for name, value in deployed.items()))
    lines += [
        f"  health monitor    {health_verdict(records)}",
        "Where to look next:",
        f"  val drawings      {output_dir / 'vis'}  ({len(drawings)} PNG: ground truth | "
        f"predictions with score >= {args.vis_threshold:g})",
        f"  plots             {output_dir / 'plots'}  ({len(plots)} PNG)",
        f"  metrics.json      {output_dir / 'metrics.json'}",
        f"  TensorBoard       tensorboard --logdir {output_dir}  ({len(events)} event file(s))",
        f"  checkpoint        {output_dir / 'model_final.pth'}",
        f"  COCO results      {output_dir / 'inference'}",
        f"  predict           .venv/bin/python tools/predict.py --config-file "
        f"{output_dir / 'config.yaml'} --weights {output_dir / 'model_final.pth'} --input "
        "IMAGE_OR_FOLDER --output output/predictions",
    ]
    text = "\n".join(lines)
    (output_dir / "summary.txt").write_text(text + "\n")
    print("\n" + text + f"\n  this summary      {output_dir / 'summary.txt'}")
    return summary


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
