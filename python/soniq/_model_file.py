"""One model file: converted models as safetensors + JSON metadata (soniq.save / soniq.load
of anything but a SentenceTransformer folder, see _io.py).

The file holds every tensor (packed weights via PackedTensor.state_dict(), activation
bits/scales, biases, the other modules' state) and, in the header metadata, a JSON record
with a format version, the module tree (when built from standard layers; otherwise pass
the architecture as load(path, model=...)) and a SHA-256 of all tensor bytes, so a
truncated or tampered file raises a clear error instead of loading wrong numbers.
Writes go to a temporary file in the same folder, then os.replace (atomic).
"""
from __future__ import annotations

import collections
import hashlib
import json
import os
import tempfile
import warnings

import torch
from torch import nn

from ._compact import compact, widen
from ._fastpath import disable_torch_fastpaths
from ._fuse import FusedActivation, fuse_activations, unfuse_activations
from ._packed_nn import PackedConv2d, PackedLinear
from .nn import QConv2d, QLinear
from . import _trellis, ops
from .packed import KLayout, PackedTensor

FORMAT, VERSION = "soniq-model", 7
# version 1: packed metadata as int64; version 2: compact (soniq._compact), activation bits
# uint8, optional per-layer "a_dynamic"; version 3: no weight bit widths and no identity
# permutations (rebuilt from the blocks), activation bits / scales that are one value for every
# input channel stored once (a 1-element tensor: per-token dynamic scales and one activation
# tier make them so); version 4: optional per-layer "hadamard_block" (input rotation), written only
# by models that use it (others are written as version 3, which older soniq reads); version 5:
# trellis-coded weights (soniq._trellis): such a layer stores its k-bit streams, row widths and
# row scales instead of the packed planes, the file one codebook per trellis size; written only
# by models that hold them (others as version 3 or 4); version 6: float32 values held in 2 bytes
# where that is lossless, named in the layer's record ("narrow": {"bias": "float16", "w.scale":
# "bfloat16"}, widened back to float32 on load): the biases a PTQConfig(float16_biases=True) rounded
# and the row scales of trellis layers (bfloat16 values by construction); written only when
# some layer has them (others as version 3, 4 or 5); version 7: trellis layers whose input columns
# are each one path down all rows (soniq._trellis, joint: the record's "trellis" holds "paths":
# "joint", the layer one stream `w.trellis.paths` instead of one per width); written only when some
# layer has such paths (others as version 3 to 6)

# leaf modules rebuilt from their constructor arguments (state, if any, is in the tensors)
_LEAVES = {
    "ReLU": lambda m: {"inplace": m.inplace}, "ReLU6": lambda m: {"inplace": m.inplace},
    "GELU": lambda m: {"approximate": m.approximate},
    "Tanh": lambda m: {}, "Sigmoid": lambda m: {}, "Identity": lambda m: {},
    "LeakyReLU": lambda m: {"negative_slope": m.negative_slope, "inplace": m.inplace},
    "Flatten": lambda m: {"start_dim": m.start_dim, "end_dim": m.end_dim},
    "Dropout": lambda m: {"p": m.p, "inplace": m.inplace},
    "MaxPool2d": lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                            "dilation": m.dilation, "return_indices": m.return_indices, "ceil_mode": m.ceil_mode},
    "AvgPool2d": lambda m: {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
                            "ceil_mode": m.ceil_mode, "count_include_pad": m.count_include_pad,
                            "divisor_override": m.divisor_override},
    "AdaptiveAvgPool2d": lambda m: {"output_size": m.output_size},
    "BatchNorm1d": lambda m: {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                              "affine": m.affine, "track_running_stats": m.track_running_stats},
    "BatchNorm2d": lambda m: {"num_features": m.num_features, "eps": m.eps, "momentum": m.momentum,
                              "affine": m.affine, "track_running_stats": m.track_running_stats},
    "Linear": lambda m: {"in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    "Conv2d": lambda m: {"in_channels": m.in_channels, "out_channels": m.out_channels, "kernel_size": m.kernel_size,
                         "stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups,
                         "bias": m.bias is not None, "padding_mode": m.padding_mode},
}
# (every constructor argument that changes what the module computes: a rebuilt model that
# pooled or padded differently would load without error and give other outputs)


