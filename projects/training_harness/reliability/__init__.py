"""What keeps an interrupted or broken run resumable and its results trustworthy
(docs/reliability.md): atomic checkpoints that must fit the model, a checkpoint on SIGTERM /
Ctrl-C, the DDP peer watchdog, the launcher, and the lock on the output folder."""

from .checkpoint import AtomicCheckpointer
from .launch import launch, refused_together
from .output_dir import claim_output_dir
from .signals import CheckpointOnSignal
from .watchdog import PeerWatchdog, PeerWatchdogHook

__all__ = ["AtomicCheckpointer", "CheckpointOnSignal", "PeerWatchdog", "PeerWatchdogHook",
           "claim_output_dir", "launch", "refused_together"]
