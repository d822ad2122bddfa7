import numpy as np
import pytest

import soniq

def pytest_report_header(config):
    d = soniq.info(verbose=False)
    return [f"soniq {d['version']}: cpu {d['cpu']['model']}; isa supported {d['isa']['supported']}; "
            f"threads {d['threads']['soniq']}"]


@pytest.fixture(params=soniq.supported_isas())
def isa(request):
    """Runs a test once per ISA path this CPU has (the header lists them; unsupported
    paths are covered by the tests that they raise a clear error)."""
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
