"""tools/schedule.py: epochs -> MAX_ITER / STEPS / periods for a dataset and batch (the
arithmetic of training_harness.preflight.schedule, which the pre-flight report shares)."""

import importlib.util
import json
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "schedule.py"


def _tool():
    spec = importlib.util.spec_from_file_location("schedule", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_coco_1x_is_the_published_schedule():
    # 118287 train2017 images at 16 per step, 12 epochs, drops at epochs 8 and 11.
    from training_harness.preflight.schedule import schedule_keys

    out = schedule_keys(118287, 16, 12, [8, 11], 1, 1)
    assert out["iterations_per_epoch"] == 7393
    assert (out["SOLVER.MAX_ITER"], out["SOLVER.STEPS"]) == (88716, (59144, 81323))
    assert out["SOLVER.CHECKPOINT_PERIOD"] == out["TEST.EVAL_PERIOD"] == 7393


def test_a_json_with_empty_images(tmp_path, capsys):
    coco = {"images": [{"id": i} for i in range(10)],
            "annotations": [{"image_id": i, "iscrowd": 0} for i in (0, 1, 2)]
            + [{"image_id": 3, "iscrowd": 1}]}  # crowd only: counts as empty
    path = tmp_path / "train.json"
    path.write_text(json.dumps(coco))
    kept = _tool().main(["--json", str(path), "--batch", "4"])
    assert (kept["images"], kept["with_objects"], kept["trained"]) == (10, 3, 10)
    assert kept["iterations_per_epoch"] == 3  # ceil(10 / 4)
    assert (kept["SOLVER.MAX_ITER"], kept["SOLVER.STEPS"]) == (36, (24, 33))
    out = capsys.readouterr().out
    assert ('SOLVER.IMS_PER_BATCH 4 SOLVER.MAX_ITER 36 SOLVER.STEPS "(24,33)" '
            "SOLVER.CHECKPOINT_PERIOD 3 TEST.EVAL_PERIOD 3") in out
    dropped = _tool().main(["--json", str(path), "--batch", "4", "--drop-empty", "--steps"])
    assert (dropped["trained"], dropped["SOLVER.MAX_ITER"], dropped["SOLVER.STEPS"]) == (3, 12, ())


@pytest.mark.parametrize("argv,message", [
    (["--json", "/nonexistent.json", "--batch", "4"], "schedule: cannot read the COCO json"),
    (["--batch", "0"], "schedule: --batch must be >= 1"),
    (["--batch", "4", "--steps", "13"], "schedule: --steps must lie inside (0, 12) epochs"),
])
def test_errors_are_one_line(tmp_path, capsys, argv, message):
    path = tmp_path / "train.json"
    path.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    if "--json" not in argv:
        argv = ["--json", str(path)] + argv
    with pytest.raises(SystemExit) as info:
        _tool().main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err
