"""Token layouts: where outputs go, and how to read them back without a copy.

A divided block keeps its tokens as ``(B, [1 +] N*T, C)`` with ``C = H*D``, patch
tokens in ``(h w t)`` order (TimeSformer: token ``1 + n*T + t``) or ``(t h w)`` order
(ViViT, scenic: token ``t*N + n``). q/k/v reach the ops as ``(B, T, N, H, D)`` views of
the qkv projection in either order. Outputs are allocated token-major in q's order so
that the projection after the op reads them through a free ``view``.
"""

from __future__ import annotations

import torch


def is_hwt(x: torch.Tensor) -> bool:
    """True when a ``(B, T, N, ...)`` tensor's patches are stored in (h w t) order."""
    sh, st = x.shape, x.stride()
    return sh[1] > 1 and sh[2] > 1 and st[2] > st[1]


def alloc_tokens(q: torch.Tensor, *, has_cls: bool) -> torch.Tensor:
    """Uninitialised ``(B, [1 +] T*N, H, D)`` buffer for the output of an op on ``q``."""
    B, T, N, H, D = q.shape
    return torch.empty((B, int(has_cls) + T * N, H, D), dtype=q.dtype, device=q.device)


def patch_view(buf: torch.Tensor, q: torch.Tensor, *, has_cls: bool) -> torch.Tensor:
    """The ``(B, T, N, H, D)`` view of the patch tokens in ``buf``, in q's token order."""
    B, T, N, H, D = q.shape
    patches = buf[:, 1:] if has_cls else buf
    if is_hwt(q):
        return patches.view(B, N, T, H, D).transpose(1, 2)
    return patches.view(B, T, N, H, D)


def tokens_major(o: torch.Tensor) -> torch.Tensor:
    """View a ``(B, T, N, H, D)`` op output as ``(B, T*N, H*D)`` tokens in storage order.

    Raises ValueError instead of copying when ``o`` is not laid out token-major (every
    op output is).
    """
    B, T, N, H, D = o.shape
    x = o.transpose(1, 2) if is_hwt(o) else o
    try:
        return x.reshape(B, T * N, H, D).view(B, T * N, H * D)
    except RuntimeError as e:
        raise ValueError(
            f"tokens_major: expected a token-major (B, T, N, H, D) tensor, got shape "
            f"{tuple(o.shape)} with strides {o.stride()}"
        ) from e


def split_qkv(qkv: torch.Tensor, T: int, N: int, *, order: str, has_cls: bool):
    """Views q, k, v ``(B, T, N, H, D)`` (and cls ``(B, H, D)`` each) of a packed qkv.

    ``qkv`` is the qkv projection output viewed as ``(B, [1 +] N*T, 3, H, D)`` (rows
    ``[q; k; v]``, heads contiguous, as timm/TimeSformer lay them out). ``order`` is
    ``"hwt"`` or ``"thw"``. No data is copied.

    Returns ``(q, k, v)`` or ``(q, k, v, (q_cls, k_cls, v_cls))`` when ``has_cls``.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"split_qkv: expected qkv of shape (B, L, 3, H, D), got {tuple(qkv.shape)}")
    B, L, _, H, D = qkv.shape
    if L != int(has_cls) + T * N:
        raise ValueError(
            f"split_qkv: qkv has {L} tokens, expected {int(has_cls)} + T*N = {int(has_cls) + T * N}"
        )
    patches = qkv[:, 1:] if has_cls else qkv
    if order == "hwt":
        p = patches.view(B, N, T, 3, H, D).transpose(1, 2)
    elif order == "thw":
        p = patches.view(B, T, N, 3, H, D)
    else:
        raise ValueError(f"split_qkv: order must be 'hwt' or 'thw', got {order!r}")
    q, k, v = p.unbind(3)
    if not has_cls:
        return q, k, v
    return q, k, v, tuple(qkv[:, 0].unbind(1))
