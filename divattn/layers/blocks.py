"""Whole transformer blocks (attention + MLP) for the bundled video models.

Every block runs its attention through the divattn ops and keeps timm / TimeSformer
parameter names, so official checkpoints load without renaming:

- :class:`Block`: joint attention over all tokens (TimeSformer joint / space-only,
  ViViT models 1 and 2);
- :class:`DividedBlock`: the official TimeSformer divided block (temporal, then
  spatial with the cls token);
- :class:`FactorisedSelfAttentionBlock`: ViViT model 3 (spatial MSA, then temporal
  MSA, or the other way round; no cls);
- :class:`FactorisedDotProductBlock`: ViViT model 4 (the first half of the heads over
  time, the second half over space, one qkv; scenic's head assignment).

Blocks that need the frame count read it from ``num_frames`` (set from the model
config, updated by the model when a clip with another frame count comes in); N comes
from the token count. ``forward(x, mask)`` takes a padded batch's real tokens: ``(B, L)``
for :class:`Block`, ``(B, T, N)`` or :class:`~divattn.layers.padding.Frames` for the others
(see the ops' ``mask`` and ``frames``). Each block's ``attention_maps(x)`` returns its attention
probabilities for the input ``x`` through the reference softmax, for inspection.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import spatial_attention, split_qkv, temporal_attention, tokens_major
from .attention import Attention
from .divided import DividedSpaceTimeAttention, add_after_first
from .drop import DropPath
from .mlp import Mlp
from .padding import op_padding
from .sharded import patch_sharded_attention, temporal_residual


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(q @ k^T * scale)`` in fp32 over the last two dims of ``(..., L, D)`` inputs."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    return s.softmax(-1)


def _split_frames(qkv: torch.Tensor, num_frames: int, who: str):
    """q, k, v ``(B, T, N, H, D)`` views of a ``(B, T*N, 3, H, D)`` qkv in ``(t h w)`` order."""
    L = qkv.shape[1]
    if L % num_frames != 0:
        raise ValueError(f"{who}: {L} tokens is not N*T with T = num_frames = {num_frames}")
    return split_qkv(qkv, num_frames, L // num_frames, order="thw", has_cls=False)


class Block(nn.Module):
    """Pre-norm transformer block with joint attention over all tokens of ``x`` ``(B, L, C)``.

    ``x = x + drop_path(attn(norm1(x))); x = x + drop_path(mlp(norm2(x)))``; keys
    ``norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2``. The MLP is ``mlp_dim`` wide
    when given, else ``int(dim * mlp_ratio)``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 drop_path: float = 0.0, act: str = "gelu", norm_eps: float = 1e-6, backend: Optional[str] = None,
                 mlp_dim: Optional[int] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_drop=drop, backend=backend)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio) if mlp_dim is None else mlp_dim, act, drop)

    @property
    def backend(self) -> Optional[str]:
        return self.attn.backend

    @backend.setter
    def backend(self, value: Optional[str]) -> None:
        self.attn.backend = value

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(x, self.norm1, mask))
        return x + self.drop_path(self.mlp(x, self.norm2))

    def attention_maps(self, x: torch.Tensor) -> dict:
        """``{"joint": (B, H, L, L)}`` attention probabilities for the block input ``x``."""
        q, k, _ = self.attn.qkv_heads(self.norm1(x)).unbind(2)
        return {"joint": attention_probs(q.transpose(1, 2), k.transpose(1, 2), self.attn.scale)}


class DividedBlock(DividedSpaceTimeAttention):
    """The official TimeSformer divided space-time block: divided attention, then the MLP.

    Adds ``norm2`` and ``mlp`` to :class:`~divattn.layers.DividedSpaceTimeAttention`,
    so the state-dict keys are the official ones: ``temporal_norm1,
    temporal_attn.{qkv,proj}, temporal_fc, norm1, attn.{qkv,proj}, norm2,
    mlp.{fc1,fc2}``. Input and output ``(B, 1 + N*T, C)``.
    """

    def __init__(self, dim: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, drop_path: float = 0.0, act: str = "gelu", norm_eps: float = 1e-6,
                 token_order: str = "hwt", backend: Optional[str] = None):
        super().__init__(dim, num_heads, num_frames, qkv_bias=qkv_bias, proj_drop=drop, drop_path=drop_path,
                         norm_layer=partial(nn.LayerNorm, eps=norm_eps), token_order=token_order, backend=backend)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = super().forward(x, mask)
        return x + self.drop_path(self.mlp(x, self.norm2))

    def attention_maps(self, x: torch.Tensor) -> dict:
        """Attention probabilities of both halves for the block input ``x`` ``(B, 1 + N*T, C)``.

        ``"temporal"``: ``(B, N, H, T, T)``, patch n's query frame over key frames.
        ``"spatial"``: ``(B, T, H, 1 + N, 1 + N)``, frame t's ``[cls] + N`` tokens, cls first.
        """
        T = self.num_frames
        q, k, v, _ = self._split(self.temporal_attn.qkv_heads(self.temporal_norm1(x)), T)
        # (B, T, N, H, D) -> (B, N, H, T, D)
        temporal = attention_probs(q.permute(0, 2, 3, 1, 4), k.permute(0, 2, 3, 1, 4), self.temporal_attn.scale)
        o = temporal_attention(q, k, v, scale=self.temporal_attn.scale, backend=self.backend)
        x = add_after_first(x, self.temporal_fc(self.temporal_attn.out(tokens_major(o))))
        q, k, _, (q_cls, k_cls, _) = self._split(self.attn.qkv_heads(self.norm1(x)), T)
        B, T, N, H, D = q.shape
        # (B, T, N, H, D) -> (B, T, H, 1 + N, D) with the cls token repeated in every frame
        q = torch.cat([q_cls[:, None, None].expand(B, T, 1, H, D), q], 2).transpose(2, 3)
        k = torch.cat([k_cls[:, None, None].expand(B, T, 1, H, D), k], 2).transpose(2, 3)
        return {"temporal": temporal, "spatial": attention_probs(q, k, self.attn.scale)}


