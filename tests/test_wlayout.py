"""The weight execution layout (cpp/wlayout.h): built once per weight from its bit planes,
the planes rebuilt from it exactly, its size at the weight's bits, and the same results on
every ISA path (saved files stay bit planes, so a model loads and runs the same anywhere)."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import soniq
from soniq import ops
from soniq._native import _C
from conftest import TEST_ISAS, random_values, ref_matmul


def layout_of(p):
    desc, ksegs, _ = p.host_meta()
    desc, ksegs = desc.contiguous(), ksegs.contiguous()
    n = _C.layout_nbytes(desc.data_ptr(), desc.shape[0], ksegs.data_ptr(), ksegs.shape[0])
    lay = torch.empty(n, dtype=torch.int8)
    _C.layout_build(p.data.data_ptr(), p.shape[0], desc.shape[0], desc.data_ptr(), ksegs.data_ptr(), ksegs.shape[0],
                    lay.data_ptr())
    return lay, desc, ksegs


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("tiers", [(1, 8), (3, 5), (2, 7), (4, 6), (8, 8)])
def test_planes_rebuilt_from_layout_exactly(axis, tiers):
    rng = np.random.default_rng(sum(tiers) + axis)
    N, K = 37, 200
    bits = rng.choice(tiers, (N, K)[axis])
    p = ops.pack(random_values(rng, (N, K), bits, True, axis), bits, signed=True, axis=axis)
    lay, desc, ksegs = layout_of(p)
    back = torch.full_like(p.data, 12345)
    _C.layout_to_planes(lay.data_ptr(), desc.data_ptr(), desc.shape[0], ksegs.data_ptr(), ksegs.shape[0],
                        back.data_ptr())
    assert torch.equal(back, p.data)


@pytest.mark.parametrize("bits", range(1, 9))
def test_layout_bytes_at_the_weight_bits(bits):
    """Tiles of 16 rows and K in words of 64: exactly bits/8 bytes per code of the padded block."""
    N, K = 1536, 384
    p = ops.pack(np.zeros((N, K), np.int64), bits, signed=False)
    lay, _, _ = layout_of(p)
    assert lay.numel() == N * K * bits // 8
    odd = ops.pack(np.zeros((17, 65), np.int64), bits, signed=False)
    assert layout_of(odd)[0].numel() == 32 * 128 * bits // 8  # 2 tiles, 2 words


def test_exec_layout_cached_and_used(isa):
    rng = np.random.default_rng(3)
    a, b = random_values(rng, (5, 300), 8, False), random_values(rng, (70, 300), 4, True)
    pa, pb = ops.pack(a, 8, signed=False), ops.pack(b, 4, signed=True)
    out = ops.mpgemm(pa, pb)
    np.testing.assert_array_equal(out, ref_matmul(a, b))
    assert pb.exec_layout() is pb.exec_layout() and pb.exec_nbytes == 80 * 320 * 4 // 8
    assert pb.with_scale(None).exec_layout() is pb.exec_layout()


def test_large_layout_on_its_own_mapping(monkeypatch, tmp_path):
    """Layouts from soniq.packed.HUGE_LAYOUT_BYTES on live in a 2 MiB-aligned mapping advised
    for huge pages (lowered here so a small weight takes that path): same results as an
    ordinary tensor, freed with it, and copies/pickles are ordinary tensors again."""
    import copy
    import gc

    from soniq import packed
    rng = np.random.default_rng(11)
    a, b = random_values(rng, (1, 300), 8, False), random_values(rng, (70, 300), 1, True)
    want = ref_matmul(a, b)
    monkeypatch.setattr(packed, "HUGE_LAYOUT_BYTES", 1)
    pa, pb = ops.pack(a, 8, signed=False), ops.pack(b, 1, signed=True)
    lay = pb.exec_layout()
    assert lay.data_ptr() % (2 << 20) == 0 and lay.numel() == 80 * 320 // 8
    pb.release_planes()  # the layout alone: GEMV on it
    np.testing.assert_array_equal(ops.mpgemm(pa, pb), want)
    twin = copy.deepcopy(pb)
    torch.save(pb, tmp_path / "pb.pt")
    del pb, lay
    gc.collect()  # the mapping goes with the tensor; the copies own theirs
    np.testing.assert_array_equal(ops.mpgemm(pa, twin), want)
    np.testing.assert_array_equal(ops.mpgemm(pa, torch.load(tmp_path / "pb.pt", weights_only=False)), want)
    with pytest.raises(ValueError, match="layout_alloc: n must be positive"):
        _C.layout_alloc(0)


def test_saved_model_same_on_every_isa(tmp_path):
    """A converted model saved here loads (bit planes) and gives bit-identical float outputs
    on every ISA path this CPU has, with mixed weight tiers and activation tiers."""
    from soniq.qat import QATConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80), nn.ReLU(), nn.Linear(80, 33))
    x = torch.randn(7, 96)
    soniq.qat.prepare(model, QATConfig(w_palette=(2, 8), a_palette=(4, 8), w_bits_target=4.0, a_bits_target=6.0))
    model(x)
    soniq.qat.freeze_precision(model)
    conv = soniq.convert(model.eval())
    path = tmp_path / "m.safetensors"
    soniq.save(conv, path)
    outs = {}
    for isa in TEST_ISAS:
        with soniq.use_isa(isa):
            outs[isa] = soniq.load(path)(x)
            outs[isa + " in memory"] = conv(x)
    for isa, o in outs.items():
        assert torch.equal(o, outs["scalar"]), isa
    hist = conv[0].w.bit_histogram()
    assert len(hist) == 2, hist  # both weight tiers present


def test_packed_layer_keeps_one_copy(tmp_path):
    """A packed layer on the CPU keeps its weight once (the layout, planes dropped) where its
    bit pairs run on layout kernels: resident weight bytes <= 1.1 x bits/8 x N x K plus
    metadata and scales; the planes come back bit for bit to save, move or unpack."""
    from soniq.qat import QATConfig

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(384, 256))
    x = torch.randn(5, 384)
    soniq.qat.prepare(model, QATConfig(w_palette=(4, 8), a_palette=(4, 8), w_bits_target=5.0, a_bits_target=6.0))
    model(x)
    soniq.qat.freeze_precision(model)
    conv = soniq.convert(model.eval())
    w = conv[0].w
    ref = conv(x)
    assert not w.planes_resident
    bits = w.bits.double()
    meta = sum(t.numel() * t.element_size() for k, t in w._tensors(resident=True).items() if t is not None and k != "data")
    assert w.nbytes - meta <= 1.1 * float(bits.sum()) / 8 * 384
    path = tmp_path / "m.safetensors"
    soniq.save(conv, path)
    loaded = soniq.load(path)
    assert torch.equal(loaded[0].w.data, w.data)  # planes rebuilt from the layout, as packed
    assert torch.equal(loaded(x), ref)
    for isa in TEST_ISAS:  # paths without layout kernels get the rebuilt planes
        with soniq.use_isa(isa):
            assert torch.equal(conv(x), ref), isa
    np.testing.assert_array_equal(ops.unpack(w).numpy(), ops.unpack(loaded[0].w).numpy())


def test_release_planes_off_cpu_names_the_device():
    rng = np.random.default_rng(5)
    bits = rng.choice((2, 4), 16)
    p = ops.pack(random_values(rng, (16, 64), bits, True, 0), bits, signed=True, axis=0).to("meta")
    with pytest.raises(ValueError, match="on meta; only CPU tensors"):
        p.release_planes()
    assert p.planes_resident


@pytest.mark.parametrize("a_tiers,b_tiers", [((1,), (1,)), ((1, 8), (1, 4)), ((4,), (8,))])
@pytest.mark.parametrize("rows", [1, 7])
def test_mpgemm_without_a_layout_builds_one_where_needed(isa, a_tiers, b_tiers, rows):
    """A caller that passes no execution layout (C++ callers; the op's b_layout=None): mpgemm
    builds one for the call where some block pair runs on the layout kernels and reads only the
    planes where every pair runs bit-serially (1x1 bits); exact either way, with and without a
    layout passed, under every kernel path."""
    from soniq.ops._library import mpgemm_packed_cpu

    rng = np.random.default_rng(len(a_tiers) * 10 + len(b_tiers) + rows)
    K, N = 150, 40
    ab, bb = rng.choice(a_tiers, K), rng.choice(b_tiers, N)  # activations per K column, weights per row
    a = random_values(rng, (rows, K), ab, False, 1)
    b = random_values(rng, (N, K), bb, True, 0)
    pa = ops.pack(a, ab, signed=False, axis=1)
    pb = ops.pack(b, bb, signed=True, axis=0, k_layout=pa)
    want = ref_matmul(a, b)
    path = _C.get_kernel_path()
    try:
        for kp in _C.kernel_paths():
            _C.set_kernel_path(kp)
            for lay in (None, pb.exec_layout()):
                out = mpgemm_packed_cpu(pa.data, pa.desc, pa.sums, pa.row_perm, pa.signed, pb.data, pb.desc, pb.sums,
                                        pb.row_perm, pb.signed, pa.ksegs, None, None, None, None, 1, lay)
                np.testing.assert_array_equal(out.numpy(), want, err_msg=f"{kp} layout={lay is not None}")
    finally:
        _C.set_kernel_path(path)
