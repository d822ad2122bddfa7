"""Trellis-coded weights (soniq._trellis, PTQConfig(trellis_states_log2=...), save formats 5 to 7)."""
import copy
import itertools
import json
import os
import warnings

import pytest
import torch
from torch import nn

import soniq
from soniq import _trellis as T
from soniq._gptq import gptq_codes, grid, h_error, mse_step, trellis_codes
from soniq._model_file import _digest
from soniq.nn import PackedConv2d, PackedLinear, QLinear
from soniq.ptq import PTQConfig, quantize
from conftest import TEST_ISAS
from test_ptq import _check_fake_equals_packed, _convnet, _data, _mlp


def _paths(L, k, steps):
    for bits in itertools.product(range(2 ** k), repeat=steps):
        s, path = 0, []
        for b in bits:
            s = ((s << k) | b) & (2 ** L - 1)
            path.append(s)
        yield path


@pytest.mark.parametrize("L,k,steps", [(4, 2, 5), (4, 1, 7), (6, 3, 3), (3, 3, 2), (5, 2, 1)])
def test_viterbi_finds_the_least_squares_path(L, k, steps):
    """Against every path from zero history (brute force): the same least cost."""
    g = torch.Generator().manual_seed(L * 100 + k * 10 + steps)
    values, x = torch.randn(2 ** L, generator=g), torch.randn(4, steps, generator=g)
    got = T.viterbi(x, L, k, values)
    assert got.shape == (4, steps) and got.dtype == torch.int64
    for r in range(4):
        best = min(float(((x[r] - values[p]) ** 2).sum()) for p in _paths(L, k, steps))
        assert float(((x[r] - values[got[r]]) ** 2).sum()) == pytest.approx(best, rel=1e-6, abs=1e-7)
        assert list(got[r]) in [list(p) for p in _paths(L, k, steps)]  # a path of this trellis


@pytest.mark.parametrize("isa", TEST_ISAS)
@pytest.mark.parametrize("L,k", [(3, 3), (5, 2), (8, 1), (8, 4), (8, 8), (9, 3), (10, 6), (12, 4), (12, 5),
                                 (13, 2), (14, 7), (16, 4)])
def test_native_viterbi_equals_the_torch_reference_on_every_isa(isa, L, k):
    """The native search gives viterbi_ref's paths exactly, ties included: codebook entries
    repeat (2^L int8 values), inputs on the codebook's grid make equal costs."""
    g = torch.Generator().manual_seed(L * 10 + k)
    steps = 9 if L >= 14 else 31
    cb = (T.codebook(L).float() if L >= 8 else torch.randint(-3, 4, (2 ** L,), generator=g).float())
    x = torch.cat([torch.randn(5, steps, generator=g) * 40, torch.randint(-6, 7, (2, steps), generator=g).float(),
                   torch.zeros(1, steps)])
    with soniq.use_isa(isa):
        got = T.viterbi(x, L, k, cb)
        t1 = T.viterbi(x[:, :1], L, k, cb)
    assert torch.equal(got, T.viterbi_ref(x, L, k, cb))
    assert torch.equal(t1, T.viterbi_ref(x[:, :1], L, k, cb))


@pytest.mark.parametrize("isa", TEST_ISAS)
@pytest.mark.parametrize("L,widths", [(8, (4, 5)), (8, (1, 8)), (12, (4, 5)), (12, (2, 3, 7)), (14, (4, 5)),
                                      (16, (1, 4)), (5, (1, 2, 5))])
def test_native_viterbi_with_a_width_and_a_weight_per_step_equals_the_reference(isa, L, widths):
    """Joint paths (a column's rows at their own widths, weighted errors): the same paths as
    viterbi_ref on every ISA, ties included; a weight of 1 everywhere gives the unweighted paths."""
    g = torch.Generator().manual_seed(L + len(widths))
    steps = 9 if L >= 14 else 33
    bits = torch.tensor(widths)[torch.randint(len(widths), (steps,), generator=g)]
    cb = T.codebook(L).float() if L >= 8 else torch.randint(-3, 4, (2 ** L,), generator=g).float()
    x = torch.cat([torch.randn(5, steps, generator=g) * 40, torch.randint(-6, 7, (2, steps), generator=g).float()])
    w = torch.rand(steps, generator=g) * 3
    w[::5] = 0  # a step of weight 0: any value, the first argmin
    with soniq.use_isa(isa):
        got, plain, ones = T.viterbi(x, L, bits, cb, w), T.viterbi(x, L, bits, cb), T.viterbi(x, L, bits, cb, torch.ones(steps))
    assert torch.equal(got, T.viterbi_ref(x, L, bits, cb, w))
    assert torch.equal(plain, T.viterbi_ref(x, L, bits, cb)) and torch.equal(ones, plain)
    k = bits.to(torch.int64)  # each state is its step's bits shifted onto the previous state
    assert bool((got[:, 0] >> k[0] == 0).all())
    assert bool(((got[:, 1:] >> k[1:]) == (got[:, :-1] & ((1 << (L - k[1:])) - 1))).all())


