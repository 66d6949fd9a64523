"""The divided attention ops composed from PyTorch's own attention (``backend="torch"``).

This is the path of every CPU user and of GPUs without Triton: each op is one
``F.scaled_dot_product_attention`` call on views of q/k/v, so PyTorch picks its fused
kernel (on a CPU its flash kernel, which reads strided inputs and lays its output out
like the query). Around that call the composition is chosen for fewest copies:

- causal temporal attention is SDPA's ``is_causal`` when q and k have the same frames,
  else an explicit bottom-right mask (query frame i is frame ``Tk - Tq + i``);
- sequences go into SDPA as ``(B', L, H, D)`` views transposed to ``(B', H, L, D)``; a
  view is copied only where two batch dims cannot be merged (the cls token between
  batches, or the frames of ``(h w t)`` tokens), and in inference such views instead
  go to one SDPA call per batch element uncopied, the outputs stacked into q's order;
- the output buffer is SDPA's own output when its layout already is q's token order
  (temporal over ``(h w t)`` tokens, spatial over ``(t h w)`` tokens, joint), otherwise
  one copy into :func:`divattn.ops.layout.alloc_tokens`;
- spatial attention with cls concatenates ``[cls] + N`` queries, keys and values per
  frame (the official semantics, one softmax per frame) in one copy that also serves
  as the batch merge, and averages the T cls outputs.

Half precision on a CPU is computed in fp32 and cast back (faster there than half, and
as accurate as :mod:`divattn.ops.reference`); fp64 stays fp64. Gradients come from
autograd.

Non-finite values: torch's CPU flash kernel differs from the plain softmax where q or k
holds NaN or inf. Its forward writes 0 instead of NaN for a query row whose scores are
all NaN or -inf: a NaN query in a sequence shorter than its vector width (16 fp32, 8
fp64 elements), an inf in q or k whose scores in a row are all -inf (likely in short
sequences), and with a causal mask any row whose visible scores are. Its backward
recomputes probabilities that an ``inf`` in q or k made NaN in the plain softmax, at
every length. So on a CPU, inputs holding NaN or inf (one sum over them tells) take
:mod:`divattn.ops.reference`, whose propagation is the spec: a non-finite input or
upstream gradient makes non-finite exactly what the plain softmax composition makes
non-finite, and nothing in other sequences. A NaN or inf in v alone propagates as in
the plain softmax through the forward (see :func:`_fused`), and a NaN or inf upstream
gradient with finite inputs through the non-causal backward; in a causal backward it
also reaches the gradients of the key frames after its query frame, which the plain
composition's mask keeps finite (a known difference, not yet handled).

Under ``torch.compile`` the check, a data-dependent branch, is skipped, and on GPUs
(where it would synchronise) SDPA's fused kernels decide.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import reference
from .layout import alloc_tokens, is_hwt, patch_view


_FAKE = torch._subclasses.FakeTensor


def _fused(q, k, v, cls=None, causal: bool = False) -> bool:
    """Whether SDPA computes these inputs: not empty, and on a CPU q, k (and v) all finite.

    v is left unread only in a forward that autograd does not record and that is not
    causal: with q and k finite every row's maximum is finite and its sum at least 1,
    so a NaN or inf in v reaches exactly the outputs it reaches in the plain softmax
    composition (a probability times a non-finite value stays non-finite, 0 * inf is
    NaN in both). A backward needs v checked (the flash backward differs), and so does
    a causal forward (the plain composition multiplies masked-out v by 0).
    """
    xs = (q, k, v) if cls is None else (q, k, v, *cls)
    for x in xs:
        if x.numel() == 0:
            return False
    if q.device.type != "cpu" or torch.compiler.is_compiling():
        return True
    for x in xs:
        if isinstance(x, _FAKE):
            return True  # shapes only (FlopCounterMode, tracing): there are no values to check
    with_v = causal or (torch.is_grad_enabled() and any(x.requires_grad for x in xs))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    with torch.no_grad():
        # NaN and inf survive a sum; a finite sum that overflows only sends the inputs to the reference
        total = None
        for group in ((q, k, v), cls):
            if group is None:
                continue
            for x in _packed(*(group if with_v else group[:2])):
                s = x.sum(dtype=acc)
                total = s if total is None else total + s
        return math.isfinite(total.item())


def _packed(*xs: torch.Tensor) -> tuple:
    """The views as one strided view when they are evenly spaced views of one tensor
    with the same shape and strides (q, k, v slices of a qkv projection), so that one
    pass reads them; else the views themselves."""
    q = xs[0]
    base = q._base
    if base is None:
        return xs
    shape, stride, off = q.shape, q.stride(), q.storage_offset()
    step = xs[1].storage_offset() - off
    if step <= 0:
        return xs
    for i, x in enumerate(xs[1:], 1):
        if x._base is not base or x.storage_offset() - off != i * step or x.shape != shape or x.stride() != stride:
            return xs
    return (q.as_strided((len(xs),) + shape, (step,) + stride),)


# Largest batch that inference over uncopied views splits into per-element SDPA calls.
MAX_SPLIT_BATCH = 8


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, keep: bool,
            causal: bool = False, split: bool = False) -> torch.Tensor:
    """softmax(q k^T * scale) v over L for ``(B1, B2, L, H, D)`` views; returns ``(B1, B2, L, H, D)``.

    k and v may have another L than q; with ``causal`` query i sees keys ``0 .. Lk - Lq + i``.

    The batch dims merge into SDPA's one without a copy when the strides allow (packed
    ``(t h w)`` tokens for spatial attention, ``(h w t)`` tokens without cls for temporal).
    Otherwise each view is copied once, in the compute dtype: to contiguous
    ``(B1, B2, L, H, D)`` when ``keep`` (SDPA's output then has that layout, which the
    caller uses as its buffer), else to ``(B1*B2, H, L, D)``, the layout SDPA reads fastest.
    With ``split``, when autograd does not record and B1 is small, such views instead go
    to SDPA one batch element at a time, uncopied (faster than the copies in a forward;
    in training the copies make the backward cheaper).
    """
    B1, B2, Lq, H, D = q.shape
    Lk = k.shape[2]
    dtype = out_dtype = q.dtype
    if q.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
        dtype = torch.float32
    merges = [B1 == 1 or B2 == 1 or x.stride(0) == B2 * x.stride(1) for x in (q, k, v)]
    mask = {}
    if causal and Lq > 1:  # a single query is the last frame: it sees every key
        mask = dict(is_causal=True) if Lq == Lk else dict(attn_mask=reference.causal_mask(Lq, Lk, q.device))
    if (split and not all(merges) and dtype == out_dtype and B1 <= MAX_SPLIT_BATCH
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))):
        # stacked as (B1, B2, L) when keep, else as (B1, L, B2): the caller's buffer either way
        outs = [F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in xs), scale=scale, **mask).transpose(1, 2)
                for xs in zip(q.unbind(0), k.unbind(0), v.unbind(0))]
        return torch.stack(outs) if keep else torch.stack([o.transpose(0, 1) for o in outs]).transpose(1, 2)
    xs = []
    for x, merge in zip((q, k, v), merges):
        L = x.shape[2]
        if keep or merge:
            x = x.to(dtype).reshape(B1 * B2, L, H, D).transpose(1, 2)
        else:
            x = x.transpose(2, 3).to(dtype).reshape(B1 * B2, H, L, D)
        xs.append(x)
    o = F.scaled_dot_product_attention(*xs, scale=scale, **mask).transpose(1, 2).view(B1, B2, Lq, H, D)
    return o if dtype == out_dtype else o.to(out_dtype)


def _token_buffer(o: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``o`` ``(B, T, N, H, D)`` as the ``(B, T*N, H, D)`` output buffer in q's token order:
    a view of ``o`` when it is laid out so, else one copy into a new buffer."""
    B, T, N, H, D = o.shape
    x = o.transpose(1, 2) if is_hwt(q) else o
    if x.is_contiguous():
        return x.view(B, T * N, H, D)
    buf = alloc_tokens(q, has_cls=False)
    patch_view(buf, q, has_cls=False).copy_(o)
    return buf


