"""CUDA mpgemm kernels are exactly the CPU mpgemm (and a_int @ b_int.T): every kernel
(reference, popcount GEMM, GEMV, INT8 and binary tensor cores, cuBLAS INT8) forced in turn, every bit pair, odd
shapes, two-tier operands on both axes, scales, non-default streams and graph capture."""
import numpy as np
import pytest
import torch

import soniq
from soniq import ops
from soniq._native import _C
from soniq.packed import KLayout

HAVE_GPU = bool(_C.built_with_cuda) and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(
    not HAVE_GPU, reason="no CUDA device" if _C.built_with_cuda else "soniq built without CUDA")

KERNELS = ["ref", "popc", "gemv", "mma", "mma4", "bmma", "int8mm", "auto"]


def values(rng, shape, bits, signed, axis=0):
    """Random integers valid for per-channel `bits` (int or array along `axis`)."""
    R, K = shape
    b = np.broadcast_to(np.asarray(bits), ((R, K)[axis],)).reshape((-1, 1) if axis == 0 else (1, -1))
    if signed:
        lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
        v = rng.integers(0, 1 << 62, size=shape) % (hi - lo + 1) + lo
        v = np.where(np.broadcast_to(b == 1, shape), np.where(rng.random(shape) < 0.5, -1, 1), v)
    else:
        v = rng.integers(0, 1 << 62, size=shape) % (1 << b)
    return torch.from_numpy(v.astype(np.int64))


@pytest.fixture(params=KERNELS)
def kernel(request):
    _C.cuda_set_kernel(request.param)
    try:
        yield request.param
    finally:
        _C.cuda_set_kernel("auto")


def check(kernel, pa, pb, exact=None, stream=None, **kw):
    """GPU result == CPU result (bitwise, any dtype) == exact integer product if given."""
    want = ops.mpgemm(pa, pb, **kw)
    if exact is not None:
        torch.testing.assert_close(want.to(torch.int64), exact, rtol=0, atol=0)
    ga, gb = pa.cuda(), pb.cuda()
    if stream is None:
        got = ops.mpgemm(ga, gb, **kw)
    else:
        with torch.cuda.stream(stream):
            got = ops.mpgemm(ga, gb, **kw)
        stream.synchronize()
    assert got.is_cuda and got.dtype == want.dtype and got.shape == want.shape
    got = got.cpu()
    if want.dtype == torch.float32:  # bitwise, NaN-free
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), f"{kernel}: float mismatch"
    else:
        assert torch.equal(got, want), f"{kernel}: max diff {(got - want).abs().max()}"


def small_m(kernel, M):
    return min(M, 16) if kernel == "gemv" else M


@needs_gpu
@pytest.mark.parametrize("wa", range(1, 9))
@pytest.mark.parametrize("signed_a,signed_b", [(False, True), (True, True), (False, False)])
def test_every_bit_pair(kernel, wa, signed_a, signed_b):
    rng = np.random.default_rng(wa)
    # even wa: M = 13 also covers the small-M tile shape of the tensor-core kernels
    M, N, K = small_m(kernel, 13 if wa % 2 == 0 else 67), 70, 131
    for wb in range(1, 9):
        a, b = values(rng, (M, K), wa, signed_a), values(rng, (N, K), wb, signed_b)
        check(kernel, ops.pack(a, wa, signed=signed_a), ops.pack(b, wb, signed=signed_b), exact=a @ b.T)


@needs_gpu
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (1, 9, 63), (3, 1, 64), (2, 3, 65), (1, 130, 200), (16, 65, 129),
                                   (17, 64, 1000), (65, 129, 257), (128, 64, 513)])
def test_odd_shapes(kernel, M, N, K):
    if kernel == "gemv" and M > 16:
        pytest.skip("gemv takes a.rows <= 16")
    rng = np.random.default_rng(M * 1000 + N + K)
    for wa, wb in [(1, 1), (2, 4), (8, 8)]:
        a, b = values(rng, (M, K), wa, False), values(rng, (N, K), wb, True)
        check(kernel, ops.pack(a, wa, signed=False), ops.pack(b, wb, signed=True), exact=a @ b.T)


