"""Checkpoints: atomic writes, and loads that refuse missing, truncated or corrupt files by name."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from training_harness.errors import CheckpointError
from training_harness.reliability.atomic_files import atomic_write
from training_harness.reliability.checkpoint import AtomicCheckpointer
from training_harness.reliability.weights_files import check_weights_file


def _model() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))


def _save(folder: Path, name: str = "model_0000003", iteration: int = 3) -> Path:
    AtomicCheckpointer(_model(), str(folder)).save(name, iteration=iteration)
    return folder / f"{name}.pth"


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path: Path):
    target = tmp_path / "last_checkpoint"
    target.write_text("model_0000003.pth")

    def fail_halfway(f):
        f.write(b"model_00")
        raise KeyboardInterrupt  # e.g. Ctrl-C without the training handlers

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(target), fail_halfway)
    assert target.read_text() == "model_0000003.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]  # no temporary file left


def test_a_full_disk_is_named_with_the_file_and_the_space(tmp_path: Path, monkeypatch):
    """torch.save on a full disk says only "unexpected pos"; the save names file and cause."""
    import shutil
    from collections import namedtuple

    (tmp_path / "model_0000099.pth").write_bytes(b"x" * 3 * 2**20)  # the run's last checkpoint

    def runs_out(f):
        f.write(b"y" * 2**20)
        raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 1048576 "
                           "vs 1048512")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10 * 2**20, 10 * 2**20, 0))
    target = tmp_path / "model_0000199.pth"
    with pytest.raises(OSError) as info:
        atomic_write(str(target), runs_out)
    assert str(info.value) == (
        f"[Errno 28] Could not write '{target}': no space left on the device of {tmp_path} "
        "(0 MiB free; 1 MiB were written before it ran out, and a checkpoint of this run takes "
        "about 3 MiB). Free space or move OUTPUT_DIR; the checkpoints already there are intact.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0000099.pth"]


def test_save_is_complete_tagged_and_removes_debris_of_killed_writes(tmp_path: Path):
    debris = tmp_path / ".model_0000007.pth.tmp-12345"  # what a killed write leaves
    debris.write_bytes(b"half a checkpoint")
    path = _save(tmp_path)
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000003.pth"
    assert not debris.exists()
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000003.pth"]
    # The same file a plain torch.save writes, with the same permissions as other files.
    assert torch.load(path, weights_only=False)["iteration"] == 3
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    loaded = AtomicCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)
    assert loaded["iteration"] == 3


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_bytes(path: Path) -> None:
    # In the middle of the first weight tensor: the zip structure stays intact.
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 64
    data[start:start + 16] = bytes(16)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, problem",
    [
        (_truncate, "it starts as a zip archive but its end is missing"),
        (_flip_bytes, "fails its CRC check"),
        (lambda p: p.write_bytes(b""), "torch.load failed: EOFError"),
        (lambda p: p.write_bytes(b"model_0000003.pth"), "torch.load failed: UnpicklingError"),
    ],
    ids=["truncated", "bytes-changed", "empty", "not-a-checkpoint"],
)
def test_resume_from_damaged_checkpoint_names_it(tmp_path: Path, damage, problem):
    _save(tmp_path, "model_0000001", 1)
    path = _save(tmp_path, "model_0000003", 3)
    damage(path)
    with pytest.raises(CheckpointError) as info:
        AtomicCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)
    message = str(info.value)
    assert message.startswith(f"Cannot load checkpoint '{path}' (named by "
                              f"{tmp_path / 'last_checkpoint'}): it is truncated, corrupt or not "
                              "a checkpoint (")
    assert problem in message
    assert "this folder also has: model_0000001.pth" in message


def test_damaged_model_weights_names_the_key(tmp_path: Path):
    path = _save(tmp_path)
    _truncate(path)
    with pytest.raises(CheckpointError, match=rf"Cannot load checkpoint '{path}' \(named by "
                                              r"MODEL.WEIGHTS\).*Point MODEL.WEIGHTS at an intact"):
        AtomicCheckpointer(_model(), str(tmp_path / "new")).resume_or_load(str(path), resume=True)


def test_last_checkpoint_naming_a_missing_file(tmp_path: Path):
    (tmp_path / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(FileNotFoundError) as info:
        AtomicCheckpointer(_model(), str(tmp_path)).resume_or_load("", resume=True)
    assert str(info.value) == (f"Checkpoint '{tmp_path / 'model_0000009.pth'}' (named by "
                               f"{tmp_path / 'last_checkpoint'}) does not exist")


def test_missing_model_weights_is_refused_before_anything_is_built(tiny_cfg, tmp_path: Path):
    tiny_cfg.OUTPUT_DIR = str(tmp_path)
    tiny_cfg.MODEL.WEIGHTS = str(tmp_path / "nope.pth")
    with pytest.raises(FileNotFoundError) as info:
        check_weights_file(tiny_cfg, resume=False)
    assert str(info.value) == f"MODEL.WEIGHTS '{tmp_path / 'nope.pth'}' does not exist"
    tiny_cfg.MODEL.WEIGHTS = "nope.pth"
    with pytest.raises(FileNotFoundError, match=r"'nope.pth' does not exist \(relative to the "
                                                r"current folder /"):
        check_weights_file(tiny_cfg, resume=False)
    # Resuming from OUTPUT_DIR does not read MODEL.WEIGHTS, but the checkpoint it names.
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    with pytest.raises(FileNotFoundError, match=r"^Checkpoint '.*model_0000003.pth' \(named by "
                                                r".*last_checkpoint\) does not exist$"):
        check_weights_file(tiny_cfg, resume=True)
    (tmp_path / "last_checkpoint").unlink()
    # URLs are downloaded by detectron2; an empty MODEL.WEIGHTS is a random initialization.
    tiny_cfg.MODEL.WEIGHTS = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    check_weights_file(tiny_cfg, resume=False)
    tiny_cfg.MODEL.WEIGHTS = ""
    check_weights_file(tiny_cfg, resume=False)
    with pytest.raises(ValueError, match="--eval-only needs trained weights: MODEL.WEIGHTS is "
                                         "empty"):
        check_weights_file(tiny_cfg, resume=False, eval_only=True)


def test_train_net_refuses_missing_weights_up_front(repo_root, tmp_path: Path):
    command = [sys.executable, "train_net.py", "--config-file",
               "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml",
               "MODEL.WEIGHTS", str(tmp_path / "nope.pth"), "OUTPUT_DIR", str(tmp_path / "out")]
    env = dict(os.environ, BALANCED_RCNN_DATASETS=str(tmp_path / "datasets"))
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().endswith(
        f"train_net.py: error: MODEL.WEIGHTS '{tmp_path / 'nope.pth'}' does not exist")
    assert "Traceback" not in result.stderr
    log = result.stdout + result.stderr
    assert "Model:" not in log and "Starting training" not in log  # nothing was built
