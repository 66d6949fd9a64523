"""Pure-PyTorch reference for the divided attention ops (``backend="torch"``).

This is the ground truth of every test and the path CPU users get. It follows the
official TimeSformer block literally: temporal attention over the T frames of each
patch, spatial attention over ``[cls] + N`` patches of each frame with the cls
query/key/value repeated in every frame, one softmax per frame, and the T cls outputs
averaged. Half-precision inputs are computed in fp32 and cast back
(``upcast=True`` in flash-attention's terms). Gradients come from autograd.

It is also a backend, ``backend="reference"`` (never chosen automatically): each
function returns what the public op returns, written into a buffer laid out in q's
token order (see :func:`divattn.ops.layout.alloc_tokens`), so callers get the same
layout from every backend; that final copy is the only one the reference path adds to
eager attention.
"""

from __future__ import annotations

import torch

from .layout import alloc_tokens, patch_view
from .masks import with_real_cls, zero_padded


UPCAST = True


def causal_mask(Tq: int, Tk: int, device=None) -> torch.Tensor:
    """``(Tq, Tk)`` bool, True where query frame i may see key frame j: ``j <= Tk - Tq + i``.

    Query frame i is absolute frame ``Tk - Tq + i`` (the queries are the last Tq of the
    Tk frames, aligned bottom-right as in flash-attention).
    """
    return torch.ones(Tq, Tk, dtype=torch.bool, device=device).tril(Tk - Tq)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None) -> torch.Tensor:
    """softmax(q @ k^T * scale) @ v over the second-to-last dim, computed in >= fp32.

    ``mask`` (bool, broadcast against the scores) keeps the pairs where it is True; a
    query row that keeps no pair gets zero weights (a zero output), never NaN.
    With ``UPCAST = False`` (tests only) half precision is computed in half precision:
    the plain low-precision baseline that kernel errors are measured against.
    """
    compute = torch.promote_types(q.dtype, torch.float32) if UPCAST else q.dtype
    s = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if mask is None:
        return torch.matmul(torch.softmax(s, dim=-1), v.to(compute))
    mask = mask.expand(s.shape)
    some = mask.any(-1, keepdim=True)
    # rows that keep nothing take a finite softmax of zeros, then zero weights
    p = torch.softmax(torch.where(some, s.masked_fill(~mask, -torch.inf), 0.0), dim=-1)
    return torch.matmul(torch.where(mask, p, 0.0), v.to(compute))


def temporal(q, k, v, scale: float, causal: bool = False, padding=None) -> torch.Tensor:
    """Attention over T for every (b, n, h): q ``(B, Tq, N, H, D)``, k, v ``(B, Tk, N, H, D)``.

    Query frame i is frame ``Tk - Tq + i``; with ``causal`` it sees key frames
    ``0 .. Tk - Tq + i`` (:func:`causal_mask`), otherwise all Tk. With ``padding`` (a
    :class:`~divattn.ops.masks.Padding`) it sees the real ones among them, and a padded
    query's output is zero.
    Returns ``(B, Tq, N, H, D)``, a view of a token-major buffer in q's token order.
    """
    Tq, Tk = q.shape[1], k.shape[1]
    out = patch_view(alloc_tokens(q, has_cls=False), q, has_cls=False)
    mask = causal_mask(Tq, Tk, q.device) if causal else None
    if padding is not None:
        real, real_q = padding.dense(), padding.real_queries(Tq)
        q, k, v = zero_padded(q, real_q), zero_padded(k, real), zero_padded(v, real)
        keys = real.transpose(1, 2)[:, :, None, None, :]  # (B, N, 1, 1, Tk)
        mask = keys if mask is None else keys & mask
    # (B, T, N, H, D) -> (B, N, H, T, D)
    o = _attend(*(x.permute(0, 2, 3, 1, 4) for x in (q, k, v)), scale, mask).permute(0, 3, 1, 2, 4)
    out.copy_(o if padding is None else zero_padded(o, real_q))
    return out


def spatial(q, k, v, scale: float, cls=None, padding=None) -> torch.Tensor:
    """Attention over N for every (b, t, h), optionally with a shared cls token.

    With ``padding``, each frame's keys are its real patches (and the cls token, always
    real), a padded query's output is zero, and the cls output is the mean over the
    frames that hold a real patch (:meth:`~divattn.ops.masks.Padding.frame_weights`).
    Returns ``(B, T, N, H, D)`` as :func:`temporal` does; with ``cls``, the token-major
    ``(B, 1 + T*N, H, D)`` buffer in q's token order with the mean cls output as token 0.
    """
    B, T, N, H, D = q.shape
    buf = alloc_tokens(q, has_cls=cls is not None)
    out = patch_view(buf, q, has_cls=cls is not None)
    mask = None
    if padding is not None:
        real = padding.dense()
        q, k, v = zero_padded(q, real), zero_padded(k, real), zero_padded(v, real)
        keys = real[:, :, None, None, :]  # (B, T, 1, 1, N)
        mask = keys if cls is None else with_real_cls(keys)
    # (B, T, N, H, D) -> (B, T, H, N, D)
    qs, ks, vs = (x.permute(0, 1, 3, 2, 4) for x in (q, k, v))
    if cls is None:
        o = _attend(qs, ks, vs, scale, mask).permute(0, 1, 3, 2, 4)
        out.copy_(o if padding is None else zero_padded(o, real))
        return out
    # The official block repeats the cls token in every frame: (B, H, D) -> (B, T, H, 1, D).
    qc, kc, vc = (c[:, None, :, None, :].expand(B, T, H, 1, D) for c in cls)
    o = _attend(torch.cat([qc, qs], 3), torch.cat([kc, ks], 3), torch.cat([vc, vs], 3), scale, mask)
    patches = o[:, :, :, 1:].permute(0, 1, 3, 2, 4)
    out.copy_(patches if padding is None else zero_padded(patches, real))
    if padding is None:
        buf[:, 0].copy_(o[:, :, :, 0].mean(1))
    else:
        w = padding.frame_weights().to(o.dtype)  # (B, T)
        buf[:, 0].copy_((o[:, :, :, 0] * w[:, :, None, None]).sum(1))
    return buf


def joint(q, k, v, scale: float, padding=None) -> torch.Tensor:
    """Attention over all L tokens for every (b, h): q, k, v ``(B, L, H, D)``; with
    ``padding`` over the real ones, a padded query's output zero."""
    mask = None
    if padding is not None:
        real = padding.dense()  # (B, L)
        q, k, v = (zero_padded(x, real) for x in (q, k, v))
        mask = real[:, None, None, :]
    o = _attend(*(x.transpose(1, 2) for x in (q, k, v)), scale, mask).transpose(1, 2)
    if padding is not None:
        o = zero_padded(o, real)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    out.copy_(o)
    return out


__all__ = ["temporal", "spatial", "joint", "causal_mask"]
