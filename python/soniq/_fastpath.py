"""torch's fused Transformer fast paths read a layer's weights directly (`linear1.weight`,
`self_attn.out_proj.weight`) instead of calling the layer, so a soniq layer there would be
skipped: in eval under no_grad the fake-quantized model would silently run in float, and a
packed model (no `weight`) would fail. Turned off per module for the modules holding soniq
layers; the regular path computes the same function through the layers' forwards."""
from __future__ import annotations

from torch import nn

from ._packed_nn import PackedConv2d, PackedLinear
from .nn import QConv2d, QLinear


def _holds_soniq_layer(m: nn.Module) -> bool:
    return any(isinstance(c, (QLinear, QConv2d, PackedLinear, PackedConv2d)) for c in m.modules())


def disable_torch_fastpaths(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and _holds_soniq_layer(m):
            m.activation_relu_or_gelu = False  # its fast path's precondition (fused kernel)
        elif isinstance(m, nn.TransformerEncoder) and _holds_soniq_layer(m):
            m.use_nested_tensor = False  # its nested-tensor path runs the layers' fast path


def attention_projections(model: nn.Module) -> list[str]:
    """Names of the Linear modules inside nn.MultiheadAttention (out_proj): torch's attention
    reads their weight and bias directly and never calls them, so they cannot be quantized."""
    return [f"{n}.{c}" if n else c for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)
            for c, sub in m.named_children() if isinstance(sub, nn.Linear)]
