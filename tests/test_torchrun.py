"""train_net.py under torchrun: each process torchrun starts is one worker, which joins the process
group from torchrun's environment; torch's elastic agent stops the workers when one fails."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict

from conftest import TINY_CONFIG

SHORT_RUN = ["SOLVER.MAX_ITER", "2", "HEALTH.PERIOD", "0", "TEST.EVAL_PERIOD", "0",
             "DATASETS.TEST", "()"]


def _torchrun(repo_root, tmp_path, *args):
    env = dict(os.environ, BALANCED_RCNN_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "train_net.py", "--config-file", f"configs/{TINY_CONFIG}",
               *args]
    result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True, text=True,
                            timeout=300)
    return result, result.stdout + result.stderr


def test_two_workers_under_torchrun_train_and_save(repo_root, tmp_path):
    output = tmp_path / "out"
    result, log = _torchrun(repo_root, tmp_path, *SHORT_RUN, "OUTPUT_DIR", str(output))
    assert result.returncode == 0, log[-4000:]
    assert "Rank of current process: 0. World size: 2" in log
    assert (output / "log.txt.rank1").is_file()  # the second worker set itself up too
    assert (output / "model_final.pth").is_file()


def test_num_gpus_under_torchrun_is_refused(repo_root, tmp_path):
    result, log = _torchrun(repo_root, tmp_path, "--num-gpus", "2", *SHORT_RUN,
                            "OUTPUT_DIR", str(tmp_path / "out"))
    assert result.returncode != 0
    assert ("train_net.py: error: under torchrun, each process is one worker: give the workers "
            "to torchrun (--nproc-per-node, --nnodes), not --num-gpus or --num-machines") in log
    assert not (tmp_path / "out").exists()


def _torchrun_workers(agent_pid: int) -> Dict[int, int]:
    """rank -> pid of the train_net.py workers that the torchrun agent started."""
    workers = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        # ppid is the 2nd field after the parenthesized command name.
        if int(stat.rsplit(")", 1)[1].split()[1]) == agent_pid and b"train_net.py" in cmdline:
            rank = next(int(v[5:]) for v in environ if v.startswith(b"RANK="))
            workers[rank] = int(entry)
    return workers


def test_a_killed_worker_stops_the_torchrun_job_naming_it(repo_root, tmp_path):
    output = tmp_path / "out"
    env = dict(os.environ, BALANCED_RCNN_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    log_file = tmp_path / "torchrun.log"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", "train_net.py", "--config-file", f"configs/{TINY_CONFIG}",
               "SOLVER.MAX_ITER", "1000", "SOLVER.CHECKPOINT_PERIOD", "2", "HEALTH.PERIOD", "0",
               "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()", "OUTPUT_DIR", str(output)]
    with open(log_file, "w") as log:
        agent = subprocess.Popen(command, cwd=repo_root, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (output / "model_0000001.pth").exists():  # both workers are training
            assert agent.poll() is None, log_file.read_text()[-3000:]
            assert time.monotonic() < deadline, log_file.read_text()[-3000:]
            time.sleep(0.05)
        workers = _torchrun_workers(agent.pid)
        assert sorted(workers) == [0, 1]
        worker = workers[1]
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        status = agent.wait(timeout=120)
        elapsed = time.monotonic() - killed
    finally:
        if agent.poll() is None:
            agent.kill()
    log = log_file.read_text()
    # torch's elastic agent stops the other worker and reports the one that failed.
    assert status == 1, log[-3000:]
    assert elapsed < 60, elapsed
    assert "local_rank: 1" in log and "exitcode  : -9" in log, log[-3000:]
    assert f"Signal 9 (SIGKILL) received by PID {worker}" in log
    # No worker outlives the job (the agent's children are reaped by then, or soon after).
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in workers.values()):
        assert time.monotonic() < deadline, "a torchrun worker outlived the job"
        time.sleep(0.1)
    # The last periodic checkpoint is complete: --resume continues from it.
    last = (output / "last_checkpoint").read_text().strip()
    assert (output / last).is_file()
