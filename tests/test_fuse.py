"""Activation fusion (soniq.fuse_activations, done by soniq.convert and soniq.load): a packed
Linear followed by an exact GELU applies soniq's GELU (soniq.ops.gelu_) in place to its own
output. Same bits as the unfused model with that GELU in the activation's place, on every
path; recognized only where overwriting the output is safe, not state (saving writes the
original module), undone by unfuse_activations (torch's GELU again)."""
import copy

import pytest
import torch
from torch import nn

import soniq
from conftest import TEST_ISAS
from soniq._fuse import FusedActivation, FusedResidual
from soniq.qat import QATConfig

CFG = QATConfig(w_palette=(2, 4), a_palette=(4, 8), w_bits_target=3.0, a_bits_target=6.0)


def _convert(model, x, **kw):
    torch.manual_seed(0)
    soniq.qat.prepare(model, copy.deepcopy(CFG))
    model(x)
    soniq.qat.freeze_precision(model)
    return soniq.convert(model.eval(), **kw)


class NativeGELU(nn.Module):  # the unfused reference: soniq's GELU, out of place
    def forward(self, x):
        y = x.clone()
        soniq.ops.gelu_(y)
        return y


def _native(model):
    """model with every nn.GELU module swapped for NativeGELU (what fusion computes)."""
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if type(child) is nn.GELU:
                setattr(m, child_name, NativeGELU())
    return model


def _mlp(act):
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(37, 70), act, nn.Linear(70, 5))


class DenseThenAct(nn.Module):  # Hugging Face's BertIntermediate, as its copies in other models
    def __init__(self, act):
        super().__init__()
        self.dense = nn.Linear(24, 40)
        self.intermediate_act_fn = act

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dense(hidden_states)
        hidden_states = self.intermediate_act_fn(hidden_states)
        return hidden_states


class DenseActTwice(DenseThenAct):  # reads the dense output after the activation: never fused
    def forward(self, hidden_states):
        hidden_states = self.dense(hidden_states)
        return self.intermediate_act_fn(hidden_states) + hidden_states


def test_sequential_gelu_fused_same_bits():
    x = torch.randn(9, 37)
    q = _convert(_mlp(nn.GELU()), x)
    ref = _convert(_mlp(nn.GELU()), x, fuse=False)
    assert q[0].fused and q[0].activation is None and isinstance(q[1], FusedActivation)
    assert not ref[0].fused and type(ref[1]) is nn.GELU
    torch_gelu = copy.deepcopy(ref)
    _native(ref)
    assert "GELU fused" in repr(q[0])
    for inp in (x, torch.randn(3, 4, 37), torch.randn(37, 11).T):  # batch dims, non-contiguous
        assert torch.equal(q(inp), ref(inp))
    assert q.state_dict().keys() == torch_gelu.state_dict().keys()
    # torch's GELU differs in the last bits (then, rarely, in an activation code of the next layer)
    assert torch.allclose(q(x), torch_gelu(x), rtol=0.05, atol=0.05)


@pytest.mark.parametrize("isa", TEST_ISAS)
def test_fused_same_bits_on_every_isa(isa):
    """ISAs without layout kernels take the general path (mpgemm + bias): gelu in place there too."""
    x = torch.randn(6, 37)
    q = _convert(_mlp(nn.GELU()), x)
    ref = _native(_convert(_mlp(nn.GELU()), x, fuse=False))
    with soniq.use_isa(isa):
        assert torch.equal(q(x), ref(x))


@pytest.mark.parametrize("act", [nn.GELU(approximate="tanh"), nn.ReLU(), nn.SiLU()])
def test_other_activations_not_fused(act):
    x = torch.randn(5, 37)
    q = _convert(_mlp(act), x)
    assert not q[0].fused and type(q[1]) is type(act)


def _block(cls, act):
    torch.manual_seed(4)
    return nn.Sequential(cls(act))