def temporal(q, k, v, scale: float, causal: bool = False) -> torch.Tensor:
    """Attention over T for every (b, n, h): q ``(B, Tq, N, H, D)``, k, v ``(B, Tk, N, H, D)``.

    Query frame i is frame ``Tk - Tq + i``; with ``causal`` it sees key frames
    ``0 .. Tk - Tq + i``. Returns the token-major ``(B, Tq*N, H, D)`` output buffer in
    q's token order.
    """
    if not _fused(q, k, v, causal=causal):
        return reference.temporal(q, k, v, scale, causal)
    # (B, T, N, H, D) -> (B, N, T, H, D): N sequences of T per batch
    keep = is_hwt(q) or min(q.shape[1], q.shape[2]) == 1
    o = _attend(*(x.transpose(1, 2) for x in (q, k, v)), scale, keep, causal, split=True)
    return _token_buffer(o.transpose(1, 2), q)


def spatial(q, k, v, scale: float, cls=None) -> torch.Tensor:
    """Attention over N for every (b, t, h), optionally with a shared cls token.

    Returns the token-major ``(B, [1 +] T*N, H, D)`` output buffer in q's token order,
    with the mean cls output as token 0 when ``cls`` is given.
    """
    B, T, N, H, D = q.shape
    if cls is None:
        if not _fused(q, k, v):
            return reference.spatial(q, k, v, scale)
        return _token_buffer(_attend(q, k, v, scale, not is_hwt(q), split=True), q)
    if not _fused(q, k, v, cls):
        return reference.spatial(q, k, v, scale, cls)
    # The official block repeats the cls token in every frame: [cls] + N tokens per frame.
    # The cat copies to contiguous (B, T, H, 1 + N, D): SDPA then reads it without another copy.
    qq, kk, vv = (
        torch.cat([c[:, None, :, None].expand(B, T, H, 1, D), x.transpose(2, 3)], 3).transpose(2, 3)
        for c, x in zip(cls, (q, k, v))
    )
    o = _attend(qq, kk, vv, scale, False)
    buf = alloc_tokens(q, has_cls=True)
    patch_view(buf, q, has_cls=True).copy_(o[:, :, 1:])
    buf[:, 0].copy_(o[:, :, 0].mean(1))
    return buf


def joint(q, k, v, scale: float) -> torch.Tensor:
    """Attention over all L tokens for every (b, h): q, k, v ``(B, L, H, D)``; contiguous output."""
    if not _fused(q, k, v):
        return reference.joint(q, k, v, scale)
    return _attend(*(x.unsqueeze(1) for x in (q, k, v)), scale, True).squeeze(1).contiguous()


def _register_cpu_flash_flops() -> None:
    """Teach FlopCounterMode torch's CPU flash attention ops (it knows only the GPU ones),
    with torch's own SDPA formulas, so the ops above are counted on a CPU too."""
    from torch.utils.flop_counter import (flop_registry, register_flop_formula, sdpa_backward_flop_count,
                                          sdpa_flop_count)

    aten = torch.ops.aten
    fwd, bwd = (getattr(aten, name, None) for name in (
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"))
    if fwd is not None and fwd not in flop_registry:
        @register_flop_formula(fwd)
        def _fwd_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)
    if bwd is not None and bwd not in flop_registry:
        @register_flop_formula(bwd)
        def _bwd_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_register_cpu_flash_flops()

__all__ = ["temporal", "spatial", "joint"]
