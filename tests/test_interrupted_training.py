"""
A real training run (train_net.py in a subprocess) killed again and again, resumed each time with
--resume, until it reaches MAX_ITER:

1. SIGKILL in the middle of writing a checkpoint (the test slows that one torch.save down through a
   sitecustomize module on PYTHONPATH; the product has no test hook);
2. SIGTERM: a checkpoint of the step in progress, exit code 143;
3. SIGKILL at an arbitrary moment;
4. to the end: the final checkpoint is complete and loads into the model.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import torch
from training_harness import GuardedTrainer
from training_harness.reliability.checkpoint import AtomicCheckpointer

CONFIG = "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml"
MAX_ITER, PERIOD = 12, 2  # checkpoints after iterations 1, 3, 5, 7, 9, 11

# Imported by Python at start-up (sitecustomize) when its folder is on PYTHONPATH.
SLOW_SAVE = '''
import io, os, time
import torch

_save = torch.save


def _slow_save(obj, f, *args, **kwargs):
    """Writes half of the checkpoint whose file name contains $SLOW_SAVE_MATCH, says so in
    $SLOW_SAVE_MARKER, then waits to be killed."""
    name = os.path.basename(str(getattr(f, "name", "")))
    if os.environ["SLOW_SAVE_MATCH"] not in name:
        return _save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    _save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    f.write(data[: len(data) // 2])
    f.flush()
    with open(os.environ["SLOW_SAVE_MARKER"], "w") as marker:
        marker.write(name)
    time.sleep(600)
    f.write(data[len(data) // 2:])


torch.save = _slow_save
'''


class _Run:
    """train_net.py running in the background, its output in a file."""

    def __init__(self, repo_root: Path, tmp_path: Path, output: Path, args: List[str], **env):
        self.log_file = tmp_path / f"run{len(list(tmp_path.glob('run*.log')))}.log"
        command = [sys.executable, "train_net.py", "--config-file", CONFIG, *args,
                   "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD),
                   "DATASETS.TEST", "()", "OUTPUT_DIR", str(output)]
        environment = dict(os.environ, BALANCED_RCNN_DATASETS=str(tmp_path / "datasets"), **env)
        with open(self.log_file, "w") as log:
            self.process = subprocess.Popen(command, cwd=repo_root, env=environment,
                                            stdout=log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_file.read_text()

    def wait_for(self, condition: Callable[[], bool], timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.process.poll() is None, f"exited early:\n{self.log()[-5000:]}"
            assert time.monotonic() < deadline, f"timed out:\n{self.log()[-5000:]}"
            time.sleep(0.02)

    def stop(self, signum: int) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=240)


def _last(output: Path) -> str:
    return (output / "last_checkpoint").read_text()


def _iteration(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["iteration"]


def test_killed_three_times_resumes_to_max_iter(repo_root, tmp_path, tiny_cfg):
    output = tmp_path / "output"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_SAVE)
    marker = tmp_path / "saving"

    # 1. SIGKILL while model_0000003.pth is half written.
    run = _Run(repo_root, tmp_path, output, [], PYTHONPATH=str(site),
               SLOW_SAVE_MATCH="model_0000003.pth", SLOW_SAVE_MARKER=str(marker))
    run.wait_for(marker.exists)
    assert run.stop(signal.SIGKILL) == -signal.SIGKILL
    assert _last(output) == "model_0000001.pth"  # the last complete checkpoint
    assert not (output / "model_0000003.pth").exists()
    assert [p.name for p in output.glob(".model_0000003.pth.tmp-*")]  # the half-written file
    assert _iteration(output / "model_0000001.pth") == 1

    # 2. --resume, then SIGTERM once training is past model_0000005.pth.
    run = _Run(repo_root, tmp_path, output, ["--resume"])
    run.wait_for((output / "model_0000005.pth").exists)
    assert run.stop(signal.SIGTERM) == 143
    log = run.log()
    assert "Starting training from iteration 2" in log
    assert "Received SIGTERM: training stops after the current step, with a checkpoint" in log
    assert not list(output.glob(".*.tmp-*"))  # debris of the killed write removed
    stopped_at = _iteration(output / _last(output))
    assert _last(output) == f"model_{stopped_at:07d}.pth" and 5 <= stopped_at < MAX_ITER - 1
    assert (f"Stopped by SIGTERM after iteration {stopped_at}: checkpoint "
            f"{output / _last(output)}. Exit code 143; rerun with --resume") in log

    # 3. --resume, SIGKILL one second into training: wherever the run is then.
    run = _Run(repo_root, tmp_path, output, ["--resume"])
    run.wait_for(lambda: f"Starting training from iteration {stopped_at + 1}" in run.log())
    time.sleep(1.0)
    run.stop(signal.SIGKILL)
    killed_at = _iteration(output / _last(output))  # whatever was complete
    assert killed_at >= stopped_at

    # 4. --resume to the end.
    run = _Run(repo_root, tmp_path, output, ["--resume"])
    assert run.process.wait(timeout=300) == 0, run.log()[-5000:]
    assert f"Starting training from iteration {killed_at + 1}" in run.log()
    assert _last(output) == "model_final.pth"
    final = output / "model_final.pth"
    assert _iteration(final) == MAX_ITER - 1
    model = GuardedTrainer.build_model(tiny_cfg)
    extra = AtomicCheckpointer(model).load(str(final))  # refuses a damaged file
    assert extra["iteration"] == MAX_ITER - 1
    saved = torch.load(final, map_location="cpu", weights_only=False)["model"]
    loaded = model.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
