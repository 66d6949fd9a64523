"""Autograd and ``torch.library`` registration of the kernel backends.

:func:`attention` runs an op on a kernel backend. Traced or transformed calls
(``torch.compile``, ``torch.export``, ``FlopCounterMode``, fake tensors, ``torch.func``)
go through the custom ops ``divattn::attn_fwd`` and ``divattn::attn_bwd`` (with fake
implementations), tied together with ``torch.library.register_autograd``, so they
compile fullgraph as opaque calls and are counted; eager calls run the same forward and
backward as one ``autograd.Function`` (:class:`_Eager`), without the dispatcher's
per-call cost. Both take the backend's name; :data:`KERNELS` imports its kernel module,
which follows the :class:`KernelModule` contract. Temporal q may have fewer frames (Tq) than k and v (Tk):
the output and the log-sum-exp rows follow q.

The ops take q/k/v (and the cls q/k/v) as *sources plus geometry*: when they are all
views of one tensor — the qkv projection output — that tensor is the single source
and each view is an ``(offset, sizes, strides)`` into it. The backward then writes
dq/dk/dv straight into one gradient buffer laid out like the qkv, which autograd hands
to the projection's backward as is: no per-view zero-fill, scatter and sum.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional, Protocol, Sequence

import torch

from .layout import alloc_tokens, patch_view


class KernelModule(Protocol):
    """What a kernel backend's module provides: launchers that write into given buffers.

    ``op`` is ``"temporal"``, ``"spatial"`` or ``"joint"``; ``q, k, v, o`` (and ``do``,
    ``dq``, ``dk``, ``dv``) are views in the op's layout (any strides, head dim
    contiguous); ``lse`` a contiguous fp32 ``(S*L,)`` of base-2 log-sum-exps with the scale
    included, one per query row. With ``cls = (q_cls, k_cls, v_cls)`` (each ``(B, H, D)``),
    ``o_cls`` is ``(B, H, D)``, ``cls_frames`` a contiguous fp32 ``(B, H, T, D)`` of the cls
    query's per-frame outputs and ``lse_cls`` a contiguous fp32 ``(B, H, T)``. Temporal
    ``q`` may have the last Tq of the Tk frames of ``k`` and ``v``; ``causal`` is temporal
    only. ``counts`` (a padded batch, where the backend declares ``"counts"``) is the
    ``(rows, groups)`` pair of :meth:`divattn.ops.masks.Padding.kernel_counts`; ``mask``
    (where it declares ``"mask"``) the ``(B, Tk, N)`` (joint ``(B, L)``) bool mask and
    ``cls_weights`` its ``(B, T)`` fp32 cls frame weights, of
    :meth:`~divattn.ops.masks.Padding.kernel_mask`; a token is real where both say so. A
    padded row is never a key, its output, log-sum-exp-weighted gradients and q/k/v
    gradients are zero, and ``o_cls`` weighs the frames that hold a real patch
    (:meth:`~divattn.ops.masks.Padding.frame_weights`). Every output element is written
    once (no atomics): results are deterministic.
    """

    def forward(self, op: str, q, k, v, o, lse, scale: float, *, causal: bool = False, cls=None, o_cls=None,
                cls_frames=None, lse_cls=None, counts=None, mask=None, cls_weights=None) -> None: ...

    def backward(self, op: str, q, k, v, o, do, lse, dq, dk, dv, scale: float, *, causal: bool = False, cls=None,
                 d_cls=None, do_cls=None, cls_frames=None, lse_cls=None, counts=None, mask=None,
                 cls_weights=None) -> None: ...


def _triton() -> KernelModule:
    from . import triton

    return triton


def _cuda() -> KernelModule:
    from . import cuda_ext

    return cuda_ext


# Imported on first use: the Triton module needs TRITON_INTERPRET set before it loads.
KERNELS: dict[str, Callable[[], KernelModule]] = {"triton": _triton, "cuda": _cuda}


def _encode(views: Sequence[torch.Tensor], srcs: Sequence[torch.Tensor], index: Sequence[int]) -> list:
    geom = [len(views)]
    for view, i in zip(views, index):
        off = 0 if view is srcs[i] else view.storage_offset() - srcs[i].storage_offset()
        geom += [i, off, view.dim(), *view.shape, *view.stride()]
    return geom


def _decode(srcs: Sequence[torch.Tensor], geom: Sequence[int]) -> list:
    views, pos = [], 1
    for _ in range(geom[0]):
        i, off, nd = geom[pos:pos + 3]
        sizes = geom[pos + 3:pos + 3 + nd]
        strides = geom[pos + 3 + nd:pos + 3 + 2 * nd]
        pos += 3 + 2 * nd
        src = srcs[i]
        views.append(src.as_strided(sizes, strides, src.storage_offset() + off))
    return views


def _runs(offset: int, sizes, strides):
    """Start offsets and the length of the contiguous runs that make up a view."""
    dims = sorted((st, sz) for sz, st in zip(sizes, strides) if sz != 1)
    run = 1
    while dims and dims[0][0] == run:
        run *= dims.pop(0)[1]
    starts = torch.tensor([offset], dtype=torch.int64)
    for st, sz in dims:
        if st == 0:
            return None, run
        starts = (starts[:, None] + torch.arange(sz, dtype=torch.int64) * st).reshape(-1)
    return starts, run


@functools.lru_cache(maxsize=256)
def _packing(geoms: tuple, base_numel: int) -> Optional[torch.Tensor]:
    """None if the views overlap or leave the base, else the base positions they miss.

    ``geoms`` holds ``(offset, sizes, strides)`` per view, offsets relative to the
    base. The answer is cached: models call the ops with few distinct geometries.
    """
    all_starts, all_ends = [], []
    for off, sizes, strides in geoms:
        if 0 in sizes:
            continue
        starts, run = _runs(off, sizes, strides)
        if starts is None:
            return None
        all_starts.append(starts)
        all_ends.append(starts + run)
    if not all_starts:
        return torch.arange(base_numel, dtype=torch.int64)
    starts, order = torch.cat(all_starts).sort()
    ends = torch.cat(all_ends)[order]
    if starts[0] < 0 or ends[-1] > base_numel or bool((starts[1:] < ends[:-1]).any()):
        return None
    gap_starts = torch.cat([torch.zeros(1, dtype=torch.int64), ends])
    gap_lens = torch.cat([starts, torch.full((1,), base_numel, dtype=torch.int64)]) - gap_starts
    keep = gap_lens > 0
    gap_starts, gap_lens = gap_starts[keep], gap_lens[keep]
    if gap_lens.numel() == 0:
        return gap_lens
    first = torch.repeat_interleave(gap_starts - torch.cumsum(gap_lens, 0) + gap_lens, gap_lens)
    return first + torch.arange(int(gap_lens.sum()), dtype=torch.int64)


def _key(views: Sequence[torch.Tensor], base: torch.Tensor) -> tuple:
    return tuple((v.storage_offset() - base.storage_offset(), tuple(v.shape), tuple(v.stride())) for v in views)


def sources(views: Sequence[torch.Tensor]):
    """(srcs, geom): one shared source when the views tile one tensor, else the views.

    The last entry of ``geom`` says whether the views cover every element of their
    sources (then the gradient buffers need no zero fill).
    """
    base = views[0]._base
    if (
        base is not None
        and not torch.compiler.is_compiling()
        and torch.is_grad_enabled()
        and base.requires_grad
        and base.is_contiguous()
        and all(v._base is base for v in views)
    ):
        gaps = _packing(_key(views, base), base.numel())
        if gaps is not None:
            return [base], _encode(views, [base], [0] * len(views)) + [int(gaps.numel() == 0)]
    return list(views), _encode(views, views, range(len(views))) + [1]


def _outputs(op: str, has_cls: bool, q: torch.Tensor):
    """Allocate (buf, lse, cls_frames, lse_cls); buf is token-major in q's token order.

    Sizes follow q (temporal: B*Tq*N*H log-sum-exp rows when k and v have Tk frames).
    """
    if op == "joint":
        B, L, H, D = q.shape
        buf = torch.empty((B, L, H, D), dtype=q.dtype, device=q.device)
        n_rows = B * H * L
    else:
        B, T, N, H, D = q.shape
        buf = alloc_tokens(q, has_cls=has_cls)
        n_rows = B * T * N * H
    f32 = dict(dtype=torch.float32, device=q.device)
    lse = torch.empty((n_rows,), **f32)
    if has_cls:
        cls_frames = torch.empty((B, H, T, D), **f32)
        lse_cls = torch.empty((B, H, T), **f32)
    else:
        cls_frames, lse_cls = torch.empty((0,), **f32), torch.empty((0,), **f32)
    return buf, lse, cls_frames, lse_cls


def _out_views(op: str, has_cls: bool, q: torch.Tensor, buf: torch.Tensor):
    if op == "joint":
        return buf, None
    return patch_view(buf, q, has_cls=has_cls), (buf[:, 0] if has_cls else None)


def _padding(rows: Optional[torch.Tensor], groups: Optional[torch.Tensor], mask: Optional[torch.Tensor],
             cls_weights: Optional[torch.Tensor]) -> dict:
    """A kernel module's padding keywords (see :class:`KernelModule`); only those given, so
    that a backend that takes no mask is never passed one."""
    kw = {} if rows is None else dict(counts=(rows, groups))
    return kw if mask is None else dict(kw, mask=mask, cls_weights=cls_weights)


def _forward(views: Sequence[torch.Tensor], op: str, has_cls: bool, scale: float, backend: str, causal: bool,
             padding: dict):
    """Allocate the outputs and run the backend's forward kernels: (buf, lse, cls_frames, lse_cls)."""
    q, k, v = views[:3]
    buf, lse, cls_frames, lse_cls = _outputs(op, has_cls, q)
    o, o_cls = _out_views(op, has_cls, q, buf)
    KERNELS[backend]().forward(
        op, q, k, v, o, lse, scale, causal=causal,
        cls=tuple(views[3:]) if has_cls else None, o_cls=o_cls, cls_frames=cls_frames, lse_cls=lse_cls, **padding,
    )
    return buf, lse, cls_frames, lse_cls