def test_hf_block_pattern():
    x = torch.randn(4, 24)
    q = _convert(_block(DenseThenAct, nn.GELU()), x)
    ref = _native(_convert(_block(DenseThenAct, nn.GELU()), x, fuse=False))
    assert q[0].dense.fused and isinstance(q[0].intermediate_act_fn, FusedActivation)
    assert torch.equal(q(x), ref(x))
    other = _convert(_block(DenseActTwice, nn.GELU()), x)
    assert not other[0].dense.fused and type(other[0].intermediate_act_fn) is nn.GELU


def test_hf_gelu_activation_module():
    acts = pytest.importorskip("transformers.activations")
    x = torch.randn(4, 24)
    q = _convert(nn.Sequential(DenseThenAct(acts.GELUActivation())), x)
    assert q[0].dense.fused
    py = _convert(nn.Sequential(DenseThenAct(acts.GELUActivation(use_gelu_python=True))), x)
    assert not py[0].dense.fused  # its own formula: left to run as written


def test_unfuse_and_refuse():
    x = torch.randn(5, 37)
    q = _convert(_mlp(nn.GELU()), x)
    y = q(x)
    assert soniq.unfuse_activations(q) == 1
    assert not q[0].fused and type(q[1]) is nn.GELU and not q._forward_pre_hooks
    assert torch.equal(q(x), _convert(_mlp(nn.GELU()), x, fuse=False)(x))  # torch's GELU again
    assert soniq.fuse_activations(q) == 1 and soniq.fuse_activations(q) == 0  # idempotent
    assert torch.equal(q(x), y)
    with pytest.raises(ValueError, match="activation must be None or 'gelu'"):
        q[0].activation = "relu"


def test_save_writes_the_original_and_load_fuses(tmp_path):
    x = torch.randn(5, 37)
    q = _convert(_mlp(nn.GELU()), x)
    y = q(x)
    path = tmp_path / "m.safetensors"
    soniq.save(q, path)
    back = soniq.load(path)
    assert back[0].fused and isinstance(back[1], FusedActivation)
    assert type(back[1].original) is nn.GELU
    assert torch.equal(back(x), y)
    # loading into a fused architecture: its packed layers are replaced and fused again
    again = soniq.load(path, model=copy.deepcopy(q))
    assert again[0].fused and torch.equal(again(x), y)


class OutputBlock(nn.Module):  # Hugging Face's BertSelfOutput / BertOutput
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(24, 24)
        self.LayerNorm = nn.LayerNorm(24)
        self.dropout = nn.Dropout(0.1)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dense(hidden_states)
        hidden_states = self.dropout(hidden_states)
        hidden_states = self.LayerNorm(hidden_states + input_tensor)
        return hidden_states


class OutputBlockNoDropout(OutputBlock):  # another forward: left as written
    def forward(self, hidden_states, input_tensor):
        return self.LayerNorm(self.dense(hidden_states) + input_tensor)