@needs_gpu
@pytest.mark.parametrize("axes", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("seed", range(3))
def test_two_tier(kernel, axes, seed):
    """Per-channel bits from two tiers along rows (axis 0) or K (axis 1) of each operand."""
    rng = np.random.default_rng(100 + seed)
    M, N, K = small_m(kernel, 40), 75, 300
    a_axis, b_axis = axes
    ta, tb = [(1, 4), (2, 8), (4, 8)][seed], [(2, 4), (1, 8), (3, 6)][seed]
    if a_axis == 1 and b_axis == 1:
        ka = rng.integers(0, 2, K)
        bits_a, bits_b = np.array(ta)[ka], np.array(tb)[ka]
        kl = soniq.KLayout.from_bits(bits_a, bits_b)
    else:
        bits_a = np.array(ta)[rng.integers(0, 2, (M, K)[a_axis])]
        bits_b = np.array(tb)[rng.integers(0, 2, (N, K)[b_axis])]
        kl = None
    a = values(rng, (M, K), bits_a, True, a_axis)
    b = values(rng, (N, K), bits_b, False, b_axis)
    if kl is not None:
        pa = ops.pack(a, bits_a, signed=True, axis=1, k_layout=kl)
        pb = ops.pack(b, bits_b, signed=False, axis=1, k_layout=kl)
    elif a_axis == 1:
        pa = ops.pack(a, bits_a, signed=True, axis=1)
        pb = ops.pack(b, bits_b, signed=False, axis=b_axis, k_layout=pa)
    else:
        pb = ops.pack(b, bits_b, signed=False, axis=b_axis)
        pa = ops.pack(a, bits_a, signed=True, axis=0, k_layout=pb)
    check(kernel, pa, pb, exact=a @ b.T)


@needs_gpu
def test_scales_bitwise(kernel):
    """float32 output with row scales on both operands and per-segment scales along K."""
    rng = np.random.default_rng(7)
    M, N, K = small_m(kernel, 33), 50, 200
    bits_a = np.array([2, 8])[rng.integers(0, 2, K)]
    a = values(rng, (M, K), bits_a, False, axis=1)
    b = values(rng, (N, K), 4, True)
    seg = {2: 0.37, 8: 0.011}
    pa = ops.pack(a, bits_a, signed=False, axis=1,
                  scale=torch.tensor([seg[int(x)] for x in bits_a], dtype=torch.float32))
    pb = ops.pack(b, 4, signed=True, scale=torch.rand(N) + 0.5, k_layout=pa)
    check(kernel, pa, pb)


@needs_gpu
def test_int64_long_k(kernel):
    """K past the int32 accumulator range of one mma run: the 64-bit flush path."""
    rng = np.random.default_rng(11)
    M, N, K = small_m(kernel, 17), 9, 40000
    a, b = values(rng, (M, K), 8, False), values(rng, (N, K), 8, False)
    check(kernel, ops.pack(a, 8, signed=False), ops.pack(b, 8, signed=False), exact=a @ b.T,
          out_dtype=torch.int64)


@needs_gpu
def test_non_default_stream(kernel):
    rng = np.random.default_rng(3)
    M, N, K = small_m(kernel, 70), 90, 333
    a, b = values(rng, (M, K), 2, True), values(rng, (N, K), 3, False)
    check(kernel, ops.pack(a, 2, signed=True), ops.pack(b, 3, signed=False), exact=a @ b.T,
          stream=torch.cuda.Stream())


@needs_gpu
def test_cuda_graph_capture_and_replay(kernel):
    """mpgemm is capturable (no sync, no host allocation after the first call) and a
    replay recomputes from the current contents of the packed buffers."""
    rng = np.random.default_rng(5)
    M, N, K = small_m(kernel, 40), 64, 250
    a1, a2 = values(rng, (M, K), 4, False), values(rng, (M, K), 4, False)
    b = values(rng, (N, K), 2, True)
    pa, pb = ops.pack(a1, 4, signed=False).cuda(), ops.pack(b, 2, signed=True).cuda()
    pa2 = ops.pack(a2, 4, signed=False).cuda()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ops.mpgemm(pa, pb)  # warm-up: caches host metadata and kernel attributes
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = ops.mpgemm(pa, pb)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu().to(torch.int64), a1 @ b.T)
    pa.data.copy_(pa2.data)
    pa.sums.copy_(pa2.sums)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu().to(torch.int64), a2 @ b.T)


@needs_gpu
def test_pack_on_gpu_matches_cpu():
    rng = np.random.default_rng(9)
    a = values(rng, (5, 130), 3, True)
    pc, pg = ops.pack(a, 3, signed=True), ops.pack(a.cuda(), 3, signed=True)
    assert torch.equal(pc.data, pg.data.cpu()) and torch.equal(pc.sums, pg.sums.cpu())
    assert torch.equal(ops.unpack(pg).cpu(), a)