@torch.library.custom_op("divattn::attn_fwd", mutates_args=())
def attn_fwd(
    srcs: list[torch.Tensor], geom: list[int], op: str, has_cls: bool, scale: float, backend: str, causal: bool,
    rows: Optional[torch.Tensor], groups: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    cls_weights: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward(_decode(srcs, geom), op, has_cls, scale, backend, causal,
                    _padding(rows, groups, mask, cls_weights))


@attn_fwd.register_fake
def _(srcs, geom, op, has_cls, scale, backend, causal, rows, groups, mask, cls_weights):
    return _outputs(op, has_cls, _decode(srcs, geom)[0])


_GAPS_ON_DEVICE: dict = {}


def _grads(srcs: Sequence[torch.Tensor], geom: Sequence[int]):
    """Gradient buffers for the sources: zero-filled only where the views leave gaps.

    The kernels write every element of every view; a packed source's gaps (say the cls
    rows of a qkv that temporal attention does not read) are zeroed by index, and only
    a source with large gaps is zero-filled whole.
    """
    if geom[-1]:
        return [torch.empty_like(s) for s in srcs]
    if len(srcs) == 1 and not isinstance(srcs[0], torch._subclasses.FakeTensor):
        base = srcs[0]
        key = (_key(_decode(srcs, geom), base), base.numel())
        gaps = _packing(*key)
        if gaps is not None and gaps.numel() * 4 <= base.numel():
            idx = _GAPS_ON_DEVICE.get((key, base.device))
            if idx is None:
                if len(_GAPS_ON_DEVICE) > 64:
                    _GAPS_ON_DEVICE.clear()
                idx = _GAPS_ON_DEVICE[(key, base.device)] = gaps.to(base.device)
            grad = torch.empty_like(base)
            grad.view(-1)[idx] = 0
            return [grad]
    return [torch.zeros_like(s) for s in srcs]


def _backward_kernels(srcs, geom, op, has_cls, scale, backend, causal, padding, buf, d_buf, lse, cls_frames,
                      lse_cls) -> list:
    """Gradient buffers for the sources, written by the backend's backward kernels."""
    views = _decode(srcs, geom)
    q, k, v = views[:3]
    if op == "temporal" and q.numel() == 0:
        # no query frames (Tq = 0 < Tk): nothing read k and v, their gradients are zero
        return [torch.zeros_like(s) for s in srcs]
    grads = _grads(srcs, geom)
    # Packed: the gradients are views into one buffer shaped like the source. Separate:
    # each gradient is its own dense tensor (a source may be expanded, with stride 0).
    dviews = _decode(grads, geom) if len(srcs) < geom[0] else grads
    o, _ = _out_views(op, has_cls, q, buf)
    d_buf = d_buf.contiguous()
    do, do_cls = _out_views(op, has_cls, q, d_buf)
    KERNELS[backend]().backward(
        op, q, k, v, o, do, lse, *dviews[:3], scale, causal=causal,
        cls=tuple(views[3:]) if has_cls else None, d_cls=tuple(dviews[3:]) if has_cls else None,
        do_cls=do_cls, cls_frames=cls_frames, lse_cls=lse_cls, **padding,
    )
    return grads


@torch.library.custom_op("divattn::attn_bwd", mutates_args=())
def attn_bwd(
    srcs: list[torch.Tensor], geom: list[int], op: str, has_cls: bool, scale: float, backend: str, causal: bool,
    rows: Optional[torch.Tensor], groups: Optional[torch.Tensor], mask: Optional[torch.Tensor],
    cls_weights: Optional[torch.Tensor],
    buf: torch.Tensor, d_buf: torch.Tensor, lse: torch.Tensor, cls_frames: torch.Tensor, lse_cls: torch.Tensor,
) -> list[torch.Tensor]:
    return _backward_kernels(srcs, geom, op, has_cls, scale, backend, causal,
                             _padding(rows, groups, mask, cls_weights), buf, d_buf, lse, cls_frames, lse_cls)


@attn_bwd.register_fake
def _(srcs, geom, op, has_cls, scale, backend, causal, rows, groups, mask, cls_weights, buf, d_buf, lse,
      cls_frames, lse_cls):
    return _grads(srcs, geom)


def _setup_context(ctx, inputs, output):
    srcs, geom, op, has_cls, scale, backend, causal, rows, groups, mask, cls_weights = inputs
    buf, lse, cls_frames, lse_cls = output
    ctx.set_materialize_grads(False)  # lse & co. get no gradient: do not fill zeros for them
    ctx.n_srcs = len(srcs)
    ctx.args = (geom, op, has_cls, scale, backend, causal)
    ctx.save_for_backward(*srcs, rows, groups, mask, cls_weights, buf, lse, cls_frames, lse_cls)


def _backward(ctx, d_buf, d_lse, d_cls_frames, d_lse_cls):
    saved = ctx.saved_tensors
    srcs, padding = list(saved[:ctx.n_srcs]), saved[ctx.n_srcs:ctx.n_srcs + 4]
    buf, lse, cls_frames, lse_cls = saved[ctx.n_srcs + 4:]
    geom, op, has_cls, scale, backend, causal = ctx.args
    if d_buf is None:
        d_buf = torch.zeros_like(buf)
    grads = attn_bwd(srcs, geom, op, has_cls, scale, backend, causal, *padding, buf, d_buf, lse, cls_frames,
                     lse_cls)
    return (grads,) + (None,) * 10


torch.library.register_autograd("divattn::attn_fwd", _backward, setup_context=_setup_context)


class _Eager(torch.autograd.Function):
    """The custom ops' forward and backward as one autograd node, for eager calls.

    The same functions compute (:func:`_forward`, :func:`_backward_kernels`); going
    through the dispatcher to the custom op instead costs tens of microseconds of Python
    per call (its autograd and dispatch layers, and re-making the views from the
    geometry), which a GPU kernel of a few tens of microseconds would wait on. The
    gradients are the sources', as the custom op's are.
    """

    @staticmethod
    def forward(ctx, views, geom, op, has_cls, scale, backend, causal, padding, *srcs):
        with _profiled("divattn::attn_fwd"):
            buf, lse, cls_frames, lse_cls = _forward(views, op, has_cls, scale, backend, causal, padding)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse, cls_frames, lse_cls)
        ctx.n_srcs = len(srcs)
        ctx.args = (geom, op, has_cls, scale, backend, causal, padding)
        ctx.save_for_backward(*srcs, buf, lse, cls_frames, lse_cls)
        return buf, lse, cls_frames, lse_cls

    @staticmethod
    def backward(ctx, d_buf, *_):
        saved = ctx.saved_tensors
        srcs, (buf, lse, cls_frames, lse_cls) = list(saved[:ctx.n_srcs]), saved[ctx.n_srcs:]
        if d_buf is None:
            d_buf = torch.zeros_like(buf)
        with _profiled("divattn::attn_bwd"):
            grads = _backward_kernels(srcs, *ctx.args, buf, d_buf, lse, cls_frames, lse_cls)
        return (None,) * 8 + tuple(grads)


