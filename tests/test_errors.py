"""Bad input raises a clear Python exception naming the argument; never a crash."""
import numpy as np
import pytest
import torch

import soniq
from soniq import ops


def packed(x=None, bits=4, signed=False, **kw):
    x = np.zeros((2, 10), dtype=np.int64) if x is None else x
    return ops.pack(x, bits, signed=signed, **kw)


@pytest.mark.parametrize("values,exc,match", [
    (np.zeros((2, 3), dtype=np.float32), TypeError, "values must have an integer dtype.*float32.*quantize"),
    (torch.zeros(2, 3), TypeError, "values must have an integer dtype.*torch.float32"),
    (torch.zeros(2, 3, dtype=torch.bool), TypeError, "values.*bool.*uint8"),
    ([[1, 2]], TypeError, "values must be a torch.Tensor or numpy.ndarray, got list"),
    (np.zeros((2, 3, 4), dtype=np.int64), ValueError, "values must be 2-D.*3-D"),
    (np.zeros(5, dtype=np.int64), ValueError, "values must be 2-D"),
    (np.zeros((0, 5), dtype=np.int64), ValueError, "values must be non-empty"),
    (np.zeros((5, 0), dtype=np.int64), ValueError, "values must be non-empty"),
])
def test_bad_values(values, exc, match):
    with pytest.raises(exc, match=match):
        ops.pack(values, 4, signed=False)


@pytest.mark.parametrize("bits,exc,match", [
    (0, ValueError, r"bits must be in 1..8, got 0"),
    (9, ValueError, r"bits must be in 1..8, got 9"),
    (True, TypeError, "bits.*bool"),
    (2.5, TypeError, "bits must be an int"),
    (np.array([1, 2]), ValueError, r"bits must be 1-D with 3 entries"),
    (np.array([1, 9, 2]), ValueError, r"bits\[1\] = 9"),
    (np.array([1.0, 2.0, 3.0]), TypeError, "bits must hold integers"),
])
def test_bad_bits(bits, exc, match):
    with pytest.raises(exc, match=match):
        ops.pack(np.zeros((3, 4), dtype=np.int64), bits, signed=False)


@pytest.mark.parametrize("x,bits,signed,match", [
    (np.array([[0, 16]]), 4, False, r"values\[0, 1\] = 16 is out of range for row 0's 4-bit unsigned .*0..15"),
    (np.array([[-1, 0]]), 4, False, r"values\[0, 0\] = -1"),
    (np.array([[-9, 0]]), 4, True, r"values\[0, 0\] = -9 .* -8..7"),
    (np.array([[1, 0]]), 1, True, r"values\[0, 1\] = 0 .*1-bit signed .*\{-1, \+1\}"),
    (np.array([[2**40, 0]], dtype=np.uint64), 8, False, r"values\[0, 0\] = 1099511627776"),
    (np.array([[2**63 + 5, 0]], dtype=np.uint64), 8, False, r"values holds values above 2\*\*63-1"),
])
def test_values_out_of_range(x, bits, signed, match):
    with pytest.raises(ValueError, match=match):
        ops.pack(x, bits, signed=signed)


def test_per_column_range_names_the_column():
    x = np.array([[3, 3], [1, 5]])
    with pytest.raises(ValueError, match=r"values\[1, 1\] = 5 is out of range for column 1's 2-bit"):
        ops.pack(x, np.array([2, 2]), signed=False, axis=1)


@pytest.mark.parametrize("kw,exc,match", [
    ({"axis": 2}, ValueError, "axis must be 0 .* or 1"),
    ({"signed": 1}, TypeError, "signed must be a bool"),
    ({"scale": 0.0}, ValueError, r"scale = 0.0: scales must be finite, > 0 and fit float32"),
    ({"scale": -1.0}, ValueError, "scales must be finite, > 0"),
    ({"scale": 1e39}, ValueError, "fit float32"),
    ({"scale": float("nan")}, ValueError, "scales must be finite"),
    ({"scale": np.array([1.0, np.inf])}, ValueError, r"scale\[1\] = inf"),
    ({"scale": np.ones(3)}, ValueError, "scale must be a scalar or 1-D with 2 entries"),
    ({"scale": "big"}, TypeError, "scale must be None, a float"),
])
def test_bad_keywords(kw, exc, match):
    args = {"signed": False, **kw}
    with pytest.raises(exc, match=match):
        ops.pack(np.zeros((2, 10), dtype=np.int64), 4, **args)


def test_k_scale_must_be_constant_per_tier():
    bits = np.array([4, 4, 8, 8])
    with pytest.raises(ValueError, match="constant within each K segment"):
        ops.pack(np.zeros((2, 4), dtype=np.int64), bits, signed=False, axis=1, scale=np.array([1.0, 2.0, 1.0, 1.0]))


