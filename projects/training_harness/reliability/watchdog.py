"""
DDP: when a worker dies, the others exit with a message that names it, in bounded time.

What a dead peer does to the others depends on the backend. gloo (CPU) sees the connection close
and raises at once ("Connection closed by peer"), after which the interpreter aborts at exit
(SIGABRT) with nothing that says which worker died. NCCL (GPU) waits in the collective until its
timeout (RELIABILITY.COLLECTIVE_TIMEOUT_MIN, 30 min by default). detectron2's launch() stops the
other workers of its own machine when one dies, but not those on other machines. What the
libraries lack here: torchrun's elastic agent acts on a worker that exits, not on one that
freezes; ``dist.monitored_barrier`` names a late rank only at a barrier the code calls (gloo
only); NCCL's watchdog fires at the collective timeout.

:class:`PeerWatchdog` is a daemon thread started with training on every worker. Every heartbeat
period (1 s, shorter for short timeouts) it adds 1 to this worker's counter in a key-value store
(a connection of its own to the TCPStore of the process group, which rank 0 hosts) and reads the
other workers' counters. A peer is **lost** when its counter has not moved for
RELIABILITY.PEER_TIMEOUT_S seconds, or when the store stays unreachable that long (rank 0 is then
gone). The thread logs which rank, since when and what to do, and ends the process with
:data:`EXIT_PEER_LOST` through ``os._exit``: the main thread may be stuck in a collective that
Python cannot interrupt. The counters are bumped by a thread, so a peer that is busy (a long
evaluation, a slow checkpoint write) keeps beating; only a dead or frozen process stops.

When a collective fails in the training loop (gloo's immediate error), :class:`PeerWatchdogHook`
asks for a verdict before the error propagates: every peer must beat again within a few
heartbeats (or have left training normally); one that does not is reported as lost, as above.
An error with all peers alive propagates unchanged.

A worker that leaves training normally (finished, or stopped by a signal with a checkpoint) sets
its counter to -1, "done": the others then no longer expect heartbeats from it.
"""

import contextlib
import datetime
import logging
import os
import sys
import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch.distributed as dist
from detectron2.engine import HookBase
from detectron2.utils import comm

from ..errors import EXIT_PEER_LOST, PeerLostError

__all__ = ["PeerWatchdog", "PeerWatchdogHook", "exit_peer_lost"]

logger = logging.getLogger(__name__)

_KEY_PREFIX = "balanced_rcnn/heartbeat/"
_DONE = -1
# After a failed collective, peers that do not beat within this many heartbeats are lost.
_VERDICT_BEATS = 5


def exit_peer_lost(message: str) -> None:
    """Log ``message`` and end the process with EXIT_PEER_LOST, whatever the main thread does."""
    logger.error(message)
    # os._exit skips the interpreter's exit, which would flush and close the log handlers.
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream must not keep the process alive
            stream.flush()
    os._exit(EXIT_PEER_LOST)


def _own_store_connection(timeout: datetime.timedelta) -> dist.Store:
    """A connection to the default process group's store that only the watchdog uses, with its
    own timeout (the group's is the collective timeout, minutes)."""
    store = dist.distributed_c10d._get_default_store()
    base = store
    while isinstance(base, dist.PrefixStore):
        base = base.underlying_store
    if isinstance(base, dist.TCPStore):
        base = dist.TCPStore(base.host, base.port, is_master=False, timeout=timeout,
                             wait_for_workers=False)
    # Other stores (file://) are shared with the main thread; their ops are thread-safe.
    return dist.PrefixStore(_KEY_PREFIX, base)


