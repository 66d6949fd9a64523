"""The attention half of the official TimeSformer divided space-time block."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..ops import spatial_attention_tokens, split_qkv, temporal_attention, tokens_major
from .attention import Attention
from .drop import DropPath
from .padding import op_padding
from .recompute import linear_linear
from .sharded import temporal_residual


@torch.library.custom_op("divattn::add_after_first", mutates_args=())
def _add_after_first(x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """``cat([x[:, :1], x[:, 1:] + res], 1)`` written in one pass, without the cat.

    A custom op, so that ``torch.compile(fullgraph=True)`` keeps the ``out=`` write.
    """
    out = torch.empty_like(x)
    out[:, 0] = x[:, 0]
    torch.add(x[:, 1:], res, out=out[:, 1:])
    return out


@_add_after_first.register_fake
def _(x, res):
    return torch.empty_like(x)


def _add_after_first_backward(ctx, grad):
    return grad, grad[:, 1:]


torch.library.register_autograd("divattn::add_after_first", _add_after_first_backward)


def add_after_first(x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, 1 + L, C)`` plus ``res`` ``(B, L, C)`` on every token but the first."""
    if x.shape[0] != res.shape[0] or x.shape[1] != res.shape[1] + 1 or x.shape[2:] != res.shape[2:]:
        raise ValueError(f"add_after_first: x {tuple(x.shape)} and res {tuple(res.shape)} do not fit (B, 1 + L, C) / (B, L, C)")
    return _add_after_first(x, res)


class DividedSpaceTimeAttention(nn.Module):
    """Temporal-then-spatial attention of one TimeSformer block, on the fused ops.

    Input and output ``x``: ``(B, 1 + N*T, C)``, a cls token then patch tokens in
    ``token_order`` ``"hwt"`` (TimeSformer: token ``1 + n*T + t``) or ``"thw"``. T is
    ``num_frames`` (config); N comes from the tensor. Computes, exactly as the official
    ``Block.forward`` with ``attention_type='divided_space_time'`` (minus its MLP)::

        xt = x[:, 1:] + temporal_fc(drop_path(temporal_attn(temporal_norm1(x[:, 1:]))))
        # spatial: each frame attends over [cls] + its N patches, cls outputs averaged
        x = cat(x[:, :1], xt) + drop_path(cat(mean_t(cls_out), spatial_out))

    Submodule names (``temporal_norm1``, ``temporal_attn.{qkv,proj}``,
    ``temporal_fc``, ``norm1``, ``attn.{qkv,proj}``) are the official state-dict keys,
    so a full block subclasses this module and adds ``norm2`` and ``mlp``.

    The fast path makes no rearrange/cat/repeat copies: q/k/v are views of the qkv
    projections, the ops write token-major outputs that the projections read as
    views, and the residual of the temporal half is added in one pass. The temporal
    qkv is computed over all ``1 + N*T`` tokens (the cls row is ignored), which costs
    ``1/(N*T)`` more projection FLOPs and saves a copy of the patch tokens. One copy
    is left, in the backward: the gradient of the temporal residual skips each
    sample's cls row, and ``temporal_fc``'s GEMM needs it dense.

    ``forward(x, mask)`` takes a padded batch's real patch tokens, ``mask`` ``(B, T, N)`` or
    :class:`~divattn.layers.padding.Frames` (:func:`divattn.temporal_attention`); the cls
    token is always real.

    Stochastic depth drops whole samples; the official code drops the spatial
    residual per (sample, frame) before averaging the cls outputs, which the fused
    path (one cls output per sample) cannot express. Evaluation is identical.

    With ``sequence`` set (a :class:`~divattn.sequence_parallel.FrameShards`, by the
    model's ``parallelize``), ``x`` holds this rank's ``num_frames`` frames of a clip
    sharded over a process group: the temporal half runs on all frames of this rank's
    patches (:func:`~divattn.layers.sharded.temporal_residual`), the spatial half on the
    local frames, and the cls output is completed over all frames (one all-reduce).
    """

    sequence = None

    def __init__(self, dim: int, num_heads: int, num_frames: int, *, qkv_bias: bool = False,
                 qk_scale: Optional[float] = None, proj_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: Callable[[int], nn.Module] = nn.LayerNorm, token_order: str = "hwt",
                 backend: Optional[str] = None):
        super().__init__()
        if token_order not in ("hwt", "thw"):
            raise ValueError(f"token_order must be 'hwt' or 'thw', got {token_order!r}")
        self.num_frames = num_frames
        self.token_order = token_order
        self.backend = backend
        self.temporal_norm1 = norm_layer(dim)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias, qk_scale, proj_drop)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, proj_drop)
        self.drop_path = DropPath(drop_path)

    def _temporal_residual(self, o: torch.Tensor) -> torch.Tensor:
        """``temporal_fc(drop_path(temporal_attn.out(o)))`` for the ``(B, N*T, C)`` temporal output."""
        attn = self.temporal_attn
        if attn.memory == "min" and not (self.training and attn.proj_drop.p > 0):
            return linear_linear(o, attn.proj, self.temporal_fc, self.drop_path.scale(o))
        return self.temporal_fc(self.drop_path(attn.out(o)))

    def _split(self, qkv: torch.Tensor, T: int):
        N = (qkv.shape[1] - 1) // T
        return split_qkv(qkv, T, N, order=self.token_order, has_cls=True)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, L, C = x.shape
        T = self.num_frames
        if (L - 1) % T != 0:
            raise ValueError(f"DividedSpaceTimeAttention: {L} tokens is not 1 + N*T with T = num_frames = {T}")
        if self.sequence is None:
            q, k, v, _ = self._split(self.temporal_attn.qkv_heads(x, self.temporal_norm1), T)
            o = temporal_attention(q, k, v, scale=self.temporal_attn.scale, backend=self.backend, **op_padding(mask))
            res_t = self._temporal_residual(tokens_major(o))
            x = add_after_first(x, res_t)
        else:  # a parallelized model takes no mask (VideoModel.ragged)
            x = temporal_residual(self.sequence, x, self.temporal_norm1, self.temporal_attn, order=self.token_order,
                                  has_cls=True, drop_path=self.drop_path, fc=self.temporal_fc, backend=self.backend)

        q, k, v, cls = self._split(self.attn.qkv_heads(x, self.norm1), T)
        o = spatial_attention_tokens(q, k, v, cls, scale=self.attn.scale, backend=self.backend, **op_padding(mask))
        x = x + self.drop_path(self.attn.out(o))
        return x if self.sequence is None else self.sequence.complete_cls(x)