def _tree(m: nn.Module):
    if isinstance(m, FusedActivation):  # saved as the activation it stands for (fusion is not state)
        return _tree(m.original)
    if isinstance(m, (PackedLinear, PackedConv2d)):
        return {"type": type(m).__name__}
    if type(m) is nn.Sequential:
        kids = {n: _tree(c) for n, c in m.named_children()}
        return None if any(v is None for v in kids.values()) else {"type": "Sequential", "children": kids}
    name = type(m).__name__
    if type(m) is getattr(nn, name, None) and name in _LEAVES:
        return {"type": name, "args": _LEAVES[name](m)}
    return None


def _build(t: dict):
    if t["type"] == "Sequential":
        return nn.Sequential(collections.OrderedDict((n, _build(c)) for n, c in t["children"].items()))
    if t["type"] in ("PackedLinear", "PackedConv2d"):
        return None  # filled in from the packed records
    if t["type"] not in _LEAVES:  # only what _tree writes: never another torch.nn attribute
        raise ValueError(f"module type {t['type']!r} is not one soniq.save writes")
    return getattr(nn, t["type"])(**t["args"])


def _digest(tensors: dict, meta: dict) -> str:
    """SHA-256 over the metadata (less the digest itself) and every tensor's name, dtype,
    shape and bytes: any change to the file after saving is caught."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # 0-d too
    return h.hexdigest()


def _trellis_of(m):
    """The layer's trellis streams while they still decode to its packed codes (checked once per
    packed weight), else None with a warning: a layer whose weight was replaced since it was
    coded or loaded (load_state_dict, ...) is saved as its planes, never as stale streams."""
    tw = getattr(m, "w_trellis", None)
    if tw is None:
        return None
    seen = m.__dict__.get("_trellis_checked")
    if seen is not None and seen[0] is m.w and seen[1] is tw:
        return tw if seen[2] else None
    w = m.w.cpu()
    ok = tuple(w.shape) == tuple(tw.shape) and bool((w.bits == 8).all()) and tw.matches(ops.unpack(w))
    if not ok:
        warnings.warn(f"{getattr(m, 'name', '?')}: the packed weight is no longer what its trellis streams decode "
                      "to (replaced since it was coded or loaded); it is saved as 8-bit planes", stacklevel=3)
    m.__dict__["_trellis_checked"] = (m.w, tw, ok)
    return tw if ok else None


# float32 tensors of a layer stored in 2 bytes when that loses nothing (format version 6): the
# torch dtype each may take, by name as the layer record's "narrow" holds it
_NARROW = {"bias": "float16", "w.scale": "bfloat16"}


def _narrow(out: dict, keys) -> dict:
    """Narrows in place the float32 tensors out[k], k in keys, that their _NARROW dtype holds
    exactly; returns {key: dtype name} of those."""
    done = {}
    for k in keys:
        t = out.get(k)
        if t is not None and t.dtype == torch.float32 and t.numel() and bool(torch.isfinite(t).all()):
            n = t.to(getattr(torch, _NARROW[k]))
            if torch.equal(n.float(), t):
                out[k], done[k] = n, _NARROW[k]
    return done


def layer_tensors(m, narrow: dict | None = None) -> dict:
    """The tensors soniq.save writes for one packed layer (CPU, compact dtypes). A trellis-coded
    weight: its streams, row widths and row scales (the planes are rebuilt on load). Its bias,
    and a trellis layer's row scales, in 2 bytes where that is exact (`narrow`, if given,
    receives {key: dtype name} of those, the layer record's "narrow")."""
    tw = _trellis_of(m)
    if tw is None:
        out = {f"w.{k}": t.detach().cpu().contiguous() for k, t in compact(m.w.state_dict()).items()}
    else:
        out = {"w.scale": m.w.row_scale.detach().cpu().contiguous(), "w.trellis.row_bits": tw.row_bits}
        out.update({"w.trellis.paths": tw.streams[0]} if tw.joint else
                   {f"w.trellis.s{k}": st for k, st in sorted(tw.streams.items())})
    out["a_bits"], out["a_scale"] = m.a_bits.cpu().to(torch.uint8), m.a_scale.cpu()  # a model may be on a GPU
    for k in ("a_bits", "a_scale"):
        if out[k].numel() > 1 and bool((out[k] == out[k][0]).all()):
            out[k] = out[k][:1].clone()  # one value per input channel: stored once
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    if getattr(m, "a_inv_smooth", None) is not None:
        out["a_inv_smooth"] = m.a_inv_smooth.cpu()
    # the bias, and a trellis layer's row scales (a grid layer's scales stay in its state)
    done = _narrow(out, ("bias", "w.scale") if tw is not None else ("bias",))
    if narrow is not None:
        narrow.update(done)
    return out


