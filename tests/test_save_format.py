"""soniq.save format version 3 (compact metadata: int16/int32 permutations, no code sums, no
weight bit widths, no identity permutations, per-channel activation bits / scales stored once
when they are one value) round-trips exactly, and files of versions 1 (int64 metadata) and 2
(uint8 widths, every permutation, activation bits / scales per channel) still load."""
import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import soniq
from soniq import _model_file
from soniq._compact import channel_bits, code_sums, compact, widen
from soniq.qat import QATConfig


def packed_model(dynamic=None):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                            torch.nn.Linear(8 * 25, 70), torch.nn.ReLU(), torch.nn.Linear(70, 10))
    soniq.qat.prepare(m, QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3, a_bits_target=6,
                                   a_dynamic=dynamic))
    x = torch.randn(6, 3, 5, 5)
    m(x)
    soniq.qat.freeze_precision(m)
    return soniq.convert(m), x


def assert_same_layers(p, back):
    for n, m in p.named_modules():
        if isinstance(m, (soniq.nn.PackedLinear, soniq.nn.PackedConv2d)):
            for k, t in m.w.state_dict().items():
                u = back.get_submodule(n).w.state_dict()[k]
                assert u.dtype == t.dtype and torch.equal(u, t), (n, k)
            for k in ("a_bits", "a_scale"):
                assert torch.equal(getattr(back.get_submodule(n), k), getattr(m, k)), (n, k)


def saved(f):
    with safe_open(str(f), framework="pt") as h:
        return json.loads(h.metadata()["soniq"]), {k: h.get_tensor(k) for k in h.keys()}


def test_v3_compact_roundtrip(tmp_path):
    p, x = packed_model("token")
    f = tmp_path / "m.safetensors"
    soniq.save(p, f)
    meta, t = saved(f)
    assert meta["version"] == 3 and meta["packed"]["3"]["a_dynamic"] == "token"
    assert "a_dynamic" not in meta["packed"]["0"]  # conv layers keep static scales
    assert not any(k.endswith(("w.sums", "w.bits")) for k in t)
    assert t["3|w.row_perm"].dtype == torch.int16 and t["3|w.desc"].dtype == torch.int32
    assert t["3|a_bits"].dtype == torch.uint8 and t["3|a_bits"].numel() == 200  # two activation tiers
    back = soniq.load(f)
    assert_same_layers(p, back)
    assert torch.equal(back(x), p(x))


def test_v3_stores_uniform_channels_once(tmp_path):
    """One activation tier and per-token scales (the MiniLM demo's layers): activation bits and
    scales are one value, stored once; the K permutation is the identity and not stored."""
    torch.manual_seed(1)
    m = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.ReLU(), torch.nn.Linear(30, 6))
    soniq.qat.prepare(m, QATConfig(w_palette=(4, 8), a_palette=(4, 8), w_bits_target=5, a_bits_target=8,
                                   a_dynamic="token"))
    x = torch.randn(9, 40)
    m(x)
    soniq.qat.freeze_precision(m)
    p = soniq.convert(m)
    f = tmp_path / "m.safetensors"
    soniq.save(p, f)
    _, t = saved(f)
    for n, K in (("0", 40), ("2", 30)):
        assert t[f"{n}|a_bits"].shape == (1,) and t[f"{n}|a_scale"].shape == (1,), n
        assert f"{n}|w.k_perm" not in t and f"{n}|w.bits" not in t
        assert p.get_submodule(n).a_bits.shape == (K,)
    back = soniq.load(f)
    assert_same_layers(p, back)
    assert torch.equal(back(x), p(x))


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("signed", [False, True])
def test_compact_widen_rebuild_widths_and_permutations(axis, signed):
    """widen(compact(state)) gives back every tensor of the state (the widths from desc, ksegs
    and the permutations), for weights along rows and along K, tiers in any order."""
    g = torch.Generator().manual_seed(axis * 2 + int(signed))
    R, K = 13, 150
    n = (R, K)[axis]
    palette = [2, 3, 8, 4, 5] if signed else [1, 3, 8, 2, 5]  # (signed 1-bit codes are +-1)
    bits = torch.tensor(palette)[torch.randint(0, 5, (n,), generator=g)]
    lo = -(2 ** (bits - 1)) if signed else torch.zeros_like(bits)
    u = torch.rand(R, K, generator=g)
    span = (2.0 ** bits).view(-1, 1) if axis == 0 else (2.0 ** bits).view(1, -1)
    v = (u * span).to(torch.int64) + (lo.view(-1, 1) if axis == 0 else lo.view(1, -1))
    pt = soniq.ops.pack(v, bits, signed=signed, axis=axis)
    state = pt.state_dict()
    back = widen(compact(state), pt.metadata())
    assert sorted(back) == sorted(state)
    for k, t in state.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    assert torch.equal(channel_bits(pt.desc, pt.ksegs, pt.row_perm, pt.k_perm, axis), pt.bits)


