"""Packed inference modules: quantize and pack activations per K column in one native pass
(ops.quantize_pack; tiers grouped by the weights' K permutation), and run ops.mpgemm against
weights packed once at convert time with the same K layout. Made by soniq.convert."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._fuse_state import fused_output, take_arm
from ._hadamard import check_block, rotate
from ._packed_cat import cat_linear
from ._native import _C
from ._op_kernels import eager_kernel
from ._packed_grad import InputGrad, dequantized, gelu_derivative, needs_input_grad, through_quantizer
from .ops._gelu import gelu_
from .ops._quantize import quantizer_params
from .ops._quantize_pack import make_plan
from .packed import PackedTensor


class _PackedBase(nn.Module):
    def __init__(self, w: PackedTensor, a_bits: Tensor, a_scale: Tensor, a_signed: bool,
                 bias: Optional[Tensor], name: str = "?"):
        super().__init__()
        self.w = w
        self.register_buffer("a_bits", a_bits.to(torch.int64).cpu().contiguous())      # per input channel
        self.register_buffer("a_scale", a_scale.to(torch.float32).cpu().contiguous())  # per input channel
        self.a_signed = bool(a_signed)
        self.register_buffer("bias", None if bias is None else bias.detach().float().cpu().contiguous())
        self.name = name
        self._keep_one_copy()

    # the activation quantizer's float32 state: a dtype conversion (model.half()) must not round
    # it, or the layer would quantize on another grid than the one it was converted with
    _FLOAT32_STATE = ("a_scale", "a_inv_smooth")

    def _apply(self, fn, recurse=True):
        """model.to(device) / .cuda() / .cpu() move the packed weights too (they are not a
        buffer); dtype conversions leave them alone (integer words, float32 scales), and the
        activation scales (a_scale, a_inv_smooth) too."""
        keep = {k: self._buffers[k] for k in self._FLOAT32_STATE if self._buffers.get(k) is not None}
        out = super()._apply(fn, recurse)
        for k, t in keep.items():
            if self._buffers[k].dtype != t.dtype:
                self._buffers[k] = t.to(self._buffers[k].device)
        dev = fn(torch.empty(0, device=self.w.device)).device  # where fn sends tensors
        if dev != self.w.device:
            self.w = self.w.to(dev)
            self._keep_one_copy()
            self._weights_changed()  # plans cache device copies of the layout
        return out

    def _keep_one_copy(self):
        """On the CPU the weight is kept once: its execution layout, made here (torch.compile
        traces it as a constant), with the bit planes dropped (rebuilt from it to save or move).
        Layers whose smallest weight x activation bit pair is at most the ISA's
        keep_planes_max_pairs (cpp/kernels.h: 1x1 on AVX2 / AVX-512, where the bit-serial
        popcount kernel beats the fused forward from M = 128 up; none on AMX) keep the planes
        (that kernel reads them) and build no layout."""
        if self.w.device.type != "cpu":
            return
        if int(self.w.bits.min()) * int(self.a_bits.min()) <= _C.keep_planes_max_pairs():
            return
        self.w.release_planes()

    def __getstate__(self):
        """copy.deepcopy / pickle (torch.save(model)): the native fused plan and the float32
        weight a backward dequantized are not state (rebuilt when next needed from what is)."""
        state = super().__getstate__()
        state.pop("_fused", None)
        state.pop("_grad_weight", None)
        return state

    def _quant_params(self) -> tuple:
        """(scale, lo, hi, alpha) float32 per input channel for soniq::quantize_raw and the
        fake quantizers' autograd (RoundQuant), checked once and cached with the plans:
        ops.quantize would check them on every call, which on a GPU means host syncs (and no
        CUDA graph or torch.compile fullgraph)."""
        return self._plan(("quant_params",), lambda: quantizer_params(
            self.a_scale.detach().float().contiguous(), self.a_bits.detach().double(), self.a_signed, exact=True,
            names=(f"{self.name}.a_scale", f"{self.name}.a_bits")))

    def _dequantized_weight(self) -> Tensor:
        """[out features, K] float32 (codes x row scale) for the input gradient, made by the first
        backward and kept until the weight changes (_weights_changed; not pickled)."""
        hit = self.__dict__.get("_grad_weight")
        if hit is None or hit[0] is not self.w:
            hit = self.__dict__["_grad_weight"] = (self.w, dequantized(self.w))
        return hit[1]

    def _weights_changed(self) -> None:
        """Drops everything derived from self.w (activation plans hold its K layout). Any new
        cache of the weights kept on the module must be dropped here too."""
        self.__dict__.pop("_act_plans", None)
        self.__dict__.pop("_fused", None)
        self.__dict__.pop("_grad_weight", None)

    # ---- state dict: the packed weight's parts are module state (see docs/DESIGN_NOTES.md) ----
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for k, t in self.w.state_dict().items():
            destination[prefix + "w." + k] = t if keep_vars else t.detach()
        destination[prefix + "w.meta"] = self.w.metadata_tensor()
        destination[prefix + "a_signed"] = torch.tensor(self.a_signed)

    def _state_keys(self) -> list:
        return [*("w." + k for k in self.w.state_dict()), "w.meta", "a_signed"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Buffers load as usual; the packed weight is rebuilt from its parts, validated
        (ops._pack.validate_packed, shape/axis/signedness of this layer, K layout against
        a_bits) and replaces self.w. All of its parts absent: reported as missing keys (an
        error under strict=True; strict=False keeps the current weight and lists them, unless
        the layer's other state is given, which is an error: the two go together). Some
        present, or present but malformed: always an error (torch raises error_msgs even
        with strict=False), and the layer is left as it was (self.w and its buffers)."""
        def own(k):
            return k.startswith(prefix) and (k[len(prefix):] == "a_signed" or k[len(prefix):].startswith("w."))

        mine = {k[len(prefix):]: v for k, v in state_dict.items() if own(k)}
        rest = {k: v for k, v in state_dict.items() if not own(k)}
        errors = len(error_msgs)
        # the buffers (a_bits, a_scale, bias, ...) belong with the weight: a failed load puts
        # them back, so the layer never runs its old weight with the new activation scales
        kept = {k: b.detach().clone() for k, b in self._buffers.items() if b is not None}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        expected = self._state_keys()
        if not mine:
            missing_keys.extend(prefix + k for k in expected)
            given = [k for k in self._buffers if prefix + k in state_dict]
            if given:  # new activation scales (or bias) with the old weight: a layer that was never converted
                error_msgs.append(f"packed weight of {prefix or 'the module'!r} is missing while its {given} are "
                                  f"given: a soniq packed layer loads its weight and activation state together")
        else:
            unexpected_keys.extend(prefix + k for k in mine if k not in expected)
            absent = [k for k in expected if k not in mine]
            if absent:
                error_msgs.append(f"packed weight of {prefix or 'the module'!r} is incomplete: missing {absent} "
                                  "(a state dict of a soniq packed layer holds all of them)")
            elif len(error_msgs) == errors:
                try:
                    self._replace_weight(mine)
                except (ValueError, TypeError, RuntimeError) as e:
                    error_msgs.append(f"packed weight of {prefix or 'the module'!r}: {e}")
        if len(error_msgs) > errors:
            self._buffers.update(kept)  # assigned, not copied: load_state_dict(assign=True) puts the caller's tensors there
            self._weights_changed()

    def _check_float_input(self, x) -> None:
        """As nn.Linear / nn.Conv2d: floating-point tensors only (no silent float() of integers)."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{self.name}: expected a floating-point torch.Tensor input, got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")

    def _replace_weight(self, parts: dict) -> None:
        old, old_signed = self.w, self.a_signed
        meta = PackedTensor.metadata_from_tensor(parts["w.meta"])
        sig = parts["a_signed"]
        if not isinstance(sig, Tensor) or sig.numel() != 1 or sig.dtype != torch.bool:
            raise ValueError(f"a_signed must be a bool tensor of one element, got {sig!r}")
        tensors = {k[2:]: v.detach().to(device=old.device, copy=True).contiguous()
                   for k, v in parts.items() if k.startswith("w.") and k != "w.meta"}
        w = PackedTensor.from_state_dict(tensors, meta)
        if (w.shape, w.axis, w.signed) != (old.shape, old.axis, old.signed):
            raise ValueError(f"shape/axis/signed {w.shape}/{w.axis}/{w.signed} do not match this layer's "
                             f"{old.shape}/{old.axis}/{old.signed}")
        self.w, self.a_signed = w, bool(sig)
        self._keep_one_copy()
        self._weights_changed()
        try:  # the plans check the weights' K layout against a_bits; built now as at construction
            self._build_plans()
        except Exception:
            self.w, self.a_signed = old, old_signed
            self._weights_changed()  # rebuilt on the next call
            raise

    def _build_plans(self) -> None:
        self._act_plan(False)

    def _plan(self, key, make):
        """The activation layout (ops.quantize_pack's ActPlan), checked once and cached until
        a_bits or a_scale change (load_state_dict copies in place: their version moves). Under
        torch.compile the plan built with the module is traced as a constant (no graph break);
        the layout is a property of the converted model, not of the input."""
        cache = self.__dict__.setdefault("_act_plans", {})
        if torch.compiler.is_compiling() and key in cache:
            return cache[key][1]
        ver = (self.a_bits._version, self.a_scale._version, self.a_bits.data_ptr(), self.a_scale.data_ptr())
        hit = cache.get(key)
        if hit is None or hit[0] != ver:
            hit = cache[key] = (ver, make())
        return hit[1]

    def _gemm(self, rows: Tensor, plan, integer: bool) -> Tensor:
        rows = rows if rows.dtype == torch.float32 else rows.float()
        if integer:  # exact accumulators: a NaN has no integer code, so it raises
            return ops.mpgemm(plan(rows), self.w.with_scale(None), out_dtype=torch.int64)
        # fused quantize + pack; a row of x holding a NaN gives a NaN output row, as in the
        # float layer, found without a host sync (a per-call sync would stall the GPU)
        a = plan(rows, nan_rows=True)
        out = ops.mpgemm(a, self.w)
        return out if a._nan_rows is None else out.masked_fill_(a._nan_rows[:, None], float("nan"))

    def precision(self) -> dict:
        return {"type": type(self).__name__, "w_bits": self.w.bit_histogram(),
                "a_bits": {int(b): int(c) for b, c in zip(*torch.unique(self.a_bits, return_counts=True))},
                "packed_weight_bytes": self.w.nbytes}


def _dynamic_mode(flag) -> Optional[str]:
    """The a_dynamic mode a state dict's "a_dynamic" entry names (None: static)."""
    if flag is None:
        return None
    if not isinstance(flag, Tensor) or flag.numel() != 1 or flag.dtype != torch.bool:
        raise ValueError(f"a_dynamic must be a bool tensor of one element, got {flag!r}")
    return "token" if bool(flag) else None


def _block_of(t, name: str) -> int:
    """The block a state dict's "hadamard_block" entry holds (an integer tensor of one element)."""
    if not isinstance(t, Tensor) or t.numel() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        raise ValueError(f"{name}: hadamard_block must be an integer tensor of one element, got {t!r}")
    return int(t)


def _check_layer_block(block, k: int, name: str) -> int:
    """0, or a power of two >= 2 dividing the layer's k input features."""
    block = check_block(block, f"{name}: hadamard_block")
    if block and k % block:
        raise ValueError(f"{name}: hadamard_block={block} must divide in_features={k}")
    return block


def _layer_from_state(sd: dict) -> tuple:
    """(w, a_bits, a_scale, a_signed, bias) from a packed layer's state_dict()."""
    need = ["w.meta", "a_bits", "a_scale", "a_signed"]
    missing = [k for k in need if k not in sd]
    if missing:
        raise ValueError(f"state_dict is missing {missing} (not a soniq packed layer's state_dict?)")
    parts = {k[2:]: v for k, v in sd.items() if k.startswith("w.") and k != "w.meta"}
    w = PackedTensor.from_state_dict(parts, PackedTensor.metadata_from_tensor(sd["w.meta"]))
    return w, sd["a_bits"], sd["a_scale"], bool(sd["a_signed"]), sd.get("bias")


class PackedLinear(_PackedBase):
    """a_inv_smooth (optional, per input feature): the QLinear's float32 1/s smoothing factors,
    applied to x before quantizing (the weights were packed from W * s). a_dynamic="token":
    per-token dynamic activation scales (ops.quantize_pack(dynamic="token")): a_scale is then
    relative to each row's largest |x|, which the epilogue multiplies back in.
    hadamard_block (0 = none): the QLinear's block Hadamard rotation of the input, applied
    before quantizing (soniq._hadamard; the weights were packed in the rotated basis)."""

    fused = False  # class defaults: modules pickled (torch.save(model)) before the fields
    hadamard_block = 0

    def __setstate__(self, state):
        # pickled (torch.save(model)) when fusion set activation = "gelu" on the layer: it is
        # followed by a FusedActivation, which must pass its output through
        if "fused" not in state and state.get("activation") == "gelu":
            state["fused"] = True
        super().__setstate__(state)

    def __init__(self, w, a_bits, a_scale, a_signed, bias, name="?", *, a_inv_smooth=None, a_dynamic=None,
                 hadamard_block=0):
        super().__init__(w, a_bits, a_scale, a_signed, bias, name)
        if a_dynamic not in (None, "token"):
            raise ValueError(f"{name}: a_dynamic must be None or 'token', got {a_dynamic!r}")
        self.a_dynamic = a_dynamic
        self.hadamard_block = _check_layer_block(hadamard_block, self.a_bits.numel(), name)
        if self.hadamard_block and a_inv_smooth is not None:
            raise ValueError(f"{name}: hadamard_block and a_inv_smooth cannot be combined (one input transform)")
        if a_inv_smooth is not None:
            a_inv_smooth = torch.as_tensor(a_inv_smooth).to(torch.float32).cpu().contiguous()
            if a_inv_smooth.shape != self.a_bits.shape or not bool(torch.isfinite(a_inv_smooth).all()) \
                    or bool((a_inv_smooth <= 0).any()):
                raise ValueError(f"{name}: a_inv_smooth must hold {self.a_bits.numel()} finite positive factors, "
                                 f"got shape {tuple(a_inv_smooth.shape)}")
        self.register_buffer("a_inv_smooth", a_inv_smooth)
        # None, or "gelu": the activation that followed this layer, applied in place to its
        # output by soniq.fuse_activations (a property of the running model, not state: _fuse.py)
        self.activation: Optional[str] = None
        # True: soniq.fuse_activations fused the GELU after it into it; applied when the block
        # holding both calls it (not state either: _fuse.py)
        self.fused = False
        self._act_plan(False)  # built now, so torch.compile traces a cached plan (no graph break)

    @classmethod
    def from_state_dict(cls, state_dict: dict, name: str = "?") -> "PackedLinear":
        """A PackedLinear rebuilt from its own state_dict() (no prepared model needed)."""
        w, a_bits, a_scale, a_signed, bias = _layer_from_state(state_dict)
        rot = state_dict.get("hadamard_block")
        return cls(w, a_bits, a_scale, a_signed, bias, name, a_inv_smooth=state_dict.get("a_inv_smooth"),
                   a_dynamic=_dynamic_mode(state_dict.get("a_dynamic")),
                   hadamard_block=0 if rot is None else _block_of(rot, name))

    @classmethod
    def cat(cls, layers, name: str = "?") -> "PackedLinear":
        """One PackedLinear whose output is torch.cat([layer(x) for layer in layers], -1) bit
        for bit, for layers that read one input with the same activation quantizer (bits,
        scales, mode, rotation or smoothing): e.g. an attention block's query, key and value as
        one quantize pass and one GEMM (soniq/_packed_cat.py). ValueError names the first field
        that differs."""
        return cat_linear(cls, layers, name)

    # the activation mode and the input rotation are state too: "a_dynamic" (bool tensor, True =
    # per-token scales) and "hadamard_block" (int64 scalar, 0 = none); absent beside a packed
    # weight (state dicts from before the field) = static scales / no rotation; absent with
    # the weight (a partial load) = unchanged
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "a_dynamic"] = torch.tensor(self.a_dynamic == "token")
        destination[prefix + "hadamard_block"] = torch.tensor(self.hadamard_block, dtype=torch.int64)

    def _load_from_state_dict(self, state_dict, prefix, *args):
        mine = {k: state_dict[prefix + k] for k in ("a_dynamic", "hadamard_block") if prefix + k in state_dict}
        if mine:
            drop = {prefix + k for k in mine}
            state_dict = {k: v for k, v in state_dict.items() if k not in drop}
        whole = prefix + "w.meta" in state_dict
        old, error_msgs = (self.a_dynamic, self.hadamard_block), args[-1]
        errors = len(error_msgs)
        mode = _dynamic_mode(mine["a_dynamic"]) if "a_dynamic" in mine else (None if whole else old[0])
        try:
            rot = _block_of(mine["hadamard_block"], self.name) if "hadamard_block" in mine else (0 if whole else old[1])
            rot = _check_layer_block(rot, self.a_bits.numel(), self.name)
            if rot != old[1] and not whole:  # the rotation is the basis the weight was packed in
                raise ValueError(f"{self.name}: hadamard_block changes only with the packed weight (w.*)")
        except ValueError as e:
            error_msgs.append(str(e))
            return
        if rot and self.a_inv_smooth is not None:
            error_msgs.append(f"{self.name}: hadamard_block and a_inv_smooth cannot be combined")
            return
        if (mode, rot) != old:
            self.a_dynamic, self.hadamard_block = mode, rot
            self._weights_changed()
        super()._load_from_state_dict(state_dict, prefix, *args)
        if len(error_msgs) > errors and (self.a_dynamic, self.hadamard_block) != old:  # a failed load changes nothing
            self.a_dynamic, self.hadamard_block = old
            self._weights_changed()

    def __setattr__(self, name, value):
        if name == "activation":
            if value not in (None, "gelu"):
                raise ValueError(f"{self.__dict__.get('name', '?')}: activation must be None or 'gelu', got {value!r}")
        super().__setattr__(name, value)

    def extra_repr(self) -> str:
        K, N = self.a_bits.numel(), self.w.shape[0]
        act = "" if self.activation is None else f", activation={self.activation!r}"
        act += ", GELU fused (applied when its block calls it)" if self.fused else ""
        rot = f", hadamard_block={self.hadamard_block}" if self.hadamard_block else ""
        return f"in_features={K}, out_features={N}, bias={self.bias is not None}{rot}{act}"

    def _act_plan(self, integer: bool):
        K = self.a_bits.numel()
        return self._plan(("linear", integer), lambda: make_plan(
            self.a_bits, self.a_scale, K, signed=self.a_signed, k_layout=self.w,
            out_scale=None if integer else self.a_scale, dynamic=self.a_dynamic == "token"))

    def forward(self, x: Tensor) -> Tensor:
        # the GELU: as configured, or fused and armed by the block calling it (_fuse.py); its
        # output is then marked for the block's FusedActivation to pass through
        gelu = self.activation is not None or (self.fused and take_arm(self))
        # eager CPU without autograd: the fused native forward (_fused_plan), one call after a
        # few checks. Kept lean: a GEMV-sized layer runs in ~10 us, and inside a model this
        # Python runs with cold caches between the model's other ops, so every torch call here
        # shows (issue 13)
        if type(x) is Tensor and x.is_cpu and not x.requires_grad and not torch.compiler.is_compiling():
            fused = self._fused_plan()
            if fused is not None:
                lp, K, N = fused
                shape = x.shape
                if not shape or shape[-1] != K:
                    raise ValueError(f"{self.name}: expected {K} input features, got input of shape {tuple(shape)}")
                # (smoothing, a_inv_smooth, is applied by the plan in its quantize pass)
                if x.dtype is torch.float32 and x.is_contiguous():
                    rows, M, ld = x, x.numel() // K, K  # the usual case: no reshape, no view
                    out = x.new_empty((*shape[:-1], N))  # float32 on the CPU, as x
                else:
                    self._check_float_input(x)
                    rows = x.reshape(-1, K)
                    if rows.dtype != torch.float32:
                        rows = rows.float()
                    if rows.stride(-1) != 1:
                        rows = rows.contiguous()
                    M, ld = rows.shape[0], rows.stride(0)
                    out = torch.empty((*shape[:-1], N), dtype=torch.float32)
                if M > 0:  # (no rows: no output values, as nn.Linear)
                    # a GELU runs in the native call, on each output row once it is final
                    lp.forward(rows.data_ptr(), M, ld, out.data_ptr(), gelu)
                if out.dtype is not x.dtype:  # as nn.Linear: the input's dtype (_input_dtype, inline here)
                    out = out.to(x.dtype)
                return fused_output(out) if gelu and self.fused else out
        if needs_input_grad(x):  # the same values, with the straight-through gradient to x
            out = InputGrad.apply(x, self, gelu)
        else:
            out = self._forward(x, gelu)
        return fused_output(out) if gelu and self.fused else out

    def _forward(self, x: Tensor, gelu: bool) -> Tensor:
        """The forward's values through the general path (bit-identical to the fused native
        one, tests/test_fused_linear.py), the GELU applied when gelu."""
        return self._run(x, integer=False, gelu=gelu)

    def _input_grad(self, grad_out: Tensor, x: Tensor, gelu: bool) -> Tensor:
        """d loss / d x (InputGrad): grad_out (times the GELU's derivative at the recomputed
        pre-activation) @ the dequantized weight, through the activation quantizer's backward
        (its clipping mask), then back through the input transform: the rotation u = x H
        (H symmetric: d/dx = d/du H) or the smoothing u = x / s."""
        g = grad_out.to(torch.float32)
        if gelu:
            g = g * gelu_derivative(self._forward(x, False).to(torch.float32))
        rows = x.reshape(-1, self.a_bits.numel()).to(torch.float32)
        if self.a_inv_smooth is not None:
            rows = rows * self.a_inv_smooth
        if self.hadamard_block:
            rows = rotate(rows, self.hadamard_block)
        gu = through_quantizer(rows, g.reshape(-1, g.shape[-1]) @ self._dequantized_weight(), self._quant_params(),
                               self.a_dynamic == "token", 1)
        if self.hadamard_block:
            gu = rotate(gu, self.hadamard_block)
        if self.a_inv_smooth is not None:
            gu = gu * self.a_inv_smooth
        return gu.reshape(x.shape).to(x.dtype)

    def accumulators(self, x: Tensor) -> Tensor:
        """Exact a_int @ w_int.T (int64) as the kernels accumulate it."""
        return self._run(x, integer=True)

    def _fused_key(self) -> tuple:
        """What the fused plan was built from: the weight, the buffers it copied (objects and
        in-place versions: load_state_dict copies in place) and the activation mode."""
        b = self._buffers
        bits, scale, bias, smooth = b["a_bits"], b["a_scale"], b["bias"], b["a_inv_smooth"]
        return (self.w, bits, scale, bias, self.a_dynamic, bits._version, scale._version,
                None if bias is None else bias._version, smooth, None if smooth is None else smooth._version,
                self.hadamard_block)

    def _fused_plan(self):
        """(LinearPlan, in_features, out_features) of the native fused forward (cpp/linear.h:
        activations quantized straight to the bytes the weight-layout kernels read, the float
        epilogue and bias in the GEMM kernel's store, a_inv_smooth applied in its quantize pass;
        one call, bit-identical to (x * a_inv_smooth) + quantize_pack + mpgemm + bias) where it
        applies: a CPU weight kept as its execution layout only.
        Built once and kept until _fused_key() changes; else None."""
        hit = self.__dict__.get("_fused")
        if hit is not None:  # _fused_key() == hit[0], compared without building the tuple
            k, b = hit[0], self._buffers
            bits, scale, bias, smooth = b["a_bits"], b["a_scale"], b["bias"], b["a_inv_smooth"]
            if (k[0] is self.w and k[1] is bits and k[2] is scale and k[3] is bias and k[4] == self.a_dynamic
                    and k[5] == bits._version and k[6] == scale._version
                    and k[7] == (None if bias is None else bias._version)
                    and k[8] is smooth and k[9] == (None if smooth is None else smooth._version)
                    and k[10] == self.hadamard_block):
                return hit[1]
        key = self._fused_key()
        w = self.w
        if w.device.type != "cpu" or w._data is not None:
            return None
        plan = self._act_plan(False)
        lay = w.exec_layout()
        desc, ksegs, _ = w.host_meta()
        desc, ksegs = desc.contiguous(), ksegs.contiguous()
        sums, perm = w.sums.contiguous(), w.row_perm.contiguous()
        wscale = None if w.row_scale is None else w.row_scale.float().contiguous()
        bias = None if self.bias is None else self.bias.float().contiguous()
        smooth = self.a_inv_smooth
        smooth = None if smooth is None else smooth.float().contiguous()  # [K], x's column order
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        lp = _C.LinearPlan(plan.K, ptr(plan.k_perm), ptr(plan.segs), plan.segs.shape[0], ptr(plan.seg_scale),
                           plan.signed, ptr(plan.out_seg_scale), plan.dynamic, w.shape[0], desc.shape[0], ptr(desc),
                           ptr(sums), ptr(perm), w.signed, ptr(ksegs), ptr(lay), ptr(wscale), ptr(bias),
                           ptr(smooth), self.hadamard_block)
        fused = (lp, lp.in_features, lp.out_features)
        self.__dict__["_fused"] = (key, fused, lay)  # lay: the plan reads the layout in place
        return fused

    def _run(self, x, integer, gelu: bool = False):
        K = self.a_bits.numel()
        self._check_float_input(x)
        if x.dim() == 0 or x.shape[-1] != K:
            raise ValueError(f"{self.name}: expected {K} input features, got input of shape {tuple(x.shape)}")
        if x.numel() == 0:  # no rows, no output values (as nn.Linear)
            return torch.empty((*x.shape[:-1], self.w.shape[0]), dtype=torch.int64 if integer else x.dtype,
                               device=x.device)
        plan = self._act_plan(integer)
        rows = x.reshape(-1, K)
        if self.a_inv_smooth is not None:
            rows = rows.float() * self.a_inv_smooth
        if self.hadamard_block:
            rows = rotate(rows.float(), self.hadamard_block)
        out = self._gemm(rows, plan, integer)
        if not integer and self.bias is not None:
            out = out + self.bias
        if gelu:
            out = self._activate(out)
        return (out if integer else _input_dtype(out, x)).reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def _activate(out: Tensor) -> Tensor:
        """soniq.ops.gelu_ in place on the fresh output (no second tensor: see _fuse.py): on
        the CPU the native GELU the fused forward applies, on other devices torch's."""
        if torch.compiler.is_compiling():
            gelu_(out)
        else:
            eager_kernel(gelu_, out.device)(out)
        return out


