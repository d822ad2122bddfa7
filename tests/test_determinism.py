"""Determinism (issue 7.5): the same inputs give bit-identical outputs on every ISA path
this CPU supports, every thread count, repeated calls and (where a GPU is available)
CUDA; the noise quantizer gives the same noise for the same seed everywhere.

New kernels are covered automatically: the ISA loop is conftest.TEST_ISAS (soniq.supported_isas()
and the AMX emulation).
"""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import soniq
from conftest import TEST_ISAS
from soniq import ops

THREADS = (1, 2, 3)
HAS_CUDA = bool(soniq._native._C.built_with_cuda) and torch.cuda.is_available()


@pytest.fixture(autouse=True)
def restore_runtime():
    isa, n = soniq.get_isa(), soniq.get_num_threads()
    yield
    soniq.set_isa(isa)
    soniq.set_num_threads(n)


def configs():
    for isa in TEST_ISAS:
        for n in THREADS:
            yield isa, n


def as_bytes(r):
    """Any result as bytes + dtype + shape, so 'equal' means bit-identical (floats too)."""
    if isinstance(r, (tuple, list)):
        return [as_bytes(t) for t in r]
    if isinstance(r, soniq.PackedTensor):
        return [as_bytes(t) for t in r.state_dict().values()]
    if isinstance(r, torch.Tensor):
        r = r.detach().cpu().numpy()
    r = np.ascontiguousarray(r)
    return (str(r.dtype), r.shape, r.tobytes())


def case(seed, M, N, K, wtiers=(2, 4), atiers=(4, 8)):
    rng = np.random.default_rng(seed)
    wbits = rng.choice(wtiers, size=N)
    w = np.stack([rng.choice([-1, 1], size=K) if b == 1 else rng.integers(-(2 ** (b - 1)), 2 ** (b - 1), size=K)
                  for b in wbits])
    abits = rng.choice(atiers, size=K)
    x = rng.integers(0, 2**abits, size=(M, K))
    wscale = rng.uniform(1e-3, 1.0, size=N).astype(np.float32)
    tier_scale = {int(b): float(rng.uniform(0.01, 0.2)) for b in atiers}
    ascale = np.array([tier_scale[int(b)] for b in abits], dtype=np.float32)
    return x, abits, ascale, w, wbits, wscale


def run_all(x, abits, ascale, w, wbits, wscale):
    px = ops.pack(x, abits, signed=False, axis=1)
    pxs = ops.pack(x, abits, signed=False, axis=1, scale=ascale)
    pw = ops.pack(w, wbits, signed=True, k_layout=px)
    pws = ops.pack(w, wbits, signed=True, k_layout=px, scale=wscale)
    pw_plain = ops.pack(w, wbits, signed=True)  # per-row bits, identity K layout
    pw_binary = ops.pack(np.where(w >= 0, 1, -1), 1, signed=True, k_layout=px)
    return {
        "pack_x": as_bytes(px), "pack_w": as_bytes(pw),
        "int32": as_bytes(ops.mpgemm(px, pw)),
        "int64": as_bytes(ops.mpgemm(px, pw, out_dtype=torch.int64)),
        "float_w": as_bytes(ops.mpgemm(px, pws)),
        "float_xw": as_bytes(ops.mpgemm(pxs, pws)),
        "binary": as_bytes(ops.mpgemm(px, pw_binary)),
        "plain": as_bytes(ops.mpgemm(pw_plain, pw_plain)),
        "unpack": as_bytes(ops.unpack(pws)),
    }


SHAPES = [(1, 1, 1), (1, 5, 63), (3, 1, 64), (7, 9, 65), (17, 70, 200), (40, 130, 515)]


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_identical_on_every_isa_and_thread_count(M, N, K):
    inp = case(M * 1000 + K, M, N, K)
    want = None
    for isa, n in configs():
        soniq.set_isa(isa)
        soniq.set_num_threads(n)
        got = run_all(*inp)
        if want is None:
            want = got
            # exact, not just repeatable: the int result is the numpy product
            x, _, _, w, _, _ = inp
            assert got["int64"][2] == (x @ w.T).astype(np.int64).tobytes()
        for key in want:
            assert got[key] == want[key], f"{key} differs on isa={isa} threads={n}"


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), M=st.integers(1, 20), N=st.integers(1, 20),
       K=st.integers(1, 300), tiers=st.sampled_from([((1, 8), (2, 4)), ((2, 4), (4, 8)), ((3, 5), (1, 6))]))
def test_random_shapes_identical_everywhere(seed, M, N, K, tiers):
    inp = case(seed, M, N, K, *tiers)
    results = set()
    for isa, n in configs():
        soniq.set_isa(isa)
        soniq.set_num_threads(n)
        results.add(repr(run_all(*inp)))
    assert len(results) == 1


@pytest.mark.skipif(not HAS_CUDA, reason="needs soniq built with CUDA and a CUDA device")
@pytest.mark.parametrize("M,N,K", SHAPES)
def test_cuda_matches_cpu_bit_for_bit(M, N, K):
    x, abits, ascale, w, wbits, wscale = case(M + N + K, M, N, K)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    px = ops.pack(xt, abits, signed=False, axis=1, scale=ascale)
    pw = ops.pack(wt, wbits, signed=True, k_layout=px, scale=wscale)
    pxi = ops.pack(xt, abits, signed=False, axis=1)
    pwi = ops.pack(wt, wbits, signed=True, k_layout=pxi)
    for a, b in ((px, pw), (pxi, pwi)):
        cpu = ops.mpgemm(a, b)
        gpu = ops.mpgemm(a.cuda(), b.cuda())
        assert gpu.device.type == "cuda"
        assert as_bytes(gpu) == as_bytes(cpu)
    # packing on the GPU gives the same words
    pg = ops.pack(wt.cuda(), wbits, signed=True, k_layout=pxi)
    assert as_bytes(pg.cpu()) == as_bytes(pwi)


# ---- the noise quantizer (soniq.ops.quantize, issue 8) ----------------------------------


def _quantize(x, seed, **kw):
    return ops.quantize(x, 0.05, 4, signed=True, noise="uniform", seed=seed, **kw)


def test_same_seed_same_noise_everywhere():
    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(0))
    want = as_bytes(_quantize(x, 1234))
    for isa, n in configs():
        soniq.set_isa(isa)
        soniq.set_num_threads(n)
        assert as_bytes(_quantize(x, 1234)) == want, f"isa={isa} threads={n}"


def test_different_seed_different_noise():
    x = torch.randn(64, 64, generator=torch.Generator().manual_seed(1))
    assert as_bytes(_quantize(x, 1)) != as_bytes(_quantize(x, 2))


def test_no_noise_ignores_seed():
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    a = ops.quantize(x, 0.05, 4, signed=True, noise="none", seed=1)
    b = ops.quantize(x, 0.05, 4, signed=True, noise="none", seed=2)
    assert as_bytes(a) == as_bytes(b)


@pytest.mark.skipif(not HAS_CUDA, reason="needs soniq built with CUDA and a CUDA device")
def test_same_seed_same_noise_on_cuda():
    x = torch.randn(33, 70, generator=torch.Generator().manual_seed(3))
    assert as_bytes(_quantize(x.cuda(), 99)) == as_bytes(_quantize(x, 99))