def test_code_sums_from_planes():
    for bits in ([1, 3, 8, 2], [8, 8, 8, 8]):
        b = torch.tensor(bits)
        v = (torch.rand(4, 300) * (2.0 ** b[:, None])).to(torch.int64)  # all 1s in a 8-bit row: sign bits
        v[1] = 2 ** bits[1] - 1
        pt = soniq.ops.pack(v, b, signed=False, axis=0)
        assert torch.equal(code_sums(pt.data, pt.desc, pt.ksegs), pt.sums)


def write_v1(model, path):
    """What soniq.save wrote before version 2: int64 metadata with code sums, int64 a_bits."""
    packed = {n: m for n, m in model.named_modules() if isinstance(m, (soniq.nn.PackedLinear, soniq.nn.PackedConv2d))}
    tensors, records = {}, {}
    for n, m in packed.items():
        for k, t in m.w.state_dict().items():
            tensors[f"{n}|w.{k}"] = t.contiguous()
        tensors[f"{n}|a_bits"], tensors[f"{n}|a_scale"] = m.a_bits, m.a_scale
        if m.bias is not None:
            tensors[f"{n}|bias"] = m.bias
        rec = {"type": type(m).__name__, "w_meta": m.w.metadata(), "a_signed": m.a_signed}
        if isinstance(m, soniq.nn.PackedConv2d):
            rec["conv"] = m.conv_args()
        records[n] = rec
    meta = {"format": "soniq-model", "version": 1, "packed": records, "tree": _model_file._tree(model)}
    meta["sha256"] = _model_file._digest(tensors, meta)
    save_file(tensors, str(path), metadata={"soniq": json.dumps(meta)})


def write_v2(model, path):
    """What soniq.save wrote in version 2: uint8 widths, every permutation, per-channel
    activation bits and scales."""
    from soniq._compact import _index_dtype

    packed = {n: m for n, m in model.named_modules() if isinstance(m, (soniq.nn.PackedLinear, soniq.nn.PackedConv2d))}
    tensors, records = {}, {}
    for n, m in packed.items():
        for k, t in m.w.state_dict().items():
            if k != "sums":
                t = {"row_perm": t.to(_index_dtype(t.numel())), "k_perm": t.to(_index_dtype(t.numel())),
                     "desc": t.to(torch.int32), "ksegs": t.to(torch.int32), "bits": t.to(torch.uint8)}.get(k, t)
                tensors[f"{n}|w.{k}"] = t.contiguous()
        tensors[f"{n}|a_bits"], tensors[f"{n}|a_scale"] = m.a_bits.to(torch.uint8), m.a_scale
        if m.bias is not None:
            tensors[f"{n}|bias"] = m.bias
        rec = {"type": type(m).__name__, "w_meta": m.w.metadata(), "a_signed": m.a_signed}
        if isinstance(m, soniq.nn.PackedConv2d):
            rec["conv"] = m.conv_args()
        elif m.a_dynamic is not None:
            rec["a_dynamic"] = m.a_dynamic
        records[n] = rec
    meta = {"format": "soniq-model", "version": 2, "packed": records, "tree": _model_file._tree(model)}
    meta["sha256"] = _model_file._digest(tensors, meta)
    save_file(tensors, str(path), metadata={"soniq": json.dumps(meta)})


def test_version_2_still_loads(tmp_path):
    p, x = packed_model("token")
    write_v2(p, tmp_path / "v2.safetensors")
    back = soniq.load(tmp_path / "v2.safetensors")
    assert back[3].a_dynamic == "token"
    assert_same_layers(p, back)
    assert torch.equal(back(x), p(x))


