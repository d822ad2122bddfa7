"""Per-thread state of activation fusion (soniq/_fuse.py): which packed layers their parent
block armed for its call of them, and the outputs those calls made (GELU applied)."""
from __future__ import annotations

import threading

_local = threading.local()


def state():
    """This thread's (armed layer ids, outputs an armed call made)."""
    st = getattr(_local, "st", None)
    if st is None:
        st = _local.st = (set(), [])
    return st


def take_arm(layer) -> bool:
    """Called by PackedLinear.forward: True (once) when its parent block armed it for this call."""
    armed = state()[0]
    if id(layer) in armed:
        armed.discard(id(layer))
        return True
    return False


def fused_output(out):
    """Records an output that has the fused GELU (its FusedActivation passes it through)."""
    state()[1].append(out)
    return out
