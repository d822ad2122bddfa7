"""The per-device kernels of soniq's torch ops, in one table that torch's dispatcher and the
eager fast paths both read.

Each op is defined once (torch.library.custom_op). Its body is what a device type without a
kernel of its own runs: a generic torch version, or `raise no_kernel(...)` naming the device.
`register(op, device_type)` gives it a kernel for one device type: the function goes to torch
(op.register_kernel) and into this table. The hot paths (mpgemm, quantize_pack) skip the
dispatcher in eager mode (it costs ~15-35 us a call) through `eager_kernel(op, device)`: the kernel
recorded here for that device type, else the op itself through the dispatcher. So a kernel
added for a new device type, here or with torch.library.register_kernel, runs in eager mode
too. A leaf module (torch only): the ops live in leaf modules of their own.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

_TABLE: dict = {}  # op (CustomOpDef) -> {device type: kernel}


def register(op, device_type: str, fn: Optional[Callable] = None, *, dispatched: Optional[Callable] = None):
    """Makes fn op's kernel for device_type ("cpu", "cuda", ...); usable as a decorator.
    dispatched: what torch's dispatcher runs instead of fn, where it needs the same kernel
    in another form (outputs that share no buffer: the dispatcher checks aliasing)."""
    def deco(f: Callable) -> Callable:
        op.register_kernel(device_type)(dispatched or f)
        _TABLE.setdefault(op, {})[device_type] = f
        return f
    return deco if fn is None else deco(fn)


def eager_kernel(op, device: torch.device) -> Callable:
    """The function an eager call of op on `device` runs: the kernel registered here for its
    device type, else op through torch's dispatcher (a kernel registered with torch alone,
    or the op's body)."""
    kernels = _TABLE.get(op)
    return kernels.get(device.type, op) if kernels else op


def device_types(op) -> list:
    """The device types op has a kernel for in this table."""
    return sorted(_TABLE.get(op, {}))


def no_kernel(op, name: str, device: torch.device) -> NotImplementedError:
    """The error of an op body reached on a device type without a kernel."""
    have = ", ".join(device_types(op)) or "none"
    return NotImplementedError(f"{name} has no kernel for device '{device}' (device types with one: {have}); "
                               f"move the tensors to one of those")
