"""The public ops: temporal, spatial (with an optional cls token) and joint attention."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from . import dispatch
from .exported import exported, exporting
from .layout import patch_view
from .masks import Padding, resolve

MAX_HEAD_DIM = 256


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}, strides {x.stride()}"


_NAMES = ("q", "k", "v", "q_cls", "k_cls", "v_cls")


def _validate(fn: str, xs: tuple, ndim: int, layout: str, kv_frames: bool = False) -> torch.Size:
    """Raise TypeError/ValueError naming the tensor, what was expected and what came; returns q's shape.

    ``xs``: q, k, v, then any cls q, k, v. ``kv_frames``: k and v may have another frame
    count (dim 1) than q, the same as each other.
    """
    for name, x in zip(_NAMES, xs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    q, k, v = xs[0], xs[1], xs[2]
    qs = q.shape
    if len(qs) != ndim:
        raise ValueError(f"{fn}: q must be {ndim}-D {layout}, got {q.dim()}-D ({_describe(q)})")
    dtype, device = q.dtype, q.device
    if not dtype.is_floating_point:
        raise TypeError(f"{fn}: q must be a floating-point tensor, got dtype {dtype}")
    for name, x in zip(_NAMES[1:], xs[1:]):
        if x.dtype != dtype:
            raise TypeError(f"{fn}: {name} has dtype {x.dtype}, expected {dtype} like q")
        if x.device != device:
            raise ValueError(f"{fn}: {name} is on device {x.device}, expected {device} like q")
    if k.shape != qs or v.shape != qs:
        for name, x in (("k", k), ("v", v)):
            shape = x.shape
            if shape == qs:
                continue
            if kv_frames and len(shape) == ndim:
                want = (qs[0], shape[1], *qs[2:])
                if tuple(shape) != want:
                    raise ValueError(f"{fn}: {name} has shape {tuple(shape)}, expected {want} like q {layout} "
                                     f"in every dim but the frames (dim 1)")
            else:
                raise ValueError(f"{fn}: {name} has shape {tuple(shape)}, expected {tuple(qs)} like q {layout}")
        if kv_frames:
            if v.shape != k.shape:
                raise ValueError(f"{fn}: v has shape {tuple(v.shape)}, expected {tuple(k.shape)} like k "
                                 f"(keys and values have the same frames)")
            if qs[1] > k.shape[1]:
                raise ValueError(
                    f"{fn}: q has Tq = {qs[1]} frames, more than the Tk = {k.shape[1]} of k and v "
                    f"(q shape {tuple(qs)}, k shape {tuple(k.shape)}); the queries are the last Tq "
                    f"of the Tk frames, so Tq <= Tk"
                )
    D = qs[-1]
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"{fn}: head dim (last dim of q) must be in [1, {MAX_HEAD_DIM}], got {D}")
    if D > 1:
        for name, x in zip(_NAMES, xs):
            if x.stride()[-1] != 1:
                raise ValueError(
                    f"{fn}: {name} must have a contiguous last dim (stride(-1) == 1), got {_describe(x)}; "
                    f"pass {name}.contiguous() if a copy is acceptable"
                )
    return qs


def _scale(fn: str, scale, D: int) -> float:
    """``scale``, or ``D ** -0.5`` when None; a TypeError or ValueError unless a finite positive number."""
    if scale is None:
        return D ** -0.5
    if type(scale) is float and 0.0 < scale < math.inf:
        return scale
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a real number or None, got {type(scale).__name__} {scale!r}")
    scale = float(scale)
    if not (0.0 < scale < math.inf):
        raise ValueError(f"{fn}: scale must be finite and positive, got {scale!r}")
    return scale


def _backend(op: str, q: torch.Tensor, D: int, backend: Optional[str], features: tuple = ()) -> dispatch.Backend:
    """The backend that runs ``op`` (:func:`divattn.ops.dispatch.select`); while
    ``torch.export`` traces, it is wrapped so that the graph holds ``divattn::attention``
    (:mod:`divattn.ops.exported`)."""
    be = dispatch.select(op, q.dtype, q.device, D, backend, features)
    if not exporting():
        return be
    if "mask" in features or "counts" in features:
        raise dispatch.BackendError(f"{op} attention with a mask or counts cannot be exported yet: "
                                    f"divattn::attention takes no padding (export the model without it)")
    return exported(be)


def _padded(fn: str, op: str, q: torch.Tensor, D: int, backend: Optional[str], features: tuple, mask, frames,
            patches, shape) -> tuple:
    """The backend of a padded call and its :class:`~divattn.ops.masks.Padding`: a mask needs the
    feature ``"mask"``, counts ``"counts"`` (chosen before the padding is checked, so that
    ``torch.export`` refuses it before reading the counts)."""
    be = _backend(op, q, D, backend, features + ("counts" if mask is None else "mask",))
    return be, resolve(fn, q, mask, frames, patches, shape)


_PADDING_DOC = """
    Padded batches (any of ``mask``, ``frames``, ``patches``, combined with *and*; see
    :mod:`divattn.ops.masks`): ``mask`` ``(B, T, N)`` bool on q's device, True = a real
    token; ``frames`` ``(B,)`` ints, the first ``frames[b]`` frames of sample b are real;
    ``patches`` ``(B,)`` ints, the first ``patches[b]`` patches of every frame are real.
    The counts are the cheaper form (one number per sequence, with which the Triton
    and CUDA kernels skip whole tiles of padding; a mask is read per row, its padded rows
    not loaded): checked on the host, so give them as CPU tensors or lists to
    keep the call free of device syncs. A sample with no real token
    is allowed: its outputs are zero (with cls, ``o_cls = v_cls``) and its gradients zero
    (with cls, ``v_cls``'s is the upstream ``o_cls`` gradient)."""


def temporal_attention(q, k, v, *, causal: bool = False, scale: Optional[float] = None,
                       backend: Optional[str] = None, mask: Optional[torch.Tensor] = None, frames=None,
                       patches=None) -> torch.Tensor:
    """Attention over the frames of every patch, optionally causal.

    Args:
        q: ``(B, Tq, N, H, D)``; k, v: ``(B, Tk, N, H, D)`` with ``Tq <= Tk``; any
            strides and a contiguous last dim, typically views of one qkv projection
            output in ``(h w t)`` or ``(t h w)`` token order (see
            :func:`divattn.ops.layout.split_qkv`). Query frame i is frame
            ``Tk - Tq + i``: the queries are the last Tq frames (``Tq == Tk`` in a
            full forward; ``Tq < Tk`` when generating the last frames against cached
            keys and values of all frames so far).
        causal: when True, query frame i attends to key frames ``0 .. Tk - Tq + i``
            (frame t to frames 0..t); when False, to all Tk frames.
        scale: softmax scale, a finite positive number; default ``D ** -0.5``.
        backend: ``None`` (auto: first of triton, cuda, torch that fits; env
            ``DIVATTN_BACKEND`` sets it), ``"triton"``, ``"cuda"``, ``"torch"``, or
            ``"reference"`` (the plain softmax composition the tests trust; never
            chosen automatically).
        mask, frames, patches: the real tokens of a padded batch, over the Tk key
            frames (the queries are the last Tq of them); see below.

    Returns:
        ``o`` of shape ``(B, Tq, N, H, D)``, stored token-major in q's token order, so
        :func:`divattn.ops.layout.tokens_major` views it as ``(B, Tq*N, H*D)``.

    Raises:
        TypeError / ValueError for mismatched dtypes, devices or shapes (k and v must
        match q in B, N, H and D, and each other), ``Tq > Tk``, a last dim that is not
        contiguous, a head dim outside [1, 256], a ``scale`` that is not a finite
        positive number, a mask that is not a ``(B, Tk, N)`` bool tensor on q's device,
        or counts that are not ``(B,)`` integers in ``[0, Tk]`` (``[0, N]``);
        BackendError when the requested backend cannot run the inputs (listing every
        backend's reason; causal attention, ``Tq < Tk`` and masks are features a
        backend declares).

    Equivalent to::

        s = torch.einsum("btnhd,bsnhd->bnhts", q, k) * scale
        if causal:
            Tq, Tk = q.shape[1], k.shape[1]
            keep = torch.ones(Tq, Tk, dtype=torch.bool).tril(Tk - Tq)
            s = s.masked_fill(~keep, -torch.inf)
        o = torch.einsum("bnhts,bsnhd->btnhd", s.softmax(-1), v)

    With padding, m ``(B, Tk, N)`` the real tokens and i' = Tk - Tq + i query frame i's
    frame, the pairs that count are ``P(b, n, i) = {j : m[b, j, n] (and j <= i' if
    causal)}`` and::

        o[b, i, n, h] = m[b, i', n] * sum_{j in P} softmax_{j in P}(s[b, n, h, i, j]) v[b, j, n, h]

    (0 when P is empty, never NaN): a padded token is never a key, its output row is
    zero, and so are its q, k and v gradients.
    """
    qs = _validate("temporal_attention", (q, k, v), 5, "(B, T, N, H, D)", kv_frames=True)
    D = qs[-1]
    scale = _scale("temporal_attention", scale, D)
    causal = bool(causal)
    features = ()
    fewer = qs[1] != k.shape[1]
    if causal or fewer:
        features = (("causal",) if causal else ()) + (("fewer_queries",) if fewer else ())
    if mask is None and frames is None and patches is None:
        return _backend("temporal", q, D, backend, features).temporal(q, k, v, scale, causal)
    be, padding = _padded("temporal_attention", "temporal", q, D, backend, features, mask, frames, patches, k.shape[:3])
    return be.temporal(q, k, v, scale, causal, padding)


def spatial_attention(q, k, v, cls=None, *, scale: Optional[float] = None, backend: Optional[str] = None,
                      mask: Optional[torch.Tensor] = None, frames=None, patches=None):
    """Attention over the N patches of every frame, optionally with a cls token.

    Args:
        q, k, v: ``(B, T, N, H, D)``, any strides, contiguous last dim.
        cls: ``None`` or ``(q_cls, k_cls, v_cls)``, each ``(B, H, D)``. Then every
            frame's keys and values are ``[cls] + its N patches`` (the same cls vectors
            in every frame, one softmax per frame), and the cls query attends to each
            frame in turn; ``o_cls`` is the mean of its T per-frame outputs. This is
            the official TimeSformer divided block.
        scale, backend: as in :func:`temporal_attention`.
        mask, frames, patches: the real tokens of a padded batch; see below.

    Returns:
        ``o`` ``(B, T, N, H, D)`` token-major in q's token order, or ``(o, o_cls)``
        with ``o_cls`` ``(B, H, D)`` when ``cls`` is given; the two are views of one
        ``(B, 1 + T*N, H, D)`` buffer with the cls token first.

    Raises:
        As :func:`temporal_attention`; ValueError for ``cls`` of the wrong shape or
        for ``cls`` with T == 0 (the mean over frames is undefined).

    Equivalent to (with cls)::

        qc, kc, vc = (c[:, None, None].expand(B, T, 1, H, D) for c in cls)
        qq, kk, vv = (torch.cat([c, x], 2) for c, x in ((qc, q), (kc, k), (vc, v)))
        s = torch.einsum("btnhd,btmhd->bthnm", qq, kk) * scale
        oo = torch.einsum("bthnm,btmhd->btnhd", s.softmax(-1), vv)
        o, o_cls = oo[:, :, 1:], oo[:, :, 0].mean(1)

    With padding, m ``(B, T, N)`` the real tokens: frame t's keys are ``P(b, t) = {n :
    m[b, t, n]}`` (with cls: the cls token, always real, and those), and::

        o[b, t, n, h] = m[b, t, n] * sum_{j in P} softmax_{j in P}(s[b, t, h, n, j]) v[b, t, j, h]
        o_cls[b, h] = sum_{t in F} oo[b, t, 0, h] / |F|,   F = {t : P(b, t) holds a patch}

    (0 for an empty P, never NaN; F empty: ``o_cls = v_cls``): a padded token is never
    a key, its output row is zero, and so are its q, k and v gradients; the cls token
    averages over the frames that hold at least one real patch.
    """
    cls = _check_spatial("spatial_attention", q, k, v, cls)
    out = _spatial("spatial_attention", q, k, v, cls, scale, backend, mask, frames, patches)
    if cls is None:
        return out
    return patch_view(out, q, has_cls=True), out[:, 0]


for _op in (temporal_attention, spatial_attention):
    if _op.__doc__:  # None under python -OO
        _op.__doc__ += _PADDING_DOC


def _check_spatial(fn: str, q, k, v, cls) -> Optional[tuple]:
    """Validate the inputs of spatial attention; returns ``cls`` as a tuple (or None)."""
    xs = (q, k, v)
    if cls is not None:
        if not isinstance(cls, (tuple, list)):
            raise TypeError(f"{fn}: cls must be a tuple (q_cls, k_cls, v_cls) of three tensors, "
                            f"got {type(cls).__name__}")
        if len(cls) != 3:
            raise ValueError(f"{fn}: cls must hold three tensors (q_cls, k_cls, v_cls), "
                             f"got a {type(cls).__name__} of {len(cls)}")
        cls = tuple(cls)
        xs += cls
    B, T, N, H, D = _validate(fn, xs, 5, "(B, T, N, H, D)")
    if cls is not None:
        for name, c in zip(("q_cls", "k_cls", "v_cls"), cls):
            if tuple(c.shape) != (B, H, D):
                raise ValueError(f"{fn}: {name} has shape {tuple(c.shape)}, expected (B, H, D) = {(B, H, D)}")
        if T == 0:
            raise ValueError(f"{fn}: cls needs T >= 1 frames (o_cls is a mean over frames), got T = 0")
    return cls


def _spatial(fn: str, q, k, v, cls, scale, backend, mask=None, frames=None, patches=None) -> torch.Tensor:
    D = q.shape[-1]
    scale = _scale(fn, scale, D)
    op = "spatial" if cls is None else "spatial_cls"
    if mask is None and frames is None and patches is None:
        return _backend(op, q, D, backend).spatial(q, k, v, scale, cls)
    be, padding = _padded(fn, op, q, D, backend, (), mask, frames, patches, q.shape[:3])
    return be.spatial(q, k, v, scale, cls, padding)


def spatial_attention_tokens(q, k, v, cls, *, scale: Optional[float] = None, backend: Optional[str] = None,
                             mask: Optional[torch.Tensor] = None, frames=None, patches=None):
    """:func:`spatial_attention` with cls, returned as one ``(B, 1 + T*N, H, D)`` tensor.

    Token 0 is ``o_cls`` and tokens ``1:`` are ``o`` in q's token order: the layout of
    the block's input tokens, so the projection that follows reads it with a free
    ``view(B, 1 + T*N, H*D)`` and no ``cat`` of cls and patch outputs is needed.
    Padding, validation and errors as in :func:`spatial_attention`.
    """
    if cls is None:
        raise TypeError("spatial_attention_tokens: cls is required (use spatial_attention without it)")
    cls = _check_spatial("spatial_attention_tokens", q, k, v, cls)
    return _spatial("spatial_attention_tokens", q, k, v, cls, scale, backend, mask, frames, patches)


def joint_attention(q, k, v, *, scale: Optional[float] = None, backend: Optional[str] = None,
                    mask: Optional[torch.Tensor] = None, lengths=None) -> torch.Tensor:
    """Attention over all L tokens of every sequence (joint space-time attention).

    Args:
        q, k, v: ``(B, L, H, D)``, any strides, contiguous last dim.
        scale, backend: as in :func:`temporal_attention`.
        mask: ``(B, L)`` bool on q's device, True = a real token.
        lengths: ``(B,)`` ints, the first ``lengths[b]`` tokens of sample b are real
            (the cheaper form, as :func:`temporal_attention`'s counts; checked on the
            host). With both, a token is real when both say so.

    Returns:
        ``o`` ``(B, L, H, D)``, contiguous.

    Raises:
        As :func:`temporal_attention`, for a mask that is not a ``(B, L)`` bool tensor
        on q's device, or lengths that are not ``(B,)`` integers in ``[0, L]``.

    Equivalent to ``F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
    v.transpose(1, 2), scale=scale).transpose(1, 2)``. With padding, m ``(B, L)`` the
    real tokens::

        o[b, i, h] = m[b, i] * sum_{j : m[b, j]} softmax_{j : m[b, j]}(s[b, h, i, j]) v[b, j, h]

    (a sample with no real token: zero outputs and gradients): a padded token is never
    a key, and its output row and its q, k and v gradients are zero.
    """
    D = _validate("joint_attention", (q, k, v), 4, "(B, L, H, D)")[-1]
    scale = _scale("joint_attention", scale, D)
    if mask is None and lengths is None:
        return _backend("joint", q, D, backend).joint(q, k, v, scale)
    be, padding = _padded("joint_attention", "joint", q, D, backend, (), mask, None, lengths, q.shape[:2])
    return be.joint(q, k, v, scale, padding)
