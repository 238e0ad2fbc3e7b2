"""One training run per OUTPUT_DIR: a lock held for the whole run, taken over from a dead
holder, and no fresh start into a folder that holds a run's checkpoints."""

import errno
import fcntl
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from training_harness.errors import OutputDirError
from training_harness.reliability.output_dir import (
    LOCK_FILE,
    claim_output_dir,
    release_output_dir,
    remove_earlier_run,
)

from conftest import TINY_CONFIG

# A process that takes the lock, says so, and waits for stdin to close.
HOLDER = textwrap.dedent("""
    import sys
    from training_harness.reliability.output_dir import claim_output_dir
    claim_output_dir(sys.argv[1], resume=False, holder="process 4242 on host h")
    print("locked", flush=True)
    sys.stdin.read()
""")


def _hold(folder: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(
        tmp_path, caplog):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(OutputDirError) as info:
            claim_output_dir(str(tmp_path), resume=True)
        assert str(info.value) == (
            f"OUTPUT_DIR '{tmp_path}' is in use by another training run (process 4242 on host h; "
            f"lock file {tmp_path / LOCK_FILE}). Wait for it to end or stop it, or set another "
            "OUTPUT_DIR. If that process is gone (a machine that crashed, on a network file "
            "system), delete the lock file.")
    finally:
        holder.kill()  # as the OOM killer would: no clean-up
        holder.wait()
    try:
        with caplog.at_level("INFO"):
            claim_output_dir(str(tmp_path), resume=True)
        assert f"Taking over {tmp_path / LOCK_FILE}, last held by process 4242 on host h" in \
            caplog.text
        assert (tmp_path / LOCK_FILE).read_text().startswith(f"process {os.getpid()} on host ")
        claim_output_dir(str(tmp_path), resume=True)  # held by this process already: no-op
        (tmp_path / "model_final.pth").write_text("x")
        with pytest.raises(OutputDirError, match="already holds the checkpoints of a run"):
            claim_output_dir(str(tmp_path), resume=False)  # still checked
    finally:
        release_output_dir(str(tmp_path))


def test_a_file_system_without_locks_is_warned_about(tmp_path, caplog, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    try:
        with caplog.at_level("WARNING"):
            claim_output_dir(str(tmp_path), resume=False)
    finally:
        release_output_dir(str(tmp_path))
    assert (f"Cannot lock {tmp_path / LOCK_FILE} (No locks available): this file system has no "
            "locks, so a second run into this OUTPUT_DIR would not be refused.") in caplog.text


def test_fresh_start_into_a_folder_with_checkpoints_is_refused_or_overwritten(tmp_path, caplog):
    folder = tmp_path / "out"
    folder.mkdir()
    for name in ("model_0000004.pth", "model_final.pth", "metrics.json", "config.yaml"):
        (folder / name).write_text("x")
    (folder / "last_checkpoint").write_text("model_final.pth")
    # Each claim below runs in a child process: this one would hold the lock after the first.
    claim = ("import sys; from training_harness.reliability.output_dir import claim_output_dir; "
             "claim_output_dir(sys.argv[1], resume=sys.argv[2] == 'resume', "
             "overwrite=sys.argv[3] == 'overwrite')")

    def run(*flags):
        return subprocess.run([sys.executable, "-c", claim, str(folder), *flags],
                              capture_output=True, text=True)

    refused = run("fresh", "keep")
    assert refused.returncode == 1
    assert (f"OutputDirError: OUTPUT_DIR '{folder}' already holds the checkpoints of a run "
            "(last_checkpoint, model_0000004.pth, model_final.pth). Continue that run with "
            "--resume, or start a new one in another OUTPUT_DIR (RELIABILITY.OVERWRITE_OUTPUT "
            "True deletes the old checkpoints instead).") in refused.stderr
    assert run("resume", "keep").returncode == 0
    assert run("fresh", "overwrite").returncode == 0
    assert (folder / "model_final.pth").exists()  # deleted only once set-up has passed:
    remove_earlier_run(str(folder), keep=[str(folder / "model_0000004.pth")])
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE, "config.yaml",
                                                        "model_0000004.pth"]
    assert "keeping " + str(folder / "model_0000004.pth") + ", the MODEL.WEIGHTS" in caplog.text


def test_resume_into_checkpoints_without_their_tag_is_refused_naming_the_newest(tmp_path):
    folder = tmp_path / "copied"
    folder.mkdir()
    for age, name in enumerate(("model_final.pth", "model_0000499.pth", "model_0000999.pth")):
        (folder / name).write_text("x")
        os.utime(folder / name, (1_000_000 - age, 1_000_000 - age))  # model_final is newest
    claim = ("import sys; from training_harness.reliability.output_dir import claim_output_dir; "
             "claim_output_dir(sys.argv[1], resume=True)")
    refused = subprocess.run([sys.executable, "-c", claim, str(folder)], capture_output=True,
                             text=True)
    assert refused.returncode == 1
    assert (f"OutputDirError: --resume: OUTPUT_DIR '{folder}' holds 3 checkpoint(s), the newest "
            "model_final.pth, but no last_checkpoint naming the one to continue from, so this run "
            "would start from MODEL.WEIGHTS at iteration 0 and overwrite them. To continue from "
            f"model_final.pth: echo model_final.pth > {folder / 'last_checkpoint'}, then rerun "
            "with --resume. To start anew, use another OUTPUT_DIR.") in refused.stderr
    assert sorted(p.name for p in folder.iterdir()) == [
        LOCK_FILE, "model_0000499.pth", "model_0000999.pth", "model_final.pth"]


@pytest.mark.parametrize("num_gpus", [1, 2])
def test_train_net_refuses_a_second_run_before_writing_anything(repo_root, tmp_path, num_gpus):
    out = tmp_path / "out"
    holder = _hold(out)
    try:
        command = [sys.executable, "train_net.py", "--config-file", f"configs/{TINY_CONFIG}",
                   "--num-gpus", str(num_gpus), "OUTPUT_DIR", str(out)]
        env = dict(os.environ, BALANCED_RCNN_DATASETS=str(tmp_path / "datasets"),
                   OMP_NUM_THREADS="1")
        # Two workers: the main worker's refusal stops the other one at once (without it, the
        # other would wait in its first collective for RELIABILITY.COLLECTIVE_TIMEOUT_MIN).
        result = subprocess.run(command, cwd=repo_root, env=env, capture_output=True,
                                text=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 1, result.stderr[-3000:]
    assert f"OutputDirError: OUTPUT_DIR '{out}' is in use by another training run" in \
        result.stderr
    assert "Traceback" not in result.stderr  # one line per worker, and the launcher's
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no config.yaml, no log.txt
