"""Coverage-guided fuzzer for soniq's entry points (issue 7.2), driven by atheris (libFuzzer).

Each input picks an entry point and builds its arguments from the fuzzer's bytes: pack /
unpack with arbitrary shapes, dtypes, bit arrays, scales (0, negative, NaN, inf) and axes;
mpgemm with arbitrary operand pairs and out_dtype; PackedTensor.from_state_dict on
corrupted state; ops.quantize and ops.quantize_pack (checked equal to quantize + pack);
the trellis Viterbi search with a width and a weight per step (checked equal to the torch
reference) and its streams' encode / decode; and soniq.load on damaged files.
Allowed outcomes: a clean Python exception, or a result checked to be exact. Anything
else (another exception, a wrong result, a sanitizer report, a crash, a hang past
-timeout) is a finding.

    python tests/fuzz/fuzz_ops.py -max_total_time=60 CORPUS_DIR   # atheris / libFuzzer flags
    python tests/fuzz/fuzz_ops.py --replay CORPUS_DIR --random 30  # replay, then random bytes

.ci/reliability.sh runs it for a bounded time on the AddressSanitizer build.
"""
import os
import sys
import tempfile
import time

import numpy as np

try:
    import atheris
except ImportError:  # the --random mode needs no atheris
    atheris = None

if atheris is not None:
    with atheris.instrument_imports(include=["soniq"]):
        import soniq
        from soniq import ops
else:
    import soniq
    from soniq import ops
import torch

CLEAN = (TypeError, ValueError, OverflowError, MemoryError)
SPECIAL_FLOATS = [0.0, -0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-45, 3.4e38, 1e300, 0.5]
DTYPES = [np.int8, np.uint8, np.int16, np.int32, np.int64, np.uint64, np.float32, np.bool_]
TORCH_OUT = [None, torch.int32, torch.int64, torch.float32, torch.int16, torch.float64, "int32"]


class Source:
    """Typed values from the fuzzer's bytes (atheris' provider, or a numpy stand-in)."""

    def __init__(self, data: bytes):
        self.fdp = atheris.FuzzedDataProvider(data) if atheris is not None else None
        self.rng = None if self.fdp else np.random.default_rng(int.from_bytes(data[:8].ljust(8, b"\0"), "little"))

    def int(self, lo, hi):
        return self.fdp.ConsumeIntInRange(lo, hi) if self.fdp else int(self.rng.integers(lo, hi + 1))

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def bool(self):
        return self.int(0, 1) == 1

    def bytes(self, n):
        return self.fdp.ConsumeBytes(n) if self.fdp else self.rng.bytes(n)

    def float(self):
        if self.bool():
            return self.pick(SPECIAL_FLOATS)
        return self.fdp.ConsumeFloat() if self.fdp else float(self.rng.normal() * 10 ** self.int(-40, 40))


def value_range(bits, signed):
    if not signed:
        return 0, 2**bits - 1
    return (-1, 1) if bits == 1 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


def array(src, shape, dtype):
    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = src.bytes(n).ljust(n, b"\0")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).copy()


def bits_arg(src, n):
    kind = src.int(0, 4)
    if kind == 0:
        return src.int(-1, 10)
    if kind == 1:
        return np.array([src.int(1, 8) for _ in range(n)])
    if kind == 2:
        return np.array([src.int(-2, 12) for _ in range(src.int(0, n + 1))])
    if kind == 3:
        return torch.tensor([src.int(1, 8) for _ in range(n)])
    return src.pick([None, 4.0, "4", True, np.zeros((2, 2), dtype=np.int64)])


def scale_arg(src, n):
    kind = src.int(0, 3)
    if kind == 0:
        return None
    if kind == 1:
        return src.float()
    if kind == 2:
        return np.array([src.float() for _ in range(n)], dtype=np.float64)
    return torch.from_numpy(np.full(src.int(0, n + 1), src.float(), dtype=np.float64))


def valid_operand(src, R, K, axis, k_layout=None):
    """A valid matrix and its pack() arguments (bits per channel along `axis`)."""
    signed = src.bool()
    per = np.array([src.int(1, 8) for _ in range((R, K)[axis])])
    if src.bool():
        per[:] = per[0]
    lo = np.array([value_range(int(b), signed)[0] for b in per])
    hi = np.array([value_range(int(b), signed)[1] for b in per])
    shape = (-1, 1) if axis == 0 else (1, -1)
    raw = array(src, (R, K), np.int64)
    v = lo.reshape(shape) + np.abs(raw % (hi - lo + 1).reshape(shape))
    if signed:
        v = np.where(((per == 1).reshape(shape)) & (v == 0), 1, v)
    p = ops.pack(v, per, signed=signed, axis=axis, k_layout=k_layout)
    return v, p


def exact(a, b):
    return np.asarray(a, dtype=np.int64) @ np.asarray(b, dtype=np.int64).T


