"""configs/my_data/imbalanced_coco.yaml: a user copies it, edits the paths and NUM_CLASSES, and
train_net.py trains and evaluates on their COCO json (here a tiny one, mostly empty images)."""

import json
import shutil
import subprocess
import sys

import cv2
import numpy as np

TEMPLATE = "configs/my_data/imbalanced_coco.yaml"
# The edits the template asks for, and nothing else: the paths of the json files and of the
# images, and the number of classes.
EDITS = {
    '"data/annotations/train.json"': "{train_json}",
    '"data/annotations/val.json"': "{val_json}",
    '"data/images"': "{images}",
    "NUM_CLASSES: 5": "NUM_CLASSES: 2",
}


def _write_coco(tmp_path):
    """6 images of 64x64, 2 of them with a square (class 'box') or a disc (class 'disc')."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(6):
        image = rng.integers(80, 120, (64, 64, 3), dtype=np.uint8)
        if i == 1:
            cv2.rectangle(image, (10, 12), (40, 42), (250, 30, 30), -1)
            annotations.append(dict(id=1, image_id=i, category_id=1, bbox=[10, 12, 31, 31],
                                    area=961, iscrowd=0,
                                    segmentation=[[10, 12, 41, 12, 41, 43, 10, 43]]))
        if i == 4:
            cv2.circle(image, (32, 30), 12, (30, 250, 30), -1)
            ring = [(32 + 12 * np.cos(a), 30 + 12 * np.sin(a)) for a in np.linspace(0, 6.2, 12)]
            annotations.append(dict(id=2, image_id=i, category_id=2, bbox=[20, 18, 24, 24],
                                    area=452, iscrowd=0,
                                    segmentation=[[float(c) for p in ring for c in p]]))
        cv2.imwrite(str(images_dir / f"{i}.png"), image)
        images.append(dict(id=i, file_name=f"{i}.png", height=64, width=64))
    coco = dict(images=images, annotations=annotations,
                categories=[dict(id=1, name="box"), dict(id=2, name="disc")])
    for split in ("train", "val"):
        (tmp_path / f"{split}.json").write_text(json.dumps(coco))
    return tmp_path / "train.json", tmp_path / "val.json", images_dir


def _edited_copy(repo_root, tmp_path, template):
    """The template copied beside itself, as it says, in a copy of configs/, with EDITS
    applied to point it at a tiny COCO json."""
    train_json, val_json, images = _write_coco(tmp_path)
    configs = tmp_path / "configs"
    shutil.copytree(repo_root / "configs", configs)
    text = (repo_root / template).read_text()
    for old, new in EDITS.items():
        assert old in text, old
        text = text.replace(old, new.format(train_json=json.dumps(str(train_json)),
                                            val_json=json.dumps(str(val_json)),
                                            images=json.dumps(str(images))))
    mine = configs / "my_data" / "mine.yaml"
    mine.write_text(text)
    return mine


def test_template_trains_on_a_coco_json_after_editing_paths_and_classes(repo_root, tmp_path):
    mine = _edited_copy(repo_root, tmp_path, TEMPLATE)

    out = tmp_path / "out"
    # What a CPU machine without the ImageNet weights changes on the command line.
    cpu = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "SOLVER.AMP.ENABLED", "False",
           "SOLVER.IMS_PER_BATCH", "2", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MIN_SIZE_TEST", "64",
           "SOLVER.MAX_ITER", "2", "HEALTH.PERIOD", "1", "HEALTH.WARMUP_ITERS", "0",
           "SEED", "0", "OUTPUT_DIR", str(out)]
    result = subprocess.run([sys.executable, "train_net.py", "--config-file", str(mine), *cpu],
                            cwd=repo_root, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert (out / "model_final.pth").is_file()
    # The template's choices are in force: empty images kept, check images that hold objects,
    # the shipped sampler and heads.
    config = (out / "config.yaml").read_text()
    assert "FILTER_EMPTY_ANNOTATIONS: false" in config and "OBJECT_IMAGES_ONLY: true" in config
    assert "NAME: BalancedROIHeads" in config
    assert "a detection check every 1 iterations on 2 images of my_val" in log
    assert "Loaded 6 images in COCO format" in log
    # Evaluated on my_val; after 2 iterations from random init the
    # model may have no detection at SCORE_THRESH_TEST, which COCOEvaluator reports so.
    assert "Start inference on 6 batches" in log
    assert ("Evaluation results for segm" in log) or ("No predictions from the model!" in log)


def test_cpu_twin_trains_and_evaluates_as_it_is(repo_root, tmp_path):
    mine = _edited_copy(repo_root, tmp_path, "configs/my_data/imbalanced_coco_cpu.yaml")
    out = tmp_path / "out"
    # Only the run's length and folder change: the twin needs no CPU overrides.
    result = subprocess.run([sys.executable, "train_net.py", "--config-file", str(mine),
                             "SOLVER.MAX_ITER", "2", "HEALTH.PERIOD", "1", "OUTPUT_DIR", str(out)],
                            cwd=repo_root, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    assert (out / "model_final.pth").is_file()
    records = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    evaluation = [r for r in records if "bbox/AP" in r]
    assert evaluation and "image_level/false_alarm_images" in evaluation[-1]
    # The set-up log's pre-flight summary: 6 training images, 4 of them empty.
    assert "Pre-flight: 6 training images, 66.7% without objects; " in log


def test_pre_flight_report_on_the_template_as_readme_says(repo_root, tmp_path):
    """README, "Train on your data": the report is the first step, on the edited copy."""
    mine = _edited_copy(repo_root, tmp_path, "configs/my_data/imbalanced_coco.yaml")
    result = subprocess.run([sys.executable, "tools/analyze_data.py", "--config-file", str(mine),
                             "--output", str(tmp_path / "preflight")],
                            cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "6 training images, 66.7% without objects; 2 objects" in result.stdout
    report = json.loads((tmp_path / "preflight" / "report.json").read_text())
    assert [c["name"] for c in report["dataset"]["classes"]] == ["box", "disc"]
    assert cv2.imread(str(tmp_path / "preflight" / "report.png")) is not None
