import numpy as np
import pytest

import soniq
from soniq._native import _C

# Every ISA path this machine runs natively, plus the AMX kernel's code on its emulation
# (cpp/amx_emu.h; 'amx_emu', on CPUs with AVX-512) where the CPU has no AMX.
TEST_ISAS = soniq.supported_isas() + [i for i in _C.emulated_isas() if "amx" not in soniq.supported_isas()]

def pytest_report_header(config):
    d = soniq.info(verbose=False)
    return [f"soniq {d['version']}: cpu {d['cpu']['model']}; isa supported {d['isa']['supported']}; "
            f"threads {d['threads']['soniq']}"]


@pytest.fixture(params=TEST_ISAS)
def isa(request):
    """Runs a test once per ISA path this CPU has, and on the AMX emulation (the header lists
    them; unsupported paths are covered by the tests that they raise a clear error)."""
    name = request.param
    with soniq.use_isa(name):
        yield name


def random_values(rng, shape, bits, signed, axis=0):
    """Random integers valid for per-channel `bits` (int or array along `axis`)."""
    R, K = shape
    b = np.broadcast_to(np.asarray(bits), ((R, K)[axis],))
    b = b.reshape((-1, 1) if axis == 0 else (1, -1))
    if signed:
        lo, hi = -(1 << (b - 1)), (1 << (b - 1)) - 1
        v = rng.integers(0, 1 << 62, size=shape) % ((hi - lo + 1)) + lo
        one = np.broadcast_to(b == 1, shape)
        v = np.where(one, np.where(rng.random(shape) < 0.5, -1, 1), v)
    else:
        v = rng.integers(0, 1 << 62, size=shape) % (1 << b)
    return v.astype(np.int64)


def ref_matmul(a, b):
    return np.asarray(a, dtype=np.int64) @ np.asarray(b, dtype=np.int64).T


def edge_values(bits, signed):
    """float32 values t (in units of the scale) at the activation quantizer's rounding edges:
    every integer and exact half-way tie from lo - 3 to hi + 3 and the floats one ulp either
    side (the clamp bounds lo, hi, the magic-constant clamp lo - 1, hi + 1, the ties around
    them), +-0, +-inf, huge and subnormal values. Signed 1-bit (alpha 2) rounds (t + 1) / 2:
    its ties are the even integers, inside this range too."""
    lo = -(1 << (bits - 1)) if signed else 0
    hi = 1 if signed and bits == 1 else ((1 << (bits - 1)) - 1 if signed else (1 << bits) - 1)
    base = np.arange(2 * (lo - 3), 2 * (hi + 3) + 1, dtype=np.float32) / np.float32(2)
    t = np.concatenate([base, np.nextafter(base, np.float32(-np.inf)), np.nextafter(base, np.float32(np.inf)),
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e30, -1e30, 3.4e38, -3.4e38, 1e-45, -1e-45, 1e-40],
                                 np.float32)])
    return t.astype(np.float32)
