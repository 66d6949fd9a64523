"""The divided attention ops on PyTorch's own attention kernels (``backend="torch"``).

The path of every CPU user and of GPUs without Triton. On a CPU each op is one call of
torch's flash attention kernel on strided views of q/k/v, and one autograd node
(:class:`_FlashOp`) whose backward calls the flash backward. Elsewhere (GPUs,
``torch.compile``, shape-only tensors, ``torch.func`` transforms) the ops are composed from
``F.scaled_dot_product_attention``, which picks a fused kernel, and autograd differentiates
them. Either way a view is copied only where two batch dims cannot merge (the cls token
between batches, or the frames of ``(h w t)`` tokens), and the output is the kernel's own
when it already lies in q's token order. Half precision on a CPU is computed in fp32.

On a CPU, inputs holding NaN or inf take :mod:`divattn.ops.reference`, whose
propagation of non-finite values is the spec (torch's flash kernel differs there; the
README lists how).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from typing import Optional

from . import reference
from .layout import alloc_tokens, is_hwt, patch_view
from .masks import Padding, with_real_cls, zero_padded


_FAKE = torch._subclasses.FakeTensor
_HALF = (torch.float16, torch.bfloat16)


def _route(xs: tuple, causal: bool) -> tuple:
    """``(path, record)`` for the inputs ``xs`` (q, k, v, then any cls q, k, v): path
    ``"reference"`` (empty inputs, or on a CPU any NaN or inf that the op reads),
    ``"flash"`` (a CPU) or ``"sdpa"`` (the composition of public ops); ``record``: whether
    autograd records the op.

    A forward that autograd does not record and that is not causal needs v unchecked: with
    q and k finite every row's maximum is finite and its sum at least 1, so a non-finite v
    reaches exactly the outputs it reaches in the plain softmax.
    """
    record = False
    for x in xs:
        if x.numel() == 0:
            return "reference", False
        record = record or x.requires_grad
    record = record and torch.is_grad_enabled()
    q = xs[0]
    if not q.is_cpu or torch.compiler.is_compiling() or isinstance(q, _FAKE):
        return "sdpa", record  # SDPA's kernels decide; shape-only tensors have no values to check
    need = 3 if causal or record else 2
    groups = (xs[:need],) if len(xs) == 3 else (xs[:need], xs[3:3 + need])
    if not _finite(groups, q.dtype):
        return "reference", record
    if _FLASH is None or torch._C._are_functorch_transforms_active():
        return "sdpa", record  # torch.func transforms differentiate the composition, not _FlashOp
    if q.shape[-1] == 1 and any(x.stride()[-1] != 1 for x in xs):
        return "sdpa", record  # the flash kernel wants a unit-stride last dim; SDPA copies for it
    return "flash", record


def _finite(groups: tuple, dtype: torch.dtype) -> bool:
    """Whether every element of the tensors in ``groups`` is finite, in one sum per
    :func:`_summands` entry and one host sync (NaN and inf survive a sum; a finite sum that
    overflows only sends the inputs to the reference, which computes the same)."""
    acc = torch.float32 if dtype in _HALF else None
    total = None
    for x in _summands(groups):
        if x.requires_grad:
            x = x.detach()
        x = x.sum(dtype=acc)
        total = x if total is None else total + x
    return math.isfinite(total.item())


def _summands(groups) -> tuple:
    """The tensors whose sums cover the groups: their common base (the qkv projection
    output) when it is small or they cover nearly all of it, else each group's
    :func:`_packed` views. A non-finite value in the base outside the views then also takes
    the reference, which is slower, not wrong."""
    base = groups[0][0]._base
    if base is not None:
        n = 0
        for group in groups:
            for x in group:
                if x._base is not base:
                    base = None
                    break
                n += x.numel()
        if base is not None and (base.numel() <= _SMALL or 4 * base.numel() <= 5 * n):
            return (base,)
    return tuple(x for group in groups for x in _packed(group))


# Elements up to which one pass over the whole base beats the packed views' extra calls.
_SMALL = 1 << 16


def _packed(xs) -> tuple:
    """The views as one strided view ``(len(xs), ...)`` when they are evenly spaced views of
    one tensor with the same shape and strides (q, k, v slices of a qkv projection), so that
    one pass reads them; else the views themselves."""
    q = xs[0]
    base = q._base
    if base is None:
        return xs
    off = q.storage_offset()
    step = xs[1].storage_offset() - off
    if step <= 0:
        return xs
    shape, stride = q.shape, q.stride()
    for i in range(1, len(xs)):
        x = xs[i]
        if x._base is not base or x.storage_offset() - off != i * step or x.stride() != stride or x.shape != shape:
            return xs
    return (q.as_strided((len(xs), *shape), (step, *stride), off),)


def _merges(x: torch.Tensor, b1: int, b2: int) -> bool:
    """Whether dims b1 and b2 of ``x`` merge into one batch dim without a copy."""
    return x.shape[b1] == 1 or x.shape[b2] == 1 or x.stride(b1) == x.shape[b2] * x.stride(b2)


# Largest batch that inference over uncopied views splits into per-element SDPA calls.
MAX_SPLIT_BATCH = 8


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, keep: bool,
            causal: bool = False, split: bool = False, allowed=None) -> torch.Tensor:
    """softmax(q k^T * scale) v over L for ``(B1, B2, L, H, D)`` views; returns ``(B1, B2, L, H, D)``.

    k and v may have another L than q; with ``causal`` query i sees keys ``0 .. Lk - Lq + i``;
    ``allowed`` (bool ``(B1*B2, 1, Lq, Lk)``, causality included) replaces that mask.

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
    merges = [_merges(x, 0, 1) for x in (q, k, v)]
    mask = {}
    if allowed is not None:
        mask = dict(attn_mask=allowed)
    elif causal and Lq > 1:  # a single query is the last frame: it sees every key
        mask = dict(is_causal=True) if Lq == Lk else dict(attn_mask=reference.causal_mask(Lq, Lk, q.device))
    if (split and allowed is None and not all(merges) and dtype == out_dtype and B1 <= MAX_SPLIT_BATCH
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


def _in_q_order(o: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``o`` ``(B, T, N, H, D)`` as the op's output, token-major in q's token order: ``o``
    itself when it lies so (and has q's dtype), else a copy into a new token buffer."""
    if o.dtype == q.dtype and _is_token_major(o.shape, o.stride(), is_hwt(q)):
        return o
    out = patch_view(alloc_tokens(q, has_cls=False), q, has_cls=False)
    out.copy_(o)
    return out


def temporal(q, k, v, scale: float, causal: bool = False, padding=None) -> torch.Tensor:
    """Attention over T for every (b, n, h): q ``(B, Tq, N, H, D)``, k, v ``(B, Tk, N, H, D)``.

    Query frame i is frame ``Tk - Tq + i``; with ``causal`` it sees key frames
    ``0 .. Tk - Tq + i``; with ``padding`` (:class:`~divattn.ops.masks.Padding`) the real
    ones among them. Returns the ``(B, Tq, N, H, D)`` output, a view of a token-major
    ``(B, Tq*N, H, D)`` buffer in q's token order.
    """
    if padding is not None and _counting():
        return counted("temporal", scale, causal, padding, q, k, v)
    route, record = _route((q, k, v), causal)
    if route == "flash":
        if record:
            return _FlashOp.apply("temporal", scale, causal, padding, q, k, v)
        return _flash_forward("temporal", scale, causal, q, k, v, (), False, padding)[0]
    if route == "reference":
        return reference.temporal(q, k, v, scale, causal, padding)
    if padding is not None:
        real, real_q = padding.dense(), padding.real_queries(q.shape[1])
        xs = zero_padded(q, real_q), zero_padded(k, real), zero_padded(v, real)
        allowed = _allowed(real_q.transpose(1, 2).flatten(0, 1), real.transpose(1, 2).flatten(0, 1), causal)
        o = _attend(*(x.transpose(1, 2) for x in xs), scale, _temporal_keep(q), allowed=allowed)
        return _in_q_order(zero_padded(o.transpose(1, 2), real_q), q)
    # (B, T, N, H, D) -> (B, N, T, H, D): N sequences of T per batch
    o = _attend(*(x.transpose(1, 2) for x in (q, k, v)), scale, _temporal_keep(q), causal, split=True)
    return _in_q_order(o.transpose(1, 2), q)


def _temporal_keep(q: torch.Tensor) -> bool:
    return is_hwt(q) or min(q.shape[1], q.shape[2]) == 1


def _allowed(real_q: torch.Tensor, real_k: torch.Tensor, causal: bool) -> torch.Tensor:
    """The pairs SDPA may use, ``(S, 1, Lq, Lk)`` bool, for sequences whose real queries and
    keys are ``real_q`` ``(S, Lq)`` and ``real_k`` ``(S, Lk)``: a real query's real keys (and
    with ``causal`` only those up to it); a padded query (whose output is zeroed) sees every
    key, so that no row is empty (an empty row is NaN in SDPA's kernels)."""
    Lq, Lk = real_q.shape[1], real_k.shape[1]
    keys = real_k[:, None, None, :]
    if causal and Lq > 1:
        keys = keys & reference.causal_mask(Lq, Lk, real_k.device)
    return keys | ~real_q[:, None, :, None]


def spatial(q, k, v, scale: float, cls=None, padding=None) -> torch.Tensor:
    """Attention over N for every (b, t, h), optionally with a shared cls token.

    Returns the ``(B, T, N, H, D)`` output as in :func:`temporal`; with ``cls``, the
    token-major ``(B, 1 + T*N, H, D)`` buffer in q's token order with the mean cls output
    as token 0 (with ``padding``, the mean over the frames that hold a real patch).
    """
    if padding is not None and _counting():
        return counted("spatial", scale, False, padding, q, k, v, *(cls or ()))
    route, record = _route((q, k, v) if cls is None else (q, k, v, *cls), False)
    if route == "flash":
        cls = cls or ()
        if record:
            return _FlashOp.apply("spatial", scale, False, padding, q, k, v, *cls)
        return _flash_forward("spatial", scale, False, q, k, v, cls, False, padding)[0]
    if route == "reference":
        return reference.spatial(q, k, v, scale, cls, padding)
    if padding is not None:
        return _spatial_padded(q, k, v, scale, cls, padding)
    if cls is None:
        return _in_q_order(_attend(q, k, v, scale, not is_hwt(q), split=True), q)
    o = _attend(*_with_cls(q, k, v, cls, q.dtype), scale, False)
    return _cls_buffer(o, q)


def _spatial_padded(q, k, v, scale: float, cls, padding) -> torch.Tensor:
    """:func:`spatial` of a padded batch, composed from public ops."""
    real = padding.dense()
    xs = zero_padded(q, real), zero_padded(k, real), zero_padded(v, real)
    flat = real.flatten(0, 1)
    if cls is None:
        o = _attend(*xs, scale, not is_hwt(q), allowed=_allowed(flat, flat, False))
        return _in_q_order(zero_padded(o, real), q)
    flat = with_real_cls(flat)
    o = _attend(*_with_cls(*xs, cls, q.dtype), scale, False, allowed=_allowed(flat, flat, False))
    return _cls_buffer(o, q, real, padding.frame_weights())


def _with_cls(q, k, v, cls, dtype) -> tuple:
    """``[cls] + N`` tokens per frame, as ``(B, T, 1 + N, H, D)`` views of contiguous
    ``(B, T, H, 1 + N, D)`` copies in ``dtype``: the official block repeats the cls token
    in every frame, and the copy doubles as the batch merge (SDPA reads it as is)."""
    B, T, N, H, D = q.shape
    out = []
    for c, x in zip(cls, (q, k, v)):
        y = torch.empty((B, T, H, 1 + N, D), dtype=dtype, device=x.device)
        y[:, :, :, 0].copy_(c[:, None])
        y[:, :, :, 1:].copy_(x.transpose(2, 3))
        out.append(y.transpose(2, 3))
    return out


def _cls_buffer(o: torch.Tensor, q: torch.Tensor, real=None, weights=None) -> torch.Tensor:
    """The ``(B, 1 + T*N, H, D)`` buffer from per-frame outputs ``o`` ``(B, T, 1 + N, H, D)``:
    patch outputs in q's token order, the mean of the T cls outputs as token 0. With
    ``real`` ``(B, T, N)`` and ``weights`` ``(B, T)`` (a padded batch), padded patches' outputs
    are zero and the cls output is the weighted sum of its per-frame outputs."""
    buf = alloc_tokens(q, has_cls=True)
    patches = o[:, :, 1:]
    patch_view(buf, q, has_cls=True).copy_(patches if real is None else zero_padded(patches, real))
    if weights is None:
        buf[:, 0].copy_(o[:, :, 0].mean(1))
    else:
        buf[:, 0].copy_((o[:, :, 0] * weights.to(o.dtype)[:, :, None, None]).sum(1))
    return buf


def joint(q, k, v, scale: float, padding=None) -> torch.Tensor:
    """Attention over all L tokens for every (b, h): q, k, v ``(B, L, H, D)``; contiguous output;
    with ``padding`` over the real tokens."""
    if padding is not None and _counting():
        return counted("joint", scale, False, padding, q, k, v)
    route, record = _route((q, k, v), False)
    if route == "flash":
        if record:
            return _FlashOp.apply("joint", scale, False, padding, q, k, v)
        return _flash_forward("joint", scale, False, q, k, v, (), False, padding)[0]
    if route == "reference":
        return reference.joint(q, k, v, scale, padding)
    if padding is None:
        return _attend(*(x.unsqueeze(1) for x in (q, k, v)), scale, True).squeeze(1).contiguous()
    real = padding.dense()
    q, k, v = (zero_padded(x, real) for x in (q, k, v))
    o = _attend(*(x.unsqueeze(1) for x in (q, k, v)), scale, True, allowed=_allowed(real, real, False))
    return zero_padded(o.squeeze(1), real).contiguous()


# CPU: torch's flash kernel called directly, one autograd node per op ---------------
#
# The forward lays q/k/v out as flash sequences and calls the kernel, keeping its
# log-sum-exp; the backward hands the flash backward the gradient in the same layout and
# returns the gradients as views of what that kernel wrote. The same kernels that
# F.scaled_dot_product_attention picks on a CPU, so the same numbers.

_FLASH = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
if _FLASH is not None and _FLASH_BWD is not None:
    _FLASH_BWD = _FLASH_BWD.default
else:  # a torch without them: the public composition serves CPUs too
    _FLASH = _FLASH_BWD = None


# The dims of a (B, T, N, H, D) view that make the flash kernel's batch (b1, b2) and sequence (l).
_DIMS = {"temporal": (0, 2, 1), "spatial": (0, 1, 2)}


def _seq_layout(sh, st, dims: tuple):
    """(shape, strides) of the dims ``(b1, b2, l)`` of a 5-D layout ``sh``, ``st`` (H and D last)
    as the flash kernel's ``(B1*B2, H, L, D)``; None when b1 and b2 do not merge without a copy."""
    b1, b2, l = dims
    if sh[b1] != 1 and sh[b2] != 1 and st[b1] != sh[b2] * st[b2]:
        return None
    return (sh[b1] * sh[b2], sh[3], sh[l], sh[4]), (st[b1] if sh[b2] == 1 else st[b2], st[3], st[l], st[4])


def _seq_view(x: torch.Tensor, dims: tuple):
    """:func:`_seq_layout` of ``x`` as a view, or None."""
    layout = _seq_layout(x.shape, x.stride(), dims)
    return None if layout is None else x.as_strided(*layout, x.storage_offset())


def _seq_views(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: tuple, sh, st) -> list:
    """:func:`_seq_view` of q, k and v (q's shape ``sh`` and strides ``st``); from one strided
    view of their base, unbound, when they are evenly spaced views of one tensor with q's
    layout (q, k, v of a qkv projection)."""
    base = q._base
    if (base is not None and k._base is base and v._base is base and k.shape == sh and v.shape == sh
            and k.stride() == st and v.stride() == st):
        off = q.storage_offset()
        step = k.storage_offset() - off
        layout = _seq_layout(sh, st, dims)
        if step > 0 and v.storage_offset() - off == 2 * step and layout is not None:
            return list(base.as_strided((3, *layout[0]), (step, *layout[1]), off).unbind(0))
    return [_seq_view(x, dims) for x in (q, k, v)]


def _seqs(x: torch.Tensor, dims: tuple, ct: torch.dtype, keep: bool) -> torch.Tensor:
    """:func:`_seq_view` where it exists and no cast to ``ct`` is needed, else a copy in
    ``ct`` laid out ``(B1, B2, L, H, D)`` when ``keep`` (the kernel's output then is too),
    else ``(B1, B2, H, L, D)``."""
    if x.dtype == ct:
        y = _seq_view(x, dims)
        if y is not None:
            return y
    b1, b2, l = dims
    sh = x.shape
    B1, B2, L, H, D = sh[b1], sh[b2], sh[l], sh[3], sh[4]
    if keep:
        y = torch.empty((B1, B2, L, H, D), dtype=ct)
        y.copy_(x.permute(b1, b2, l, 3, 4))
        return y.view(B1 * B2, L, H, D).transpose(1, 2)
    y = torch.empty((B1, B2, H, L, D), dtype=ct)
    y.copy_(x.permute(b1, b2, 3, l, 4))
    return y.view(B1 * B2, H, L, D)


def _as_patches(o: torch.Tensor, B1: int, dims: tuple, offset: int = 0) -> tuple:
    """(shape, strides, storage offset) of the flash output ``o`` ``(B1*B2, H, L, D)``
    (or its rows from ``offset`` on) as a ``(B, T, N, H, D)`` tensor, its dims placed as ``dims``."""
    Bp, H, L, D = o.shape
    sB, sH, sL, sD = o.stride()
    B2 = Bp // B1
    start = o.storage_offset() + offset * sL
    if dims[1] == 1:  # (b1, b2, l)
        return (B1, B2, L - offset, H, D), (B2 * sB, sB, sL, sH, sD), start
    return (B1, L - offset, B2, H, D), (B2 * sB, sL, sB, sH, sD), start


def _is_token_major(shape, strides, hwt: bool) -> bool:
    """Whether a ``(B, T, N, H, D)`` layout is dense token-major in (h w t) or (t h w) order."""
    want = 1
    for d in ((4, 3, 1, 2, 0) if hwt else (4, 3, 2, 1, 0)):
        if shape[d] != 1 and strides[d] != want:
            return False
        want *= shape[d]
    return True


@functools.lru_cache(maxsize=64)
def _additive_mask(Lq: int, Lk: int, dtype: torch.dtype) -> torch.Tensor:
    """The bottom-right causal mask as the flash kernel takes it: 0 or -inf, in q's dtype."""
    keep = reference.causal_mask(Lq, Lk)
    return torch.zeros(Lq, Lk, dtype=dtype).masked_fill_(~keep, -math.inf)


def _mask_args(qs: torch.Tensor, ks: torch.Tensor, causal: bool, keys=None) -> tuple:
    """(is_causal, attn_mask) for the flash kernel on sequences ``qs``, ``ks`` ``(S, H, L, D)``; a
    single query is the last frame and sees every key. ``keys``: the additive key mask of a
    padded batch (:func:`_key_mask`), causality added here."""
    if keys is None and not causal:
        return False, None
    Lq, Lk = qs.shape[2], ks.shape[2]
    if keys is not None:
        return False, keys + _additive_mask(Lq, Lk, qs.dtype) if causal and Lq > 1 else keys
    if Lq <= 1:
        return False, None
    if Lq == Lk:
        return True, None
    return False, _additive_mask(Lq, Lk, qs.dtype)


def _key_mask(real_k: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The flash kernel's additive mask ``(S, 1, 1, Lk)`` (0 or -inf, in ``dtype``) of the real
    keys ``real_k`` ``(S, Lk)``. A row that keeps no key comes out of the CPU flash kernel as
    zeros with zero gradients; such rows are padded queries, whose outputs are zeroed anyway."""
    return torch.zeros(real_k.shape, dtype=dtype, device=real_k.device).masked_fill_(~real_k, -math.inf)[:, None,
                                                                                                         None]


def _flash(qs, ks, vs, scale: float, causal: bool, keys=None):
    is_causal, mask = _mask_args(qs, ks, causal, keys)
    return _FLASH(qs, ks, vs, 0.0, is_causal, attn_mask=mask, scale=scale)


def _flash_split(q, k, v, dims: tuple, scale: float, causal: bool, keys=None) -> torch.Tensor:
    """Inference over views whose batch dims do not merge: one flash call per batch
    element b, on uncopied views, each output placed in q's token order by the stack."""
    b1, b2, l = dims
    hwt = is_hwt(q)
    B, T, N, H, D = q.shape
    outs = []
    for b in range(q.shape[0]):
        xs = []
        for x in (q, k, v):
            st = x.stride()
            xs.append(x.as_strided((x.shape[b2], H, x.shape[l], D), (st[b2], st[3], st[l], st[4]),
                                   x.storage_offset() + b * st[0]))
        S = xs[0].shape[0]
        o = _flash(*xs, scale, causal, None if keys is None else keys[b * S:(b + 1) * S])[0]
        sB, sH, sL, sD = o.stride()
        # o's rows are (b2, l); the buffer's tokens are (N, T) when hwt, else (T, N)
        first_is_b2 = (b2 == 2) == hwt
        shape = (o.shape[0], o.shape[2]) if first_is_b2 else (o.shape[2], o.shape[0])
        strides = (sB, sL) if first_is_b2 else (sL, sB)
        outs.append(o.as_strided((*shape, H, D), (*strides, sH, sD), o.storage_offset()))
    out = torch.stack(outs)  # (B, N, T, H, D) when hwt, else (B, T, N, H, D)
    return out.transpose(1, 2) if hwt else out


def _cls_seqs(q, k, v, cls, ct: torch.dtype) -> list:
    """The official block repeats the cls token in every frame: ``[cls] + N`` queries, keys
    and values per frame, as flash inputs ``(B*T, H, 1 + N, D)`` in dtype ``ct``, from one
    concatenation when q, k, v (and the cls vectors) are evenly spaced views of one tensor."""
    B, T, N, H, D = q.shape
    xs, cs = _packed((q, k, v)), _packed(tuple(cls))
    if len(xs) == 1 and len(cs) == 1:
        y = torch.cat([cs[0].view(3, B, 1, H, 1, D).expand(3, B, T, H, 1, D), xs[0].transpose(3, 4)], 4)
        return list((y if y.dtype == ct else y.to(ct)).view(3, B * T, H, 1 + N, D).unbind(0))
    return [torch.cat([c.view(B, 1, H, 1, D).expand(B, T, H, 1, D), x.transpose(2, 3)], 3).to(ct)
            .view(B * T, H, 1 + N, D) for c, x in zip(cls, (q, k, v))]


def _flash_masks(op: str, padding, q_shape, ct: torch.dtype, cls: bool):
    """(real, keys, weights) of a padded batch for the flash path: the real query tokens
    (``(B, Tq, N)``, joint ``(B, L)``), the additive key mask of the flash sequences
    (:func:`_key_mask`) and, with cls, the per-frame weights of the cls output."""
    real = padding.dense()
    if op == "joint":
        return real, _key_mask(real, ct), None
    if op == "temporal":
        return padding.real_queries(q_shape[1]), _key_mask(real.transpose(1, 2).flatten(0, 1), ct), None
    flat = real.flatten(0, 1)
    if not cls:
        return real, _key_mask(flat, ct), None
    flat = with_real_cls(flat)
    return real, _key_mask(flat, ct), padding.frame_weights()


def _flash_forward(op: str, scale: float, causal: bool, q, k, v, cls, record: bool, padding=None):
    """(out, saved): the op's output, and what the backward needs when ``record``: the
    flash inputs, output and log-sum-exp, the cls query's per-frame outputs (or None),
    and the padding's real query tokens, key mask and cls weights (or None).
    ``out`` is the ``(B, T, N, H, D)`` patch view of the token buffer for temporal and
    spatial attention, the ``(B, 1 + T*N, H, D)`` buffer with cls, and ``(B, L, H, D)``
    for joint attention. A padded query's output row is zero.

    Where ``out`` is a copy of the flash output in q's dtype, the flash output is not kept
    (None in ``saved``): the backward lays ``out`` out as the flash output again (see
    :func:`_flash_out`), so one tensor of the output's size is saved, not two."""
    dtype = q.dtype
    ct = torch.float32 if dtype in _HALF else dtype  # half precision is computed in fp32 on a CPU
    real = keys = weights = None
    if padding is not None:
        real, keys, weights = _flash_masks(op, padding, q.shape, ct, bool(cls))
    masks = (real, keys, weights)
    if op == "joint":
        seqs = [x.transpose(1, 2) if x.dtype == ct else x.to(ct).transpose(1, 2) for x in (q, k, v)]
        o, lse = _flash(*seqs, scale, causal, keys)
        buf = o.transpose(1, 2)
        if buf.dtype != q.dtype or not buf.is_contiguous():
            buf = buf.to(q.dtype, memory_format=torch.contiguous_format)
        if real is not None:
            buf.masked_fill_(~real[..., None, None], 0)
        return buf, ((*seqs, o, lse, None, *masks) if record else ())
    if cls:
        seqs = _cls_seqs(q, k, v, cls, ct)
        o, lse = _flash(*seqs, scale, False, keys)
        o5 = o.as_strided(*_as_patches(o, q.shape[0], _DIMS["spatial"]))  # (B, T, 1 + N, H, D)
        buf = _cls_buffer(o5, q, real, weights)
        if not record:
            return buf, ()
        if o.dtype != q.dtype:
            return buf, (*seqs, o, lse, None, *masks)
        return buf, (*seqs, None, lse, o[:, :, 0].clone(), *masks)
    dims = _DIMS[op]
    sh, st = q.shape, q.stride()
    hwt = sh[1] > 1 and sh[2] > 1 and st[2] > st[1]
    keep = (hwt or sh[1] == 1 or sh[2] == 1) if op == "temporal" else not hwt
    if ct != dtype:
        seqs = [_seqs(x, dims, ct, keep) for x in (q, k, v)]
    else:
        seqs = _seq_views(q, k, v, dims, sh, st)
        if seqs[0] is None or seqs[1] is None or seqs[2] is None:
            if not record and sh[0] <= MAX_SPLIT_BATCH:
                out = _flash_split(q, k, v, dims, scale, causal, keys)
                return (out if real is None else out.masked_fill_(~real[..., None, None], 0)), ()
            seqs = [y if y is not None else _seqs(x, dims, ct, keep) for x, y in zip((q, k, v), seqs)]
    o, lse = _flash(*seqs, scale, causal, keys)
    shape, strides, offset = _as_patches(o, sh[0], dims)
    out = o.as_strided(shape, strides, offset)
    if ct == dtype and _is_token_major(shape, strides, hwt):
        if real is not None:
            out.masked_fill_(~real[..., None, None], 0)
        return out, ((*seqs, o, lse, None, *masks) if record else ())
    out = _in_q_order(out, q)
    if real is not None:
        out.masked_fill_(~real[..., None, None], 0)
    if not record:
        return out, ()
    return out, (*seqs, o if ct != dtype else None, lse, None, *masks)


def _buffer_patches(d_buf: torch.Tensor, q_shape, hwt: bool) -> torch.Tensor:
    """The patch tokens of a ``(B, 1 + T*N, H, D)`` output buffer (or its gradient) as ``(B, T, N, H, D)``."""
    B, T, N, H, D = q_shape
    patches = d_buf[:, 1:]
    if hwt:
        return patches.reshape(B, N, T, H, D).transpose(1, 2)
    return patches.reshape(B, T, N, H, D)


def _grads_of(x: torch.Tensor, B1: int, dims: tuple, dtype: torch.dtype, cls: bool) -> list:
    """A flash gradient ``(B1*B2, H, L, D)`` as the gradient of the op's ``(B, T, N, H, D)``
    input (and of its cls vector, the sum over frames, when ``cls``)."""
    g = x.as_strided(*_as_patches(x, B1, dims, int(cls)))
    out = [g]
    if cls:
        Bp, H, _, D = x.shape
        sB, sH, _, sD = x.stride()
        T = Bp // B1
        out.append(x.as_strided((B1, T, H, D), (T * sB, sB, sH, sD), x.storage_offset()).sum(1))
    return [y if y.dtype == dtype else y.to(dtype) for y in out]


class _FlashOp(torch.autograd.Function):
    """One op on the CPU flash kernel, forward and backward (see the section comment)."""

    @staticmethod
    def forward(ctx, op: str, scale: float, causal: bool, padding, q, k, v, *cls):
        buf, saved = _flash_forward(op, scale, causal, q, k, v, cls, record=True, padding=padding)
        ctx.args = (op, scale, causal, q.shape, q.dtype, op != "joint" and is_hwt(q), bool(cls))
        ctx.save_for_backward(*saved, buf if saved[3] is None else None)
        return buf

    @staticmethod
    def backward(ctx, d_buf):
        op, scale, causal, q_shape, dtype, hwt, cls = ctx.args
        qs, ks, vs, o, lse, cls_rows, real, keys, weights, buf = ctx.saved_tensors
        ct = qs.dtype
        if o is None:
            o = _flash_out(buf, cls_rows, op, q_shape, hwt)
        if d_buf.dtype != ct:
            d_buf = d_buf.to(ct)
        if op == "joint":
            if real is not None:  # a padded query's output is zero: its row gets no gradient
                d_buf = d_buf.masked_fill(~real[..., None, None], 0)
            go = d_buf.transpose(1, 2)
        elif cls:
            B, T, N, H, D = q_shape
            go = torch.empty((B, T, H, 1 + N, D), dtype=ct)
            if weights is None:
                go[:, :, :, 0] = d_buf[:, None, 0] / T  # the cls output is the mean over frames
            else:
                go[:, :, :, 0] = d_buf[:, None, 0] * weights.to(ct)[:, :, None, None]
            patches = _buffer_patches(d_buf, q_shape, hwt)
            go[:, :, :, 1:] = (patches if real is None else zero_padded(patches, real)).transpose(2, 3)
            go = go.view(B * T, H, 1 + N, D)
        else:  # the gradient of the (B, T, N, H, D) output
            go = _seqs(d_buf if real is None else zero_padded(d_buf, real), _DIMS[op], ct, True)
        is_causal, mask = _mask_args(qs, ks, causal, keys)
        dxs = _FLASH_BWD(go, qs, ks, vs, o, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
        if op == "joint":
            return (None,) * 4 + tuple(x.transpose(1, 2) if x.dtype == dtype else x.transpose(1, 2).to(dtype)
                                       for x in dxs)
        grads = [_grads_of(x, q_shape[0], _DIMS["spatial" if cls else op], dtype, cls) for x in dxs]
        return (None,) * 4 + tuple(g[0] for g in grads) + tuple(g[1] for g in grads if cls)


def _flash_out(buf: torch.Tensor, cls_rows, op: str, q_shape, hwt: bool) -> torch.Tensor:
    """The flash output, ``(B1*B2, H, L, D)``, laid out again from the op's output ``buf``
    (and, with cls, the cls query's per-frame outputs ``(B*T, H, D)``): a view where the
    layout allows, else one copy that lives only during the backward."""
    if cls_rows is None:
        return _seqs(buf, _DIMS[op], buf.dtype, True)
    B, T, N, H, D = q_shape
    o = torch.empty((B, T, H, 1 + N, D), dtype=buf.dtype)
    o[:, :, :, 0] = cls_rows.view(B, T, H, D)
    o[:, :, :, 1:] = _buffer_patches(buf, q_shape, hwt).transpose(2, 3)
    return o.view(B * T, H, 1 + N, D)


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



# Padded batches under FlopCounterMode: one custom op ---------------------------------
#
# FlopCounterMode would see the padded op as the dense kernel calls that compute it and
# count every pair of the padded shape. While it counts, the op is one custom op instead,
# divattn::padded_attention (its backward divattn::padded_attention_bwd), which runs the
# same code inside and whose FLOP formulas (divattn.flops) count the real pairs only.

def _counting() -> bool:
    """Whether a FlopCounterMode counts this call."""
    mode = _current_mode()
    return mode is not None and isinstance(mode, _counter_mode())


@functools.lru_cache(maxsize=None)
def _counter_mode() -> type:
    from torch.utils import flop_counter

    return getattr(flop_counter, "_FlopCounterMode", flop_counter.FlopCounterMode)


_current_mode = torch.utils._python_dispatch._get_current_dispatch_mode


def _tokens(out: torch.Tensor, op: str, cls: bool, q: torch.Tensor) -> torch.Tensor:
    """A backend output as a fresh token buffer: ``(B, [1 +] T*N, H, D)`` in q's token order
    (joint: ``(B, L, H, D)``)."""
    if op != "joint" and not cls:
        B, T, N, H, D = out.shape
        out = (out.transpose(1, 2) if is_hwt(q) else out).reshape(B, T * N, H, D)
    return out.clone() if out._base is not None or not out.is_contiguous() else out


def _run(op: str, q, k, v, cls, mask: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """``op`` of this backend on the padded batch whose real tokens are ``mask``, as a token buffer."""
    padding = Padding(tuple(mask.shape), mask.device, mask=mask)
    if op == "temporal":
        out = temporal(q, k, v, scale, causal, padding)
    elif op == "spatial":
        out = spatial(q, k, v, scale, cls, padding)
    else:
        out = joint(q, k, v, scale, padding)
    return _tokens(out, op, cls is not None, q)


@torch.library.custom_op("divattn::padded_attention", mutates_args=())
def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_cls: Optional[torch.Tensor],
                     k_cls: Optional[torch.Tensor], v_cls: Optional[torch.Tensor], mask: torch.Tensor, op: str,
                     scale: float, causal: bool) -> torch.Tensor:
    """The torch backend's ``op`` (``"temporal"``, ``"spatial"``, ``"joint"``) on a padded batch
    whose real tokens are ``mask``; returns the token buffer (see :func:`_tokens`)."""
    cls = None if q_cls is None else (q_cls, k_cls, v_cls)
    with torch.no_grad():
        return _run(op, q, k, v, cls, mask, scale, causal)


@padded_attention.register_fake
def _(q, k, v, q_cls, k_cls, v_cls, mask, op, scale, causal):
    if op == "joint":
        return q.new_empty(q.shape)
    B, T, N, H, D = q.shape
    return q.new_empty((B, int(q_cls is not None) + T * N, H, D))


@torch.library.custom_op("divattn::padded_attention_bwd", mutates_args=())
def padded_attention_bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         q_cls: Optional[torch.Tensor], k_cls: Optional[torch.Tensor], v_cls: Optional[torch.Tensor],
                         mask: torch.Tensor, op: str, scale: float, causal: bool) -> list[torch.Tensor]:
    """The gradients of q, k, v (and the cls q, k, v) of :func:`padded_attention` for the
    upstream gradient ``grad`` of its token buffer, by autograd through the forward again."""
    # A custom op's implementation runs with autograd's dispatch keys excluded (under a
    # dispatch mode, with every key the mode's handler excludes): recompute with them back.
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), _NO_KEYS), \
            torch.enable_grad():
        xs = [x.detach().requires_grad_(True) for x in (q, k, v, q_cls, k_cls, v_cls) if x is not None]
        out = _run(op, *xs[:3], tuple(xs[3:]) or None, mask, scale, causal)
        return list(torch.autograd.grad(out, xs, grad))


_NO_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU) - torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)


