"""soniq's torch ops have one kernel per device type, registered once (soniq/_op_kernels.py):
torch's dispatcher and the eager fast paths (which skip it) run the same kernel, a kernel
added for another device type runs in eager mode too, and a device type with no kernel is a
clear error naming it."""
import numpy as np
import pytest
import torch

from soniq import _op_kernels, ops
from soniq._op_kernels import eager_kernel, register
from soniq.ops import _library as L
from soniq.ops import _quantize as Q

NATIVE_OPS = {"mpgemm_packed": L.mpgemm_packed, "quantize_pack_raw": L.quantize_pack_raw,
              "quantize_raw": Q.quantize_raw}
BLOCK_OPS = {"pack_block": L.pack_block, "unpack_block": L.unpack_block}


class OnDevice(torch.Tensor):
    """A tensor that says it lives on `device` (no storage): enough to reach an op's kernel
    for that device type through the dispatcher."""

    @staticmethod
    def __new__(cls, shape, dtype, device):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        with torch._C._DisableTorchDispatch():  # on to the device type's kernel
            return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", sorted(NATIVE_OPS) + sorted(BLOCK_OPS))
def test_kernels_registered_per_device(name):
    op = {**NATIVE_OPS, **BLOCK_OPS}[name]
    want = ["cpu", "cuda"] if name in NATIVE_OPS else ["cpu"]  # block ops: the torch reference elsewhere
    assert _op_kernels.device_types(op) == want
    for dev in want:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"soniq::{name}", dev.upper())
    # the body (every other device type) is the one composite kernel; no device branch inside
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"soniq::{name}", "CompositeExplicitAutograd")
    assert eager_kernel(op, torch.device("cpu")) is _op_kernels._TABLE[op]["cpu"]


def _pair(seed, scales):
    rng = np.random.default_rng(seed)
    a_bits = np.where(rng.random(77) < 0.4, 3, 8)
    x = torch.from_numpy(rng.integers(0, 2 ** a_bits, (5, 77)))
    w_bits = rng.choice([1, 2, 5, 8], 9)
    w = torch.from_numpy(np.stack([rng.integers(-(1 << (b - 1)), 1 << (b - 1), 77) if b > 1
                                   else rng.choice([-1, 1], 77) for b in w_bits]))
    pa = ops.pack(x, a_bits, signed=False, axis=1, scale=np.where(a_bits == 3, 0.5, 0.125) if scales else None)
    pw = ops.pack(w, w_bits, signed=True, k_layout=pa, scale=rng.uniform(0.5, 1, 9) if scales else None)
    return pa, pw, x @ w.T


@pytest.mark.parametrize("kind", [L.KIND_INT32, L.KIND_INT64, L.KIND_FLOAT32])
def test_mpgemm_dispatcher_equals_eager(kind):
    pa, pw, ref = _pair(kind, kind == L.KIND_FLOAT32)
    args = (pa.data, pa.desc, pa.sums, pa.row_perm, False, pw.data, pw.desc, pw.sums, pw.row_perm, True,
            pa.ksegs, pa.row_scale, pw.row_scale, pa.seg_scale, pw.seg_scale, kind, pw.exec_layout())
    got = torch.ops.soniq.mpgemm_packed(*args)
    eager = eager_kernel(L.mpgemm_packed, pa.device)(*args)
    assert got.dtype == eager.dtype and torch.equal(got.view(torch.int8), eager.view(torch.int8))  # bit for bit
    public = ops.mpgemm(pa, pw, out_dtype=torch.int64 if kind == L.KIND_INT64 else None)  # the eager path
    assert public.dtype == eager.dtype and torch.equal(public.view(torch.int8), eager.view(torch.int8))
    if kind != L.KIND_FLOAT32:
        assert torch.equal(eager.to(torch.int64), ref)


