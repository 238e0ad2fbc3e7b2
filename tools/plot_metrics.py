#!/usr/bin/env python
"""
Plot a training run's metrics.json (detectron2's JSONWriter: one json object per line) into one
PNG per group of curves:

  total_loss.png   total_loss
  losses.png       every loss_* component, one panel each
  lr.png           learning rate
  grad_norm.png    gradient norm (optim/grad_norm, or any *grad_norm key)
  health.png       health/* metrics, if any
  eval_<task>.png  AP, AP50, ... over iterations (e.g. eval_bbox.png, eval_segm.png), if any;
                   per-class AP goes to eval_<task>_per_class.png
  diagnostics.png  the heads' other namespaced scalars (fast_rcnn/*, roi_head/*, rpn/*, ...)
  timing.png       time and data_time per iteration

Usage:
  python tools/plot_metrics.py output/metrics.json [--output-dir output/plots]
  python tools/plot_metrics.py output/            # same: the folder's metrics.json

Records are not in iteration order: evaluations and health checks are logged at iterations off
the writer's period, some scalars only on some steps, and a resumed run appends from the
iteration of its checkpoint. Every point is drawn at its iteration; where two records hold the
same key at the same iteration (a resumed run redoing iterations), the later one wins, and the
tool says how many values that replaced.
"""
import argparse
import json
import math
import re
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Series = List[Tuple[int, float]]

# "bbox/AP", "segm/AP50", "bbox/AP-circle", or with several test sets "val_set/bbox/AP".
_EVAL_KEY = re.compile(r"^(?P<task>.+)/(?P<metric>AP[^/]*)$")
_TIMING_KEYS = ("time", "data_time")
_SKIPPED_KEYS = ("iteration", "eta_seconds", "rank_data_time")


def load_metrics(path: Path) -> Dict[str, Series]:
    """Read metrics.json into {key: [(iteration, value), ...]} sorted by iteration."""
    path = Path(path)
    if path.is_dir():
        if not (path / "metrics.json").is_file():
            raise FileNotFoundError(f"no metrics.json in folder {path}")
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"metrics file not found: {path}")
    text = path.read_text()
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise ValueError(f"{path} is empty: no metrics were written yet (detectron2's JSONWriter "
                         "writes a line every 20 iterations, and after each evaluation)")
    series: Dict[str, Dict[int, float]] = {}
    replaced = 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)  # accepts the NaN that json.dumps writes for empty AP
        except json.JSONDecodeError:
            if number == len(lines) and not text.endswith("\n"):
                # A process killed mid-write leaves a partial last line: say so, plot the rest.
                print(f"warning: {path}, line {number}: incomplete last line ignored",
                      file=sys.stderr)
                continue
            raise ValueError(f"{path}, line {number}: not valid JSON: {line[:80]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("iteration"), int):
            raise ValueError(f"{path}, line {number}: expected an object with an integer "
                             f"'iteration', got {line[:80]!r}")
        it = record["iteration"]
        for key, value in record.items():
            if key in _SKIPPED_KEYS or isinstance(value, bool) or not isinstance(
                    value, (int, float)):
                continue
            points = series.setdefault(key, {})
            replaced += it in points
            points[it] = float(value)
    if replaced:
        print(f"note: {path}: {replaced} values logged again at an iteration already logged "
              "(a resumed run redoing iterations): the later ones are drawn", file=sys.stderr)
    result = {k: sorted(v.items()) for k, v in sorted(series.items()) if v}
    if not result:
        raise ValueError(f"{path} has no numeric metrics to plot")
    return result


def group_metrics(keys: Sequence[str]) -> "OrderedDict[str, List[str]]":
    """Split metric names into plot groups {file stem: keys}; empty groups are left out."""
    groups: "OrderedDict[str, List[str]]" = OrderedDict(
        (g, []) for g in ("total_loss", "losses", "lr", "grad_norm", "health"))
    evals: "OrderedDict[str, List[str]]" = OrderedDict()
    diagnostics, timing, other = [], [], []
    for key in sorted(keys):
        match = _EVAL_KEY.match(key)
        if key == "total_loss":
            groups["total_loss"].append(key)
        elif key.startswith("loss_"):
            groups["losses"].append(key)
        elif key == "lr" or key.startswith("lr/"):
            groups["lr"].append(key)
        elif key.endswith("grad_norm"):
            groups["grad_norm"].append(key)
        elif key.startswith("health/"):
            groups["health"].append(key)
        elif match:
            task = "eval_" + re.sub(r"[^A-Za-z0-9_.-]", "_", match["task"])
            per_class = match["metric"].startswith("AP-")
            evals.setdefault(task + ("_per_class" if per_class else ""), []).append(key)
        elif key in _TIMING_KEYS:
            timing.append(key)
        elif "/" in key:
            diagnostics.append(key)
        else:
            other.append(key)
    groups.update(evals)
    groups.update(diagnostics=diagnostics, timing=timing, other=other)
    return OrderedDict((g, k) for g, k in groups.items() if k)


def _plot_group(name: str, keys: List[str], series: Dict[str, Series], out: Path) -> None:
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(5 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg: no display needed
    for i, key in enumerate(keys):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        xs, ys = zip(*series[key])
        # Evaluations are a few points: markers make each one visible.
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3, linewidth=1.2)
        nan_xs = [x for x, y in zip(xs, ys) if math.isnan(y)]
        if nan_xs:
            # NaN breaks the line; e.g. AP is NaN when the model made no prediction at all,
            # an event worth seeing: red crosses on the axis floor.
            ax.plot(nan_xs, [0.0] * len(nan_xs), "x", color="red", clip_on=False,
                    transform=ax.get_xaxis_transform(), label="NaN")
            ax.legend(loc="upper right", fontsize=8)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if key == "lr" or key.startswith("lr/"):
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    fig.suptitle(name)
    fig.savefig(out, dpi=100)


def plot_metrics(metrics_path: Path, output_dir: Optional[Path] = None) -> List[Path]:
    """Write one PNG per metric group of ``metrics_path`` into ``output_dir``
    (default: ``plots/`` beside metrics.json); return the written files."""
    series = load_metrics(metrics_path)
    metrics_path = Path(metrics_path)
    if output_dir is None:
        base = metrics_path if metrics_path.is_dir() else metrics_path.parent
        output_dir = base / "plots"
    # The PNGs are named after the metrics: none can be metrics.json. (The rule of
    # reliability/tool_outputs.py, without importing the package: this tool needs no torch.)
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output-dir {output_dir} is a file, not a folder")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output-dir {output_dir} cannot be created: {e.strerror}") from None
    written = []
    for name, keys in group_metrics(list(series)).items():
        out = output_dir / f"{name}.png"
        _plot_group(name, keys, series, out)
        written.append(out)
    return written


def main(argv: Optional[Sequence[str]] = None) -> List[Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="metrics.json, or the folder that holds it")
    parser.add_argument("--output-dir", type=Path, default=None,
                        help="where to write the PNGs (default: plots/ beside metrics.json)")
    args = parser.parse_args(argv)
    try:
        written = plot_metrics(args.metrics, args.output_dir)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"plot_metrics: error: {e}")
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main()
