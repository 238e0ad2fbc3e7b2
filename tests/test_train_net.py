"""train_net.py end to end on the CPU: train, --eval-only, --resume, --num-gpus 2 (gloo).

The tiny config trains on a small COCO-format dataset this test writes (shapes drawn on noise),
registered inside train_net through DATASETS.REGISTER_COCO, as users register theirs.
"""

import json
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

TINY_CONFIG = "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml"
CATEGORIES = [{"id": 1, "name": "box"}, {"id": 2, "name": "triangle"}, {"id": 3, "name": "blob"}]
# Not multiples of 32 (and not square), so the padding path runs too.
IMAGE_SIZES = [(96, 128), (128, 80), (70, 100), (112, 112), (64, 90), (100, 64)]


def _polygon(category, x, y, s):
    if category == 1:
        return [x, y, x + s, y, x + s, y + s, x, y + s]
    if category == 2:
        return [x, y + s, x + s, y + s, x + s // 2, y]
    return [x + s // 2, y, x + s, y + s // 3, x + 2 * s // 3, y + s, x, y + 2 * s // 3]


@pytest.fixture(scope="module")
def coco_dataset(tmp_path_factory):
    """6 images with 0-2 shapes each, and their COCO instances json."""
    root = tmp_path_factory.mktemp("coco")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for image_id, (height, width) in enumerate(IMAGE_SIZES, start=1):
        image = rng.integers(0, 120, (height, width, 3), dtype=np.uint8)
        for k in range(image_id % 3):  # 1, 2, 0, 1, 2, 0 objects
            category = 1 + (image_id + k) % 3
            s = int(rng.integers(16, 32))
            x, y = int(rng.integers(0, width - s)), int(rng.integers(0, height - s))
            polygon = _polygon(category, x, y, s)
            points = np.array(polygon).reshape(-1, 2)
            cv2.fillPoly(image, [points], (60 * category, 255, 255 - 60 * category))
            x0, y0 = points.min(0)
            x1, y1 = points.max(0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": category,
                    "bbox": [int(x0), int(y0), int(x1 - x0), int(y1 - y0)],
                    "iscrowd": 0,
                    "area": float(cv2.contourArea(points.astype(np.float32))),
                    "segmentation": [polygon],
                }
            )
        name = f"{image_id:03d}.png"
        cv2.imwrite(str(root / "images" / name), image)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    json_file = root / "instances.json"
    json_file.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES})
    )
    return json_file, root / "images"


