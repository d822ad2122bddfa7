"""Memory stays flat over many calls (issue 7.1, Python side; the native core is checked
by LeakSanitizer in .ci/reliability.sh). Not run on the sanitizer build, whose allocator
quarantine grows the resident set on purpose."""
import gc
import os

import numpy as np
import pytest
import torch

from soniq import ops


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def one_round(a, b, bits):
    pa = ops.pack(a, bits, signed=False, axis=1)
    pb = ops.pack(b, 2, signed=True, k_layout=pa, scale=0.5)
    ops.mpgemm(pa, pb)
    ops.mpgemm(pa, ops.pack(b, 2, signed=True, k_layout=pa), out_dtype=torch.int64)
    ops.unpack(pb)
    with pytest.raises(ValueError):  # error paths must not leak either
        ops.pack(a, 9, signed=False)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_many_calls_do_not_grow_memory():
    rng = np.random.default_rng(0)
    bits = rng.choice([2, 4], size=130)
    a = rng.integers(0, 4, size=(7, 130))
    b = rng.integers(-2, 2, size=(9, 130))
    for _ in range(100):  # warm caches and allocator pools
        one_round(a, b, bits)
    gc.collect()
    before = rss_mib()
    for _ in range(800):
        one_round(a, b, bits)
    gc.collect()
    grown = rss_mib() - before
    assert grown < 4, f"resident memory grew {grown:.1f} MiB over 800 rounds"
