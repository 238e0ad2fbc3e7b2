#!/usr/bin/env python
"""
Pre-flight report of the datasets a config names, against that config, before any training:
images and imbalance, object sizes against the anchors, the classes, the schedule, and the
config overrides it suggests (each checked where it can be). Writes report.json and report.png
(object sizes with the anchor sizes, images per class, positive anchors per object by size).

    python tools/analyze_data.py --config-file CFG [--output DIR] [--anchor-images 500]
        [--epochs N] [KEY VALUE ...]

docs/data.md ("The pre-flight report") explains each number.
"""

import argparse
import contextlib
import gc
import json
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from training_harness import register_datasets_from_config  # noqa: E402
from training_harness.config import load_project_config  # noqa: E402
from training_harness.preflight import (load_datasets, preflight_report,  # noqa: E402
                                        render_report)
from training_harness.preflight.anchor_coverage import SIZE_BANDS  # noqa: E402
from training_harness.reliability.tool_outputs import prepare_output_folder  # noqa: E402


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config-file", required=True, type=Path)
    parser.add_argument("--output", type=Path, help="default: OUTPUT_DIR/preflight")
    parser.add_argument("--anchor-images", type=int, default=200,
                        help="object images sampled for the anchor analysis (0: all; default 200)")
    parser.add_argument("--epochs", type=float, default=0.0,
                        help="suggest SOLVER.MAX_ITER (and STEPS) for this many epochs")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs")
    return parser.parse_args(argv)


def draw(report: Dict[str, Any], path: Path) -> None:
    coverage = report["_coverage"]
    scale = min(coverage)
    sizes = coverage[scale]["size"]
    fig, (ax_size, ax_class, ax_pos) = plt.subplots(1, 3, figsize=(16, 4.5))
    if len(sizes):
        ax_size.hist(sizes, bins=np.geomspace(max(sizes.min(), 1), sizes.max() + 1, 40))
    ax_size.set_xscale("log")
    for level in report["config"]["anchor_sizes"]:
        for size in level:
            ax_size.axvline(size, color="tab:red", linestyle="--", linewidth=1)
    ax_size.set(title=f"objects at short edge {scale}; dashed: anchor sizes",
                xlabel="sqrt(area), px", ylabel="objects")
    classes = report["dataset"]["classes"]
    ax_class.bar(range(len(classes)), [max(c["images"], 0.5) for c in classes])
    ax_class.set_yscale("log")
    if len(classes) <= 40:  # more names than that do not fit: report.json lists them
        ax_class.set_xticks(range(len(classes)), [c["name"] for c in classes], rotation=90,
                            fontsize=6 if len(classes) > 20 else 8)
    else:
        ax_class.set_xlabel(f"{len(classes)} classes, most images first")
    ax_class.set(title="training images per class", ylabel="images (log)")
    bands = [(label, lo, hi) for label, lo, hi in SIZE_BANDS
             if ((sizes >= lo) & (sizes < hi)).any()]
    positives = coverage[scale]["positives"]
    if bands:
        ax_pos.boxplot([positives[(sizes >= lo) & (sizes < hi)] for _, lo, hi in bands])
        ax_pos.set_xticks(range(1, len(bands) + 1), [label for label, _, _ in bands])
    fg = report["config"]["rpn_iou_thresholds"][-1]
    ax_pos.set(title=f"positive anchors per object (RPN matcher, fg IoU {fg:g})",
               xlabel="object size", ylabel="positive anchors")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@contextlib.contextmanager
def without_cyclic_gc() -> Iterator[None]:
    """Python's cyclic garbage collector paused: it would rescan the millions of small objects
    of a parsed json and its records again and again (a fifth of the report's time on a
    COCO-train-sized json), and they hold no cycles: reference counting frees them."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    try:
        with without_cyclic_gc():
            report, output = analyze(args)
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"analyze_data: error: {e}")
    print(render_report(report))
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (output / "report.json").write_text(json.dumps(public, indent=2) + "\n")
    draw(report, output / "report.png")
    print(f"\nWritten: {output / 'report.json'}, {output / 'report.png'}")
    return report


def analyze(args: argparse.Namespace) -> Tuple[Dict[str, Any], Path]:
    """The report of the config's datasets and the folder to write it to."""
    cfg = load_project_config(str(args.config_file), args.opts)
    records: Dict[str, list] = {}  # the COCO jsons as registration parsed them
    register_datasets_from_config(cfg, keep_records=records)
    if not cfg.DATASETS.TRAIN:
        raise ValueError("DATASETS.TRAIN is empty: there is no training set to analyze")
    output = prepare_output_folder(args.output or Path(cfg.OUTPUT_DIR) / "preflight",
                                   "--output", ["report.json", "report.png"],
                                   {"--config-file": args.config_file})
    report = preflight_report(cfg, args.anchor_images, args.epochs,
                              datasets=load_datasets(cfg, records))
    return report, output


if __name__ == "__main__":
    main()