@pytest.mark.parametrize("widths", [(1, 2), (2, 3)])
def test_weighted_viterbi_with_mixed_widths_finds_the_least_weighted_squares_path(widths):
    """Against every path (brute force, L = 4): the least weighted cost."""
    g = torch.Generator().manual_seed(sum(widths))
    L, steps = 4, 5
    bits = torch.tensor([widths[i % 2] for i in range(steps)])
    values, x, w = torch.randn(16, generator=g), torch.randn(3, steps, generator=g), torch.rand(steps, generator=g) + 0.1
    got = T.viterbi(x, L, bits, values, w)

    def paths():
        for choice in itertools.product(*[range(2 ** int(b)) for b in bits]):
            s, path = 0, []
            for b, c in zip(bits.tolist(), choice):
                s = ((s << b) | c) & 15
                path.append(s)
            yield path
    for r in range(3):
        best = min(float((w * (x[r] - values[p]) ** 2).sum()) for p in paths())
        assert float((w * (x[r] - values[got[r]]) ** 2).sum()) == pytest.approx(best, rel=1e-6, abs=1e-7)


def test_native_viterbi_takes_strided_float64_and_refuses_bad_arguments():
    g = torch.Generator().manual_seed(3)
    cb = T.codebook(8)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * 30
    assert torch.equal(T.viterbi(x.T, 8, 4, cb), T.viterbi_ref(x.T, 8, 4, cb))  # non-contiguous, float64
    assert T.viterbi(torch.zeros(0, 5), 8, 4, cb).shape == (0, 5)
    with pytest.raises(ValueError, match="finite"):
        T.viterbi(torch.tensor([[0.0, float("nan")]]), 8, 4, cb)
    with pytest.raises(ValueError, match="at most 1e.18 in magnitude"):
        T.viterbi(torch.tensor([[0.0, 3e18]]), 8, 4, cb, torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="bits"):
        T.viterbi(x, 8, 9, cb)
    with pytest.raises(ValueError, match="states_log2"):
        T.viterbi(x, 17, 4, T.codebook(8))
    with pytest.raises(ValueError, match="2\\^8 entries"):
        T.viterbi(x, 8, 4, cb[:100])
    with pytest.raises(ValueError, match="float"):
        T.viterbi(torch.zeros(3, 4, dtype=torch.int64), 8, 4, cb)
    with pytest.raises(ValueError, match="one width per step .40."):  # x.T: 6 sequences of 40 steps
        T.viterbi(x.T, 8, torch.full((39,), 4), cb)
    with pytest.raises(ValueError, match="bits"):
        T.viterbi(x.T, 8, torch.tensor([4, 0] * 20), cb)
    with pytest.raises(ValueError, match="weights must be 40 finite values >= 0"):
        T.viterbi(x.T, 8, 4, cb, -torch.ones(40))
    with pytest.raises(ValueError, match="weights must be 40 finite values >= 0"):
        T.viterbi(x.T, 8, 4, cb, torch.ones(6))


@pytest.mark.parametrize("L,k", [(8, 4), (12, 5), (10, 3), (9, 1), (12, 8), (8, 8), (16, 1), (16, 7)])
@pytest.mark.parametrize("steps", [1, 13])
def test_streams_round_trip_and_are_k_bits_per_weight(L, k, steps, monkeypatch):
    g = torch.Generator().manual_seed(L + k)
    x = torch.randn(7, steps, generator=g)
    states = T.viterbi(x, L, k, torch.randn(2 ** L, generator=g))
    st = T.encode(states, L, k)
    assert st.dtype == torch.uint8 and st.numel() == (7 * steps * k + 7) // 8
    assert torch.equal(T.decode(st, 7, steps, L, k), states)
    monkeypatch.setattr(T, "_DECODE_CHUNK", 2 * steps)  # decoded 2 sequences at a time: the same
    assert torch.equal(T.decode(st, 7, steps, L, k), states)


