"""divattn: fused divided space-time attention for video transformers.

``temporal_attention``, ``spatial_attention`` and ``joint_attention`` read q/k/v as
strided views of the qkv projection (either token order) and run on the Triton
kernels, the CUDA extension or the pure-PyTorch reference (``backend=``).
"""

from .ops import (
    BackendError,
    joint_attention,
    spatial_attention,
    split_qkv,
    temporal_attention,
    tokens_major,
)
from .swap import swap_attention
from . import flops  # noqa: E402  (registers FlopCounterMode formulas for the custom ops)

__version__ = "0.1.0"

__all__ = [
    "temporal_attention",
    "spatial_attention",
    "joint_attention",
    "split_qkv",
    "tokens_major",
    "swap_attention",
    "BackendError",
    "__version__",
]
