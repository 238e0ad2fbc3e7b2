#!/usr/bin/env python
"""
The CPU demo (``make demo``): train the tiny Swin Mask R-CNN with the balanced heads on the
built-in synthetic shapes, evaluate it, and collect everything in one output folder.

Steps: train_net.py (generates the dataset on first use, trains with progress and ETA, evaluates
COCO bbox + segm AP on the val split after the last iteration) -> tools/plot_metrics.py (PNG
curves) -> a few val images with the ground truth drawn beside the predictions -> a summary.

    python tools/demo.py [--config-file CFG] [--output-dir DIR] [--num-vis 6] [KEY VALUE ...]
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
from balanced_rcnn import register_datasets_from_config
from balanced_rcnn.config import load_project_config
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.utils.visualizer import Visualizer

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "quick_schedules" / "swin_tiny_balanced_demo.yaml"
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


def train_and_evaluate(args: argparse.Namespace, output_dir: Path) -> None:
    command = [sys.executable, str(REPO / "train_net.py"), "--config-file", str(args.config_file)]
    if args.resume:
        command.append("--resume")
    else:
        # A rerun of the demo trains anew in its own folder (train_net.py alone refuses that).
        command += ["RELIABILITY.OVERWRITE_OUTPUT", "True"]
    command += [*args.opts, "OUTPUT_DIR", str(output_dir)]
    print("+ " + " ".join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO)


def final_metrics(metrics_json: Path) -> Dict[str, float]:
    """The last evaluation's numbers in metrics.json (written by the trainer's EvalHook)."""
    last: Dict[str, float] = {}
    for line in metrics_json.read_text().splitlines():
        record = json.loads(line)
        if "bbox/AP" in record:
            last = record
    return last


def draw_ground_truth_beside_predictions(output_dir: Path, num_images: int,
                                         score_threshold: float) -> List[Path]:
    cfg = load_project_config(str(output_dir / "config.yaml"),
                              weights=str(output_dir / "model_final.pth"))
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = score_threshold
    register_datasets_from_config(cfg)
    dataset = cfg.DATASETS.TEST[0]
    metadata = MetadataCatalog.get(dataset)
    predictor = DefaultPredictor(cfg)
    vis_dir = output_dir / "vis"
    vis_dir.mkdir(exist_ok=True)
    # Prefer images with objects: an empty image shows little of what the model learned.
    records = sorted(DatasetCatalog.get(dataset), key=lambda r: len(r["annotations"]) == 0)
    written = []
    for record in records[:num_images]:
        image = read_image(record["file_name"], format="RGB")
        predictions = predictor(image[:, :, ::-1] if cfg.INPUT.FORMAT == "BGR" else image)
        truth = Visualizer(image, metadata, scale=3.0).draw_dataset_dict(record).get_image()
        drawn = Visualizer(image, metadata, scale=3.0).draw_instance_predictions(
            predictions["instances"].to("cpu")).get_image()
        gap = np.full((truth.shape[0], 8, 3), 255, dtype=np.uint8)
        path = vis_dir / f"{Path(record['file_name']).stem}_truth_vs_prediction.png"
        cv2.imwrite(str(path), np.concatenate([truth, gap, drawn], axis=1)[:, :, ::-1])
        written.append(path)
    return written


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, float]:
    args = parse_args(argv)
    if args.output_dir is None:
        base = CfgNode.load_yaml_with_base(str(args.config_file))
        args.output_dir = REPO / base.get("OUTPUT_DIR", "output/demo")
    output_dir = args.output_dir.resolve()
    train_and_evaluate(args, output_dir)

    plots = plot_metrics.plot_metrics(output_dir / "metrics.json", output_dir / "plots")
    drawings = draw_ground_truth_beside_predictions(output_dir, args.num_vis, args.vis_threshold)
    metrics = final_metrics(output_dir / "metrics.json")
    events = sorted(output_dir.glob("events.out.tfevents.*"))
    print("\nDone. Everything is in", output_dir)
    print(f"  metrics.json      {output_dir / 'metrics.json'}")
    print(f"  TensorBoard       tensorboard --logdir {output_dir}  ({len(events)} event file(s))")
    print(f"  plots             {output_dir / 'plots'}  ({len(plots)} PNG)")
    print(f"  val drawings      {output_dir / 'vis'}  ({len(drawings)} PNG: truth | predictions "
          f"with score >= {args.vis_threshold})")
    print(f"  checkpoint        {output_dir / 'model_final.pth'}")
    print(f"  COCO results      {output_dir / 'inference'}")
    summary = {k: metrics[k] for k in ("bbox/AP", "bbox/AP50", "segm/AP", "segm/AP50") if k in metrics}
    print("  val AP            " + ", ".join(f"{k} {v:.1f}" for k, v in summary.items()))
    deployed = {k.split("/")[1]: metrics[k] for k in metrics if k.startswith("image_level/")}
    if deployed:
        cfg = load_project_config(str(output_dir / "config.yaml"))
        print(f"  at score >= {cfg.TEST.DEPLOYMENT_SCORE_THRESH:g}  " + ", ".join(
            f"{name} {value:.2f}" if name.startswith("dets") else f"{name} {value:.1f}%"
            for name, value in deployed.items()))
    return summary


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