@pytest.mark.parametrize("L,widths", [(8, (4, 5)), (12, (1, 8)), (16, (1, 2, 7)), (14, (4, 5)), (9, (3,))])
@pytest.mark.parametrize("steps", [1, 2, 29])
def test_streams_with_a_width_per_step_round_trip(L, widths, steps, monkeypatch):
    g = torch.Generator().manual_seed(L * steps)
    bits = torch.tensor(widths)[torch.randint(len(widths), (steps,), generator=g)]
    states = T.viterbi(torch.randn(6, steps, generator=g), L, bits, torch.randn(2 ** L, generator=g))
    st = T.encode(states, L, bits)
    assert st.numel() == (6 * int(bits.sum()) + 7) // 8 == T.stream_bytes(6, steps, bits)  # sum of the widths
    assert torch.equal(T.decode(st, 6, steps, L, bits), states)
    monkeypatch.setattr(T, "_DECODE_CHUNK", steps)  # one sequence at a time: the same
    assert torch.equal(T.decode(st, 6, steps, L, bits), states)
    if len(set(bits.tolist())) == 1:  # one width: the stream of that int width
        assert torch.equal(st, T.encode(states, L, int(bits[0])))


def test_encode_refuses_what_is_not_a_path_and_decode_a_wrong_length():
    s = torch.tensor([[1, 6, 9]])  # L = 4, k = 2: 1 -> 6 needs 6 >> 2 == 1 & 3: yes; 6 -> 9: 9 >> 2 = 2 == 6 & 3: yes
    assert torch.equal(T.decode(T.encode(s, 4, 2), 1, 3, 4, 2), s)
    with pytest.raises(ValueError, match="do not form bitshift paths"):
        T.encode(torch.tensor([[1, 8]]), 4, 2)  # 8 >> 2 = 2, not 1 & 3
    with pytest.raises(ValueError, match="do not form bitshift paths"):
        T.encode(torch.tensor([[5, 4]]), 4, 2)  # 5 >= 2^2: not from zero history
    with pytest.raises(ValueError, match=r"states must lie in \[0, 2\^4\)"):
        T.encode(torch.tensor([[16]]), 4, 2)
    with pytest.raises(ValueError, match="trellis stream must be 2 uint8 bytes"):
        T.decode(torch.zeros(3, dtype=torch.uint8), 1, 8, 4, 2)
    bits = torch.tensor([1, 3, 2])  # L = 4: 1 -> 13 (13 >> 3 = 1 == 1 & 1) -> 5 (5 >> 2 = 1 == 13 & 3)
    assert torch.equal(T.decode(T.encode(torch.tensor([[1, 13, 5]]), 4, bits), 1, 3, 4, bits), torch.tensor([[1, 13, 5]]))
    with pytest.raises(ValueError, match="do not form bitshift paths"):
        T.encode(torch.tensor([[1, 13, 9]]), 4, bits)  # 9 >> 2 = 2, not 13 & 3 = 1


def test_codebook_is_int8_gaussian_and_fixed():
    cb = T.codebook(12)
    assert cb.dtype == torch.int8 and cb.numel() == 4096 and torch.equal(cb, T.codebook(12))
    v = cb.double() / T.CODEBOOK_SCALE
    assert abs(float(v.mean())) < 0.05 and abs(float(v.std()) - 1) < 0.05 and int(cb.abs().max()) <= 127


@pytest.mark.parametrize("bits", [3, 4])
def test_trellis_rounding_beats_the_uniform_grid_on_gaussian_weights(bits):
    """The reason for the format: on Gaussian rows (what the Hadamard rotation makes of a layer's
    weights) the trellis at k bits leaves much less output error than GPTQ on the k-bit grid."""
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(96, 64, generator=g, dtype=torch.float64)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64) @ (torch.randn(64, 64, generator=g, dtype=torch.float64) * 0.3)
    h = x.T @ x / 512
    rb = torch.full((96,), bits)
    codes, states, step = trellis_codes(w, h, rb, T.codebook(10))
    assert codes.dtype == torch.int8 and torch.equal(codes, T.codebook(10)[states])
    e_trellis = float(h_error(w, codes.double() * step[:, None], h).sum())
    gstep = mse_step(w.float(), bits).double()
    e_grid = float(h_error(w, gptq_codes(w, h, gstep, rb.double()) * gstep[:, None], h).sum())
    assert e_trellis < 0.8 * e_grid  # measured 0.70 at 3 bits, 0.63 at 4