def saved_bytes(m) -> int:
    """Bytes of one packed layer's tensors in a file written by soniq.save (a trellis layer's
    codebook is the file's: shared_tensors)."""
    return sum(t.numel() * t.element_size() for t in layer_tensors(m).values())


def shared_tensors(layers) -> dict:
    """The file-level tensors the packed layers share: one trellis codebook per size."""
    out = {}
    for m in layers:
        tw = _trellis_of(m)
        if tw is not None:
            key = f"trellis|codebook{tw.states_log2}"
            if key in out and not torch.equal(out[key], tw.codebook):
                raise ValueError(f"packed layers hold different trellis codebooks of 2^{tw.states_log2} entries; "
                                 "one file stores one per size")
            out[key] = tw.codebook.cpu().contiguous()
    return out


def save_file(model: nn.Module, path) -> None:
    """soniq.save for one safetensors file (any model with packed layers)."""
    from safetensors.torch import save_file as st_save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    packed = {n: m for n, m in model.named_modules() if isinstance(m, (PackedLinear, PackedConv2d))}
    if not packed:
        raise ValueError("model has no packed layers: call soniq.convert(model) before soniq.save")
    tensors, records = {}, {}
    for n, m in packed.items():
        narrow = {}
        tensors.update({f"{n}|{k}": t for k, t in layer_tensors(m, narrow).items()})
        rec = {"type": type(m).__name__, "w_meta": m.w.metadata(), "a_signed": m.a_signed}
        if narrow:  # absent: every float tensor as float32 (version 5 and before)
            rec["narrow"] = narrow
        if isinstance(m, PackedConv2d):
            rec["conv"] = m.conv_args()
        else:
            if m.a_dynamic is not None:  # absent: static scales (files before this field)
                rec["a_dynamic"] = m.a_dynamic
            if m.hadamard_block:  # absent: no rotation (version 3 and before)
                rec["hadamard_block"] = m.hadamard_block
        tw = _trellis_of(m)
        if tw is not None:  # absent: packed planes (version 4 and before)
            rec["trellis"] = {"states_log2": tw.states_log2, **({"paths": "joint"} if tw.joint else {})}
        records[n] = rec
    tensors.update(shared_tensors(packed.values()))
    for k, t in model.state_dict().items():
        if not any(_under(k, n) for n in packed) and t is not None:
            tensors[f"state|{k}"] = t.detach().cpu().contiguous()
    version = 7 if any("paths" in r.get("trellis", {}) for r in records.values()) else \
        6 if any("narrow" in r for r in records.values()) else \
        5 if any("trellis" in r for r in records.values()) else \
        4 if any("hadamard_block" in r for r in records.values()) else 3
    meta = {"format": FORMAT, "version": version, "packed": records, "tree": _tree(model)}
    meta["sha256"] = _digest(tensors, meta)
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".soniq-", suffix=".tmp", dir=d)
    os.close(fd)
    try:
        st_save_file(tensors, tmp, metadata={"soniq": json.dumps(meta)})
        os.chmod(tmp, default_mode(path, folder=False))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_file(path, model: nn.Module | None = None) -> nn.Module:
    """soniq.load for one safetensors file written by save_file."""
    from safetensors import safe_open

    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (the saved model's architecture), got {type(model).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path}: a folder without a soniq manifest; pass the model file (.safetensors) "
                         "or a folder written by soniq.save(sentence_transformer, folder)")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own types for truncated/garbled files
        raise ValueError(f"{path}: not a readable soniq model file (truncated or corrupted?): {e}") from None
    try:
        meta = json.loads(header["soniq"])
    except (KeyError, json.JSONDecodeError):
        raise ValueError(f"{path}: safetensors file without soniq metadata (not written by soniq.save)") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: soniq metadata is not a JSON object (corrupted file)")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    if meta.get("version") not in range(1, VERSION + 1):
        raise ValueError(f"{path}: format version {meta.get('version')!r}; this soniq reads versions 1 to {VERSION}")
    if _digest(tensors, meta) != meta.get("sha256"):
        raise ValueError(f"{path}: checksum mismatch: the file was modified or damaged after saving")

    try:
        return _rebuild(path, meta, tensors, model)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: malformed soniq model record ({type(e).__name__}: {e})") from None


