"""tools/submit_slurm.py and reliability/submitit_job.py: the sbatch options, the per-node command,
one-line errors, and a 2-process CPU job through submitit's local executor that is preempted
(USR2, as SLURM sends it) mid-run, checkpoints, requeues and finishes at MAX_ITER."""

import importlib.util
import os
import re
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from training_harness.reliability.submitit_job import TrainingJob, last_checkpoint_iteration

REPO = Path(__file__).resolve().parents[1]
INSTANT = "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml"


def _tool():
    spec = importlib.util.spec_from_file_location("submit_slurm", REPO / "tools/submit_slurm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """sbatch and srun on PATH (never run: the tests only build the submission)."""
    for name in ("sbatch", "srun"):
        (tmp_path / name).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_sbatch_script_carries_every_cluster_option(fake_slurm, tmp_path):
    tool = _tool()
    args = tool.parse_args([
        "--config-file", "configs/swin_balanced.yaml", "--nodes", "2", "--gpus-per-node", "8",
        "--partition", "P", "--account", "A", "--qos", "Q", "--constraint", "volta32gb",
        "--time", "600", "--signal-delay", "150", "--sbatch", "mail-type=END", "--mem-gb", "400",
        "SOLVER.IMS_PER_BATCH", "32"])
    assert args.opts == ["SOLVER.IMS_PER_BATCH", "32"]
    executor = tool.build_executor(args, tmp_path / "jobs", "swin_balanced")
    script = executor._executor._make_submission_file_text("CMD", "uid")
    for line in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--cpus-per-task=80",
                 "--partition=P", "--account=A", "--qos=Q", "--constraint=volta32gb",
                 "--time=600", "--signal=USR2@150", "--mail-type=END", "--mem=400GB",
                 "--job-name=swin_balanced"):
        assert f"#SBATCH {line}\n" in script, line


class _Env(SimpleNamespace):
    pass


def test_every_node_runs_train_net_with_its_rank_and_one_dist_url():
    job = TrainingJob("train_net.py", ["--config-file", "c.yaml", "SOLVER.MAX_ITER", "9"], 8, "out")
    nodes = [_Env(num_nodes=2, node=n, job_id="4242", hostnames=["gpu-a", "gpu-b"]) for n in (0, 1)]
    commands = [job.command(env) for env in nodes]
    url = commands[0][commands[0].index("--dist-url") + 1]
    assert re.fullmatch(r"tcp://gpu-a:\d+", url)
    for rank, cmd in enumerate(commands):
        assert cmd[cmd.index("--machine-rank") + 1] == str(rank)
        assert cmd[cmd.index("--num-machines") + 1] == "2" and cmd[cmd.index("--num-gpus") + 1] == "8"
        assert cmd[cmd.index("--dist-url") + 1] == url  # the same on every node
        assert cmd[-2:] == ["SOLVER.MAX_ITER", "9"]  # the overrides stay last
    single = job.command(_Env(num_nodes=1, node=0, job_id="7", hostnames=["x"]))
    assert single[single.index("--dist-url") + 1] == "auto"


def test_checkpoint_requeues_with_resume_once(tmp_path):
    (tmp_path / "last_checkpoint").write_text("model_0000019.pth")
    assert last_checkpoint_iteration(str(tmp_path)) == 19
    job = TrainingJob("train_net.py", ["--config-file", "c.yaml", "K", "V"], 1, str(tmp_path))
    delayed = job.checkpoint()  # no process running: nothing to stop
    assert delayed.function is job and job.requeues == 1
    assert job.train_args == ["--resume", "--config-file", "c.yaml", "K", "V"]
    job.checkpoint()
    assert job.train_args.count("--resume") == 1 and job.requeues == 2


@pytest.mark.parametrize("argv,message", [
    (["--config-file", "nope.yaml"], "submit_slurm: --config-file nope.yaml does not exist"),
    (["--config-file", INSTANT, "SOLVER.BASE_LRR", "1"],
     "Non-existent key: SOLVER.BASE_LRR"),
    (["--config-file", INSTANT, "--cluster", "local", "--nodes", "2"],
     "submit_slurm: --cluster local runs on one node, got --nodes 2"),
    (["--config-file", INSTANT], "submit_slurm: sbatch and srun not on PATH: this is not a SLURM "
                                 "login node (--cluster local runs the job on this machine)"),
])
def test_errors_are_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(SystemExit) as exit_info:
        _tool().main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_bad_sbatch_option(fake_slurm, capsys):
    with pytest.raises(SystemExit):
        _tool().main(["--config-file", INSTANT, "--sbatch", "mail-type"])
    assert "submit_slurm: --sbatch 'mail-type': expected KEY=VALUE" in capsys.readouterr().err


def _children(pid: int):
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def test_preempted_two_process_job_requeues_and_finishes(tmp_path, monkeypatch):
    monkeypatch.setenv("BALANCED_RCNN_DATASETS", str(tmp_path / "datasets"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "out"
    job = _tool().main([
        "--config-file", INSTANT, "--cluster", "local", "--gpus-per-node", "2", "--time", "10",
        "--job-dir", str(tmp_path / "jobs"),
        "SOLVER.MAX_ITER", "40", "SOLVER.CHECKPOINT_PERIOD", "10", "DATASETS.TEST", "()",
        "HEALTH.PERIOD", "0", "OUTPUT_DIR", str(out)])
    # Preempt once training is past iteration 14: USR2 to the job's task, as SLURM sends it.
    deadline = time.monotonic() + 240
    log = out / "log.txt"
    while not (log.exists() and re.search(r"iter: (1[4-9]|[23]\d)", log.read_text())):
        assert time.monotonic() < deadline and job.state == "RUNNING", job.state
        time.sleep(0.2)
    (task,) = _children(int(job.job_id))  # the local controller's one task
    os.kill(task, signal.SIGUSR2)
    assert job.result() == 0

    text = log.read_text()
    stopped = int(re.search(r"Stopped by SIGTERM after iteration (\d+)", text).group(1))
    assert 14 <= stopped < 39
    # Resumed at the next iteration: nothing lost but the step in progress.
    assert f"Starting training from iteration {stopped + 1}" in text
    submitit_log = Path(job.paths.stderr).read_text()
    assert f"stopped at iteration {stopped}" in submitit_log
    assert f"(requeue 1): resuming from {out}/last_checkpoint, iteration {stopped}" in submitit_log
    # Every checkpoint of an uninterrupted run, plus the one written at the preemption.
    periodic = {f"model_{i:07d}.pth" for i in (9, 19, 29, 39)} | {"model_final.pth"}
    assert {p.name for p in out.glob("model_*.pth")} == periodic | {f"model_{stopped:07d}.pth"}
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    final = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == 39 and "roi_heads.box_predictor.cls_score.weight" in final["model"]