def test_mpgemm_argument_errors():
    a = packed()
    with pytest.raises(TypeError, match="b must be a soniq.PackedTensor .*ndarray"):
        ops.mpgemm(a, np.zeros((2, 10), dtype=np.int64))
    with pytest.raises(TypeError, match="a must be a soniq.PackedTensor"):
        ops.mpgemm(torch.zeros(2, 10, dtype=torch.int64), a)
    with pytest.raises(ValueError, match=r"same K: a is \(2, 10\) \(K=10\), b is \(2, 11\) \(K=11\)"):
        ops.mpgemm(a, packed(np.zeros((2, 11), dtype=np.int64)))
    with pytest.raises(ValueError, match="out_dtype must be None, torch.int32 or torch.int64"):
        ops.mpgemm(a, a, out_dtype=torch.float16)
    with pytest.raises(ValueError, match="out_dtype must be None or torch.float32 when scales"):
        ops.mpgemm(packed(scale=2.0), a, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="p must be a soniq.PackedTensor"):
        ops.unpack(np.zeros((2, 2)))


def test_k_layout_mismatch_is_explained():
    bits = np.array([4, 8] * 5)
    a = ops.pack(np.zeros((2, 10), dtype=np.int64), bits, signed=False, axis=1)
    # both operands with per-K-column bits in different layouts: no side can be re-laid out
    b = ops.pack(np.zeros((3, 10), dtype=np.int64), np.array([2, 4] * 5), signed=False, axis=1)
    c = ops.pack(np.zeros((3, 10), dtype=np.int64), np.array([2] * 5 + [4] * 5), signed=False, axis=1)
    with pytest.raises(ValueError, match="different K layouts.*segment by K segment.*KLayout.from_bits"):
        ops.mpgemm(b, c)
    with pytest.raises(ValueError, match="k_layout does not match bits"):
        ops.pack(np.zeros((2, 10), dtype=np.int64), np.array([4] * 9 + [8]), signed=False, axis=1, k_layout=a)
    with pytest.raises(ValueError, match="k_layout.perm must have K=11"):
        ops.pack(np.zeros((2, 11), dtype=np.int64), 4, signed=False, k_layout=a)
    with pytest.raises(TypeError, match="k_layout must be a soniq.KLayout"):
        ops.pack(np.zeros((2, 10), dtype=np.int64), 4, signed=False, k_layout="x")


def test_mixed_devices_rejected():
    a = packed()
    b = packed().to("meta")
    with pytest.raises(ValueError, match="same device.*cpu.*meta"):
        ops.mpgemm(a, b)


def test_set_num_threads_and_isa_errors():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n must be an int in 1..1024"):
            soniq.set_num_threads(bad)
    with pytest.raises(ValueError, match="isa must be one of scalar, avx2, avx512.*'sse9'"):
        soniq.set_isa("sse9")
    for name in ("avx2", "avx512"):
        if name not in soniq.supported_isas():
            with pytest.raises(ValueError, match=f"'{name}' is not supported by this CPU .missing: "):
                soniq.set_isa(name)


def test_corrupted_state_dict_rejected():
    p = packed(np.ones((3, 70), dtype=np.int64), 2)
    for key, bad in [("data", lambda t: t[:-1]), ("row_perm", lambda t: torch.zeros_like(t)),
                     ("desc", lambda t: t * 2), ("ksegs", lambda t: t + 1), ("sums", lambda t: t[:1]),
                     ("bits", lambda t: t * 0)]:
        sd = dict(p.state_dict())
        sd[key] = bad(sd[key])
        with pytest.raises(ValueError, match="invalid packed tensor"):
            soniq.PackedTensor.from_state_dict(sd, p.metadata())


def test_k_segment_with_extra_words_rejected():
    """A K segment stored with more words than ceil(klen / 64) (its extra words zero, so the
    codes unpack right) is refused: mpgemm walks both operands with one operand's (klen, kw),
    so it gave wrong products with it as b and read past b's words with it as a."""
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 16, (3, 100)), rng.integers(-8, 8, (20, 100))
    pa, pb = packed(a, 4), soniq.ops.pack(b, 4, signed=True)
    for p, rows in ((pa, 3), (pb, 20)):
        sd = dict(p.state_dict())
        kw = int(sd["ksegs"][0, 1])
        words = sd["data"].view(4, rows, kw)
        sd["data"] = torch.cat([words, torch.zeros(4, rows, 1, dtype=torch.int64)], 2).reshape(-1)
        sd["ksegs"] = sd["ksegs"] + torch.tensor([[0, 1]])
        with pytest.raises(ValueError, match=r"ksegs words per segment \[3\] must be ceil\(klen / 64\) = \[2\]"):
            soniq.PackedTensor.from_state_dict(sd, p.metadata())