def fuzz_pack(src):
    R, K = src.int(0, 9), src.int(0, 200)
    dtype = src.pick(DTYPES)
    values = array(src, (R, K), dtype)
    view = src.int(0, 3)
    if view == 1 and values.size:
        values = np.asfortranarray(values)
    elif view == 2:
        values = torch.from_numpy(values.T.copy()).t() if dtype not in (np.uint64,) else values
    elif view == 3 and values.size:
        values = np.broadcast_to(values[:1], values.shape)
    axis = src.pick([0, 1, 0, 1, 2, -1])
    bits = bits_arg(src, (R, K)[axis] if axis in (0, 1) else 1)
    try:
        p = ops.pack(values, bits, signed=src.pick([True, False, 1]), axis=axis, scale=scale_arg(src, max(R, K)))
    except CLEAN:
        return
    back = np.asarray(ops.unpack(p))
    assert np.array_equal(back, np.asarray(values)), "pack/unpack round trip is not exact"


def fuzz_mpgemm(src):
    M, N, K = src.int(1, 8), src.int(1, 8), src.int(1, 200)
    a, pa = valid_operand(src, M, K, src.pick([0, 1]))
    share = src.bool()
    Kb = K if share or src.bool() else src.int(1, 200)
    b, pb = valid_operand(src, N, Kb, 0, k_layout=pa if share and Kb == K else None)
    try:
        out = ops.mpgemm(pa, pb, out_dtype=src.pick(TORCH_OUT))
    except CLEAN:
        return
    assert np.array_equal(np.asarray(out, dtype=np.int64), exact(a, b)), "mpgemm result is not exact"


def fuzz_state_dict(src):
    R, K = src.int(1, 6), src.int(1, 150)
    _, p = valid_operand(src, R, K, src.pick([0, 1]))
    sd = {k: v.clone() for k, v in p.state_dict().items()}
    meta = dict(p.metadata())
    for _ in range(src.int(1, 3)):
        key = src.pick(sorted(sd))
        t = sd[key]
        how = src.int(0, 5)
        if how == 0 and t.numel():  # overwrite some raw bytes
            t = sd[key] = t.contiguous()
            buf = t.view(-1).view(torch.uint8).numpy()
            i = src.int(0, buf.size - 1)
            chunk = src.bytes(src.int(1, 16))
            buf[i:i + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)[:buf.size - i]
        elif how == 1:
            sd[key] = t.reshape(-1)[:src.int(0, t.numel())]
        elif how == 2:
            sd[key] = t.to(src.pick([torch.int32, torch.float32, torch.int64, torch.uint8]))
        elif how == 3 and t.dim() == 2:
            sd[key] = t.t()
        elif how == 4:
            meta[src.pick(["shape", "axis", "signed", "dtype", "layout"])] = src.pick(
                [None, 0, 1, 2, -1, [1, 1], [2**40, 3], "int64", "float32", True, "bitplanes-v0"])
        else:
            sd.pop(key, None)
    try:
        q = soniq.PackedTensor.from_state_dict(sd, meta)
    except (ValueError, TypeError):
        return
    v = np.asarray(ops.unpack(q))
    ones = np.ones((2, q.shape[1]), dtype=np.int64)
    out = ops.mpgemm(q, ops.pack(ones, 1, signed=False, k_layout=q), out_dtype=None if q.scale is not None
                     else torch.int64)
    if q.scale is None:
        assert np.array_equal(np.asarray(out), exact(v, ones)), "accepted state gives inconsistent results"


def fuzz_quantize(src):
    R, K = src.int(0, 6), src.int(0, 70)
    x = torch.from_numpy(array(src, (R, K), np.float32))
    try:
        ops.quantize(x, scale_arg(src, K), bits_arg(src, K), signed=src.pick([True, False, None]),
                     noise=src.pick(["none", "uniform", "bogus", None]),
                     seed=src.pick([None, 0, 1, -1, 2**64, "7"]))
    except CLEAN:
        return


def fuzz_quantize_pack(src):
    """Fused activation quantize + pack: a clean exception, or exactly the two-step result."""
    R, K = src.int(0, 6), src.int(0, 200)
    x = array(src, (R, K), src.pick([np.float32, np.float32, np.float64]))
    if src.bool() and x.size:  # finite values on the grid's scale, some special floats
        x = (np.random.default_rng(src.int(0, 99)).normal(0, 50, x.shape) * src.pick([1e-3, 1.0])).astype(x.dtype)
        with np.errstate(over="ignore"):  # 1e300 -> inf in float32: fine, it clamps
            x.flat[src.int(0, x.size - 1)] = src.float()
    bits = bits_arg(src, K)
    scale = scale_arg(src, K) if src.bool() else src.pick([0.5, 0.01, 3.0])
    signed = src.pick([True, False, None])
    k_layout = None
    if src.bool() and isinstance(bits, np.ndarray) and bits.shape == (K,) and K:
        k_layout = soniq.KLayout.from_bits(np.clip(bits, 1, 8), np.array([src.int(1, 2) for _ in range(K)]))
    xt = torch.from_numpy(x) if src.bool() else x
    try:
        p = ops.quantize_pack(xt, scale, bits, signed=signed, k_layout=k_layout)
    except CLEAN:
        return
    sv = torch.as_tensor(np.broadcast_to(np.asarray(scale, np.float64), (K,)).copy()).float()
    bv = torch.as_tensor(np.broadcast_to(np.asarray(bits), (K,)).astype(np.int64))
    v = ops.quantize(torch.from_numpy(x), sv, bv.double(), signed=signed, axis=1, values_only=True).to(torch.int64)
    q = ops.pack(v, bv, signed=signed, axis=1, scale=sv, k_layout=p)
    for name in ("data", "sums", "k_perm", "ksegs", "desc"):
        assert torch.equal(getattr(p, name), getattr(q, name)), name
    assert np.array_equal(np.asarray(ops.unpack(p)), v.numpy())


