"""soniq.ops: packing, the mixed-precision GEMM (torch tensors or numpy arrays) and the GELU
the packed layers fuse."""
from . import _library  # noqa: F401  (registers the torch.library ops)
from ._gelu import gelu_
from ._mpgemm import int32_limit, mpgemm
from ._pack import pack, unpack
from ._quantize import philox_uniform, quantize
from ._quantize_pack import quantize_pack

__all__ = ["pack", "unpack", "mpgemm", "int32_limit", "quantize", "philox_uniform", "quantize_pack", "gelu_"]