class PeerWatchdog:
    """The heartbeat thread of the module docstring; one per worker."""

    def __init__(
        self,
        store: dist.Store,
        rank: int,
        world_size: int,
        timeout_s: float,
        on_lost: Callable[[str], None] = exit_peer_lost,
        period_s: Optional[float] = None,
    ):
        """
        Args:
            store: a key-value store shared by all workers (its keys are this watchdog's own).
            rank, world_size: this worker's rank and the number of workers.
            timeout_s: seconds without a heartbeat after which a peer is lost.
            on_lost: called with the message when a peer is lost; the default exits.
            period_s: heartbeat period; default min(1 s, timeout_s / 5).
        """
        if not timeout_s > 0:
            raise ValueError(f"RELIABILITY.PEER_TIMEOUT_S must be > 0, got {timeout_s}")
        self._store = store
        self.rank = rank
        self.peers = [r for r in range(world_size) if r != rank]
        self.timeout_s = float(timeout_s)
        self.period_s = period_s if period_s is not None else min(1.0, self.timeout_s / 5)
        self._on_lost = on_lost
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()
        self._checked = threading.Condition(self._lock)  # notified after every check
        # rank -> (last counter value seen, monotonic time it last changed)
        self._seen: Dict[int, Tuple[int, float]] = {}
        self._store_ok_at = time.monotonic()
        # While a verdict is requested: when, and the counters of the first check after that.
        self._verdict_since: Optional[float] = None
        self._baseline: Optional[Dict[int, int]] = None
        self._verdict_alive = False
        self.lost: Optional[str] = None

    @classmethod
    def for_process_group(cls, timeout_s: float, **kwargs) -> "PeerWatchdog":
        """A watchdog over the workers of the default process group."""
        store = _own_store_connection(datetime.timedelta(seconds=max(timeout_s, 1.0)))
        return cls(store, dist.get_rank(), dist.get_world_size(), timeout_s, **kwargs)

    @staticmethod
    def _key(rank: int) -> str:
        return str(rank)

    def start(self) -> None:
        """Beat once, take every peer's counter as a baseline, start the thread."""
        self._store.add(self._key(self.rank), 1)
        now = time.monotonic()
        for peer in self.peers:
            # add(key, 0) creates a missing key at 0 and returns the current value.
            self._seen[peer] = (self._store.add(self._key(peer), 0), now)
        self._store_ok_at = now
        self._thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def mark_done(self) -> None:
        """This worker leaves training normally: peers stop expecting heartbeats from it."""
        self.stop()
        try:
            self._store.set(self._key(self.rank), str(_DONE))
        except Exception:  # rank 0, which hosts the store, may have left already
            pass

    def _run(self) -> None:
        while not self._stop.wait(self.period_s) and self.lost is None:
            self.check()

    def check(self) -> None:
        """One heartbeat: beat, read the peers' counters, judge (public for tests)."""
        started = time.monotonic()
        try:
            self._store.add(self._key(self.rank), 1)
            raw = self._store.multi_get([self._key(p) for p in self.peers])
            values: Optional[List[int]] = [int(v) for v in raw]
            error = None
        except Exception as e:  # rank 0's process, which hosts the store, is gone or frozen
            values, error = None, e
        with self._lock:
            message = self._judge(started, time.monotonic(), values, error)
        if message is not None:
            # Before anyone is told: the default on_lost ends the process here, and a main thread
            # woken first would race it to the exit with the original error.
            self._on_lost(message)
        with self._lock:
            self.lost = self.lost or message
            self._checked.notify_all()

    def _judge(self, started: float, now: float, values: Optional[List[int]],
               error: Optional[Exception]) -> Optional[str]:
        """The message for a lost peer, or None. Called with the lock held."""
        urgent = self._verdict_since is not None
        overdue = urgent and now - self._verdict_since >= _VERDICT_BEATS * self.period_s
        if values is None:
            if self.rank == 0 or self._seen[0][0] == _DONE:
                self._stop.set()  # rank 0 left normally, and its store with it: nothing to watch
                return None
            silent = now - self._store_ok_at
            if silent >= self.timeout_s or overdue:
                return self._message(0, silent, f"the store it hosts is unreachable: {error}")
            return None
        self._store_ok_at = now
        for peer, value in zip(self.peers, values):
            if value != self._seen[peer][0]:
                self._seen[peer] = (value, now)
        # Normal watch: a counter that has not moved for the timeout.
        for peer in self.peers:
            value, changed_at = self._seen[peer]
            if value != _DONE and now - changed_at >= self.timeout_s:
                return self._message(peer, now - changed_at)
        if not urgent:
            return None
        # Verdict: counters read entirely after the request are the baseline; each peer must
        # move past it (or be done) within _VERDICT_BEATS heartbeats.
        current = dict(zip(self.peers, values))
        if self._baseline is None:
            if started > self._verdict_since:
                self._baseline = current
            return None
        behind = [p for p in self.peers if current[p] != _DONE and current[p] <= self._baseline[p]]
        if not behind:
            self._verdict_alive = True
        elif overdue:
            peer = behind[0]
            return self._message(peer, now - self._seen[peer][1], "a collective with it failed")
        return None

    def _message(self, peer: int, silent: float, why: str = "") -> str:
        log_file = "log.txt" if peer == 0 else f"log.txt.rank{peer}"
        return (
            f"Worker rank {self.rank}: lost worker rank {peer}, no heartbeat for {silent:.0f} s"
            f"{' (' + why + ')' if why else ''}. It has exited, was killed or is frozen; see its "
            f"log ({log_file} in OUTPUT_DIR). Exiting with code {EXIT_PEER_LOST} instead of "
            "waiting in a collective (RELIABILITY.PEER_TIMEOUT_S = "
            f"{self.timeout_s:g}); restart the job with --resume to continue from the last "
            "checkpoint."
        )

    def await_verdict(self) -> Optional[str]:
        """
        After a failed collective: wait until every peer has beaten again (returns None) or one
        is lost (``on_lost`` is called, which exits by default; returns its message).
        """
        if self._thread is None:
            return self.lost
        with self._lock:
            self._verdict_since = time.monotonic()
            self._baseline, self._verdict_alive = None, False
            deadline = self._verdict_since + (_VERDICT_BEATS + 2) * self.period_s + 1.0
            while self.lost is None and not self._verdict_alive:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._checked.wait(remaining)
            self._verdict_since = None
            return self.lost


class PeerWatchdogHook(HookBase):
    """
    Runs a :class:`PeerWatchdog` during training (DDP only). Register it last: its
    ``after_train`` then comes after the final evaluation, which it watches too, and the other
    hooks' ``after_train`` use no collective on a failed run.
    """

    def __init__(self, timeout_s: float):
        self._timeout_s = timeout_s
        self.watchdog: Optional[PeerWatchdog] = None

    def before_train(self) -> None:
        if comm.get_world_size() > 1 and self._timeout_s > 0:
            self.watchdog = PeerWatchdog.for_process_group(self._timeout_s)
            self.watchdog.start()

    def after_train(self) -> None:
        if self.watchdog is None:
            return
        error = sys.exc_info()[1]  # what is ending training, if anything
        if error is None or not isinstance(error, Exception):
            # Finished, or stopped at the same step as every other worker (TrainingInterrupted
            # is a SystemExit): the others may see this process exit without alarm.
            self.watchdog.mark_done()
            return
        # The thread keeps running: it also covers a process that then hangs on its way out.
        message = self.watchdog.await_verdict()
        if message is not None:
            raise PeerLostError(message) from error