def fuzz_viterbi(src):
    """Trellis paths with a width and a weight per step: a clean exception, or viterbi_ref's paths,
    and their stream decodes back to them."""
    from soniq import _trellis

    L, R, T = src.int(0, 17), src.int(0, 4), src.int(0, 40)
    bits = src.pick([src.int(0, 9), [src.int(0, 9) for _ in range(T)], [src.int(1, 5) for _ in range(T)]])
    x = torch.from_numpy(array(src, (R, T), np.float32)) if src.bool() else torch.randn(R, T) * 30
    values = torch.randint(-4, 5, (2 ** min(L, 16),)).float() if src.bool() else torch.from_numpy(
        array(src, (2 ** min(L, 16),), np.float32))
    w = None if src.bool() else torch.from_numpy(array(src, (T,), np.float32)).abs()
    try:
        got = _trellis.viterbi(x, L, bits, values, w)
    except CLEAN:
        return
    assert torch.equal(got, _trellis.viterbi_ref(x, L, bits, values, w))
    if R and T:
        assert torch.equal(_trellis.decode(_trellis.encode(got, L, bits), R, T, L, bits), got)


_SAVED = {}


def fuzz_load(src):
    if "raw" not in _SAVED:
        cfg = soniq.qat.QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3.0, a_bits_target=6.0)
        m = soniq.qat.prepare(torch.nn.Sequential(torch.nn.Linear(16, 8)), cfg)
        m(torch.randn(8, 16, generator=torch.Generator().manual_seed(0)))  # calibrate activations
        soniq.qat.freeze_precision(m)
        with tempfile.TemporaryDirectory() as d:
            soniq.save(soniq.convert(m), os.path.join(d, "m.safetensors"))
            _SAVED["raw"] = open(os.path.join(d, "m.safetensors"), "rb").read()
    raw = bytearray(_SAVED["raw"] or b"\0" * 16)
    for _ in range(src.int(1, 4)):
        i = src.int(0, len(raw) - 1)
        chunk = src.bytes(src.int(1, 8))
        raw[i:i + len(chunk)] = chunk
    if src.bool():
        raw = raw[:src.int(0, len(raw))]
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "bad.safetensors")
        with open(path, "wb") as f:
            f.write(bytes(raw))
        try:
            soniq.load(path)
        except Exception as e:  # any clean Python exception (safetensors has its own types)
            if isinstance(e, (SystemError, RecursionError)):
                raise


TARGETS = [fuzz_pack, fuzz_mpgemm, fuzz_state_dict, fuzz_quantize, fuzz_quantize_pack, fuzz_viterbi, fuzz_load]


def TestOneInput(data: bytes) -> None:
    src = Source(data)
    TARGETS[src.int(0, len(TARGETS) - 1)](src)


def random_mode(seconds: float) -> None:
    """Random inputs for `seconds` (for machines without atheris)."""
    end, n = time.monotonic() + seconds, 0
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    while time.monotonic() < end:
        TestOneInput(rng.bytes(int(rng.integers(1, 4096))))
        n += 1
    print(f"fuzz_ops: {n} random inputs in {seconds:.0f} s, no findings")


def replay(corpus: str) -> None:
    """Runs every saved input once (e.g. a corpus grown without sanitizers, replayed on the
    sanitizer build, where atheris' coverage hooks are shadowed by the preloaded libasan)."""
    names = sorted(os.listdir(corpus)) if os.path.isdir(corpus) else []
    for name in names:
        with open(os.path.join(corpus, name), "rb") as f:
            TestOneInput(f.read())
    print(f"fuzz_ops: replayed {len(names)} inputs from {corpus}, no findings")


if __name__ == "__main__":
    torch.set_num_threads(1)
    args = sys.argv[1:]
    if args and args[0] in ("--replay", "--random"):
        while args:
            flag, val = args.pop(0), args.pop(0) if args else None
            if flag == "--replay":
                replay(val)
            elif flag == "--random":
                random_mode(float(val or 60))
            else:
                sys.exit(f"unknown argument {flag!r}")
    elif atheris is None:
        sys.exit("atheris is not installed: pip install atheris, or use --random SECONDS / --replay DIR")
    else:
        atheris.Setup(sys.argv, TestOneInput)
        atheris.Fuzz()
