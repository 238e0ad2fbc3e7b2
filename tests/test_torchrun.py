"""train_net.py under torchrun: each process torchrun starts is one worker, which joins the process
group from torchrun's environment; torch's elastic agent stops the workers when one fails."""
import os
import subprocess
import sys

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