def default_mode(path, *, folder: bool) -> int:
    """The permissions a plain open() / mkdir would give `path` (the umask applied), or those
    of what it replaces: a temporary file or folder (mkstemp / mkdtemp: owner only) renamed
    into place must not leave a model that other users of the machine can no longer read."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return (0o777 if folder else 0o666) & ~_umask()


def _umask() -> int:
    """The process umask, read without setting it (os.umask would, for a moment, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: the usual way (briefly 0o022, never 0)
    os.umask(mask)
    return mask


def _under(key: str, layer: str) -> bool:
    """Whether state-dict key `key` belongs to the module named `layer` ("" = the root)."""
    return not layer or key == layer or key.startswith(layer + ".")


def _rebuild(path: str, meta: dict, tensors: dict, model: nn.Module | None) -> nn.Module:
    if model is None:
        if meta.get("tree") is None:
            raise ValueError(f"{path}: the saved model has custom module types; pass its architecture as "
                             "soniq.load(path, model=...)")
        model = _build(meta["tree"])
    else:
        _check_architecture(path, meta, tensors, model)  # before anything in it changes
    built = {}  # every packed layer built (and checked) before the model changes
    for n, rec in meta["packed"].items():
        pre = f"{n}|"
        if meta["version"] >= 6 and "narrow" in rec:
            _widen(path, n, rec["narrow"], tensors, pre)
        wt = {k[len(pre) + 2:]: v for k, v in tensors.items() if k.startswith(pre + "w.")}
        # input channels: K per kernel position (a conv weight's K is channels x kh x kw)
        kk = 1 if rec["type"] == "PackedLinear" else rec["conv"]["kernel_size"][0] * rec["conv"]["kernel_size"][1]
        if "trellis" in rec and meta["version"] >= 5:
            w, tw = _trellis_weight(path, n, rec, wt, tensors, pre, kk, meta["version"])
        else:
            if meta["version"] >= 2:
                wt = widen(wt, rec["w_meta"])
            w, tw = PackedTensor.from_state_dict(wt, rec["w_meta"]), None
        if not isinstance(rec["a_signed"], bool):
            raise ValueError(f"{path}: layer {n!r}: a_signed must be true or false, got {rec['a_signed']!r}")
        bias = tensors.get(pre + "bias")
        if bias is not None and (not bias.is_floating_point() or tuple(bias.shape) != (w.shape[0],)):
            raise ValueError(f"{path}: layer {n!r}: bias must be float with {w.shape[0]} entries, "
                             f"got {bias.dtype} {tuple(bias.shape)}")
        n_in = w.shape[1] // max(1, kk)
        a_bits = _per_input(path, n, "a_bits", tensors[pre + "a_bits"].to(torch.int64), n_in, meta["version"])
        a_scale = _per_input(path, n, "a_scale", tensors[pre + "a_scale"], n_in, meta["version"])
        args = (w, a_bits, a_scale, rec["a_signed"], bias, n)
        try:  # the layer's own checks (its weight's K layout against a_bits, ...), named with the layer
            if rec["type"] == "PackedConv2d":
                mod = PackedConv2d(*args, **rec["conv"])
            else:
                rot = rec.get("hadamard_block", 0) if meta["version"] >= 4 else 0
                if isinstance(rot, bool) or not isinstance(rot, int):
                    raise ValueError(f"hadamard_block must be an integer, got {rot!r}")
                mod = PackedLinear(*args, a_inv_smooth=tensors.get(pre + "a_inv_smooth"),
                                   a_dynamic=rec.get("a_dynamic"), hadamard_block=rot)
        except ValueError as e:
            raise ValueError(f"{path}: layer {n!r}: {e}") from None
        if mod.a_bits.numel() * kk != w.shape[1]:
            raise ValueError(f"{path}: layer {n!r}: activation bits do not match the packed weight's K={w.shape[1]}")
        if tw is not None:
            mod.w_trellis = tw
        built[n] = mod
    if model is not None and any(built):
        unfuse_activations(model)  # its packed layers are replaced below (fused again at the end)
    for n, mod in built.items():
        if not n:  # the model is the one packed layer
            model = mod
            continue
        parent = model
        parts = n.split(".")
        for p in parts[:-1]:
            parent = getattr(parent, p)
        setattr(parent, parts[-1], mod)
    state = {k[len("state|"):]: v for k, v in tensors.items() if k.startswith("state|")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not any(_under(k, n) for n in meta["packed"])]
    if missing or unexpected:
        raise ValueError(f"{path}: the file does not match the model: missing {missing}, unexpected {unexpected}")
    fuse_activations(model)
    disable_torch_fastpaths(model)
    return model.eval()


def _widen(path: str, n: str, narrow, tensors: dict, pre: str) -> None:
    """A layer record's "narrow" (version 6): each named tensor, stored in that 2-byte dtype,
    back to the float32 it was saved from (in `tensors`)."""
    if not isinstance(narrow, dict) or not narrow:
        raise ValueError(f"{path}: layer {n!r}: narrow must be a non-empty object, got {narrow!r}")
    for k, name in narrow.items():
        if _NARROW.get(k) != name:
            allowed = ", ".join(f"{key!r}: {dt!r}" for key, dt in _NARROW.items())
            raise ValueError(f"{path}: layer {n!r}: narrow may hold {allowed}, got {k!r}: {name!r}")
        t = tensors.get(pre + k)
        if t is None or t.dtype != getattr(torch, name):
            raise ValueError(f"{path}: layer {n!r}: {k} is recorded as {name} but stored as "
                             f"{None if t is None else str(t.dtype).removeprefix('torch.')}")
        tensors[pre + k] = t.float()


def _per_input(path: str, n: str, key: str, t, n_in: int, version: int):
    """A per-input-channel tensor of a layer record ([n_in], or from version 3 one value stored
    once when every input channel has it), checked."""
    if version >= 3 and t.shape == (1,):
        t = t.expand(n_in).clone()
    if tuple(t.shape) != (n_in,):
        raise ValueError(f"{path}: layer {n!r}: {key} must hold {n_in} entries (one per input channel), "
                         f"got shape {tuple(t.shape)}")
    return t


def _trellis_weight(path: str, n: str, rec: dict, wt: dict, tensors: dict, pre: str, kk: int, version: int):
    """A trellis layer's PackedTensor (8-bit rows of the decoded codes, packed as soniq.convert
    packs them) and its TrellisWeights, every stored field checked first."""
    shape = rec["w_meta"].get("shape")
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ValueError(f"{path}: layer {n!r}: w_meta shape must be two positive ints, got {shape!r}")
    info = rec["trellis"] if isinstance(rec["trellis"], dict) else {}
    L = info.get("states_log2")
    cb = tensors.get(f"trellis|codebook{L}")
    if isinstance(L, bool) or not isinstance(L, int) or cb is None:
        raise ValueError(f"{path}: layer {n!r}: trellis states_log2 {L!r} without a stored codebook of that size")
    unknown = sorted(set(info) - {"states_log2", "paths"})
    if unknown or ("paths" in info and (version < 7 or info["paths"] != "joint")):
        raise ValueError(f"{path}: layer {n!r}: trellis record {info!r} not understood (\"paths\": \"joint\" from "
                         f"format version 7; this file is version {version})")
    joint = "paths" in info
    if joint:
        streams = {0: wt["trellis.paths"]} if "trellis.paths" in wt else {}
        names = {"trellis.paths"}
    else:
        streams = {int(k[len("trellis.s"):]): t for k, t in wt.items() if k in {f"trellis.s{b}" for b in range(1, 9)}}
        names = {f"trellis.s{b}" for b in streams}
    extra = sorted(set(wt) - names - {"trellis.row_bits", "scale"})
    if extra or (joint and not streams):
        raise ValueError(f"{path}: layer {n!r}: unexpected or missing tensors for a trellis weight: {extra[:4]} "
                         "(streams are w.trellis.paths for joint paths, else w.trellis.s1 .. w.trellis.s8)")
    row_bits, scale = wt.get("trellis.row_bits"), wt.get("scale")
    if row_bits is None or scale is None:
        raise ValueError(f"{path}: layer {n!r}: trellis weight without row_bits or scale")
    try:
        _trellis.check_record(tuple(shape), row_bits, streams, cb, L, "trellis weight", joint=joint)
    except ValueError as e:
        raise ValueError(f"{path}: layer {n!r}: {e}") from None
    if scale.dtype != torch.float32 or tuple(scale.shape) != (shape[0],) or not bool(torch.isfinite(scale).all()) \
            or bool((scale <= 0).any()):
        raise ValueError(f"{path}: layer {n!r}: trellis row scales must be {shape[0]} positive float32 values")
    tw = _trellis.TrellisWeights(tuple(shape), row_bits, streams, cb)
    if shape[1] % max(1, kk):
        raise ValueError(f"{path}: layer {n!r}: a weight of {shape[1]} columns is not {kk} kernel positions "
                         "per input channel")
    a_bits = _per_input(path, n, "a_bits", tensors[pre + "a_bits"].to(torch.int64), shape[1] // max(1, kk), 5)
    try:  # the K layout of the weight follows the activation widths, as soniq.convert packs it
        w = ops.pack(tw.codes().to(torch.int64), torch.full((shape[0],), 8, dtype=torch.int64), signed=True, axis=0,
                     scale=scale, k_layout=KLayout.from_bits(a_bits.repeat_interleave(kk)))
    except ValueError as e:
        raise ValueError(f"{path}: layer {n!r}: {e}") from None
    return w, tw


def _check_architecture(path: str, meta: dict, tensors: dict, model: nn.Module) -> None:
    """soniq.load(path, model=...): every saved packed layer names a layer of the same kind and
    shape in `model`, and the rest of the file's state is the rest of `model`'s, checked before
    the model is changed (a mismatch would otherwise leave it half replaced)."""
    for n, rec in meta["packed"].items():
        try:
            m = model.get_submodule(n)
        except AttributeError:
            raise ValueError(f"{path}: the file does not match the model: it has no layer {n!r}") from None
        want = (nn.Linear, QLinear, PackedLinear) if rec["type"] == "PackedLinear" else (nn.Conv2d, QConv2d, PackedConv2d)
        if not isinstance(m, want):
            raise ValueError(f"{path}: the file does not match the model: layer {n!r} is a {type(m).__name__}, "
                             f"the file holds a {rec['type']}")
        shape = rec.get("w_meta", {}).get("shape")
        if shape is not None:
            if isinstance(m, (PackedLinear, PackedConv2d)):
                n_out, n_k = m.w.shape
            elif rec["type"] == "PackedLinear":
                n_out, n_k = m.out_features, m.in_features
            else:
                n_out, n_k = m.out_channels, m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            if (int(shape[0]), int(shape[1])) != (int(n_out), int(n_k)):
                raise ValueError(f"{path}: the file does not match the model: layer {n!r} has {n_out} outputs "
                                 f"x {n_k} inputs, the file's {shape[0]} x {shape[1]}")
    packed = list(meta["packed"])
    have = {k: t for k, t in model.state_dict().items() if not any(_under(k, p) for p in packed)}
    saved = {k[len("state|"):]: t for k, t in tensors.items() if k.startswith("state|")}
    if have.keys() != saved.keys():
        raise ValueError(f"{path}: the file does not match the model: missing {sorted(have.keys() - saved.keys())[:8]}, "
                         f"unexpected {sorted(saved.keys() - have.keys())[:8]}")
    for k, t in have.items():
        if t is not None and tuple(t.shape) != tuple(saved[k].shape):
            raise ValueError(f"{path}: the file does not match the model: {k} has shape {tuple(t.shape)}, "
                             f"the file's {tuple(saved[k].shape)}")
