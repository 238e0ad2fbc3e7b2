"""No weights or config file runs code (reliability/safe_files.py, reliability/checkpoint.py,
config.py): a crafted .pkl, .pth or YAML is refused on every path that reads one (training,
--eval-only, --resume, each tool), naming the file and what it tried to build, and leaves no
trace of having run; detectron2's model-zoo .pkl format still loads."""

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from training_harness.config import load_project_config
from training_harness.errors import UnsafeFileError
from training_harness.reliability.checkpoint import AtomicCheckpointer
from training_harness.reliability.safe_files import load_model_zoo_pickle

from conftest import TINY_CONFIG, load_tool

TINY = f"configs/{TINY_CONFIG}"


class _RunsCode:
    """Pickled as a call of os.system: what a crafted file holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def crafted(tmp_path):
    """Crafted files whose loading would create ``marker``."""
    marker = tmp_path / "ran"
    files = {"marker": marker}
    files["pkl"] = tmp_path / "weights.pkl"
    with open(files["pkl"], "wb") as f:
        pickle.dump({"model": {"w": np.zeros(2)}, "__author__": "x", "x": _RunsCode(marker)}, f)
    files["pth"] = tmp_path / "weights.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "x": _RunsCode(marker)}, files["pth"])
    tag = f'!!python/object/apply:os.system ["touch {marker}"]'
    files["yaml"] = tmp_path / "config.yaml"
    files["yaml"].write_text(f"SEED: 1\nOUTPUT_DIR: {tag}\n")
    (tmp_path / "base.yaml").write_text(f"SEED: {tag}\n")
    files["child_yaml"] = tmp_path / "child.yaml"
    files["child_yaml"].write_text('_BASE_: "base.yaml"\nSEED: 1\n')
    yield files
    assert not marker.exists(), "a crafted file ran code"


PKL_REFUSAL = "it asks to build posix.system, and a weights .pkl holds only numpy arrays"
PTH_REFUSAL = "it asks to build posix.system, and a checkpoint is read with torch.load(weights_only"
YAML_REFUSAL = ("line 2: could not determine a constructor for the tag "
                "'tag:yaml.org,2002:python/object/apply:os.system'")


def test_model_zoo_pickles_still_load(tmp_path):
    """Pickled as detectron2's model zoo and Detectron1 files are: numpy arrays in dicts, any
    protocol (protocol 2 encodes bytes with _codecs.encode)."""
    model = torch.nn.Linear(3, 2)
    weights = {"weight": np.arange(6, dtype=np.float32).reshape(2, 3),
               "bias": np.array([1.0, -1.0], dtype=np.float32)}
    for protocol in (2, pickle.HIGHEST_PROTOCOL):
        path = tmp_path / f"zoo_{protocol}.pkl"
        with open(path, "wb") as f:
            pickle.dump({"model": weights, "__author__": "Detectron2 Model Zoo",
                         "scale": np.float32(2.0), "names": ("a", b"b")}, f, protocol=protocol)
        loaded = load_model_zoo_pickle(str(path))
        assert loaded["names"] == ("a", b"b") and loaded["scale"] == np.float32(2.0)
        AtomicCheckpointer(model, require_full_model=True).load(str(path))
        assert torch.equal(model.weight, torch.arange(6.0).reshape(2, 3))
        assert torch.equal(model.bias, torch.tensor([1.0, -1.0]))
    # Detectron1's format: {"blobs": {...}}, momentum blobs dropped.
    path = tmp_path / "blobs.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": {"weight": weights["weight"] * 2, "bias": weights["bias"],
                               "bias_momentum": weights["bias"]}}, f, protocol=2)
    AtomicCheckpointer(model).load(str(path))
    assert torch.equal(model.weight, 2 * torch.arange(6.0).reshape(2, 3))


def test_checkpoint_loads_pass_weights_only(monkeypatch, tmp_path):
    """Pinned: fvcore's own call leaves weights_only to torch's default."""
    model = torch.nn.Linear(3, 2)
    torch.save({"model": model.state_dict()}, tmp_path / "m.pth")
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    AtomicCheckpointer(model).load(str(tmp_path / "m.pth"))
    assert calls == [True]


def test_crafted_weights_are_refused_in_process(crafted, monkeypatch):
    model = torch.nn.Linear(3, 2)
    with pytest.raises(UnsafeFileError) as info:
        AtomicCheckpointer(model).load(str(crafted["pkl"]))
    assert str(info.value).startswith(f"Refusing to load '{crafted['pkl']}': {PKL_REFUSAL}")
    with pytest.raises(UnsafeFileError) as info:
        AtomicCheckpointer(model).load(str(crafted["pth"]))
    assert str(info.value).startswith(
        f"Refusing to load checkpoint '{crafted['pth']}': {PTH_REFUSAL}")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(UnsafeFileError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set"):
        AtomicCheckpointer(model).load(str(crafted["pth"]))


def test_crafted_configs_are_refused_naming_the_file_and_line(crafted):
    with pytest.raises(UnsafeFileError) as info:
        load_project_config(str(crafted["yaml"]))
    assert str(info.value).startswith(f"Config '{crafted['yaml']}', {YAML_REFUSAL}")
    with pytest.raises(UnsafeFileError) as info:
        load_project_config(str(crafted["child_yaml"]))
    base = crafted["child_yaml"].parent / "base.yaml"
    assert str(info.value).startswith(f"Config '{base}', line 1: could not determine")
    assert str(info.value).endswith(f"Loaded from --config-file '{crafted['child_yaml']}'.")


def _train_net(repo_root, *args):
    result = subprocess.run([sys.executable, "train_net.py", *args], cwd=repo_root,
                            capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout + result.stderr


@pytest.mark.parametrize("how", ["train", "eval_only", "resume", "config"])
def test_train_net_refuses_crafted_files(repo_root, crafted, tmp_path, how):
    out = tmp_path / "out"
    if how == "train":
        args = ["--config-file", TINY, "MODEL.WEIGHTS", str(crafted["pkl"])]
        expected = f"Refusing to load '{crafted['pkl']}' (named by MODEL.WEIGHTS): {PKL_REFUSAL}"
    elif how == "eval_only":
        args = ["--config-file", TINY, "--eval-only", "MODEL.WEIGHTS", str(crafted["pth"])]
        expected = (f"Refusing to load checkpoint '{crafted['pth']}' (named by MODEL.WEIGHTS): "
                    f"{PTH_REFUSAL}")
    elif how == "resume":
        out.mkdir()
        (out / "model_0000009.pkl").write_bytes(crafted["pkl"].read_bytes())
        (out / "last_checkpoint").write_text("model_0000009.pkl")
        args = ["--config-file", TINY, "--resume"]
        expected = (f"Refusing to load '{out / 'model_0000009.pkl'}' (named by "
                    f"{out / 'last_checkpoint'}): {PKL_REFUSAL}")
    else:
        args = ["--config-file", str(crafted["yaml"])]
        expected = f"Config '{crafted['yaml']}', {YAML_REFUSAL}"
    code, log = _train_net(repo_root, *args, "OUTPUT_DIR", str(out))
    assert code == 1 and expected in log, log[-3000:]
    assert "Traceback" not in log  # one line: train_net.py: error: ...


@pytest.mark.parametrize("tool, argv, expected", [
    ("predict", ["--weights", "{pkl}", "--input", "{dir}", "--output", "{dir}/out"], PKL_REFUSAL),
    ("predict", ["--weights", "{pth}", "--input", "{dir}", "--output", "{dir}/out"], PTH_REFUSAL),
    ("export_model", ["--weights", "{pkl}", "--output", "{dir}/export"], PKL_REFUSAL),
    ("export_model", ["--weights", "{pth}", "--output", "{dir}/export"], PTH_REFUSAL),
])
def test_tools_refuse_crafted_weights(repo_root, crafted, tmp_path, capsys, tool, argv,
                                      expected):
    (tmp_path / "image.png").write_bytes(b"")  # never read: the weights are refused first
    argv = [a.format(pkl=crafted["pkl"], pth=crafted["pth"], dir=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as info:
        load_tool(tool).main(["--config-file", str(repo_root / TINY), *argv])
    assert expected in str(info.value.code) + capsys.readouterr().err


@pytest.mark.parametrize("tool, argv", [
    ("predict", ["--weights", "w.pth", "--input", ".", "--output", "out"]),
    ("export_model", ["--weights", "w.pth", "--output", "out"]),
    ("analyze_data", []),
    ("submit_slurm", []),
    ("demo", []),
])
def test_tools_refuse_crafted_configs(repo_root, crafted, capsys, tool, argv):
    with pytest.raises((SystemExit, UnsafeFileError)) as info:
        load_tool(tool).main(["--config-file", str(crafted["yaml"]), *argv])
    message = str(info.value.code if isinstance(info.value, SystemExit) else info.value)
    assert f"Config '{crafted['yaml']}', {YAML_REFUSAL}" in message + capsys.readouterr().err


def test_the_swin_converter_refuses_a_crafted_download(crafted, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        load_tool("convert_swin_checkpoint").main([str(crafted["pth"]),
                                                   str(tmp_path / "converted.pth")])
    assert info.value.code == 2  # argparse's error status, with the tool's usage
    assert (f"error: Refusing to load checkpoint '{crafted['pth']}' (named by the converter's "
            f"input): {PTH_REFUSAL}") in capsys.readouterr().err
    assert not (tmp_path / "converted.pth").exists()
