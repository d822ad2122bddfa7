"""soniq: per-channel mixed-precision (1-8 bit) quantization with fast packed kernels.

See README.md and design.md. Public API: soniq.ops (pack / unpack / mpgemm),
soniq.PackedTensor, soniq.info(), thread and ISA controls.
"""
from . import _native  # noqa: F401  (loads soniq._C and applies SONIQ_ISA)
from ._runtime import (get_isa, get_num_threads, info, set_isa, set_num_threads,
                       supported_isas, use_isa)
from ._version import __version__
from .packed import KLayout, PackedTensor
from . import ops
from . import nn, qat
from . import ptq
from ._convert import convert
from ._fuse import fuse_activations, unfuse_activations
from ._io import load, save

__all__ = ["ops", "PackedTensor", "KLayout", "info", "get_num_threads", "set_num_threads",
           "get_isa", "set_isa", "use_isa", "supported_isas", "__version__",
           "nn", "qat", "ptq", "convert", "fuse_activations", "unfuse_activations", "save", "load"]
