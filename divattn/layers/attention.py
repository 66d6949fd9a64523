"""Multi-head attention modules that hold parameters and call the divattn ops."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import joint_attention
from .padding import op_padding
from .recompute import norm_linear


class Attention(nn.Module):
    """Parameters of one multi-head attention, laid out as timm / TimeSformer do.

    ``qkv``: ``Linear(dim, 3*dim)`` with output rows ``[q; k; v]``, heads contiguous;
    ``proj``: ``Linear(dim, dim)``. State-dict keys ``qkv.weight``, ``qkv.bias``,
    ``proj.weight``, ``proj.bias`` match the official checkpoints.

    Calling the module runs joint attention over all tokens of ``x`` ``(B, L, C)``;
    divided blocks use :meth:`qkv_heads` and ``proj`` around the divided ops instead.
    Both take the pre-norm ``norm`` applied to ``x`` first; with ``memory="min"`` the
    norm and ``qkv`` are one node that saves ``x``, not ``norm(x)``
    (:mod:`divattn.layers.recompute`).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_scale: Optional[float] = None,
                 proj_drop: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5 if qk_scale is None else float(qk_scale)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend
        self.memory = "fast"

    def project(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """``qkv(norm(x))`` (``qkv(x)`` without ``norm``) over the last dim of ``x``."""
        if norm is None:
            return self.qkv(x)
        if self.memory == "min":
            return norm_linear(x, norm, self.qkv)
        return self.qkv(norm(x))

    def qkv_heads(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """``x`` ``(B, L, C)`` (through ``norm`` first, when given) -> the qkv projection
        viewed as ``(B, L, 3, H, D)`` (no copy)."""
        B, L, _ = x.shape
        return self.project(x, norm).view(B, L, 3, self.num_heads, self.head_dim)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """Project token-major head outputs ``(B, L, H, D)`` (or ``(B, L, C)``) back to ``(B, L, C)``."""
        B, L = o.shape[:2]
        return self.proj_drop(self.proj(o.reshape(B, L, -1)))

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Joint attention over the tokens of ``x``; ``mask`` ``(B, L)`` bool: the real ones, or
        their :class:`~divattn.layers.padding.Lengths` (:func:`divattn.joint_attention`)."""
        q, k, v = self.qkv_heads(x, norm).unbind(2)
        return self.out(joint_attention(q, k, v, scale=self.scale, backend=self.backend, **op_padding(mask)))