def _profiled(name: str):
    """A profiler range named like the custom op, when a profiler runs (else nothing)."""
    if torch._C._autograd._profiler_enabled():
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def _tracing(srcs: Sequence[torch.Tensor]) -> bool:
    """Whether something records or transforms the call (torch.compile, torch.export, a
    dispatch mode such as FlopCounterMode or FakeTensorMode, torch.func), so that it must
    see the custom op."""
    return (torch.compiler.is_compiling() or _current_mode() is not None
            or torch._C._are_functorch_transforms_active() or isinstance(srcs[0], _FAKE))


_FAKE = torch._subclasses.FakeTensor
_current_mode = torch.utils._python_dispatch._get_current_dispatch_mode


def attention(backend: str, op: str, views: tuple, scale: float, causal: bool, counts: Optional[tuple] = None,
              mask: Optional[torch.Tensor] = None, cls_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``op`` on the kernel ``backend``: ``views`` are q, k, v and, for spatial attention
    with cls, the cls q, k, v; ``counts`` the ``(rows, groups)`` of a padded batch
    (:meth:`~divattn.ops.masks.Padding.kernel_counts`) or None, ``mask`` and
    ``cls_weights`` its mask (:meth:`~divattn.ops.masks.Padding.kernel_mask`) or None.
    Returns the token-major output buffer: ``(B, [1 +] T*N, H, D)`` in q's token order, or
    ``(B, L, H, D)`` for joint attention.

    Eager calls run :class:`_Eager`; traced and transformed ones the custom op
    ``divattn::attn_fwd`` (with its fake kernel and FLOP formula)."""
    srcs, geom = sources(views)
    has_cls = len(views) > 3
    rows, groups = counts or (None, None)
    if _tracing(srcs):
        return attn_fwd(srcs, geom, op, has_cls, scale, backend, causal, rows, groups, mask, cls_weights)[0]
    return _Eager.apply(views, geom, op, has_cls, scale, backend, causal, _padding(rows, groups, mask, cls_weights),
                        *srcs)[0]
