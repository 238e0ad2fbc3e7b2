"""
Training scalars that are still tensors (possibly on the GPU).

``EventStorage.put_scalar`` converts its value with ``float()``, a host-device synchronization.
Heads call :func:`put_tensor_scalars` instead, which only keeps detached tensors; the trainer
calls :func:`flush_tensor_scalars` once per step, which moves them all to the host in one
transfer and hands them to ``EventStorage``.
"""
from typing import Dict, Optional

import torch
from detectron2.utils.events import EventStorage, get_event_storage

_PENDING_ATTR = "_balanced_rcnn_pending_scalars"


def _pending(storage: EventStorage) -> Dict[str, torch.Tensor]:
    pending = getattr(storage, _PENDING_ATTR, None)
    if pending is None:
        pending = {}
        setattr(storage, _PENDING_ATTR, pending)
    return pending


def current_storage() -> Optional[EventStorage]:
    """The EventStorage in use, or None outside one (a loss called in a test or an analysis)."""
    try:
        return get_event_storage()
    except AssertionError:  # detectron2's way of saying there is none
        return None


def put_tensor_scalars(**scalars: torch.Tensor) -> None:
    """Record 0-dim tensors under their names for the current iteration (no synchronization);
    outside an EventStorage, nothing (as detectron2's losses log nothing without one)."""
    storage = current_storage()
    if storage is None:
        return
    pending = _pending(storage)
    for name, value in scalars.items():
        pending[name] = value.detach().reshape(())


def pending_tensor_scalar(name: str, storage: EventStorage = None) -> Optional[torch.Tensor]:
    """The tensor recorded under ``name`` in this step and not yet flushed, or None."""
    return _pending(storage if storage is not None else get_event_storage()).get(name)


def flush_tensor_scalars(storage: EventStorage = None) -> Dict[str, float]:
    """Write every pending tensor scalar to ``storage`` with one device-to-host copy."""
    storage = storage if storage is not None else get_event_storage()
    pending = _pending(storage)
    if not pending:
        return {}
    names = list(pending)
    values = torch.stack([pending[n].to(torch.float32) for n in names]).cpu().tolist()
    pending.clear()
    flushed = dict(zip(names, values))
    storage.put_scalars(**flushed)
    return flushed
