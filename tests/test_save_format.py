"""soniq.save format version 2 (compact metadata: int16/int32 permutations, no code sums,
uint8 bit widths) round-trips exactly, and files of version 1 (int64 metadata) still load."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import soniq
from soniq import _model_file
from soniq._compact import code_sums
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


def test_v2_compact_roundtrip(tmp_path):
    p, x = packed_model("token")
    f = tmp_path / "m.safetensors"
    soniq.save(p, f)
    with safe_open(str(f), framework="pt") as h:
        meta = json.loads(h.metadata()["soniq"])
        dtypes = {k: h.get_tensor(k).dtype for k in h.keys()}
    assert meta["version"] == 2 and meta["packed"]["3"]["a_dynamic"] == "token"
    assert "a_dynamic" not in meta["packed"]["0"]  # conv layers keep static scales
    assert not any(k.endswith("w.sums") for k in dtypes)
    assert dtypes["3|w.row_perm"] == torch.int16 and dtypes["3|w.desc"] == torch.int32
    assert dtypes["3|w.bits"] == torch.uint8 and dtypes["3|a_bits"] == torch.uint8
    back = soniq.load(f)
    for n in ("0", "3", "5"):
        for k, t in p.get_submodule(n).w.state_dict().items():
            u = back.get_submodule(n).w.state_dict()[k]
            assert u.dtype == t.dtype and torch.equal(u, t), (n, k)
    assert torch.equal(back(x), p(x))


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
    meta["version"] = 3
    meta["sha256"] = _model_file._digest(tensors, meta)
    save_file(tensors, str(f), metadata={"soniq": json.dumps(meta)})
    with pytest.raises(ValueError, match="format version 3"):
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
], ids=["desc", "a_signed", "bias", "tree"])
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