def _packed(rows, k, bits, signed=False):
    return ops.pack(torch.ones(rows, k, dtype=torch.int64), bits, signed=signed)


def test_raw_ops_refuse_what_would_read_past_their_buffers():
    """torch.ops.soniq.* called directly (soniq.ops checks everything before calling them): the
    sizes and dtypes the kernels rely on are checked against the layout metadata, so a bad call
    raises instead of reading or writing out of bounds (these segfaulted or returned garbage)."""
    raw = torch.ops.soniq
    with pytest.raises(ValueError, match="unpack_block: planes must be int64 with 8 x 20000 x 1 words"):
        raw.unpack_block(torch.zeros(1, dtype=torch.int64), 8, 20000, 64, 1)
    with pytest.raises(ValueError, match="pack_block: codes must be uint8"):
        raw.pack_block(torch.zeros(2, 8, dtype=torch.int64), 4, 1)
    x, s = torch.randn(1000, 3), torch.ones(1)
    with pytest.raises(ValueError, match="quantize_raw: scale must be torch.float32 with 1000 entries"):
        raw.quantize_raw(x, s, s, s, s, 0, 0, 0, False)
    s3 = torch.ones(3)
    with pytest.raises(ValueError, match="quantize_raw: x must be float32/float64"):
        raw.quantize_raw(torch.zeros(3, 4, dtype=torch.int32), s3, s3, s3, s3, 0, 0, 0, True)
    with pytest.raises(ValueError, match="quantize_raw: scale must be torch.float64"):
        raw.quantize_raw(torch.zeros(3, 4, dtype=torch.float64), s3, s3, s3, s3, 0, 0, 0, True)
    with pytest.raises(ValueError, match="noise must be 0"):
        raw.quantize_raw(torch.zeros(3, 4), s3, s3, s3, s3, 0, 7, 0, True)
    a, b = _packed(2000, 8, 4), _packed(4, 8, 4)
    args = [a.data, a.desc, a.sums, a.row_perm, False, b.data, b.desc, b.sums, b.row_perm, False, a.ksegs,
            None, None, None, None, 0]

    def call(**change):
        names = ["a_data", "a_desc", "a_sums", "a_perm", "a_signed", "b_data", "b_desc", "b_sums", "b_perm",
                 "b_signed", "ksegs", "a_row_scale", "b_row_scale", "a_seg_scale", "b_seg_scale", "kind"]
        v = dict(zip(names, args))
        v.update(change)
        layout = v.pop("b_layout", None)
        return raw.mpgemm_packed(*v.values(), layout)

    assert torch.equal(call(), ops.mpgemm(a, b))  # the checks pass what soniq.ops hands over
    with pytest.raises(ValueError, match="a_data has 1 words, its desc and ksegs need 8000"):
        call(a_data=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="a_data must be a contiguous int64 tensor"):
        call(a_data=a.data.float())
    with pytest.raises(ValueError, match="a_sums has 1 entries, expected 2000 x 1"):
        call(a_sums=torch.zeros(1, dtype=torch.int64))
    with pytest.raises(ValueError, match="a_row_scale must be float32 with 2000 entries"):
        call(a_row_scale=torch.ones(1), kind=2)
    with pytest.raises(ValueError, match="b_layout holds 8 bytes"):
        call(b_data=None, b_layout=torch.zeros(8, dtype=torch.int8))
    with pytest.raises(ValueError, match="b_data is None without an execution layout"):
        call(b_data=None)
    with pytest.raises(ValueError, match="a_desc row groups must cover"):
        call(a_desc=torch.tensor([[0, 2000, 9]]))


def test_packed_tensor_scale_and_device_moves_are_checked():
    """with_scale takes what pack(scale=) takes (and keeps per-token scales); to() moves devices
    only: a dtype would turn the integer words into floats."""
    a, b = _packed(3, 300, 8), ops.pack(torch.randint(-2, 2, (40, 300)), 2, signed=True)
    with pytest.raises(ValueError, match="scale must be a scalar or 1-D with 40 entries"):
        b.with_scale(torch.ones(1))
    with pytest.raises(ValueError, match="scale\\[0\\] = -1.0"):
        b.with_scale(-torch.ones(40))
    want = ops.mpgemm(a, b).float() * 2
    assert torch.equal(ops.mpgemm(a, b.with_scale(2.0)), want)
    assert torch.equal(ops.mpgemm(a, b.with_scale(torch.full((40,), 2.0, dtype=torch.float64))), want)
    x = torch.randn(4, 300)
    p = ops.quantize_pack(x, 1 / 100, 8, signed=True, dynamic="token")
    w = b.with_scale(1.0)
    assert torch.equal(ops.mpgemm(p.with_scale(p.scale), w), ops.mpgemm(p, w))
    with pytest.raises(TypeError, match="moves to a device"):
        b.to(torch.float32)
    assert torch.equal(b.to("cpu").data, b.data)


