"""Temporal attention over a clip whose frames are sharded over a process group.

The blocks call :func:`temporal_residual` in place of their temporal half once a model is
parallelized (:meth:`divattn.models.VideoModel.parallelize`): the frame-sharded tokens are
re-sharded to patches (all frames of this rank's patches, time-major ``(T, B, N_r, C)``),
norm, qkv, temporal attention and the output projection run there on the block's own
parameters, and the result comes back into the frame-sharded residual. Spatial attention,
the MLP and everything else stay on the frame shards as they are.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import temporal_attention, tokens_major
from ..sequence_parallel import FrameShards
from .attention import Attention
from .recompute import linear_linear


def patch_sharded_attention(qkv: torch.Tensor, attn: Attention, *, causal: bool = False,
                            backend: Optional[str] = None) -> torch.Tensor:
    """Temporal attention over all T frames of this rank's patches, from their qkv projection
    ``(T, B, N_r, 3*H*D)`` (time-major, as :meth:`~divattn.sequence_parallel.FrameShards.frames_to_patches`
    delivers the tokens; H is ``attn``'s heads, or fewer: ViViT model 4 projects its temporal half).

    q/k/v are ``(1, T, B*N_r, H, D)`` views of ``qkv`` (the batch folded into the patches:
    each (sample, patch) is its own sequence), so the op writes its output time-major,
    ``(T, B, N_r, H*D)``: the order the way back sends.
    """
    T, B, Nr, three_c = qkv.shape
    H = three_c // (3 * attn.head_dim)
    q, k, v = qkv.view(1, T, B * Nr, 3, H, attn.head_dim).unbind(3)
    o = temporal_attention(q, k, v, causal=causal, scale=attn.scale, backend=backend)
    return tokens_major(o).view(T, B, Nr, H * attn.head_dim)


def temporal_residual(shards: FrameShards, x: torch.Tensor, norm: nn.Module, attn: Attention, *, order: str,
                      has_cls: bool, causal: bool = False, drop_path: Optional[nn.Module] = None,
                      fc: Optional[nn.Module] = None, backend: Optional[str] = None) -> torch.Tensor:
    """``x`` plus the temporal residual, for this rank's frame shard ``x`` of the clip.

    Computes, with the attention over all T frames of the clip::

        x + fc(drop_path(attn.out(temporal_attention(attn.qkv(norm(x))))))   # on the patch tokens

    (``fc`` and ``drop_path`` when given; the cls row, when ``has_cls``, is passed through),
    with ``attn.memory``'s recomputation as the unsharded blocks. ``x``: ``(B, [1 +] N*T_r, C)``
    in ``order``, or ``(B, T_r, N, C)``. Two all-to-alls of C values per token
    (:class:`~divattn.sequence_parallel.FrameShards`).
    """
    xp = shards.frames_to_patches(x, order=order, has_cls=has_cls)
    o = patch_sharded_attention(attn.project(xp, norm), attn, causal=causal, backend=backend)
    # the stochastic-depth factor per sample: (1, B, 1, 1), the batch is dim 1 here
    scale = None if drop_path is None else drop_path.scale(o.transpose(0, 1))
    scale = None if scale is None else scale.transpose(0, 1)
    if fc is not None and attn.memory == "min" and not (attn.training and attn.proj_drop.p > 0):
        y = linear_linear(o, attn.proj, fc, scale)
    else:
        y = attn.proj_drop(attn.proj(o))  # attn.out, on (T, B, N_r, C)
        y = y if scale is None else y * scale
        y = y if fc is None else fc(y)
    return shards.patches_to_frames(y, x, residual=True, order=order, has_cls=has_cls)