@pytest.mark.parametrize("act_order", [True, False])
def test_trellis_codes_with_dead_columns_and_either_column_order(act_order):
    """Columns no input reaches (H_kk = 0) get a code of their own path but no error feedback;
    the rounding is the same problem in either column order, so both beat the grid."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(128, 16, generator=g, dtype=torch.float64)
    x = torch.randn(256, 16, generator=g, dtype=torch.float64)
    x[:, [3, 9]] = 0
    h = x.T @ x / 256
    codes, states, step = trellis_codes(w, h, torch.full((128,), 4), T.codebook(10), act_order=act_order)
    assert torch.equal(codes, T.codebook(10)[states]) and bool(torch.isfinite(step).all())
    q = codes.double() * step[:, None]
    gstep = mse_step(w.float(), 4).double()
    e_grid = float(h_error(w, gptq_codes(w, h, gstep, torch.full((128,), 4.0), act_order=act_order)
                           * gstep[:, None], h).sum())
    assert float(h_error(w, q, h).sum()) < e_grid


def test_joint_paths_run_down_all_rows_at_their_widths():
    """joint (the default): each column is one path over every row, a row's steps its width; the
    stream is sum(row_bits) bits per column, and it decodes to the codes."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 6, generator=g, dtype=torch.float64)
    rb = torch.tensor([4, 5, 5, 4] * 5)
    codes, states, step = trellis_codes(w, torch.eye(6, dtype=torch.float64), rb, T.codebook(8))
    k = rb.to(torch.int64)[:, None]
    assert bool((states[0] >> k[0] == 0).all()) and bool(((states[1:] >> k[1:]) == (states[:-1] & ((1 << (8 - k[1:])) - 1))).all())
    tw = T.TrellisWeights.from_states((20, 6), rb, states, T.codebook(8), joint=True)
    assert sorted(tw.streams) == [0] and tw.streams[0].numel() == (6 * 90 + 7) // 8
    assert torch.equal(tw.codes(), codes)


def test_joint_paths_spend_a_column_s_bits_where_they_cut_the_error_most():
    """Rows of unequal scale: the joint weighted paths leave less layer error than one path
    per width, at the same bits (why it is the default)."""
    g = torch.Generator().manual_seed(8)
    w = torch.randn(192, 64, generator=g, dtype=torch.float64) * torch.rand(192, 1, generator=g, dtype=torch.float64).add(0.5)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64)
    h = x.T @ x / 512
    rb = (w.pow(2).mean(1) > w.pow(2).mean(1).median()).to(torch.int64) + 4  # the larger rows at 5 bits
    err = {}
    for joint in (False, True):
        codes, states, step = trellis_codes(w, h, rb, T.codebook(10), joint=joint)
        err[joint] = float(h_error(w, codes.double() * step[:, None], h).sum())
    assert err[True] < 0.95 * err[False]


