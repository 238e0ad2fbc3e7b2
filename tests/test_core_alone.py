"""The core without the training harness, with every import of training_harness failing: the
core's Trainer trains on a COCO json registered with detectron2's own API, and the weights it
saved, reloaded by detectron2's checkpointer, evaluate; and the core tests pass in a copy of the
tree that holds the core alone."""
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coco_builders import write_coco

# Run by a fresh interpreter before anything else: the harness cannot be imported.
BLOCK_HARNESS = 'import sys; sys.modules["training_harness"] = None; '

SCRIPT = BLOCK_HARNESS + r"""
import json
from balanced_rcnn import Trainer, add_balanced_rcnn_config
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data.datasets import register_coco_instances

config_file, json_file, image_root, output = sys.argv[1:]
cfg = get_cfg()
add_balanced_rcnn_config(cfg)
cfg.merge_from_file(config_file, allow_unsafe=False)
register_coco_instances("core_alone", {}, json_file, image_root)
cfg.merge_from_list(["DATASETS.TRAIN", "('core_alone',)", "DATASETS.TEST", "('core_alone',)",
                     "MODEL.ROI_HEADS.NUM_CLASSES", "2", "SOLVER.MAX_ITER", "2",
                     "SOLVER.IMS_PER_BATCH", "2", "TEST.EVAL_PERIOD", "0", "OUTPUT_DIR", output])
trainer = Trainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
model = Trainer.build_model(cfg)  # as train_net.py --eval-only
DetectionCheckpointer(model).load(f"{output}/model_final.pth")
results = Trainer.test(cfg, model)
print(json.dumps({
    "results": {task: sorted(metrics) for task, metrics in results.items()},
    "harness_loaded": [m for m in sys.modules if m.startswith("training_harness.")],
    "iteration": trainer.iter,
}))
"""


@pytest.mark.core
def test_the_core_trains_and_evaluates_without_the_harness(tmp_path, repo_root):
    json_file, image_root = write_coco(tmp_path / "data")
    config = repo_root / "configs" / "quick_schedules" / "Base-BalancedRCNN-TinySwin-CPU.yaml"
    run = subprocess.run([sys.executable, "-c", SCRIPT, str(config), str(json_file),
                          str(image_root), str(tmp_path / "output")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["harness_loaded"] == []
    assert out["iteration"] == 2  # SOLVER.MAX_ITER steps trained
    # COCO AP with the frequency groups (bbox and segm) and the image-level metrics.
    assert set(out["results"]) == {"bbox", "segm", "image_level"}
    assert {"AP", "AP50", "APr", "APc", "APf"} <= set(out["results"]["bbox"])
    assert "false_alarm_images" in set(out["results"]["image_level"])


def _imports_the_harness_at_load(path: Path) -> bool:
    """Whether a test module imports training_harness outside its functions."""
    tree = ast.parse(path.read_text())
    for node in tree.body:
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n.split(".")[0] == "training_harness" for n in names):
            return True
    return False


def test_the_core_tests_pass_in_a_copy_without_the_harness(tmp_path, repo_root):
    # The copy: the core package, the configs and the test modules that hold core tests.
    copy = tmp_path / "repo"
    shutil.copytree(repo_root / "projects" / "balanced_rcnn", copy / "projects" / "balanced_rcnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo_root / "configs", copy / "configs")
    shutil.copy(repo_root / "pyproject.toml", copy)
    tests = [p for p in sorted((repo_root / "tests").glob("*.py"))
             if p.name in ("conftest.py", "coco_builders.py")
             or ("pytest.mark.core" in p.read_text() and not _imports_the_harness_at_load(p))]
    (copy / "tests").mkdir()
    for path in tests:
        shutil.copy(path, copy / "tests")
    env = {**os.environ, "PYTHONPATH": str(copy / "projects")}
    run = subprocess.run(
        [sys.executable, "-c", BLOCK_HARNESS + "import pytest; code = pytest.main(['-m', 'core', "
         "'-q', '-p', 'no:cacheprovider', 'tests']); import balanced_rcnn; "
         "print('core package:', balanced_rcnn.__file__); sys.exit(code)"],
        cwd=copy, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    expected = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "core", "--collect-only", "-q",
         "-p", "no:cacheprovider", str(repo_root / "tests")],
        capture_output=True, text=True, timeout=300).stdout
    # Every core test of the tree ran in the copy, from the copy's core package.
    assert f"core package: {copy / 'projects' / 'balanced_rcnn' / '__init__.py'}" in run.stdout
    count = expected.strip().splitlines()[-1].split("/")[0].split()[0]
    assert f"{count} passed" in run.stdout
