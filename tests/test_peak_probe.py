"""The benchmarks' limits come from measured instruction rates (cpp/peak_probe_*.cpp), not the
nominal clock: each ISA path with a probe returns rates a core of this kind can reach (a loop
that did not run, or ran far fewer instructions than it counts, lands outside), scalar and AMX
(tile rate: not probed) return None, and bad arguments are refused."""
import pytest

import soniq
from soniq._native import _C

# per core: at most 2 x 64-lane vpdpbusd (or 2 x 32-lane vpmaddubsw) per cycle, at most
# 1.5 vpopcntq zmm (or 6 scalar popcnt) per cycle, clocks up to 6 GHz; and at least a
# tenth of one such instruction per cycle at 1 GHz (a busy shared core)
BOUNDS = {"avx512": {"int8_macs_per_s": (6.4e9, 2 * 64 * 6e9), "popcount_bits_per_s": (51e9, 1.5 * 512 * 6e9)},
          "avx2": {"int8_macs_per_s": (3.2e9, 2 * 32 * 6e9), "popcount_bits_per_s": (6.4e9, 6 * 64 * 6e9)}}


@pytest.mark.parametrize("isa", ["avx2", "avx512"])
def test_probe_rates_are_physical(isa):
    if isa not in soniq.supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    with soniq.use_isa(isa):
        r = _C.measure_peaks(0.05)
    assert r["isa"] == isa
    for key, (lo, hi) in BOUNDS[isa].items():
        assert lo < r[key] < hi, (key, r[key])


def test_paths_without_probe_return_none():
    for isa in ["scalar"] + list(_C.emulated_isas()):  # amx_emu: the AMX table's settings
        with soniq.use_isa(isa):
            assert _C.measure_peaks(0.05) is None


@pytest.mark.parametrize("seconds", [0.0, -1.0, 11.0, float("nan")])
def test_bad_duration_is_refused(seconds):
    with pytest.raises(ValueError, match="seconds must be in"):
        _C.measure_peaks(seconds)