def test_rows_of_each_width_form_the_sequences():
    """Mixed widths: the k-bit rows of each column are one sequence of k-bit steps."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(20, 6, generator=g, dtype=torch.float64)
    rb = torch.tensor([4, 5] * 10)
    codes, states, step = trellis_codes(w, torch.eye(6, dtype=torch.float64), rb, T.codebook(8), joint=False)
    tw = T.TrellisWeights.from_states((20, 6), rb, states, T.codebook(8))
    assert sorted(tw.streams) == [4, 5] and tw.streams[4].numel() == (6 * 10 * 4 + 7) // 8
    assert torch.equal(tw.codes(), codes)


def _trellis_cfg(**kw):
    return PTQConfig(w_palette=(4, 5), w_bits_target=4.5, trellis_states_log2=8, **kw)


@pytest.mark.parametrize("net,shape", [(_mlp, (384, 48)), (_convnet, (96, 3, 8, 8))])
def test_trellis_ptq_fake_equals_packed_and_reports_the_stored_bits(net, shape):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g)
    m = quantize(net(), list(x.split(32)), _trellis_cfg(asymmetric=True, row_weighting=0.5))
    qs = [q for q in m.modules() if hasattr(q, "w_trellis")]
    assert qs and all(bool((q.w_quant.bits() == 8).all()) for q in qs)  # run as 8-bit rows
    n = sum(q.weight.numel() for q in qs)
    stored = sum(float(q.w_trellis.row_bits.double().sum()) * q.w_quant.per_channel for q in qs) / n
    assert 4.0 <= stored <= 4.5
    assert soniq.qat.precision_report(m)["avg_w_bits"] == pytest.approx(stored, rel=1e-6)
    for q in qs:  # the weight the fake model uses is the codebook's entries x the row step
        step = q.w_quant.step().detach()
        codes = torch.round(q.effective_weight().detach().reshape(q.weight.shape[0], -1) / step[:, None])
        assert torch.equal(codes.to(torch.int8), q.w_trellis.codes())
    packed = soniq.convert(m)
    _check_fake_equals_packed(m, packed, x[:19])
    assert all(hasattr(packed.get_submodule(n), "w_trellis") for n, q in m.named_modules() if hasattr(q, "w_trellis"))


def _saved_meta(path):
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return json.loads(f.metadata()["soniq"]), {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("net,shape", [(_mlp, (384, 48)), (_convnet, (96, 3, 8, 8))])
def test_saved_trellis_model_stores_streams_and_loads_exactly(tmp_path, net, shape, joint):
    """joint paths: format 7, one stream per layer; one path per width: format 6, a stream per width."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(*shape, generator=g)
    m = quantize(net(), list(x.split(32)), _trellis_cfg(trellis_joint=joint))
    packed = soniq.convert(m)
    path = tmp_path / "m.safetensors"
    soniq.save(packed, path)
    meta, tensors = _saved_meta(path)
    assert meta["version"] == (7 if joint else 6) and "trellis|codebook8" in tensors
    names = [n for n, q in packed.named_modules() if hasattr(q, "w_trellis")]
    for n in names:
        assert meta["packed"][n]["trellis"] == ({"states_log2": 8, "paths": "joint"} if joint else {"states_log2": 8})
        assert f"{n}|w.data" not in tensors and f"{n}|w.trellis.row_bits" in tensors
        streams = sorted(k for k in tensors if k.startswith(f"{n}|w.trellis.") and not k.endswith("row_bits"))
        rb = tensors[f"{n}|w.trellis.row_bits"]
        assert streams == ([f"{n}|w.trellis.paths"] if joint else [f"{n}|w.trellis.s{k}" for k in sorted(set(rb.tolist()))])
        k_in = packed.get_submodule(n).w.shape[1]
        assert sum(tensors[k].numel() for k in streams) <= (k_in * int(rb.sum()) + 7) // 8 + (0 if joint else 1)
        # row steps are bfloat16 values, stored in 2 bytes; the biases stay float32
        assert meta["packed"][n]["narrow"] == {"w.scale": "bfloat16"}
        assert tensors[f"{n}|w.scale"].dtype == torch.bfloat16
        assert torch.equal(tensors[f"{n}|w.scale"].float(), packed.get_submodule(n).w.row_scale)
        assert tensors[f"{n}|bias"].dtype == torch.float32
    back = soniq.load(path)
    with torch.no_grad():
        assert torch.equal(back(x[:23]), packed(x[:23]))
    for n in names:
        assert torch.equal(soniq.ops.unpack(back.get_submodule(n).w), soniq.ops.unpack(packed.get_submodule(n).w))
    path2 = tmp_path / "again.safetensors"
    soniq.save(back, path2)  # the loaded model keeps its streams: the same file
    assert path.read_bytes() == path2.read_bytes()
    # about k bits per weight: smaller than the same layers as 8-bit rows
    plain = copy.deepcopy(packed)
    for n in names:
        del plain.get_submodule(n).w_trellis
    soniq.save(plain, tmp_path / "plain.safetensors")
    assert os.path.getsize(path) < 0.75 * os.path.getsize(tmp_path / "plain.safetensors")
    assert _saved_meta(tmp_path / "plain.safetensors")[0]["version"] == 3


def _rewrite(path, meta, tensors, out):
    from safetensors.torch import save_file

    meta = dict(meta)
    meta["sha256"] = _digest(tensors, meta)
    save_file(tensors, out, metadata={"soniq": json.dumps(meta)})