def _input_dtype(out: Tensor, x: Tensor) -> Tensor:
    """The float32 output in the input's floating dtype, as nn.Linear / nn.Conv2d return it (a
    bfloat16 model's next LayerNorm refuses float32)."""
    return out if out.dtype is x.dtype else out.to(x.dtype)


def _pair(name: str, what: str, v, least: int) -> tuple:
    """An int or two ints (as nn.Conv2d takes them), each >= least, as a pair."""
    pair = (v, v) if isinstance(v, int) and not isinstance(v, bool) else tuple(v) if isinstance(v, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) and x >= least
                                                 for x in pair):
        raise ValueError(f"{name}: {what} must be an int or two ints >= {least}, got {v!r}")
    return pair


class PackedConv2d(_PackedBase):
    def __init__(self, w, a_bits, a_scale, a_signed, bias, name, *, kernel_size, stride, padding, dilation):
        super().__init__(w, a_bits, a_scale, a_signed, bias, name)
        self.kernel_size, self.stride = _pair(name, "kernel_size", kernel_size, 1), _pair(name, "stride", stride, 1)
        self.padding, self.dilation = _pair(name, "padding", padding, 0), _pair(name, "dilation", dilation, 1)
        kk = self.kernel_size[0] * self.kernel_size[1]
        if w.shape[1] != self.a_bits.numel() * kk:
            raise ValueError(f"{name}: kernel_size {self.kernel_size} does not match the packed weight: K = "
                             f"{w.shape[1]} is not {self.a_bits.numel()} input channels x {kk}")
        self._build_plans()  # built now, so torch.compile traces cached plans (no graph break)

    @classmethod
    def from_state_dict(cls, state_dict: dict, name: str = "?", *, kernel_size, stride, padding,
                        dilation) -> "PackedConv2d":
        """A PackedConv2d rebuilt from its own state_dict() and its geometry (conv_args())."""
        return cls(*_layer_from_state(state_dict), name, kernel_size=kernel_size, stride=stride,
                   padding=padding, dilation=dilation)

    def _build_plans(self) -> None:
        self._act_plan(False)
        self._quant_params()

    def _act_plan(self, integer: bool):
        # the unfolded rows already hold integers: quantizing them with scale 1 keeps them (they
        # are in range: convert refuses zero padding with signed 1-bit); the real scale goes
        # into the pack
        def make():
            kk = self.kernel_size[0] * self.kernel_size[1]
            kb = self.a_bits.repeat_interleave(kk)
            ks = self.a_scale.repeat_interleave(kk)
            return make_plan(kb, 1.0, kb.numel(), signed=self.a_signed, k_layout=self.w,
                             out_scale=None if integer else ks)
        return self._plan(("conv", integer), make)

    @property
    def in_channels(self) -> int:
        return self.a_bits.numel()

    @property
    def out_channels(self) -> int:
        return self.w.shape[0]

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, bias={self.bias is not None}")

    def conv_args(self) -> dict:
        return {"kernel_size": list(self.kernel_size), "stride": list(self.stride),
                "padding": list(self.padding), "dilation": list(self.dilation)}

    def forward(self, x: Tensor) -> Tensor:
        if needs_input_grad(x):  # the same values, with the straight-through gradient to x
            return InputGrad.apply(x, self, False)
        return self._run(x, integer=False)

    def _forward(self, x: Tensor, gelu: bool) -> Tensor:
        return self._run(x, integer=False)

    def _input_grad(self, grad_out: Tensor, x: Tensor, gelu: bool) -> Tensor:
        """d loss / d x: the transposed convolution of grad_out with the dequantized weight,
        through the activation quantizer's backward (per input channel, its clipping mask)."""
        w = self._dequantized_weight().reshape(self.out_channels, self.a_bits.numel(), *self.kernel_size)
        one = x.dim() == 3  # unbatched [C, H, W]
        xb, g = (x.unsqueeze(0), grad_out.unsqueeze(0)) if one else (x, grad_out)
        gv = torch.nn.grad.conv2d_input(xb.shape, w, g.to(torch.float32), self.stride, self.padding, self.dilation)
        gx = through_quantizer(xb.to(torch.float32), gv, self._quant_params(), False, 1)
        return (gx.squeeze(0) if one else gx).to(x.dtype)

    def accumulators(self, x: Tensor) -> Tensor:
        """Exact integer accumulators [B, O, H', W'] (int64) over the unfolded input."""
        return self._run(x, integer=True)

    def _run(self, x, integer):
        C = self.a_bits.numel()
        self._check_float_input(x)
        if x.dim() == 3 and x.shape[0] == C:  # unbatched [C, H, W], as nn.Conv2d takes it
            return self._run(x.unsqueeze(0), integer).squeeze(0)
        if x.dim() != 4 or x.shape[1] != C:
            raise ValueError(f"{self.name}: expected input [B, {C}, H, W] or [{C}, H, W], got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        kh, kw = self.kernel_size
        Ho = (H + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        Wo = (W + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        if B == 0:  # no samples, no output values (as nn.Conv2d)
            return torch.empty((0, self.out_channels, max(Ho, 0), max(Wo, 0)),
                               dtype=torch.int64 if integer else x.dtype)
        # quantize per channel first (zero padding is the integer 0), then unfold exact integers
        v = torch.ops.soniq.quantize_raw(x.float().contiguous(), *self._quant_params(), 1, 0, 0, True)
        cols = F.unfold(v, self.kernel_size, self.dilation, self.padding, self.stride)  # [B, C*kh*kw, L]
        rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
        out = self._gemm(rows, self._act_plan(integer), integer)
        if not integer and self.bias is not None:
            out = out + self.bias
        out = out if integer else _input_dtype(out, x)
        return out.reshape(B, Ho * Wo, -1).transpose(1, 2).reshape(B, -1, Ho, Wo)