@needs_gpu
def test_device_metadata_still_works():
    """The raw op accepts desc/ksegs on the device too (at the cost of a copy to the host)."""
    rng = np.random.default_rng(2)
    a, b = values(rng, (20, 70), 2, False), values(rng, (30, 70), 2, True)
    pa, pb = ops.pack(a, 2, signed=False).cuda(), ops.pack(b, 2, signed=True).cuda()
    out = torch.ops.soniq.mpgemm_packed(pa.data, pa.desc, pa.sums, pa.row_perm, False, pb.data, pb.desc, pb.sums,
                                        pb.row_perm, True, pa.ksegs, None, None, None, None, 1)
    assert torch.equal(out.cpu(), a @ b.T)


@needs_gpu
def test_kernel_choice_errors():
    with pytest.raises(ValueError, match="kernel must be one of"):
        _C.cuda_set_kernel("fast")
    rng = np.random.default_rng(1)
    a, b = values(rng, (17, 64), 2, False), values(rng, (8, 64), 2, False)
    _C.cuda_set_kernel("gemv")
    try:
        with pytest.raises(ValueError, match="at most 16 rows"):
            ops.mpgemm(ops.pack(a, 2, signed=False).cuda(), ops.pack(b, 2, signed=False).cuda())
    finally:
        _C.cuda_set_kernel("auto")


@needs_gpu
@pytest.mark.parametrize("scaled", [False, True])
def test_opcheck_cuda(scaled):
    """The op on CUDA tensors (desc/ksegs on the host) passes torch.library.opcheck."""
    rng = np.random.default_rng(4)
    bits_a = np.where(rng.random(100) < 0.5, 2, 8)
    a, w = values(rng, (3, 100), bits_a, False, axis=1), values(rng, (5, 100), np.array([1, 4, 4, 1, 2]), True)
    pa = ops.pack(a, bits_a, signed=False, axis=1, scale=np.where(bits_a == 2, 0.5, 0.25) if scaled else None)
    pw = ops.pack(w, np.array([1, 4, 4, 1, 2]), signed=True, k_layout=pa,
                  scale=rng.uniform(0.5, 1, 5) if scaled else None)
    pa, pw = pa.cuda(), pw.cuda()
    args = (pa.data, pa.host_meta()[0], pa.sums, pa.row_perm, False, pw.data, pw.host_meta()[0], pw.sums,
            pw.row_perm, True, pa.host_meta()[1], pa.row_scale, pw.row_scale, pa.seg_scale, pw.seg_scale,
            2 if scaled else 1)
    torch.library.opcheck(torch.ops.soniq.mpgemm_packed.default, args)
    if not scaled:
        f = torch.compile(lambda *x: torch.ops.soniq.mpgemm_packed(*x) * 2, fullgraph=True, backend="eager")
        assert torch.equal(f(*args).cpu(), 2 * (a @ w.T))


@pytest.mark.skipif(not _C.built_with_cuda or _C.cuda_device_count() > 0,
                    reason="only meaningful on a CUDA build without a usable device")
def test_errors_without_device():
    """Metadata is validated on the host (ValueError naming the operand) before any CUDA
    call, and a CUDA failure surfaces as RuntimeError carrying the CUDA error text."""
    rng = np.random.default_rng(0)
    pa = ops.pack(values(rng, (4, 70), 2, False), 2, signed=False)
    pb = ops.pack(values(rng, (3, 70), 2, True), 2, signed=True)

    def call(desc_a, ksegs):
        A = (pa.data.data_ptr(), 4, desc_a.shape[0], desc_a.data_ptr(), pa.sums.data_ptr(), pa.row_perm.data_ptr(), False)
        B = (pb.data.data_ptr(), 3, 1, pb.desc.data_ptr(), pb.sums.data_ptr(), pb.row_perm.data_ptr(), True)
        out = torch.empty(4, 3, dtype=torch.int32)
        _C.cuda_mpgemm(A, B, ksegs.data_ptr(), ksegs.shape[0], (0, 0, 0, 0), 0, out.data_ptr(), 0)

    bad = pa.desc.clone()
    bad[0, 2] = 9
    with pytest.raises(ValueError, match="a: block bits must be in 1..8"):
        call(bad, pa.ksegs)
    with pytest.raises(RuntimeError, match="CUDA error in"):
        call(pa.desc, pa.ksegs)