@pytest.mark.parametrize("edit,match", [
    (lambda m, t: t.__setitem__("0|w.trellis.s4", t["0|w.trellis.s4"][:-1].clone()),
     "trellis stream for 4-bit rows must be"),
    (lambda m, t: t.__setitem__("0|w.trellis.row_bits", t["0|w.trellis.row_bits"].to(torch.int32)),
     "trellis row_bits must be uint8"),
    (lambda m, t: t.__setitem__("trellis|codebook8", t["trellis|codebook8"][:100].clone()),
     "trellis codebook must be int8 of 2\\^8 entries"),
    (lambda m, t: t.pop("trellis|codebook8"), "without a stored codebook"),
    (lambda m, t: m["packed"]["0"].__setitem__("trellis", {"states_log2": True}), "without a stored codebook"),
    (lambda m, t: t.__setitem__("0|w.scale", -t["0|w.scale"]), "row scales must be"),
    (lambda m, t: t.pop("0|w.trellis.s5"), "trellis widths"),
    (lambda m, t: t.__setitem__("trellis|codebook9", torch.zeros(256, dtype=torch.int8))
     or m["packed"]["0"].__setitem__("trellis", {"states_log2": 9}), "codebook must be int8 of 2\\^9 entries"),
    (lambda m, t: m["packed"]["0"].__setitem__("trellis", {"states_log2": 20})
     or t.__setitem__("trellis|codebook20", torch.zeros(8, dtype=torch.int8)), "states_log2 must be an integer in 8..16"),
    (lambda m, t: t["0|w.trellis.row_bits"].__setitem__(0, 9), "trellis widths"),
    (lambda m, t: t["0|w.trellis.row_bits"].__setitem__(0, 0), "trellis widths"),
    (lambda m, t: t.__setitem__("0|w.trellis.row_bits", t["0|w.trellis.row_bits"][:-1].clone()),
     "trellis row_bits must be uint8"),
    (lambda m, t: t.__setitem__("0|w.trellis.s04", t["0|w.trellis.s4"].clone()), "unexpected or missing tensors"),
    (lambda m, t: t.__setitem__("0|w.data", torch.zeros(3, dtype=torch.int64)), "unexpected or missing tensors"),
    (lambda m, t: t.__setitem__("0|a_bits", torch.zeros(1, dtype=torch.uint8)), "layer '0': .*bits"),
    (lambda m, t: m["packed"]["0"].__setitem__("narrow", {"w.scale": "float16"}), "narrow may hold"),
    (lambda m, t: m["packed"]["0"].__setitem__("narrow", {"w.data": "bfloat16"}), "narrow may hold"),
    (lambda m, t: m["packed"]["0"].__setitem__("narrow", []), "narrow must be a non-empty object"),
    (lambda m, t: t.__setitem__("0|w.scale", t["0|w.scale"].float()), "recorded as bfloat16 but stored as float32"),
    (lambda m, t: m["packed"]["0"].__setitem__("narrow", {"w.scale": "bfloat16", "bias": "float16"}),
     "bias is recorded as float16 but stored as float32"),
    (lambda m, t: m.__setitem__("version", 5) or [r.pop("narrow") for r in m["packed"].values()],
     "row scales must be .* positive float32"),  # a version 5 reader's view of a bfloat16 scale
])
def test_malformed_trellis_records_are_refused_by_name(tmp_path, edit, match):
    """A file of one path per width (format 6)."""
    _refused(tmp_path, edit, match, joint=False)


@pytest.mark.parametrize("edit,match", [
    (lambda m, t: t.__setitem__("0|w.trellis.paths", t["0|w.trellis.paths"][:-1].clone()),
     "trellis joint stream must be"),
    (lambda m, t: t["0|w.trellis.row_bits"].__setitem__(0, 5 if int(t["0|w.trellis.row_bits"][0]) == 4 else 4),
     "trellis joint stream must be"),  # the widths' sum no longer what the stream holds
    (lambda m, t: t.pop("0|w.trellis.paths"), "missing tensors for a trellis weight"),
    (lambda m, t: t.__setitem__("0|w.trellis.s4", torch.zeros(4, dtype=torch.uint8)), "unexpected or missing tensors"),
    (lambda m, t: m["packed"]["0"]["trellis"].__setitem__("paths", "by_width"), "trellis record .* not understood"),
    (lambda m, t: m["packed"]["0"]["trellis"].__setitem__("order", 1), "trellis record .* not understood"),
    (lambda m, t: m.__setitem__("version", 6), "not understood .*this file is version 6"),
    (lambda m, t: m["packed"]["0"]["trellis"].pop("paths"), "unexpected or missing tensors"),
    (lambda m, t: t["0|w.trellis.row_bits"].__setitem__(0, 9), "trellis widths"),
    (lambda m, t: m.__setitem__("version", 8), "format version 8; this soniq reads versions 1 to 7"),
])
def test_malformed_joint_trellis_records_are_refused_by_name(tmp_path, edit, match):
    """A file of joint paths (format 7)."""
    _refused(tmp_path, edit, match, joint=True)