@pytest.mark.parametrize("dynamic", [False, True])
def test_quantize_ops_dispatcher_equal_eager(dynamic):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(7, 150, generator=g) * 3)[:, ::2]  # non-contiguous rows
    bits = torch.where(torch.arange(75) % 3 == 0, 2, 6)
    plan = ops._quantize_pack.make_plan(bits, torch.where(bits == 2, 0.7, 0.05), 75, signed=True,
                                        dynamic=dynamic)
    args = (x, plan.k_perm, plan.segs, plan.seg_scale, True, plan.row_words, 1, 99, True, dynamic)
    for a, b in zip(torch.ops.soniq.quantize_pack_raw(*args), eager_kernel(L.quantize_pack_raw, x.device)(*args)):
        assert a.dtype == b.dtype and torch.equal(a, b)
    s = torch.rand(75, dtype=torch.float64, generator=g) + 0.1
    vec = Q.quantizer_params(s, torch.full((75,), 3.0, dtype=torch.float64), True, exact=True)
    xd = x.double().contiguous()
    qa = torch.ops.soniq.quantize_raw(xd, *vec, 1, 1, 5, False)
    assert torch.equal(qa, eager_kernel(Q.quantize_raw, xd.device)(xd, *vec, 1, 1, 5, False))


def test_block_ops_dispatcher_equal_eager_and_reference():
    codes = torch.randint(0, 32, (6, 130), dtype=torch.uint8)
    planes = torch.ops.soniq.pack_block(codes, 5, 3)
    assert torch.equal(planes, eager_kernel(L.pack_block, codes.device)(codes, 5, 3))
    assert torch.equal(planes, L.pack_block_torch(codes, 5, 3))
    assert torch.equal(eager_kernel(L.unpack_block, planes.device)(planes, 5, 6, 130, 3), codes)


def test_device_without_kernel_is_a_clear_error():
    x = OnDevice((3, 4), torch.float32, "mps")
    perm, segs, sc = torch.arange(4), torch.tensor([[4, 1, 8]]), torch.ones(1)
    assert eager_kernel(L.quantize_pack_raw, x.device) is L.quantize_pack_raw  # the dispatcher decides
    with pytest.raises(NotImplementedError, match=r"soniq::quantize_pack_raw has no kernel for device 'mps'.*cpu, cuda"):
        eager_kernel(L.quantize_pack_raw, x.device)(x, perm, segs, sc, False, 8)
    with pytest.raises(NotImplementedError, match=r"soniq::quantize_raw has no kernel for device 'mps'"):
        torch.ops.soniq.quantize_raw(x, sc, sc, sc, sc, 0, 0, 0, False)
    d = OnDevice((4,), torch.int64, "mps")
    with pytest.raises(NotImplementedError, match=r"soniq::mpgemm_packed has no kernel for device 'mps'"):
        torch.ops.soniq.mpgemm_packed(d, d, d, d, False, d, d, d, d, False, d, None, None, None, None, 0)


def test_kernel_added_for_a_device_runs_in_eager_mode_too():
    """One added through soniq's table and one added to torch alone (torch.library): the eager
    path runs each, as the dispatcher does. (Registrations cannot be undone: device types no
    other test uses.)"""
    calls = []

    def on_xpu(x, scale, lo, hi, alpha, axis, noise, seed, values_only):
        calls.append("xpu")
        return OnDevice(x.shape, x.dtype, x.device)

    def on_hpu(x, scale, lo, hi, alpha, axis, noise, seed, values_only):
        calls.append("hpu")
        return OnDevice(x.shape, x.dtype, x.device)

    register(Q.quantize_raw, "xpu", on_xpu)
    torch.library.register_kernel("soniq::quantize_raw", "hpu", on_hpu)
    try:
        sc = torch.ones(1)
        for dev in ("xpu", "hpu"):
            x = OnDevice((2, 1), torch.float32, dev)
            eager_kernel(Q.quantize_raw, x.device)(x, sc, sc, sc, sc, 1, 0, 0, False)
            torch.ops.soniq.quantize_raw(x, sc, sc, sc, sc, 1, 0, 0, False)
        assert calls == ["xpu", "xpu", "hpu", "hpu"]
        assert eager_kernel(Q.quantize_raw, torch.device("xpu")) is on_xpu
    finally:
        _op_kernels._TABLE[Q.quantize_raw].pop("xpu")
