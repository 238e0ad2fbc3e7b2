"""benchmarks/gpu_check.py --cpu-dry-run: the GPU check's code paths on the CPU at tiny sizes,
so that the script works when a GPU comes."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_dry_run(tmp_path, monkeypatch):
    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    data = _load("gpu_check").main(["--cpu-dry-run", "--results-dir", str(tmp_path / "results"),
                                    "--output-dir", str(tmp_path / "runs")])
    assert data["dry_run"] and data["device"] == "cpu (dry run)"
    assert {(r["head"], r["pass"]) for r in data["losses_ms"]} >= {("all", "fwd+bwd")}
    step = data["step"]
    assert step["config"] == "tiny" and step["inference_equal"]
    balanced_syncs = step["loss_path_syncs"]["balanced"]
    assert set(balanced_syncs) == {"rpn", "roi_box", "mask"}
    assert all(sum(v for k, v in c.items() if k.startswith("python:")) == 0
               for c in balanced_syncs.values())
    (run,) = data["training"]
    assert run["returncode"] == 0 and run["healthy"], run
    assert run["non_finite_losses"] == 0 and run["collapses"] == 0 and run["loss_decreased"]
    saved = json.loads((tmp_path / "results" / "gpu_check.json").read_text())
    assert saved["commit"] and saved["training"][0]["precision"] == "float32"
    text = (tmp_path / "results" / "gpu_check.md").read_text()
    for header in ("| head | pass | stock ms | balanced ms | balanced/stock |",
                   "| pass | stock ms | balanced ms | balanced/stock | stock peak MiB |",
                   "| head | stock | balanced |", "| precision | iterations | size |"):
        assert header in text, header


def test_without_cuda_the_real_check_says_so(capsys):
    gpu_check = _load("gpu_check")
    if gpu_check.torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(SystemExit) as info:
        gpu_check.main([])
    assert info.value.code == 2
    assert "gpu_check: no CUDA device here; on the CPU run --cpu-dry-run" in capsys.readouterr().err
