"""tools/plot_metrics.py on a metrics.json written by detectron2's own JSONWriter."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detectron2.utils.events import EventStorage, JSONWriter
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "plot_metrics.py"


def _load_tool():
    spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plot_metrics = _load_tool()

LOSSES = ("loss_box_reg", "loss_cls", "loss_mask", "loss_rpn_cls", "loss_rpn_loc")


def _write_run(path: Path, start: int = 0, stop: int = 60, lr: float = 0.001) -> None:
    """A short run the way DefaultTrainer logs it: a write every 20 iterations, evals at 29/59."""
    writer = JSONWriter(str(path))
    with EventStorage(start_iter=start) as storage:
        for it in range(start, stop):
            storage.iter = it
            losses = {k: 1.0 / (it + 1 + i) for i, k in enumerate(LOSSES)}
            storage.put_scalars(total_loss=sum(losses.values()), **losses)
            storage.put_scalar("lr", lr * (it + 1), smoothing_hint=False)
            storage.put_scalar("optim/grad_norm", 10.0 - 0.1 * it)
            storage.put_scalar("health/dets_per_image", float(it % 7))
            storage.put_scalar("fast_rcnn/cls_accuracy", 0.5)
            storage.put_scalars(time=0.2, data_time=0.01)
            if it % 30 == 29:
                storage.put_scalars(**{"bbox/AP": it / 2, "bbox/AP50": float(it),
                                       "bbox/AP-circle": 3.0, "segm/AP": math.nan},
                                    smoothing_hint=False)
            if it % 20 == 19 or it % 30 == 29:
                writer.write()
    writer.close()


def test_plots_every_group_as_valid_png(tmp_path: Path):
    metrics = tmp_path / "metrics.json"
    _write_run(metrics)
    written = plot_metrics.plot_metrics(metrics, tmp_path / "plots")
    assert sorted(p.name for p in written) == sorted([
        "total_loss.png", "losses.png", "lr.png", "grad_norm.png", "health.png",
        "eval_bbox.png", "eval_bbox_per_class.png", "eval_segm.png", "diagnostics.png",
        "timing.png"])
    for png in written:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.width >= 300 and image.height >= 200
            # Not a blank canvas: curves and text were drawn.
            assert len(np.unique(np.asarray(image.convert("L")))) > 10
    # The losses figure has one panel per component: it is 3 panels wide and 2 high.
    with Image.open(tmp_path / "plots" / "losses.png") as image:
        assert image.size == (1500, 640)


def test_series_match_what_was_logged(tmp_path: Path):
    metrics = tmp_path / "metrics.json"
    _write_run(metrics)
    series = plot_metrics.load_metrics(metrics)
    # lr is not smoothed: written values are exact at the logged iterations.
    assert series["lr"] == [(19, 0.02), (29, 0.03), (39, 0.04), (59, 0.06)]
    assert [it for it, _ in series["bbox/AP"]] == [29, 59]
    assert series["bbox/AP50"] == [(29, 29.0), (59, 59.0)]
    assert math.isnan(series["segm/AP"][0][1])
    groups = plot_metrics.group_metrics(list(series))
    assert groups["losses"] == list(LOSSES)
    assert groups["eval_bbox"] == ["bbox/AP", "bbox/AP50"]
    assert groups["eval_bbox_per_class"] == ["bbox/AP-circle"]
    assert groups["grad_norm"] == ["optim/grad_norm"]
    assert groups["health"] == ["health/dets_per_image"]
    assert "iteration" not in series and "eta_seconds" not in series


def test_resumed_run_replaces_the_redone_iterations(tmp_path: Path):
    metrics = tmp_path / "metrics.json"
    _write_run(metrics, 0, 90, lr=1.0)  # killed after iteration 89
    _write_run(metrics, 40, 100, lr=0.001)  # resumed from the checkpoint at 40, appended
    series = plot_metrics.load_metrics(metrics)
    # Up to 39 from the first run; 59 onwards only from the resumed one.
    assert series["lr"] == [(19, 20.0), (29, 30.0), (39, 40.0), (59, 0.06), (79, 0.08),
                            (89, 0.09), (99, 0.1)]
    assert [it for it, _ in series["bbox/AP"]] == [29, 59, 89]


def test_records_off_the_writers_period_keep_every_point(tmp_path: Path, capsys):
    """A check or an evaluation logged at an iteration below the line before it is no resume:
    every loss point stays, and nothing is said."""
    metrics = tmp_path / "metrics.json"
    records = [{"iteration": 19, "total_loss": 1.0}, {"iteration": 39, "total_loss": 0.5},
               {"iteration": 29, "health/dets_per_image": 3.0},
               {"iteration": 59, "total_loss": 0.25}, {"iteration": 49, "bbox/AP": 7.0}]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    series = plot_metrics.load_metrics(metrics)
    assert series["total_loss"] == [(19, 1.0), (39, 0.5), (59, 0.25)]
    assert series["health/dets_per_image"] == [(29, 3.0)] and series["bbox/AP"] == [(49, 7.0)]
    assert capsys.readouterr().err == ""
    _write_run(metrics, 40, 60, lr=0.001)  # a resumed run redoing 40-59: writes at 59 (and 49)
    plot_metrics.load_metrics(metrics)
    assert "values logged again at an iteration already logged (a resumed run redoing " \
        "iterations): the later ones are drawn" in capsys.readouterr().err


def test_folder_argument_and_default_output(tmp_path: Path, capsys):
    (tmp_path / "metrics.json").write_text(
        '{"iteration": 19, "lr": 0.1, "total_loss": 2.0}\n'
        '{"iteration": 39, "lr": 0.2, "total_loss": 1.5}\n')
    written = plot_metrics.main([str(tmp_path)])
    assert written == [tmp_path / "plots" / "total_loss.png", tmp_path / "plots" / "lr.png"]
    assert all(p.is_file() for p in written)
    assert capsys.readouterr().out.split() == [str(p) for p in written]


def test_missing_or_empty_metrics_give_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"^metrics file not found: .*nope\.json$"):
        plot_metrics.plot_metrics(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match=rf"^no metrics.json in folder {tmp_path}$"):
        plot_metrics.plot_metrics(tmp_path)
    empty = tmp_path / "metrics.json"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"metrics.json is empty: no metrics were written yet"):
        plot_metrics.plot_metrics(empty)
    empty.write_text('{"iteration": 1, "lr": 0.1}\n{"iteration": 2, "lr"\n{"iteration": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.json, line 2: not valid JSON: "):
        plot_metrics.plot_metrics(empty)
    empty.write_text('{"lr": 0.1}\n')
    with pytest.raises(ValueError, match=r"line 1: expected an object with an integer "
                                         r"'iteration'"):
        plot_metrics.plot_metrics(empty)


def test_partial_last_line_of_a_killed_run_is_skipped_with_a_warning(tmp_path: Path, capsys):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"iteration": 19, "lr": 0.1}\n{"iteration": 39, "lr": 0.')
    assert plot_metrics.load_metrics(metrics) == {"lr": [(19, 0.1)]}
    assert "line 2: incomplete last line ignored" in capsys.readouterr().err


def test_command_line_error_exit(tmp_path: Path):
    missing = tmp_path / "metrics.json"
    proc = subprocess.run([sys.executable, str(TOOL), str(missing)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"plot_metrics: error: metrics file not found: {missing}"