class Layer(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.output = block()

    def forward(self, x):
        return self.output(torch.tanh(x), x)


def _layer(block):
    torch.manual_seed(5)
    return Layer(block)


def test_residual_added_in_place_same_bits(tmp_path):
    x = torch.randn(7, 24)
    q = _convert(_layer(OutputBlock), x)
    ref = _convert(_layer(OutputBlock), x, fuse=False)
    assert isinstance(q.output, FusedResidual) and type(ref.output) is OutputBlock
    assert q.state_dict().keys() == ref.state_dict().keys()
    for inp in (x, torch.randn(2, 3, 24), torch.randn(24, 5).T):
        assert torch.equal(q(inp), ref(inp))
    residual = torch.randn(7, 24)
    kept = residual.clone()
    q.output(x, residual)
    assert torch.equal(residual, kept)  # only the block's own output is written in place
    with torch.no_grad():  # a broadcast residual is added as written
        assert torch.equal(q.output(x, residual[:1]), ref.output(x, residual[:1]))
    other = _convert(_layer(OutputBlockNoDropout), x)
    assert type(other.output) is OutputBlockNoDropout
    assert soniq.unfuse_activations(q) == 1 and type(q.output) is OutputBlock
    assert q.output.dense is not None and torch.equal(q(x), ref(x))
    soniq.fuse_activations(q)
    again = soniq.load(_saved(q, tmp_path), model=copy.deepcopy(q))  # fused architecture in, fused out
    assert isinstance(again.output, FusedResidual) and torch.equal(again(x), ref(x))


def _saved(model, tmp_path):
    path = tmp_path / "r.safetensors"
    soniq.save(model, path)
    return path


class CallsItsLayerTwice(nn.Module):
    """The fused layer also called on its own, outside the Sequential it is fused in."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.body = nn.Sequential(nn.Linear(37, 16), nn.GELU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x)) + self.body[0](x).sum(-1, keepdim=True)


def test_fused_layer_called_on_its_own_gives_its_own_output(tmp_path):
    """The GELU applies only when the block holding the pair calls the layer: a call of the
    layer elsewhere, a layer with a hook of its own (which must see its output), copies and
    pickles of the model all give the unfused model's values."""
    x = torch.randn(6, 37)
    q = _convert(CallsItsLayerTwice(), x)
    ref = _native(_convert(CallsItsLayerTwice(), x, fuse=False))
    assert q.body[0].fused
    assert torch.equal(q(x), ref(x))
    assert torch.equal(q.body[0](x), ref.body[0](x))  # on its own: no GELU
    assert torch.equal(q.body(x), ref.body(x))
    for other in (copy.deepcopy(q), torch.load(_pickled(q, tmp_path), weights_only=False)):
        assert torch.equal(other(x), ref(x)) and torch.equal(other.body[0](x), ref.body[0](x))
    seen = []
    handle = q.body[0].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    assert torch.equal(q(x), ref(x)) and torch.equal(seen[0], ref.body[0](x))
    handle.remove()
    # an error inside the block leaves nothing armed for a later call of the layer on its own
    with pytest.raises(ValueError):
        q.body(torch.randn(2, 5))
    assert torch.equal(q.body[0](x), ref.body[0](x))


def _pickled(model, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    return path


def test_global_hooks_and_old_pickles_see_the_right_values(tmp_path):
    """A global forward hook (torch.nn.modules.module.register_module_forward_hook) sees the
    layer's plain output, as its own hooks do; a layer pickled when fusion set
    activation = "gelu" on it applies the GELU once (its FusedActivation passes it through)."""
    x = torch.randn(6, 37)
    q = _convert(_mlp(nn.GELU()), x)
    ref = _native(_convert(_mlp(nn.GELU()), x, fuse=False))
    seen = {}
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.setdefault(id(m), o.clone()))
    try:
        assert torch.equal(q(x), ref(x))
    finally:
        handle.remove()
    assert torch.equal(seen[id(q[0])], ref[0](x))
    old = copy.deepcopy(q)  # as pickled before: activation set, no "fused" field, no hooks
    for h in (old._forward_pre_hooks, old._forward_hooks):
        h.clear()
    del old[0].__dict__["fused"]
    old[0].activation = "gelu"
    torch.save(old, tmp_path / "old.pt")
    back = torch.load(tmp_path / "old.pt", weights_only=False)
    assert back[0].fused and torch.equal(back(x), ref(x))
    assert soniq.unfuse_activations(back) == 1 and back[0].activation is None
    assert torch.equal(back(x), _convert(_mlp(nn.GELU()), x, fuse=False)(x))


def test_call_in_block_times_what_the_block_runs():
    """soniq bench times layers outside their model: call_in_block gives what the block's call
    gives (the fused GELU applied) and leaves nothing armed or recorded for later calls."""
    from soniq._fuse import call_in_block
    from soniq._fuse_state import state

    x = torch.randn(6, 37)
    q = _convert(_mlp(nn.GELU()), x)
    ref = _native(_convert(_mlp(nn.GELU()), x, fuse=False))
    assert torch.equal(call_in_block(q[0], x), ref[:2](x))
    assert state() == (set(), [])
    assert torch.equal(q[0](x), ref[0](x))  # a plain call after it: no GELU
    assert torch.equal(call_in_block(q[2], ref[:2](x)), ref[2](ref[:2](x)))  # not fused: just called