def run_train_net(repo_root, tmp_path, args, *opts, threads=None):
    env = dict(os.environ, BALANCED_RCNN_DATASETS=str(tmp_path / "datasets"))
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    command = [sys.executable, "train_net.py", "--config-file", TINY_CONFIG, *args, *opts]
    result = subprocess.run(
        command, cwd=repo_root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


def dataset_opts(coco_dataset, output_dir, max_iter):
    json_file, image_root = coco_dataset
    return [
        "DATASETS.REGISTER_COCO",
        repr(
            [
                ["test_train", str(json_file), str(image_root)],
                ["test_val", str(json_file), str(image_root)],
            ]
        ),
        "DATASETS.TRAIN",
        "('test_train',)",
        "DATASETS.TEST",
        "('test_val',)",
        "SOLVER.MAX_ITER",
        str(max_iter),
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "OUTPUT_DIR",
        str(output_dir),
    ]


def read_metrics(output_dir):
    with open(output_dir / "metrics.json") as f:
        return [json.loads(line) for line in f]


def checkpoint_iteration(path):
    return torch.load(path, map_location="cpu", weights_only=False)["iteration"]


@pytest.fixture(scope="module")
def trained(repo_root, coco_dataset, tmp_path_factory):
    """Output folder of a 4-iteration training run, and the run's log."""
    tmp = tmp_path_factory.mktemp("train")
    output = tmp / "output"
    log = run_train_net(repo_root, tmp, [], *dataset_opts(coco_dataset, output, max_iter=4))
    return output, log


def test_train_writes_checkpoints_and_metrics(trained):
    output, log = trained
    assert "Starting training from iteration 0" in log
    assert (output / "last_checkpoint").read_text() == "model_final.pth"
    assert checkpoint_iteration(output / "model_final.pth") == 3
    assert (output / "model_0000001.pth").is_file()  # CHECKPOINT_PERIOD 2: after iteration 1

    metrics = read_metrics(output)
    train = [m for m in metrics if "total_loss" in m]
    assert train[-1]["iteration"] == 3
    for key in ("loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask", "lr"):
        assert np.isfinite(train[-1][key]), key
    assert train[-1]["optim/grad_norm"] > 0
    evaluation = [m for m in metrics if "bbox/AP" in m]
    assert len(evaluation) == 1 and "segm/AP" in evaluation[0]
    # Every evaluation also writes AP by class frequency and the image-level metrics.
    assert {"bbox/APr", "bbox/APc", "bbox/APf", "segm/APf", "image_level/false_alarm_images",
            "image_level/object_images_detected", "image_level/recall50",
            "image_level/dets_per_empty_image"} <= set(evaluation[0])


def test_eval_only_evaluates_model_weights(repo_root, coco_dataset, trained, tmp_path):
    output, _ = trained
    log = run_train_net(
        repo_root,
        tmp_path,
        ["--eval-only"],
        *dataset_opts(coco_dataset, tmp_path / "eval", max_iter=4),
        "MODEL.WEIGHTS",
        str(output / "model_final.pth"),
    )
    assert f"Loading from {output / 'model_final.pth'}" in log
    assert "Some model parameters or buffers are not found" not in log
    assert "Evaluation results for test_val in csv format" in log
    for task in ("bbox", "segm"):
        assert f"copypaste: Task: {task}\n" in log
    assert log.count("copypaste: AP,AP50,AP75,APs,APm,APl") == 2
    assert "Starting training" not in log


def test_resume_continues_from_the_last_checkpoint(repo_root, coco_dataset, trained, tmp_path):
    output = tmp_path / "output"
    shutil.copytree(trained[0], output)
    log = run_train_net(
        repo_root, tmp_path, ["--resume"], *dataset_opts(coco_dataset, output, max_iter=6)
    )
    assert f"Loading from {output / 'model_final.pth'}" in log
    assert "Starting training from iteration 4" in log
    assert checkpoint_iteration(output / "model_final.pth") == 5
    assert [m["iteration"] for m in read_metrics(output) if "total_loss" in m][-2:] == [3, 5]


def _refusal(repo_root, tmp_path, *args):
    env = dict(os.environ, BALANCED_RCNN_DATASETS=str(tmp_path / "datasets"))
    result = subprocess.run([sys.executable, "train_net.py", "--config-file", TINY_CONFIG, *args],
                            cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Starting training" not in result.stdout + result.stderr
    assert "copypaste" not in result.stdout + result.stderr  # no AP
    assert "Traceback" not in result.stderr  # one line: train_net.py: error: ...
    return result.stderr


def test_eval_only_refuses_weights_that_do_not_fit_and_a_fresh_start_over_a_run(
        repo_root, coco_dataset, trained, tmp_path):
    output, _ = trained
    weights = output / "model_final.pth"
    err = _refusal(repo_root, tmp_path, "--eval-only", "MODEL.WEIGHTS", str(weights),
                   "MODEL.ROI_HEADS.NUM_CLASSES", "2", "OUTPUT_DIR", str(tmp_path / "eval"),
                   # No dataset to compare NUM_CLASSES with: only the checkpoint can say.
                   "DATASETS.TRAIN", "()", "DATASETS.TEST", "()")
    assert (f"CheckpointMismatchError: Checkpoint '{weights}' (named by MODEL.WEIGHTS) does not "
            "fit the config's model: 6 tensors have another shape (") in err
    assert "The checkpoint has 3 classes, the config 2: set MODEL.ROI_HEADS.NUM_CLASSES 3." in err
    rerun = tmp_path / "output"
    shutil.copytree(output, rerun)
    err = _refusal(repo_root, tmp_path, *dataset_opts(coco_dataset, rerun, max_iter=4))
    assert (f"OutputDirError: OUTPUT_DIR '{rerun}' already holds the checkpoints of a run "
            "(last_checkpoint, model_0000001.pth, model_0000003.pth, model_final.pth). Continue "
            "that run with --resume") in err


def test_two_cpu_processes(repo_root, coco_dataset, tmp_path):
    output = tmp_path / "output"
    log = run_train_net(
        repo_root,
        tmp_path,
        ["--num-gpus", "2"],
        *dataset_opts(coco_dataset, output, max_iter=3),
        threads=1,
    )
    assert "Rank of current process: 0. World size: 2" in log
    # detectron2 logs the other worker only to its own file.
    assert "Rank of current process: 1. World size: 2" in (output / "log.txt.rank1").read_text()
    assert checkpoint_iteration(output / "model_final.pth") == 2
    train = [m for m in read_metrics(output) if "total_loss" in m]
    assert train[-1]["iteration"] == 2 and train[-1]["optim/grad_norm"] > 0
    assert "copypaste: Task: segm" in log
