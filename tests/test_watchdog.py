"""
DDP: a worker whose peer is gone exits in bounded time, naming the peer.

The watchdog's rules on an in-memory store (a peer that stops beating, a failed collective, a
peer that left normally, rank 0's store going away), then two train_net.py "machines" of one
worker each on the CPU (gloo): one worker is killed, the other must exit with code 75 and a
message within seconds. Two machines, not one launcher with two workers: detectron2's launcher
stops its other local workers itself, but nothing stops the workers on other machines.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List

import torch.distributed as dist
from training_harness.errors import EXIT_PEER_LOST
from training_harness.reliability.watchdog import PeerWatchdog

PERIOD = 0.05  # heartbeat period of the in-memory tests


def _watchdogs(store, timeout_s: float = 1.0, world_size: int = 2) -> List[PeerWatchdog]:
    lost: List[str] = []
    dogs = [PeerWatchdog(store, r, world_size, timeout_s, on_lost=lost.append, period_s=PERIOD)
            for r in range(world_size)]
    for dog in dogs:
        dog.start()
    return dogs


def test_a_peer_that_stops_beating_is_lost_after_the_timeout():
    first, second = _watchdogs(dist.HashStore())
    time.sleep(0.3)
    assert first.lost is None and second.lost is None
    second.stop()  # as if its process had been killed or frozen
    start = time.monotonic()
    while first.lost is None:
        assert time.monotonic() - start < 5
        time.sleep(PERIOD)
    assert 1.0 <= time.monotonic() - start < 2.0
    assert first.lost.startswith("Worker rank 0: lost worker rank 1, no heartbeat for 1 s. It has "
                                 "exited, was killed or is frozen; see its log (log.txt.rank1 in "
                                 "OUTPUT_DIR). Exiting with code 75 instead of waiting in a "
                                 "collective (RELIABILITY.PEER_TIMEOUT_S = 1)")
    first.stop()


def test_after_a_failed_collective_the_verdict_takes_a_few_heartbeats():
    first, second = _watchdogs(dist.HashStore(), timeout_s=60.0)
    time.sleep(0.2)
    start = time.monotonic()
    assert first.await_verdict() is None  # both alive: the error is not a lost peer
    assert time.monotonic() - start < 0.5
    second.stop()
    start = time.monotonic()
    message = first.await_verdict()
    assert time.monotonic() - start < 1.0  # not the 60 s timeout
    assert message.startswith("Worker rank 0: lost worker rank 1, no heartbeat for 0 s (a "
                              "collective with it failed).")
    first.stop()


def test_a_peer_that_left_normally_is_not_reported():
    first, second = _watchdogs(dist.HashStore(), timeout_s=0.5)
    time.sleep(0.2)
    second.mark_done()
    time.sleep(1.0)
    assert first.lost is None and first.await_verdict() is None
    first.stop()


class _Rank0Store:
    """rank 0's store seen from rank 1: it stops answering when rank 0 dies."""

    def __init__(self):
        self.store, self.alive = dist.HashStore(), True

    def __getattr__(self, name):
        if not self.__dict__["alive"]:
            raise RuntimeError("Connection reset by peer")
        return getattr(self.__dict__["store"], name)


def test_rank_0_gone_with_its_store_is_lost():
    store = _Rank0Store()
    first, second = _watchdogs(store, timeout_s=60.0)
    first.stop()
    store.alive = False
    assert second.await_verdict().startswith(
        "Worker rank 1: lost worker rank 0, no heartbeat for 0 s (the store it hosts is "
        "unreachable: Connection reset by peer).")
    second.stop()


PINNED_STORE = """
import datetime, sys
import torch.distributed as dist
from training_harness.reliability.watchdog import _KEY_PREFIX, _own_store_connection

port = int(sys.argv[1])
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
base = dist.distributed_c10d._get_default_store()
while isinstance(base, dist.PrefixStore):
    base = base.underlying_store
assert isinstance(base, dist.TCPStore), type(base)  # else the watchdog shares the main one's
own = _own_store_connection(datetime.timedelta(seconds=5))
own.set("0", "7")
client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=5))
print(dist.PrefixStore(_KEY_PREFIX, client).get("0").decode())
dist.destroy_process_group()
"""


def test_the_watchdog_reaches_the_tcp_store_of_the_process_group():
    """Pins what the watchdog takes from torch's private _get_default_store: under a tcp://
    init_method, the default group's store wraps the TCPStore that rank 0 hosts, so that a
    connection of the watchdog's own reaches the same keys."""
    result = subprocess.run([sys.executable, "-c", PINNED_STORE, str(_free_port())],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "7"


# ---- two train_net.py processes ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> List[int]:
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            # ppid is the 2nd field after the parenthesized command name.
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmdline:
                children.append(int(entry))
    return children


def test_killing_one_worker_makes_the_other_exit_75_in_seconds(repo_root, tmp_path):
    output = tmp_path / "output"
    port = _free_port()
    env = dict(os.environ, BALANCED_RCNN_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    machines, logs = [], []
    for rank in (0, 1):
        logs.append(tmp_path / f"machine{rank}.log")
        command = [sys.executable, "train_net.py", "--config-file",
                   "configs/quick_schedules/swin_tiny_balanced_instant_test.yaml",
                   "--num-gpus", "1", "--num-machines", "2", "--machine-rank", str(rank),
                   "--dist-url", f"tcp://127.0.0.1:{port}",
                   # A timeout far above the verdict's few seconds: the test sees which rule fired.
                   "RELIABILITY.PEER_TIMEOUT_S", "60.0", "SOLVER.MAX_ITER", "1000",
                   "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()",
                   "OUTPUT_DIR", str(output)]
        with open(logs[-1], "w") as log:
            machines.append(subprocess.Popen(command, cwd=repo_root, env=env, stdout=log,
                                             stderr=subprocess.STDOUT))
    try:
        deadline = time.monotonic() + 240
        while not (output / "model_0000001.pth").exists():  # both workers are training
            assert all(m.poll() is None for m in machines), logs[0].read_text()[-3000:]
            assert time.monotonic() < deadline, logs[0].read_text()[-3000:]
            time.sleep(0.05)
        (worker,) = _children(machines[1].pid)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        assert machines[0].wait(timeout=120) == EXIT_PEER_LOST
        elapsed = time.monotonic() - killed
        assert machines[1].wait(timeout=60) == 128 + signal.SIGKILL
    finally:
        for machine in machines:
            if machine.poll() is None:
                machine.kill()
    survivor = logs[0].read_text()
    assert elapsed < 30, elapsed
    assert "Worker rank 0: lost worker rank 1, no heartbeat for" in survivor
    assert "(a collective with it failed)" in survivor
    assert ("launch: worker rank 0 (pid " in survivor and "exited with code 75; any other "
            "workers of this machine were stopped. Exit code 75" in survivor)
    assert f"launch: worker rank 1 (pid {worker}) was killed by SIGKILL" in logs[1].read_text()