ATTENTION_ORDERS = ("space_time", "time_space")


class FactorisedSelfAttentionBlock(nn.Module):
    """ViViT model 3 block: spatial MSA, then temporal MSA, then the MLP; no cls token.

    Input and output ``(B, T*N, C)`` in ``(t h w)`` order, T = ``num_frames`` temporal
    tokens. Keys ``norm1, attn`` (spatial), ``temporal_norm1, temporal_attn``,
    ``norm2, mlp``. With ``attention_order="space_time"`` (default, the paper's)::

        x = x + drop_path(attn(norm1(x)))                     # over the N patches of each frame
        x = x + drop_path(temporal_attn(temporal_norm1(x)))   # over the T frames of each patch
        x = x + drop_path(mlp(norm2(x)))

    ``"time_space"`` (scenic's other ``attention_order``) runs the first two lines the
    other way round. With ``sequence`` set (the model's ``parallelize``), ``x`` holds this
    rank's frames and the temporal MSA runs on all frames of this rank's patches.
    """

    sequence = None

    def __init__(self, dim: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, drop_path: float = 0.0, act: str = "gelu", norm_eps: float = 1e-6,
                 backend: Optional[str] = None, attention_order: str = "space_time"):
        super().__init__()
        if attention_order not in ATTENTION_ORDERS:
            raise ValueError(f"FactorisedSelfAttentionBlock: attention_order must be one of {ATTENTION_ORDERS}, "
                             f"got {attention_order!r}")
        self.attention_order = attention_order
        self.num_frames = num_frames
        self.backend = backend
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_drop=drop)
        self.temporal_norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)

    def _qkv(self, attn: Attention, x: torch.Tensor, norm: nn.Module):
        return _split_frames(attn.qkv_heads(x, norm), self.num_frames, type(self).__name__)

    def _spatial(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self._qkv(self.attn, x, self.norm1)
        o = spatial_attention(q, k, v, scale=self.attn.scale, backend=self.backend, **op_padding(mask))
        return x + self.drop_path(self.attn.out(tokens_major(o)))

    def _temporal(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.sequence is not None:  # a parallelized model takes no mask (VideoModel.ragged)
            return temporal_residual(self.sequence, x, self.temporal_norm1, self.temporal_attn, order="thw",
                                     has_cls=False, drop_path=self.drop_path, backend=self.backend)
        q, k, v = self._qkv(self.temporal_attn, x, self.temporal_norm1)
        o = temporal_attention(q, k, v, scale=self.temporal_attn.scale, backend=self.backend, **op_padding(mask))
        return x + self.drop_path(self.temporal_attn.out(tokens_major(o)))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.attention_order == "space_time":
            x = self._temporal(self._spatial(x, mask), mask)
        else:
            x = self._spatial(self._temporal(x, mask), mask)
        return x + self.drop_path(self.mlp(x, self.norm2))

    def attention_maps(self, x: torch.Tensor) -> dict:
        """``"spatial"``: ``(B, T, H, N, N)``; ``"temporal"``: ``(B, N, H, T, T)``, each for
        the input its attention sees in ``attention_order``."""
        maps = {}
        for part in self.attention_order.split("_"):
            if part == "space":
                q, k, _ = self._qkv(self.attn, x, self.norm1)
                maps["spatial"] = attention_probs(q.transpose(2, 3), k.transpose(2, 3), self.attn.scale)
                x = self._spatial(x)
            else:
                q, k, _ = self._qkv(self.temporal_attn, x, self.temporal_norm1)
                maps["temporal"] = attention_probs(q.permute(0, 2, 3, 1, 4), k.permute(0, 2, 3, 1, 4),
                                                   self.temporal_attn.scale)
                x = self._temporal(x)
        return maps


class FactorisedDotProductBlock(nn.Module):
    """ViViT model 4 block: one qkv, half the heads attend over time, half over space.

    Input and output ``(B, T*N, C)`` in ``(t h w)`` order. As in the official code
    (scenic's ``factorized_dot_product_attention`` splits the heads in two and gives
    split ``i`` axis ``i + 1`` of ``(B, T, N)``): heads ``[0, H/2)`` attend over the T
    frames of their patch, heads ``[H/2, H)`` over the N patches of their frame. Both
    halves read views of the one qkv projection. The output projection consumes the
    two halves through the matching column blocks of its weight, so the head outputs
    are never concatenated::

        y = o_temporal @ proj.weight[:, :C/2].T + o_spatial @ proj.weight[:, C/2:].T + proj.bias

    Keys ``norm1, attn.qkv, attn.proj, norm2, mlp`` (the parameters of model 1's block).

    With ``sequence`` set (the model's ``parallelize``), ``x`` holds this rank's frames: the
    temporal heads' q/k/v are projected from the normed tokens re-sharded to patches, and
    their output comes back to the frames before the projection (C values per token out,
    C/2 back).
    """

    sequence = None

    def __init__(self, dim: int, num_heads: int, num_frames: int, mlp_ratio: float = 4.0, qkv_bias: bool = False,
                 drop: float = 0.0, drop_path: float = 0.0, act: str = "gelu", norm_eps: float = 1e-6,
                 backend: Optional[str] = None):
        super().__init__()
        if num_heads % 2 != 0:
            raise ValueError(f"FactorisedDotProductBlock: num_heads must be even (half spatial, half temporal), "
                             f"got {num_heads}")
        self.num_frames = num_frames
        self.backend = backend
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)

    def _halves(self, x: torch.Tensor):
        """``((q, k, v) temporal, (q, k, v) spatial)``: ``(B, T, N, H/2, D)`` views of one qkv."""
        q, k, v = _split_frames(self.attn.qkv_heads(x, self.norm1), self.num_frames, type(self).__name__)
        h = self.attn.num_heads // 2
        return (q[:, :, :, :h], k[:, :, :, :h], v[:, :, :, :h]), (q[:, :, :, h:], k[:, :, :, h:], v[:, :, :, h:])

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.sequence is not None:  # a parallelized model takes no mask (VideoModel.ragged)
            return self._forward_sharded(x)
        (qt, kt, vt), (qs, ks, vs) = self._halves(x)
        scale = self.attn.scale
        padding = op_padding(mask)
        o_t = tokens_major(temporal_attention(qt, kt, vt, scale=scale, backend=self.backend, **padding))
        o_s = tokens_major(spatial_attention(qs, ks, vs, scale=scale, backend=self.backend, **padding))
        return self._project(x, o_t, o_s)

    def _project(self, x: torch.Tensor, o_t: torch.Tensor, o_s: torch.Tensor) -> torch.Tensor:
        w, half = self.attn.proj.weight, o_t.shape[-1]
        y = F.linear(o_t, w[:, :half]) + F.linear(o_s, w[:, half:], self.attn.proj.bias)
        x = x + self.drop_path(self.attn.proj_drop(y))
        return x + self.drop_path(self.mlp(x, self.norm2))

    def _forward_sharded(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` on this rank's frames: the temporal heads over all frames of its patches."""
        xn = self.norm1(x)
        C, shards = xn.shape[-1], self.sequence
        # qkv rows (q k v) x (temporal heads, spatial heads) x C/2
        w = self.attn.qkv.weight.view(3, 2, C // 2, C)
        b = self.attn.qkv.bias.view(3, 2, C // 2) if self.attn.qkv.bias is not None else None
        half = [(w[:, i].reshape(-1, C), None if b is None else b[:, i].reshape(-1)) for i in (0, 1)]
        qkv_t = F.linear(shards.frames_to_patches(xn), *half[0])
        o_t = shards.patches_to_frames(patch_sharded_attention(qkv_t, self.attn, backend=self.backend), xn)
        q, k, v = _split_frames(F.linear(xn, *half[1]).view(*xn.shape[:2], 3, -1, self.attn.head_dim),
                                self.num_frames, type(self).__name__)
        o_s = tokens_major(spatial_attention(q, k, v, scale=self.attn.scale, backend=self.backend))
        return self._project(x, o_t, o_s)

    def attention_maps(self, x: torch.Tensor) -> dict:
        """``"temporal"``: ``(B, N, H/2, T, T)`` (heads ``[0, H/2)``); ``"spatial"``:
        ``(B, T, H/2, N, N)`` (heads ``[H/2, H)``)."""
        (qt, kt, _), (qs, ks, _) = self._halves(x)
        scale = self.attn.scale
        return {
            "spatial": attention_probs(qs.transpose(2, 3), ks.transpose(2, 3), scale),
            "temporal": attention_probs(qt.permute(0, 2, 3, 1, 4), kt.permute(0, 2, 3, 1, 4), scale),
        }
