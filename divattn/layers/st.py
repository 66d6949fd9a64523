"""The spatiotemporal (ST) transformer block of video world models, with a key/value cache.

Genie (Bruce et al., 2024) and the autoregressive video generators built like it run,
in every block, spatial attention within each frame, then *causal* temporal attention
(frame t sees frames <= t of its own patch), then one MLP; there is no cls token.
:class:`STBlock` is that block on the fused ops, and :class:`KVCache` keeps the keys and
values its temporal attention has seen so that a model can roll out one frame at a time.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import spatial_attention, temporal_attention, tokens_major
from ..sequence_parallel import SequenceParallelError
from .attention import Attention
from .drop import DropPath
from .mlp import Mlp
from .padding import op_padding
from .sharded import temporal_residual


class KVCache:
    """Keys and values of the frames one temporal attention has seen so far.

    Stored as one ``(B, capacity, N, 2, H, D)`` buffer (k then v per token), filled
    frame-major, so appending the next frames is one copy of the k/v rows of their qkv
    projection and the keys/values of all frames so far are views of the buffer. The
    buffer is allocated at the first :meth:`append` (``capacity`` frames, default the
    frames of that first call) and doubled when it fills.

    A cache is for inference: it holds no autograd history, so :meth:`append` raises
    when gradients would be needed (run generation under ``torch.no_grad()``).
    """

    def __init__(self, capacity: Optional[int] = None):
        if capacity is not None and (not isinstance(capacity, int) or capacity < 1):
            raise ValueError(f"KVCache: capacity must be None or a positive int, got {capacity!r}")
        self.capacity = capacity
        self.buffer: Optional[torch.Tensor] = None
        self.length = 0

    def __len__(self) -> int:
        """Frames cached so far."""
        return self.length

    def reset(self) -> None:
        """Forget every cached frame (the buffer is kept for the next rollout)."""
        self.length = 0

    def append(self, kv: torch.Tensor):
        """Add the keys and values of ``t`` new frames; return ``(k, v)`` of all frames so far.

        Args:
            kv: ``(B, t, N, 2, H, D)``, the k and v rows of the new frames' qkv projection
                (any strides; typically ``qkv[:, :, :, 1:]`` of a ``(B, t, N, 3, H, D)`` view).

        Returns:
            ``k, v``: ``(B, length, N, H, D)`` views of the buffer, frame-major.

        Raises:
            ValueError when ``kv`` does not fit the cached frames' batch, patch and head
            shape, dtype or device; RuntimeError when ``kv`` requires grad.
        """
        if kv.dim() != 6 or kv.shape[3] != 2:
            raise ValueError(f"KVCache.append: expected kv of shape (B, t, N, 2, H, D), got {tuple(kv.shape)}")
        if kv.requires_grad and torch.is_grad_enabled():
            raise RuntimeError("KVCache.append: the cache holds no autograd history; "
                               "roll out under torch.no_grad() (train on the full causal forward)")
        B, t, N, _, H, D = kv.shape
        buf = self.buffer
        fits = buf is not None and (buf.shape[0], buf.shape[2], buf.shape[4], buf.shape[5]) == (B, N, H, D) \
            and buf.dtype == kv.dtype and buf.device == kv.device
        if self.length and not fits:
            raise ValueError(
                f"KVCache.append: new frames (B, N, H, D) = {(B, N, H, D)}, {kv.dtype}, {kv.device} do not fit "
                f"the cached ({buf.shape[0]}, {buf.shape[2]}, {buf.shape[4]}, {buf.shape[5]}), {buf.dtype}, "
                f"{buf.device}; reset() the cache first")
        if not fits:
            buf = kv.new_empty((B, max(t, self.capacity or 0), N, 2, H, D))
        end = self.length + t
        if end > buf.shape[1]:
            grown = kv.new_empty((B, max(end, 2 * buf.shape[1]), N, 2, H, D))
            grown[:, : self.length].copy_(buf[:, : self.length])
            buf = grown
        self.buffer = buf
        buf[:, self.length:end].copy_(kv)
        self.length = end
        cached = buf[:, :end]
        return cached[:, :, :, 0], cached[:, :, :, 1]


class STBlock(nn.Module):
    """Pre-norm ST block: spatial attention, causal temporal attention, MLP; no cls token.

    Input and output ``x``: ``(B, T, N, C)``, the tokens of T frames of N patches
    (frame-major, i.e. ``(t h w)`` order). Computes::

        x = x + drop_path(attn(norm1(x)))                    # over the N patches of each frame
        x = x + drop_path(temporal_attn(temporal_norm1(x)))  # causal over the frames of each patch
        x = x + drop_path(mlp(norm2(x)))

    Each attention has its own ``qkv`` / ``proj`` Linear (keys ``norm1, attn.qkv,
    attn.proj, temporal_norm1, temporal_attn.qkv, temporal_attn.proj, norm2, mlp.fc1,
    mlp.fc2``, as ViViT model 3). q/k/v are views of the projections; the fused ops
    write token-major outputs that ``proj`` reads as views.

    With ``cache`` (a :class:`KVCache`), ``x`` holds only the next frames: their keys and
    values are appended to the cache, and their queries attend causally to every
    cached frame, so feeding frames one at a time gives the outputs of the full
    causal forward.

    With ``sequence`` set (the model's ``parallelize``), ``x`` holds this rank's frames of a
    clip sharded over a process group, and the causal temporal attention runs on all frames
    of this rank's patches (no cache: generation runs in one process).
    """

    sequence = None

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, drop: float = 0.0,
                 drop_path: float = 0.0, act: str = "gelu", norm_eps: float = 1e-6, backend: Optional[str] = None):
        super().__init__()
        self.backend = backend
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, proj_drop=drop)
        self.temporal_norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias, proj_drop=drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act, drop)

    @staticmethod
    def _qkv(attn: Attention, x: torch.Tensor, norm: nn.Module):
        """The ``(B, T, N, 3, H, D)`` view of ``attn.qkv(norm(x))`` for ``x`` ``(B, T, N, C)`` (q, k,
        v along dim 3: the ``split_qkv(..., order="thw")`` views)."""
        B, T, N, _ = x.shape
        return attn.project(x, norm).view(B, T, N, 3, attn.num_heads, attn.head_dim)

    def _out(self, attn: Attention, o: torch.Tensor) -> torch.Tensor:
        B, T, N = o.shape[:3]
        return attn.out(tokens_major(o)).view(B, T, N, -1)

    def spatial(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` plus the spatial attention residual (``mask``: the real tokens ``(B, T, N)``
        or :class:`~divattn.layers.padding.Frames`)."""
        q, k, v = self._qkv(self.attn, x, self.norm1).unbind(3)
        o = spatial_attention(q, k, v, scale=self.attn.scale, backend=self.backend, **op_padding(mask))
        return x + self.drop_path(self._out(self.attn, o))

    def temporal(self, x: torch.Tensor, cache: Optional[KVCache] = None,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` plus the causal temporal attention residual (over the cached frames too;
        ``mask``: the real tokens ``(B, T, N)`` or :class:`~divattn.layers.padding.Frames`,
        without a cache)."""
        if self.sequence is not None:  # a parallelized model takes no mask (VideoModel.ragged)
            if cache is not None:
                raise SequenceParallelError("STBlock: a key/value cache (generation) runs in one process; this "
                                            "block is parallelized over frames")
            return temporal_residual(self.sequence, x, self.temporal_norm1, self.temporal_attn, order="thw",
                                     has_cls=False, causal=True, drop_path=self.drop_path, backend=self.backend)
        qkv = self._qkv(self.temporal_attn, x, self.temporal_norm1)
        q = qkv[:, :, :, 0]
        if cache is None:
            k, v = qkv[:, :, :, 1], qkv[:, :, :, 2]
        else:
            k, v = cache.append(qkv[:, :, :, 1:])
        o = temporal_attention(q, k, v, causal=True, scale=self.temporal_attn.scale, backend=self.backend,
                               **op_padding(mask))
        return x + self.drop_path(self._out(self.temporal_attn, o))

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"STBlock: x must be (B, T, N, C), got shape {tuple(x.shape)}")
        x = self.temporal(self.spatial(x, mask), cache, mask)
        return x + self.drop_path(self.mlp(x, self.norm2))

    def attention_maps(self, x: torch.Tensor) -> dict:
        """Attention probabilities (reference softmax, fp32) for the block input ``x`` ``(B, T, N, C)``.

        ``"spatial"``: ``(B, T, H, N, N)``; ``"temporal"``: ``(B, N, H, T, T)``, zero above
        the diagonal (a frame never attends to later frames).
        """
        q, k, _ = self._qkv(self.attn, x, self.norm1).unbind(3)
        scale = self.attn.scale
        spatial = torch.matmul(q.transpose(2, 3).float(), k.transpose(2, 3).float().transpose(-1, -2)) * scale
        x = self.spatial(x)
        q, k, _ = self._qkv(self.temporal_attn, x, self.temporal_norm1).unbind(3)
        # (B, T, N, H, D) -> (B, N, H, T, D)
        s = torch.matmul(q.permute(0, 2, 3, 1, 4).float(), k.permute(0, 2, 3, 4, 1).float()) * self.temporal_attn.scale
        T = x.shape[1]
        future = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
        return {"spatial": spatial.softmax(-1), "temporal": s.masked_fill(future, float("-inf")).softmax(-1)}
