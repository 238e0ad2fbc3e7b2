"""Importing the core registers the project's names and nothing else; both packages add their
config keys idempotently."""
import ast
import subprocess
import sys
from pathlib import Path

import balanced_rcnn
import pytest
from detectron2.config import get_cfg


@pytest.mark.core
def test_add_config_is_idempotent_and_keeps_values():
    cfg = get_cfg()
    balanced_rcnn.add_balanced_rcnn_config(cfg)
    cfg.MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT = 3.0
    cfg.SOLVER.OPTIMIZER = "AdamW"
    balanced_rcnn.add_balanced_rcnn_config(cfg)
    assert cfg.MODEL.BALANCED_LOSS.ROI_CLS_POS_WEIGHT == 3.0
    assert cfg.SOLVER.OPTIMIZER == "AdamW"
    assert cfg.MODEL.BALANCED_LOSS.EPS == 1e-6
    assert cfg.MODEL.BALANCED_LOSS.SYNC_NORMALIZERS is True


def test_add_harness_config_is_idempotent_and_keeps_values():
    from training_harness import add_training_harness_config

    cfg = get_cfg()
    add_training_harness_config(cfg)
    cfg.HEALTH.PERIOD = 7
    cfg.DATASETS.REGISTER_COCO = [["a", "b.json", "c"]]
    add_training_harness_config(cfg)
    assert cfg.HEALTH.PERIOD == 7
    assert cfg.DATASETS.REGISTER_COCO == [["a", "b.json", "c"]]
    assert cfg.RELIABILITY.BAD_ANNOTATIONS == "error"


@pytest.mark.core
def test_the_core_imports_nothing_of_the_harness():
    # At run time: a fresh interpreter imports the core and lists what came with it.
    code = ("import sys; from detectron2.data import DatasetCatalog; before = set(DatasetCatalog); "
            "import balanced_rcnn; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'training_harness')); "
            "print(sorted(set(DatasetCatalog) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]  # no harness module, no dataset registered
    # In the source, lazy imports included.
    core = Path(balanced_rcnn.__file__).parent
    importers = []
    for path in sorted(core.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] == "training_harness" for n in names):
                importers.append(f"{path.relative_to(core)}:{node.lineno}")
    assert importers == []