def _refused(tmp_path, edit, match, joint):
    x, batches = _data()
    packed = soniq.convert(quantize(_mlp(), batches, _trellis_cfg(trellis_joint=joint)))
    path = tmp_path / "m.safetensors"
    soniq.save(packed, path)
    meta, tensors = _saved_meta(path)
    assert sorted(k for k in tensors if k.startswith("0|w.trellis.") and not k.endswith("row_bits")) == \
        (["0|w.trellis.paths"] if joint else ["0|w.trellis.s4", "0|w.trellis.s5"])
    edit(meta, tensors)
    _rewrite(path, meta, tensors, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match=match):
        soniq.load(tmp_path / "bad.safetensors")


def test_a_version_5_file_float32_steps_and_no_narrow_record_still_loads(tmp_path):
    x, batches = _data()
    packed = soniq.convert(quantize(_mlp(), batches, _trellis_cfg(trellis_joint=False)))
    soniq.save(packed, tmp_path / "m.safetensors")
    meta, tensors = _saved_meta(tmp_path / "m.safetensors")
    meta["version"] = 5  # as session-45 soniq wrote it: float32 row steps, no "narrow"
    for n, r in meta["packed"].items():
        del r["narrow"]
        tensors[f"{n}|w.scale"] = tensors[f"{n}|w.scale"].float()
    _rewrite(tmp_path / "m.safetensors", meta, tensors, tmp_path / "v5.safetensors")
    back = soniq.load(tmp_path / "v5.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x[:23]), packed(x[:23]))


def test_float16_biases_are_rounded_by_the_ptq_and_saved_in_2_bytes(tmp_path):
    x, batches = _data()
    ref = quantize(_mlp(), batches, _trellis_cfg())
    m = quantize(_mlp(), batches, _trellis_cfg(float16_biases=True))
    qs = {n: q for n, q in m.named_modules() if hasattr(q, "w_trellis")}
    for n, q in qs.items():  # float16 values, within float16's rounding of the float32 ones
        b, b32 = q.bias.detach(), ref.get_submodule(n).bias.detach()
        assert b.dtype == torch.float32 and torch.equal(b.half().float(), b) and not torch.equal(b, b32)
        torch.testing.assert_close(b, b32, rtol=2 ** -11, atol=0)
    packed = soniq.convert(m)
    _check_fake_equals_packed(m, packed, x[:21])
    soniq.save(packed, tmp_path / "m.safetensors")
    meta, tensors = _saved_meta(tmp_path / "m.safetensors")
    for n in qs:
        assert meta["packed"][n]["narrow"] == {"bias": "float16", "w.scale": "bfloat16"}
        assert tensors[f"{n}|bias"].dtype == torch.float16
    back = soniq.load(tmp_path / "m.safetensors")
    for n in qs:
        assert back.get_submodule(n).bias.dtype == torch.float32
        assert torch.equal(back.get_submodule(n).bias, packed.get_submodule(n).bias)
    with torch.no_grad():
        assert torch.equal(back(x[:23]), packed(x[:23]))
    soniq.save(soniq.convert(ref), tmp_path / "ref.safetensors")
    n_bias = sum(q.bias.numel() for q in qs.values())  # 2 bytes less per bias
    saved = os.path.getsize(tmp_path / "ref.safetensors") - os.path.getsize(tmp_path / "m.safetensors")
    assert saved >= 2 * n_bias - 64  # (the records' "narrow" lengthen the header a little)
    # a grid layer: its bias narrowed too, its scales stay in its float32 packed state
    grid = soniq.convert(quantize(_mlp(), batches, PTQConfig(w_palette=(4, 5), w_bits_target=4.5,
                                                             float16_biases=True)))
    soniq.save(grid, tmp_path / "grid.safetensors")
    meta, tensors = _saved_meta(tmp_path / "grid.safetensors")
    assert meta["version"] == 6 and all(r["narrow"] == {"bias": "float16"} for r in meta["packed"].values())
    back = soniq.load(tmp_path / "grid.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x[:23]), grid(x[:23]))


def test_a_stream_changed_after_saving_fails_the_checksum(tmp_path):
    x, batches = _data()
    soniq.save(soniq.convert(quantize(_mlp(), batches, _trellis_cfg())), tmp_path / "m.safetensors")
    meta, tensors = _saved_meta(tmp_path / "m.safetensors")
    tensors["0|w.trellis.paths"][0] ^= 1
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "flip.safetensors", metadata={"soniq": json.dumps(meta)})
    with pytest.raises(ValueError, match="checksum mismatch"):
        soniq.load(tmp_path / "flip.safetensors")


def test_weights_trained_after_the_trellis_are_saved_as_their_8_bit_codes(tmp_path):
    x, batches = _data()
    m = quantize(_mlp(), batches, _trellis_cfg())
    q = m.get_submodule("0")
    with torch.no_grad():
        q.weight[0, 0] += 3 * q.w_quant.step()[0]  # another code in row 0
    assert soniq.qat.precision_report(m)["layers"]["0"]["w_bits"] != soniq.qat.precision_report(
        quantize(_mlp(), batches, _trellis_cfg()))["layers"]["0"]["w_bits"]  # counted as 8 bits now
    assert float(q.stored_w_bits().min()) == 8 and float(m.get_submodule("2").stored_w_bits().max()) <= 5
    with pytest.warns(UserWarning, match="0: the weights changed since they were trellis-coded"):
        packed = soniq.convert(m)
    assert not hasattr(packed.get_submodule("0"), "w_trellis") and hasattr(packed.get_submodule("2"), "w_trellis")
    soniq.save(packed, tmp_path / "m.safetensors")
    back = soniq.load(tmp_path / "m.safetensors")
    with torch.no_grad():
        assert torch.equal(back(x[:9]), packed(x[:9]))
    _check_fake_equals_packed(m, packed, x[:9])


@pytest.mark.parametrize("kw,match", [
    (dict(trellis_states_log2=7), "trellis_states_log2 must be 0 .the uniform grid. or in 8..16"),
    (dict(trellis_states_log2=17), "trellis_states_log2 must be 0"),
    (dict(trellis_states_log2=12.0), "trellis_states_log2 must be 0"),
    (dict(trellis_states_log2=True), "trellis_states_log2 must be 0"),
    (dict(trellis_states_log2=12, trellis_block=0), "trellis_block must be a positive integer"),
    (dict(trellis_states_log2=12, trellis_joint=1), "trellis_joint must be True or False"),
    (dict(trellis_states_log2=12, rounding="rtn"), "trellis_states_log2 > 0 needs rounding='gptq'"),
    (dict(trellis_states_log2=12, clip_search=(0.9,)), "cannot be combined with clip_search"),
    (dict(trellis_states_log2=12, reconstruct_blocks=("0",), reconstruct_steps=2),
     "cannot be combined with reconstruct_steps"),
])
def test_trellis_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        PTQConfig(**kw)


def test_a_layer_whose_packed_weight_was_replaced_is_saved_as_planes(tmp_path):
    """load_state_dict puts other codes into a loaded trellis layer: soniq.save must not write its
    old streams (the file would load as the old model)."""
    x, batches = _data()
    packed = soniq.convert(quantize(_mlp(), batches, _trellis_cfg()))
    soniq.save(packed, tmp_path / "m.safetensors")
    other = soniq.convert(quantize(_mlp(seed=3), batches, PTQConfig(w_palette=(8, 8), w_bits_target=8.0)))
    back = soniq.load(tmp_path / "m.safetensors")
    back.get_submodule("0").load_state_dict(other.get_submodule("0").state_dict())
    with pytest.warns(UserWarning, match="no longer what its trellis streams decode to"):
        soniq.save(back, tmp_path / "changed.safetensors")
    meta, tensors = _saved_meta(tmp_path / "changed.safetensors")
    assert "trellis" not in meta["packed"]["0"] and meta["packed"]["2"]["trellis"] == {"states_log2": 8, "paths": "joint"}
    again = soniq.load(tmp_path / "changed.safetensors")
    with torch.no_grad():
        assert torch.equal(again(x[:7]), back(x[:7]))
