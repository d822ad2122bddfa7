"""soniq._layer_inputs: the inputs sequential GPTQ takes block by block are the inputs the whole
model feeds each layer, bit for bit, and PTQ gives the same model either way."""
import torch
from torch import nn

import soniq
from soniq import _layer_inputs
from soniq._layer_inputs import LayerInputs
from soniq._recon import _block_inputs
from soniq.nn import QLinear
from soniq.ptq import PTQConfig, quantize


class _Block(nn.Module):
    """A transformer-like block called with a keyword mask: two Linear layers on one input, then one."""

    def __init__(self, d):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, mask=None):
        h = torch.nn.functional.gelu(self.a(x)) * torch.sigmoid(self.b(x))
        return x + self.out(h) * mask[..., None]


class _Net(nn.Module):
    """Blocks in a ModuleList, one of them run only on batches of more than 8 rows (the rest
    fall back to whole-model runs), and a head outside any block."""

    def __init__(self, d=24, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(3))
        self.head = nn.Linear(d, 5)

    def forward(self, x, mask):
        x = self.inp(x)
        for i, blk in enumerate(self.blocks):
            if i != 1 or x.shape[0] > 8:
                x = blk(x, mask=mask)
        return self.head(x)


def _batches(n=6):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(6 if i == 2 else 12, 7, 24, generator=g), "mask": (torch.rand(6 if i == 2 else 12, 7, generator=g) > 0.2).float()}
            for i in range(n)]


def _forward(m, b):
    return m(b["x"], mask=b["mask"])


def test_block_of_is_the_innermost_module_list_child():
    net = _Net()
    li = LayerInputs(net, _batches(), _forward)
    assert li.block_of(net.blocks[2].out) == "blocks.2"
    assert li.block_of(net.head) is None and li.block_of(net.inp) is None
    lst = nn.ModuleList([nn.Linear(4, 4)])  # a layer that is itself the list's child is not in a block
    assert LayerInputs(lst, [], _forward).block_of(lst[0]) is None


def test_first_args_equal_the_whole_model_inputs_bit_for_bit():
    net, batches = _Net(), _batches()
    li = LayerInputs(net, batches, _forward)
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            got = list(li.first_args(m))
            want = [_block_inputs(net, m, [b], _forward) for b in batches]
            assert len(got) == len(want) == len(batches), name
            for g, w in zip(got, want):
                assert (g is None) if not w else torch.equal(g, w[0][0][0]), name
    assert sum(g is None for g in li.first_args(net.blocks[1].a)) == 1  # block 1 skips the batch of 6


def test_ptq_is_the_same_with_and_without_block_inputs(monkeypatch):
    """Sequential, asymmetric GPTQ with clip search: every weight and clip the same."""
    batches = _batches()
    cfg = PTQConfig(w_palette=(2, 4), w_bits_target=3.0, asymmetric=True, clip_search=(0.9, 1.1),
                    qat_options=(("a_dynamic", "token"),))
    calls, captured = [], []
    real, real_capture = _layer_inputs._block_inputs, LayerInputs._capture

    def spy(model, module, batches, forward):
        if isinstance(model, _Net):  # runs from the model's input (not a block re-run alone)
            calls.append(len(batches))
        return real(model, module, batches, forward)

    def spy_capture(self, blk):
        got = real_capture(self, blk)
        captured.append((blk, len(got)))
        return got

    monkeypatch.setattr(_layer_inputs, "_block_inputs", spy)
    monkeypatch.setattr(LayerInputs, "_capture", spy_capture)
    fast = quantize(_Net(), batches, cfg, forward=_forward)
    # blocks 0, 1, 2 of the quantized and the float model captured once each (block 1 misses a
    # batch); from the model's input: inp and head, and block 1's two groups, per batch and model
    assert sorted(captured) == sorted([(f"blocks.{i}", 5 if i == 1 else 6) for i in range(3)] * 2)
    assert calls == [1] * (2 + 2) * len(batches) * 2
    calls.clear()
    monkeypatch.setattr(LayerInputs, "block_of", lambda self, layer: None)  # every group from the model's input
    slow = quantize(_Net(), batches, cfg, forward=_forward)
    assert calls and set(calls) == {1}  # batch by batch
    n = 0
    for (name, a), b in zip(fast.named_modules(), slow.modules()):
        if isinstance(a, QLinear):
            n += 1
            assert torch.equal(a.weight, b.weight), name
            assert torch.equal(a.w_quant.clip, b.w_quant.clip), name
    assert n == 11
    x = batches[0]
    with torch.no_grad():
        assert torch.equal(_forward(fast, x), _forward(slow, x))
    packed = soniq.convert(fast)
    with torch.no_grad():
        torch.testing.assert_close(_forward(packed, x), _forward(fast, x), rtol=1e-4, atol=1e-4)


class _Cache:
    """A key/value-cache-like kwarg: grows on every call, so re-running a block would differ."""

    def __init__(self):
        self.seen = []


class _StatefulBlock(_Block):
    def forward(self, x, mask=None, cache=None):
        cache.seen.append(x.shape[1])
        return super().forward(x * len(cache.seen), mask=mask)


class _InPlaceBlock(_Block):
    def forward(self, x, mask=None):
        x.mul_(0.5)  # writes its input: a kept copy must not see it
        return super().forward(x, mask=mask)


class _Net2(nn.Module):
    def __init__(self, block, d=24):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([block(d), block(d)])

    def forward(self, x, mask):
        cache, x = _Cache(), x * 1.0  # (the batch itself is never written)
        for blk in self.blocks:
            x = blk(x, mask=mask, cache=cache) if isinstance(blk, _StatefulBlock) else blk(x, mask=mask)
        return x


def _same_as_model(net, batches, forward=_forward):
    li = LayerInputs(net, batches, forward)
    for name, m in net.named_modules():
        if isinstance(m, nn.Linear):
            for g, b in zip(li.first_args(m), batches):
                assert torch.equal(g, _block_inputs(net, m, [b], forward)[0][0][0]), name
    return li


def test_blocks_with_state_own_hooks_or_autocast_are_not_rerun_alone():
    """Re-running such a block alone could differ from the model, so it is reached from the
    model's input; a block writing its input in place is re-run on a fresh copy each time."""
    batches = _batches(3)
    li = _same_as_model(_Net2(_StatefulBlock), batches)
    assert li._capture("blocks.1") == []
    li = _same_as_model(_Net2(_InPlaceBlock), batches)
    assert len(li._capture("blocks.1")) == 3
    net = _Net2(_Block)
    net.blocks[1].register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    li = _same_as_model(net, batches)
    assert li._capture("blocks.1") == [] and len(li._capture("blocks.0")) == 3

    def amp_forward(m, b):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _forward(m, b)

    li = _same_as_model(_Net2(_Block), batches, amp_forward)
    assert li._capture("blocks.1") == []
    assert len(LayerInputs(_Net2(_Block), batches, _forward)._capture("blocks.1")) == 3
