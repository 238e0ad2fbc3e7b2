"""The core without the training harness: train_net.py with its lines marked "# harness" deleted,
in a copy of the tree that holds the core package and the configs alone, trains on a COCO json
registered with detectron2's own API and evaluates the weights it saved with --eval-only; and the
core tests pass in such a copy."""
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

# train_net.py of the copy, run as a user's project runs it, after registering their dataset.
RUN_TRAIN_NET = BLOCK_HARNESS + """
from detectron2.data.datasets import register_coco_instances
register_coco_instances("core_alone", {}, sys.argv.pop(1), sys.argv.pop(1))
import runpy
runpy.run_path("train_net.py", run_name="__main__")
"""

HARNESS_MARK = "# harness"


def copy_core_tree(repo_root: Path, copy: Path) -> None:
    """The core package, the configs and train_net.py without the lines marked "# harness"."""
    shutil.copytree(repo_root / "projects" / "balanced_rcnn", copy / "projects" / "balanced_rcnn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(repo_root / "configs", copy / "configs")
    shutil.copy(repo_root / "pyproject.toml", copy)
    lines = (repo_root / "train_net.py").read_text().splitlines(keepends=True)
    (copy / "train_net.py").write_text(
        "".join(line for line in lines if not line.rstrip().endswith(HARNESS_MARK)))


@pytest.mark.core
def test_train_net_trains_and_evaluates_without_the_harness(tmp_path, repo_root):
    copy = tmp_path / "repo"
    copy_core_tree(repo_root, copy)
    assert "training_harness" not in (copy / "train_net.py").read_text()
    json_file, image_root = write_coco(tmp_path / "data")
    output = tmp_path / "output"
    config = ["--config-file", "configs/quick_schedules/Base-BalancedRCNN-TinySwin-CPU.yaml"]
    common = ["DATASETS.TRAIN", "('core_alone',)", "DATASETS.TEST", "('core_alone',)",
              "MODEL.ROI_HEADS.NUM_CLASSES", "2", "SOLVER.IMS_PER_BATCH", "2",
              "OUTPUT_DIR", str(output)]
    env = {**os.environ, "PYTHONPATH": str(copy / "projects")}

    def train_net(*argv):
        run = subprocess.run([sys.executable, "-c", RUN_TRAIN_NET, str(json_file),
                              str(image_root), *argv], cwd=copy, env=env,
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        return run.stdout + run.stderr

    train_net(*config, *common, "SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "0")
    metrics = [json.loads(line) for line in (output / "metrics.json").read_text().splitlines()]
    # SOLVER.MAX_ITER steps trained (iterations 0 and 1)
    assert max(m["iteration"] for m in metrics if "total_loss" in m) == 1
    assert (output / "model_final.pth").is_file()
    log = train_net(*config, "--eval-only", *common, "MODEL.WEIGHTS", str(output / "model_final.pth"))
    # COCO AP with the frequency groups (bbox and segm) and the image-level metrics.
    for task in ("bbox", "segm"):
        assert f"Evaluation results for {task}" in log
    assert "APr" in log and "false_alarm_images" in log
    assert "training_harness" not in log


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
    copy_core_tree(repo_root, copy)
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