def test_version_1_still_loads(tmp_path):
    p, x = packed_model()
    write_v1(p, tmp_path / "old.safetensors")
    back = soniq.load(tmp_path / "old.safetensors")
    assert back[3].a_dynamic is None and torch.equal(back(x), p(x))


def test_future_version_refused(tmp_path):
    p, _ = packed_model()
    f = tmp_path / "m.safetensors"
    soniq.save(p, f)
    with safe_open(str(f), framework="pt") as h:
        meta = json.loads(h.metadata()["soniq"])
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    meta["version"] = _model_file.VERSION + 1
    meta["sha256"] = _model_file._digest(tensors, meta)
    save_file(tensors, str(f), metadata={"soniq": json.dumps(meta)})
    with pytest.raises(ValueError, match=f"format version {_model_file.VERSION + 1}"):
        soniq.load(f)


def rewrite(f, edit):
    """f rewritten with edit(meta, tensors) applied and its checksum recomputed: a file another
    writer got wrong, which only the record checks can refuse."""
    with safe_open(str(f), framework="pt") as h:
        meta = json.loads(h.metadata()["soniq"])
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    edit(meta, tensors)
    meta["sha256"] = _model_file._digest(tensors, meta)
    save_file(tensors, str(f), metadata={"soniq": json.dumps(meta)})


def shift_first_row_start(meta, tensors):
    d = tensors["3|w.desc"].clone()
    d[0, 0] -= 5
    tensors["3|w.desc"] = d


@pytest.mark.parametrize("what,edit,match", [
    ("desc row start", shift_first_row_start, r"packed desc row group 0 is malformed"),
    ("a_signed", lambda m, t: m["packed"]["3"].__setitem__("a_signed", "no"), r"layer '3': a_signed must be true or false"),
    ("bias length", lambda m, t: t.__setitem__("3|bias", t["3|bias"][:3]), r"layer '3': bias must be float with 70 entries"),
    ("tree type", lambda m, t: m["tree"]["children"]["1"].__setitem__("type", "Module"),
     r"module type 'Module' is not one soniq.save writes"),
    ("a_bits length", lambda m, t: t.__setitem__("3|a_bits", t["3|a_bits"][:3]), r"layer '3': a_bits must hold 200 entries"),
    ("k_perm dropped", lambda m, t: t.pop("3|w.k_perm"), r"layer '3': k_layout does not match bits"),
], ids=["desc", "a_signed", "bias", "tree", "a_bits", "k_perm"])
def test_malformed_records_refused(tmp_path, what, edit, match):
    """Records that pass the checksum but are malformed raise ValueError at load naming the
    problem (they raised RuntimeError, or loaded: a_signed "no" as signed, a short bias failing
    only in forward, a bare nn.Module without forward)."""
    p, _ = packed_model()
    f = tmp_path / "m.safetensors"
    soniq.save(p, f)
    rewrite(f, edit)
    with pytest.raises(ValueError, match=match):
        soniq.load(f)


@pytest.mark.parametrize("model_file", ["../elsewhere.safetensors", "/tmp/x.safetensors", "", 3])
def test_folder_manifest_names_a_file_inside(tmp_path, model_file):
    """A SentenceTransformer folder's manifest must name its model file inside the folder: a
    path out of it (or no name) is refused before anything is built or read."""
    d = tmp_path / "st"
    d.mkdir()
    (d / "soniq.json").write_text(json.dumps({"format": "soniq-dir", "kind": "sentence-transformers",
                                              "model_file": model_file}))
    with pytest.raises(ValueError, match="it must be a file name in the folder"):
        soniq.load(d)


def test_saved_file_gets_the_usual_permissions(tmp_path):
    """The file is written to a temporary name (mkstemp: owner only) and renamed: it must come
    out as a plain open() would make it (umask), or keep the mode of the file it replaces."""
    import os
    p, _ = packed_model()
    f = tmp_path / "m.safetensors"
    mask = os.umask(0o022)
    try:
        soniq.save(p, f)
        assert os.stat(f).st_mode & 0o777 == 0o644
        os.chmod(f, 0o640)
        soniq.save(p, f)
        assert os.stat(f).st_mode & 0o777 == 0o640
    finally:
        os.umask(mask)


