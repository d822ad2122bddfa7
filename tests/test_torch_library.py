"""The ops are real torch.library ops: opcheck passes and torch.compile traces them."""
import numpy as np
import pytest
import torch

from soniq import ops
from conftest import random_values


def _packed_pair(seed=0, scales=False):
    rng = np.random.default_rng(seed)
    a_bits = np.where(rng.random(100) < 0.5, 2, 8)
    a = random_values(rng, (3, 100), a_bits, False, axis=1)
    w_bits = np.array([1, 4, 4, 1, 2])
    w = random_values(rng, (5, 100), w_bits, True, axis=0)
    pa = ops.pack(torch.from_numpy(a), a_bits, signed=False, axis=1,
                  scale=np.where(a_bits == 2, 0.5, 0.25) if scales else None)
    pw = ops.pack(torch.from_numpy(w), w_bits, signed=True, k_layout=pa,
                  scale=rng.uniform(0.5, 1, 5) if scales else None)
    return pa, pw, a, w


def _mpgemm_args(pa, pw, kind):
    return (pa.data, pa.desc, pa.sums, pa.row_perm, pa.signed, pw.data, pw.desc, pw.sums, pw.row_perm,
            pw.signed, pa.ksegs, pa.row_scale, pw.row_scale, pa.seg_scale, pw.seg_scale, kind)


@pytest.mark.parametrize("scales,kind", [(False, 0), (False, 1), (True, 2)])
def test_opcheck_mpgemm(scales, kind):
    pa, pw, _, _ = _packed_pair(scales=scales)
    torch.library.opcheck(torch.ops.soniq.mpgemm_packed.default, _mpgemm_args(pa, pw, kind))


@pytest.mark.parametrize("bits,rows,klen", [(1, 1, 1), (3, 5, 65), (8, 2, 200)])
def test_opcheck_pack_unpack(bits, rows, klen):
    codes = torch.randint(0, 1 << bits, (rows, klen), dtype=torch.uint8)
    kw = (klen + 63) // 64
    torch.library.opcheck(torch.ops.soniq.pack_block.default, (codes, bits, kw))
    planes = torch.ops.soniq.pack_block(codes, bits, kw)
    torch.library.opcheck(torch.ops.soniq.unpack_block.default, (planes, bits, rows, klen, kw))


def test_torch_compile_fullgraph():
    pa, pw, a, w = _packed_pair(seed=3)

    def f(x_data, x_sums):
        out = torch.ops.soniq.mpgemm_packed(x_data, pa.desc, x_sums, pa.row_perm, False, pw.data, pw.desc,
                                            pw.sums, pw.row_perm, True, pa.ksegs, None, None, None, None, 1)
        return out * 2

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    got = compiled(pa.data, pa.sums)
    assert torch.equal(got, 2 * torch.from_numpy(a @ w.T))