def test_small_api_errors_name_the_argument():
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64"):
        ops.philox_uniform(10, 0, dtype=torch.float16)
    with pytest.raises(ValueError, match="scale\\[0\\] = .* is too small: its float32 inverse overflows"):
        ops.quantize(torch.tensor([[0.0, -1.0]]), 1e-45, 4, signed=True)
    with pytest.raises(ValueError, match="axis must be 0 .* got 1.0"):
        ops.pack(torch.ones(2, 4, dtype=torch.int64), 4, signed=True, axis=1.0)
    with pytest.raises(ValueError, match="bits_along_k\\[0\\] must hold widths in 1..8"):
        soniq.KLayout.from_bits([0, 4])


def test_with_scale_checked_as_pack_checks_it():
    """Scales along K are one per K segment (tier): a vector that varies inside a segment is
    refused (the kernels would use each segment's first scale: a wrong result)."""
    x = torch.randint(0, 4, (2, 4))
    a = ops.pack(x, [2, 4, 2, 4], signed=False, axis=1)
    b = ops.pack(torch.ones(3, 4, dtype=torch.int64), 2, signed=False, k_layout=a)
    with pytest.raises(ValueError, match="scale along K must be constant within each K segment"):
        a.with_scale([1.0, 2.0, 3.0, 4.0])
    want = (x.double() * torch.tensor([1.0, 2.0, 1.0, 2.0], dtype=torch.float64)).sum(1).float()
    assert torch.equal(ops.mpgemm(a.with_scale([1.0, 2.0, 1.0, 2.0]), b), want[:, None].expand(2, 3))


def test_int32_limit_follows_mpgemms_relayout():
    """Operands packed with different K layouts (one of them one segment): the bound mpgemm
    checks after re-laying it out, not a sum over the shorter segment list."""
    bits = np.where(np.arange(4000) < 100, 2, 8)
    a = ops.pack(np.zeros((1, 4000), np.int64), bits, signed=False, axis=1)
    b = ops.pack(np.full((1, 4000), 255), 8, signed=False)
    assert ops.int32_limit(a, b) == 100 * 3 * 255 + 3900 * 255 * 255
    with pytest.raises(TypeError, match="a must be a soniq.PackedTensor"):
        ops.int32_limit(torch.zeros(2), b)


def test_thread_count_bounded_and_isa_back_to_auto():
    before = soniq.get_num_threads()
    try:
        soniq.set_num_threads(np.int64(2))  # numpy integers as ints
        assert soniq.get_num_threads() == 2
        for bad in (100_000, 2 ** 40):  # would start that many threads
            with pytest.raises(ValueError, match="n must be an int in 1..1024"):
                soniq.set_num_threads(bad)
    finally:
        soniq.set_num_threads(before)
    best = soniq.get_isa()
    with soniq.use_isa("scalar"):
        soniq.set_isa("auto")
        assert soniq.get_isa() == soniq.supported_isas()[-1]
    assert soniq.get_isa() == best


def test_klayout_takes_lists_and_refuses_what_is_not_a_layout():
    from soniq import KLayout
    assert torch.equal(KLayout([2, 0, 1], (3,)).perm, torch.tensor([2, 0, 1]))
    assert KLayout(np.arange(4), [1, 3]).seg_lens == (1, 3)
    for perm, lens, msg in ((None, (3,), "perm must be a 1-D integer tensor or array"),
                            (torch.tensor([0.5, 1.0, 2.0]), (3,), "perm must be a 1-D integer"),
                            ([0, 0, 1], (3,), r"perm must be a permutation of range\(3\)"),
                            ([0, 1, 2], (2, 0), "seg_lens must be positive integer segment lengths"),
                            ([0, 1, 2], "3", "seg_lens must be positive integer segment lengths")):
        with pytest.raises(ValueError, match=msg):
            KLayout(perm, lens)
    for bits in ([2.5, 8], [[2, 8], [2, 8]]):
        with pytest.raises(ValueError, match=r"bits_along_k\[0\] must be a 1-D array of integer widths"):
            KLayout.from_bits(bits)