@pytest.mark.parametrize("layer", [
    torch.nn.MaxPool2d(2, ceil_mode=True), torch.nn.MaxPool2d(2, stride=1, dilation=2),
    torch.nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False, divisor_override=2),
    torch.nn.BatchNorm2d(8, affine=False), torch.nn.BatchNorm2d(8, track_running_stats=False),
    torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), torch.nn.Dropout(0.3, inplace=True),
])
def test_rebuilt_layers_keep_every_argument(layer, tmp_path):
    """soniq.load rebuilds standard layers from their saved constructor arguments: all of those
    that change the output (a pooling's ceil_mode changed the shape; reflect padding the values;
    BatchNorm without affine parameters could not be loaded)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), copy.deepcopy(layer), torch.nn.Flatten())
    excl = ("1",) if isinstance(layer, torch.nn.Conv2d) else ()
    soniq.qat.prepare(m, QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3, a_bits_target=6,
                                   exclude=excl))
    x = torch.randn(4, 3, 9, 9)
    m(x)
    soniq.qat.freeze_precision(m)
    p = soniq.convert(m)
    soniq.save(p, tmp_path / "m.safetensors")
    back = soniq.load(tmp_path / "m.safetensors")
    assert back[1].extra_repr() == p[1].extra_repr()
    with torch.no_grad():
        assert torch.equal(back(x), p(x))


def test_load_into_a_model_checks_it_before_changing_it(tmp_path):
    """soniq.load(path, model=...) with an architecture that does not match: a ValueError naming
    the difference, and the model left exactly as it was (no layer swapped in or added)."""
    p, x = packed_model()
    f = tmp_path / "m.safetensors"
    soniq.save(p, f)

    def arch(*extra, out=10):
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(8 * 25, 70), torch.nn.ReLU(), torch.nn.Linear(70, out), *extra)

    for model, msg in ((arch(torch.nn.Linear(10, 3)), r"unexpected|missing \['6\."),
                       (arch()[:5], "it has no layer '5'"),
                       (arch(out=5), "layer '5' has 5 outputs x 70 inputs, the file's 10 x 70"),
                       (torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                            torch.nn.Linear(8 * 25, 70), torch.nn.ReLU(), torch.nn.Linear(50, 10)),
                        "layer '5' has 10 outputs x 50 inputs, the file's 10 x 70"),
                       (torch.nn.Sequential(torch.nn.Linear(3, 3)), "no layer|is a Linear")):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        kinds = [type(c) for c in model.modules()]
        with pytest.raises(ValueError, match=msg):
            soniq.load(f, model=model)
        assert [type(c) for c in model.modules()] == kinds
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        soniq.load(f, model="x")
    assert torch.equal(soniq.load(f, model=arch())(x), p(x))


def test_load_checks_the_float_layers_shapes_too(tmp_path):
    """A layer kept in float (excluded) whose shape differs from the file's: refused before the
    model changes (it used to swap the packed layers in, then fail in load_state_dict)."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    soniq.qat.prepare(m, QATConfig(exclude=("2",)))
    x = torch.randn(5, 16)
    m(x)
    soniq.qat.freeze_precision(m)
    soniq.save(soniq.convert(m), tmp_path / "m.safetensors")
    other = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 5))
    with pytest.raises(ValueError, match=r"2.weight has shape \(5, 8\), the file's \(3, 8\)"):
        soniq.load(tmp_path / "m.safetensors", model=other)
    assert type(other[0]) is torch.nn.Linear


def test_single_layer_model_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    q = soniq.qat.prepare(torch.nn.Linear(16, 4), QATConfig())
    x = torch.randn(5, 16)
    q(x)
    soniq.qat.freeze_precision(q)
    p = soniq.convert(q)
    soniq.save(p, tmp_path / "one.safetensors")
    for back in (soniq.load(tmp_path / "one.safetensors"),
                 soniq.load(tmp_path / "one.safetensors", model=torch.nn.Linear(16, 4))):
        assert type(back) is type(p)
        with torch.no_grad():
            assert torch.equal(back(x), p(x))