@needs_gpu
@pytest.mark.parametrize("bits,rows,klen,off_rows", [(1, 1, 1, 0), (5, 7, 130, 3), (8, 33, 64, 1), (3, 16, 1000, 0)])
def test_expand_codes_kernel(bits, rows, klen, off_rows):
    """cuda/expand_codes.cu == its torch twin (shifted codes, zero padding), also at odd word offsets."""
    from soniq.ops import _int8mm
    rng = np.random.default_rng(bits)
    kw = (klen + 63) // 64
    codes = torch.from_numpy(rng.integers(0, 1 << bits, (rows, klen)).astype(np.uint8))
    planes = torch.cat([torch.zeros(off_rows * kw, dtype=torch.int64), ops._library.pack_block_torch(codes, bits, kw)])
    rows_pad, kpad = max(32, (rows + 15) // 16 * 16), (klen + 15) // 16 * 16
    want = _int8mm.expand_block(planes, off_rows * kw, bits, rows, klen, kw, rows_pad, kpad)
    got = _int8mm.expand_block(planes.cuda(), off_rows * kw, bits, rows, klen, kw, rows_pad, kpad)
    torch.cuda.synchronize()
    assert torch.equal(got.cpu(), want)


@needs_gpu
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("M", [1, 5, 64])
def test_quantize_pack_cuda_matches_cpu(signed, M):
    """cuda/quantize_pack.cu == the CPU kernel word for word (planes, sums), with a gathered
    two-tier K layout, ties, clamping and a non-contiguous x; then mpgemm on the GPU."""
    rng = np.random.default_rng(M)
    K = 300
    bits = np.where(rng.random(K) < 0.5, 2, 8)
    bits[:3] = 1
    scale = np.where(bits == 1, 0.3, np.where(bits == 2, 0.5, 0.05)).astype(np.float32)
    x = torch.from_numpy(rng.normal(0, 2, (M, K + 5)).astype(np.float32))[:, :K]  # row stride K + 5
    x[0, :10] = torch.from_numpy(((np.arange(10) - 4.5) * scale[:10]).astype(np.float32))  # ties
    x[-1, -1] = 1e30
    w = values(rng, (7, K), 4, True)
    pw = ops.pack(w, 4, signed=True, k_layout=KLayout.from_bits(bits))  # tiers grouped: a gathered layout
    cpu = ops.quantize_pack(x, scale, bits, signed=signed, k_layout=pw)
    xg = torch.empty(M, K + 5, device="cuda")[:, :K]  # .cuda() of x would be contiguous
    xg.copy_(x)
    gpu = ops.quantize_pack(xg, scale, bits, signed=signed, k_layout=pw)
    assert gpu.device.type == "cuda"
    assert torch.equal(gpu.data.cpu(), cpu.data) and torch.equal(gpu.sums.cpu(), cpu.sums)
    got = ops.mpgemm(gpu, pw.cuda(), out_dtype=torch.int64)
    assert torch.equal(got.cpu(), ops.mpgemm(cpu, pw, out_dtype=torch.int64))


@needs_gpu
@pytest.mark.parametrize("signed", [False, True])
def test_quantize_pack_cuda_noise_matches_cpu(signed):
    """noise="uniform": the same Philox draws and codes on the GPU as on the CPU for a seed."""
    rng = np.random.default_rng(3 + signed)
    M, K = 9, 333
    bits = rng.choice([1, 3, 8], size=K)
    scale = np.where(bits == 1, 0.4, np.where(bits == 3, 0.2, 0.02)).astype(np.float32)
    x = torch.from_numpy(rng.normal(0, 1, (M, K)).astype(np.float32))
    kl = KLayout.from_bits(bits, rng.choice([2, 4], size=K))
    for seed in (0, 2**62 + 12345):
        cpu = ops.quantize_pack(x, scale, bits, signed=signed, k_layout=kl, noise="uniform", seed=seed)
        gpu = ops.quantize_pack(x.cuda(), scale, bits, signed=signed, k_layout=kl, noise="uniform", seed=seed)
        assert torch.equal(gpu.data.cpu(), cpu.data) and torch.equal(gpu.sums.cpu(), cpu.sums)


@needs_gpu
def test_quantize_pack_cuda_nan_raises():
    x = torch.zeros(3, 70, device="cuda")
    x[2, 17] = float("nan")
    with pytest.raises(ValueError, match=r"x\[2, 17\] is NaN"):
        ops.quantize_pack(x, 0.1, 4, signed=True)



@needs_gpu
def test_converted_model_on_cuda_propagates_nan_rows():
    """On the GPU too a NaN input gives NaN outputs where the float model's are, with no sync."""
    from test_convert import check_nan_rows_propagate, converted_conv_net
    q, x = converted_conv_net()
    check_nan_rows_propagate(q, x, "cuda")


@needs_gpu
def test_converted_model_on_cuda_equals_cpu(tmp_path):
    """A converted model moved with .cuda() runs on the GPU kernels (fused quantize + pack,
    mpgemm) bit for bit as on the CPU, and saves from the GPU."""
    from test_convert import check_moved_model, converted_conv_net
    q, x = converted_conv_net()
    check_moved_model(q, x, "cuda", tmp_path)
