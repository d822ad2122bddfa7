"""The b-bit code encoding (value = alpha * code + offset) has one definition,
cpp/code_encoding.h: the C++ kernels and the CUDA kernels compile it, and Python reads it
through soniq._C.code_encoding. Every Python use equals it for bits 1..8, signed and unsigned."""
import pytest
import torch

from soniq import _checks, ops
from soniq._native import _C
from soniq.ops import _int8mm
from soniq.ops._quantize import level_bounds

CASES = [(b, s) for b in range(1, 9) for s in (False, True)]


def spec(bits, signed):
    """design.md section 2, written out independently."""
    if not signed:
        return 1, 0, 0, 2**bits - 1
    if bits == 1:
        return 2, -1, -1, 1  # {-1, +1}
    return 1, -(2 ** (bits - 1)), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits,signed", CASES)
def test_native_definition_is_the_spec(bits, signed):
    alpha, offset, lo, hi = _C.code_encoding(bits, signed)
    assert (alpha, offset, lo, hi) == spec(bits, signed)
    assert alpha * (2**bits - 1) + offset == hi  # codes 0..2^b-1 span exactly lo..hi


def test_python_uses_the_native_definition():
    bits = torch.arange(1, 9)
    for signed in (False, True):
        native = [_C.code_encoding(b, signed) for b in range(1, 9)]
        assert [_checks.ENCODING[signed][b] for b in range(1, 9)] == native
        alpha, offset = _checks.code_affine(bits, signed)
        lo, hi = _checks.value_range(bits, signed)
        assert torch.stack([alpha, offset, lo, hi], 1).tolist() == [list(e) for e in native]
        assert [_checks.max_abs_value(b, signed) for b in range(1, 9)] == [max(-e[2], e[3]) for e in native]
        # the quantizer's bounds (real-valued bits in noise mode) meet the encoding at integer bits
        qlo, qhi, qalpha = level_bounds(bits.double(), signed)
        assert torch.stack([qalpha, qlo, qhi], 1).tolist() == [[e[0], e[2], e[3]] for e in native]


@pytest.mark.parametrize("bits,signed", CASES)
def test_every_code_round_trips_through_pack_unpack_and_mpgemm(bits, signed):
    """All 2^b codes as values: pack (Python encodes with the table), the C++ mpgemm (its own
    compiled copy) and the int8 route's torch twin (the table again) agree with the integers."""
    _, _, lo, hi = spec(bits, signed)
    vals = torch.arange(lo, hi + 1, 2 if signed and bits == 1 else 1)
    a = vals.view(1, -1)
    pa = ops.pack(a, bits, signed=signed, axis=1)
    assert torch.equal(ops.unpack(pa), a)
    one = ops.pack(torch.ones(1, vals.numel(), dtype=torch.int64), 1, signed=False, k_layout=pa)
    eye = ops.pack(torch.eye(vals.numel(), dtype=torch.int64), 1, signed=False, k_layout=pa)
    assert int(ops.mpgemm(pa, one, out_dtype=torch.int64)) == int(vals.sum())
    assert torch.equal(ops.mpgemm(pa, eye, out_dtype=torch.int64), a)
    out = torch.empty(1, vals.numel(), dtype=torch.int64)
    _int8mm.mpgemm_int8mm(pa.data, pa.desc, pa.sums, pa.row_perm, signed, eye.data, eye.desc, eye.sums,
                          eye.row_perm, False, pa.ksegs, None, None, None, None, out)
    assert torch.equal(out, a)


def test_bad_bits_are_refused():
    for b in (0, 9, -1):
        with pytest.raises(ValueError, match="bits must be in 1..8"):
            _C.code_encoding(b, True)
