"""The problems the kernel report covers and the launches GPU dispatch makes for them.

A :class:`~divattn.shapes.AttnShape` is one attention layer as the kernels see it
(batch, frames, patches, heads, head dim, token order, cls, causal); a :class:`Problem` is one op,
pass and dtype on it. The report covers the callers' named shapes (``divattn
kernels`` passes the benchmark shapes) and :data:`COVERAGE`: layers chosen so that
every code path dispatch can reach is planned (every packed sequence length, the
frame and long regimes, with and without cls, causal, joint), at every head dim of
:data:`HEAD_DIMS` and at the batch/head counts of :data:`BATCH_HEADS`, whose strides
and sizes give the launches the divisibility specialisations real models get.

:func:`launches` lays out a packed qkv projection output like the benchmarks do,
splits it with :func:`divattn.ops.layout.split_qkv` (joint: ``qkv.unbind(2)``),
allocates the outputs, the saved statistics and the gradient buffers with the
helpers of :mod:`divattn.ops.functions`, and asks the Triton backend for its plan
(:func:`~divattn.ops.triton.plan_forward` /
:func:`~divattn.ops.triton.plan_backward`) on a target. Nothing here knows
a kernel by name: a new kernel or code path in the plans is covered as it appears.

On the ``"meta"`` device no memory is allocated, so the real batch is used and the
strides and integer arguments (which the JIT specialises on) are those of a real launch.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence

import torch

from ..shapes import AttnShape

PASSES = ("fwd", "bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ARCHS = (80, 90)
# A representative of every head-dim bucket, aligned (a multiple of 16) and not (40, 72).
HEAD_DIMS = (16, 32, 40, 48, 64, 72, 80, 96, 128)
ORDERS = ("hwt", "thw")
# (B, H): one clip and one head (every size-1 specialisation), an odd head count (strides
# that are not multiples of 16 when D is not), a training batch of ViT-B's 12 heads.
BATCH_HEADS = ((1, 1), (2, 3), (8, 12))


# Layers that reach every code path dispatch plans, with the benchmark shapes or without
# them: temporal attention over every packed sequence length (1 ... 64 frames) and the frame
# regime (96); 64 px frames (N = 16: spatial sequences packed, 17 rows with cls) and a
# joint sequence of 1 + 16 T tokens, packed (T <= 2), in the frame regime (T <= 8 ... 16)
# or the long one; 112 px (N = 49) and 224 px (N = 196) frames; a video diffusion UNet's
# 32x32 latent (N = 1024: the long regime, no cls); causal temporal attention (an ST
# transformer's) packed, in the frame regime (96 frames) and the long one (320).
COVERAGE = (
    *(AttnShape(f"clip{T}_64px", 1, T, 16, 1, 64) for T in (1, 2, 4, 8, 16, 32, 64, 96)),
    AttnShape("clip8_112px", 1, 8, 49, 1, 64),
    AttnShape("clip8_224px", 1, 8, 196, 1, 64),
    AttnShape("unet_16x32x32", 1, 16, 1024, 1, 64, "thw", False),
    *(AttnShape(f"causal{T}_64px", 1, T, 16, 1, 64, "thw", False, causal=True) for T in (2, 4, 8, 16, 32, 64, 96, 320)),
)


@dataclass(frozen=True)
class Problem:
    """One attention op on one layer: ``op`` is temporal, spatial, spatial_cls or joint; with
    ``counts`` on a padded batch given as counts (the kernels' COUNTS path), with ``mask`` as a
    token mask (MASKED)."""

    shape: AttnShape
    op: str
    pass_: str
    dtype: str
    counts: bool = False
    mask: bool = False

    @property
    def id(self) -> str:
        s = self.shape
        op = self.op + ("+counts" if self.counts else "") + ("+mask" if self.mask else "")
        return f"{s.name}-{s.order}-B{s.B}H{s.H}-D{s.D}-{op}-{self.pass_}-{self.dtype}"

    @property
    def kernel_op(self) -> str:
        return "spatial" if self.op == "spatial_cls" else self.op

    @property
    def has_cls(self) -> bool:
        return self.op == "spatial_cls"

    @property
    def causal(self) -> bool:
        return self.shape.causal and self.op == "temporal"

    @property
    def q_shape(self) -> tuple:
        s = self.shape
        return (s.B, s.tokens, s.H, s.D) if self.op == "joint" else (s.B, s.T, s.N, s.H, s.D)

    def to_dict(self) -> dict:
        out = {"shape": dataclasses.asdict(self.shape), "op": self.op, "pass_": self.pass_, "dtype": self.dtype}
        return {**out, **({"counts": True} if self.counts else {}), **({"mask": True} if self.mask else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(AttnShape(**d["shape"]), d["op"], d["pass_"], d["dtype"], d.get("counts", False),
                   d.get("mask", False))


def variants(shape, head_dims: Sequence[int] = HEAD_DIMS, orders: Sequence[str] = ORDERS,
             batch_heads: Optional[Sequence[tuple]] = None) -> list:
    """``shape`` at each head dim in each token order, and at each (B, H) of ``batch_heads``
    (default: its own); :attr:`Problem.id` names all three."""
    shape = shape
    return [dataclasses.replace(shape, D=int(D), order=order, B=B, H=H)
            for D in head_dims for order in orders for B, H in (batch_heads or [(shape.B, shape.H)])]


def problems(shapes: Iterable, *, passes: Sequence[str] = PASSES, dtypes: Sequence[str] = tuple(DTYPES),
             ops: Optional[Sequence[str]] = None, counts: Sequence[bool] = (False,),
             masks: Sequence[bool] = (False,)) -> Iterator[Problem]:
    """Every (shape, op, pass, dtype) with each of ``counts`` and ``masks``; ``ops`` default to each
    shape's own."""
    for shape in shapes:
        for op in shape.ops():
            if ops is not None and op not in ops:
                continue
            for pass_ in passes:
                for dtype in dtypes:
                    for padded in counts:
                        for masked in masks:
                            yield Problem(shape, op, pass_, dtype, padded, masked)


def coverage(head_dims: Sequence[int] = HEAD_DIMS, orders: Sequence[str] = ORDERS,
             batch_heads: Sequence[tuple] = BATCH_HEADS) -> list:
    """The :data:`COVERAGE` layers at every head dim, token order and (B, H)."""
    return [v for s in COVERAGE for v in variants(s, head_dims, orders, batch_heads)]


def _fill(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if x.device.type != "meta":
        x.normal_(generator=generator)
    return x


def interpreting() -> bool:
    """True when this process's Triton kernels are the interpreter's (imported with TRITON_INTERPRET=1)."""
    from triton.runtime.jit import JITFunction

    from ..ops.triton.kernels import KERNELS

    return not any(isinstance(k, JITFunction) for k in KERNELS)


def plans(problem: Problem, *, target=None, device="meta", seed: Optional[int] = 0) -> list:
    """The plans of ``problem`` on ``target``, one :class:`~divattn.ops.triton.Launch` list per
    tile candidate dispatch may run (the first unless tuning on a GPU picks another).

    ``target``: ``None`` (the device's: the interpreter for CPU tensors) or an SM
    number (80, 90). ``device="meta"`` allocates nothing (for compiling); on a real
    device the inputs and the incoming gradients are random normal (``seed``) so the
    launches can run (the backward's after the forward of the first candidate has).
    """
    from ..ops import functions
    from ..ops.layout import split_qkv
    from ..ops.masks import Padding
    from ..ops.triton import plan_backward, plan_forward, problem_candidates

    s = problem.shape
    dtype = DTYPES[problem.dtype]
    device = torch.device(device)
    gen = None
    if seed is not None and device.type == "cpu":
        gen = torch.Generator().manual_seed(seed)
    op = problem.kernel_op
    with torch.enable_grad():
        qkv = _fill(torch.empty((s.B, s.tokens, 3, s.H, s.D), dtype=dtype, device=device), gen)
        qkv = qkv.mul_(0.5).requires_grad_()
        if op == "joint":
            views = list(qkv.unbind(2))
            cls = None
        else:
            out = split_qkv(qkv, s.T, s.N, order=s.order, has_cls=s.cls)
            views = list(out[:3])
            cls = tuple(out[3]) if problem.has_cls else None
            views += list(cls or ())
        q, k, v = (x.detach() for x in views[:3])
        cls = tuple(x.detach() for x in cls) if cls is not None else None
        scale = s.D ** -0.5
        buf, lse, cls_frames, lse_cls = functions._outputs(op, problem.has_cls, q)
        o, o_cls = functions._out_views(op, problem.has_cls, q, buf)
        # the COUNTS path with every token real: on a real device it computes the unpadded result
        tokens = tuple(k.shape[:2] if op == "joint" else k.shape[:3])
        counts = Padding(tokens, device).kernel_counts(op) if problem.counts else None
        # the MASKED path with every token real, likewise
        mask, cls_weights = Padding(tokens, device, torch.ones(tokens, dtype=torch.bool, device=device)).kernel_mask(
            cls is not None) if problem.mask else (None, None)
        fwd = dict(cls=cls, o_cls=o_cls, cls_frames=cls_frames, lse_cls=lse_cls, causal=problem.causal,
                   counts=counts, mask=mask, cls_weights=cls_weights)
        candidates = problem_candidates(op, problem.pass_, q, k, cls is not None, target,
                                        problem.counts or problem.mask)
        if problem.pass_ == "fwd":
            return [plan_forward(op, q, k, v, o, lse, scale, **fwd, target=target, candidate=c) for c in candidates]
        # The backward reads what the forward wrote: run it where that is possible.
        if device.type != "meta":
            for launch in plan_forward(op, q, k, v, o, lse, scale, **fwd):
                launch.run()
        srcs, geom = functions.sources(views)
        grads = functions._grads(srcs, geom)
        dviews = functions._decode(grads, geom) if len(srcs) < geom[0] else grads
        d_buf = _fill(torch.empty_like(buf), gen)
        do, do_cls = functions._out_views(op, problem.has_cls, q, d_buf)
        return [plan_backward(op, q, k, v, o, do, lse, *dviews[:3], scale, cls=cls,
                              d_cls=tuple(dviews[3:]) if cls is not None else None, do_cls=do_cls,
                              cls_frames=cls_frames, lse_cls=lse_cls, causal=problem.causal, counts=counts,
                              mask=mask, cls_weights=cls_weights, target=target, candidate=c) for c in candidates]


def launches(problem: Problem, *, target=None, device="meta", seed: Optional[int] = 0) -> list:
    """The :class:`~divattn.ops.triton.Launch` list of ``problem`` on ``target`` with the first
    tile candidate: what runs untuned (see :func:`plans`)."""
    return plans(problem, target=target, device=device, seed=seed)[0]


__all__ = ["Problem", "problems", "variants", "coverage", "plans", "launches", "interpreting", "COVERAGE",
           "PASSES", "DTYPES", "ARCHS", "HEAD_DIMS", "ORDERS", "BATCH_HEADS"]
