"""tools/demo.py end to end on the instant-test config: training, evaluation, plots, drawings."""
import json
import os
import subprocess
import sys

import cv2


def test_demo_writes_every_artifact_and_prints_the_ap(repo_root, tmp_path):
    output = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "demo.py"),
         "--config-file", str(repo_root / "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml"),
         "--output-dir", str(output), "--num-vis", "2", "SOLVER.MAX_ITER", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    final = [r for r in records if "bbox/AP" in r][-1]
    assert {"bbox/AP50", "segm/AP"} <= set(final)
    summary = result.stdout.split("Done. Everything is in")[1]
    assert f"bbox/AP {final['bbox/AP']:.1f}, bbox/AP50 {final['bbox/AP50']:.1f}" in summary
    # What a deployment sees, at TEST.DEPLOYMENT_SCORE_THRESH.
    assert (f"at score >= 0.5  dets_per_empty_image {final['image_level/dets_per_empty_image']:.2f}, "
            f"false_alarm_images {final['image_level/false_alarm_images']:.1f}%, "
            f"object_images_detected {final['image_level/object_images_detected']:.1f}%, "
            f"recall50 {final['image_level/recall50']:.1f}%") in summary
    assert list(output.glob("events.out.tfevents.*"))
    for name in ("total_loss", "losses", "lr", "grad_norm"):
        assert cv2.imread(str(output / "plots" / f"{name}.png")) is not None, name
    drawings = sorted((output / "vis").glob("*_truth_vs_prediction.png"))
    assert len(drawings) == 2
    truth_and_prediction = cv2.imread(str(drawings[0]))
    # Two 64-px images drawn at scale 3 with an 8-px gap between them, each under a 28-px band
    # that names it: white, with dark text inside its margins.
    assert truth_and_prediction.shape == (28 + 192, 2 * 192 + 8, 3)
    band = truth_and_prediction[:28].min(axis=2)
    for side in (band[:, :192], band[:, 200:]):
        assert side.min() < 100
        assert (side[:4] == 255).all() and (side[:, :4] == 255).all() and (side[:, -4:] == 255).all()
    # The summary, also in summary.txt: the monitor's verdict and where to look next.
    written = (output / "summary.txt").read_text()
    assert "Done. Everything is in" + summary.split("  this summary")[0] == written
    assert "  health monitor    " in written and "Where to look next:" in written
    assert f"--weights {output / 'model_final.pth'} --input IMAGE_OR_FOLDER" in written
    assert (output / "model_final.pth").is_file()
    # A folder given with --output-dir may hold another run: the demo does not train over it.
    mtime = (output / "model_final.pth").stat().st_mtime_ns
    rerun = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "demo.py"),
         "--config-file", str(repo_root / "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml"),
         "--output-dir", str(output), "SOLVER.MAX_ITER", "4"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert rerun.returncode == 1, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert (f"train_net.py: error: OutputDirError: OUTPUT_DIR '{output}' already holds the "
            "checkpoints of a run") in rerun.stderr
    assert "Traceback" not in rerun.stderr
    assert (output / "model_final.pth").stat().st_mtime_ns == mtime