@padded_attention_bwd.register_fake
def _(grad, q, k, v, q_cls, k_cls, v_cls, mask, op, scale, causal):
    return [torch.empty_like(x) for x in (q, k, v, q_cls, k_cls, v_cls) if x is not None]


def _padded_setup(ctx, inputs, output):
    q, k, v, q_cls, k_cls, v_cls, mask, op, scale, causal = inputs
    ctx.args = (op, scale, causal, q_cls is not None)
    ctx.save_for_backward(q, k, v, q_cls, k_cls, v_cls, mask)


def _padded_backward(ctx, grad):
    q, k, v, q_cls, k_cls, v_cls, mask = ctx.saved_tensors
    op, scale, causal, has_cls = ctx.args
    grads = padded_attention_bwd(grad, q, k, v, q_cls, k_cls, v_cls, mask, op, scale, causal)
    return (*grads[:3], *(grads[3:] if has_cls else (None, None, None)), None, None, None, None)


torch.library.register_autograd("divattn::padded_attention", _padded_backward, setup_context=_padded_setup)


def counted(op: str, scale: float, causal: bool, padding: Padding, q, k, v, *cls) -> torch.Tensor:
    """``op`` on a padded batch as :func:`padded_attention`, laid out as the backend returns it."""
    has_cls = bool(cls)
    buf = padded_attention(q, k, v, *(cls or (None, None, None)), padding.dense(), op, scale, causal)
    if op == "joint" or has_cls:
        return buf
    return patch_view(buf, q, has_cls=False)

# last: importing torch.utils.flop_counter imports divattn.flops, which registers the custom ops' formulas
_register_cpu_flash_flops()

__all__ = ["temporal", "spatial", "joint", "padded_attention"]
