"""torch.distributed for QAT: which rank this process is, and rank 0's state for everyone.

Collectives run only when a default process group is initialized with more than one rank,
and then on every rank in the same order (as under DistributedDataParallel, where every
rank runs the same forward passes and calls freeze_precision)."""
from __future__ import annotations

import torch


def _active() -> bool:
    d = torch.distributed
    return d.is_available() and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    """This process's rank in the default group (0 without torch.distributed)."""
    return torch.distributed.get_rank() if _active() else 0


def broadcast_from_rank0(*tensors: torch.Tensor) -> None:
    """Overwrites each tensor in place with rank 0's values (no-op in a single process).
    Tensors must live where the backend expects them (CPU for gloo, CUDA for NCCL)."""
    if not _active():
        return
    with torch.no_grad():
        for t in tensors:
            torch.distributed.broadcast(t.data, src=0)
