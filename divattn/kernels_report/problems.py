"""The launches GPU dispatch makes for a named shape, built the way the op builds them.

A :class:`Problem` is one (shape, op, pass, dtype) with its head dim and token order.
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

from ..shapes import GPU_SHAPES, AttnShape

PASSES = ("fwd", "bwd")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
ARCHS = (80, 90)
# D of the named shapes (ViT-B) and the two other head dims every GPU report covers.
HEAD_DIMS = (64, 128, 72)
ORDERS = ("hwt", "thw")


@dataclass(frozen=True)
class Problem:
    """One attention op on one shape: ``op`` is temporal, spatial, spatial_cls or joint."""

    shape: AttnShape
    op: str
    pass_: str
    dtype: str

    @property
    def id(self) -> str:
        s = self.shape
        return f"{s.name}-{s.order}-D{s.D}-{self.op}-{self.pass_}-{self.dtype}"

    @property
    def kernel_op(self) -> str:
        return "spatial" if self.op == "spatial_cls" else self.op

    @property
    def has_cls(self) -> bool:
        return self.op == "spatial_cls"

    @property
    def causal(self) -> bool:
        return bool(getattr(self.shape, "causal", False)) and self.op == "temporal"

    @property
    def q_shape(self) -> tuple:
        return self.shape.q_shape(self.op)

    def to_dict(self) -> dict:
        return {"shape": dataclasses.asdict(self.shape), "op": self.op, "pass_": self.pass_, "dtype": self.dtype}

    @classmethod
    def from_dict(cls, d: dict) -> "Problem":
        return cls(AttnShape(**d["shape"]), d["op"], d["pass_"], d["dtype"])


def variants(shape: AttnShape, head_dims: Sequence[int] = HEAD_DIMS,
             orders: Sequence[str] = ORDERS) -> list:
    """``shape`` with each head dim (heads kept) in each token order (:attr:`Problem.id` names both)."""
    out = []
    for D in head_dims:
        for order in orders:
            out.append(dataclasses.replace(shape, D=int(D), order=order))
    return out


def problems(shapes: Iterable[AttnShape], *, passes: Sequence[str] = PASSES,
             dtypes: Sequence[str] = tuple(DTYPES), ops: Optional[Sequence[str]] = None) -> Iterator[Problem]:
    """Every (shape, op, pass, dtype); ``ops`` default to each shape's own."""
    for shape in shapes:
        for op in shape.ops():
            if ops is not None and op not in ops:
                continue
            for pass_ in passes:
                for dtype in dtypes:
                    yield Problem(shape, op, pass_, dtype)


def gpu_problems(head_dims: Sequence[int] = HEAD_DIMS, orders: Sequence[str] = ORDERS, **kw) -> list:
    """The named GPU benchmark shapes at every head dim and token order (see :data:`HEAD_DIMS`)."""
    shapes = [v for s in GPU_SHAPES.values() for v in variants(s, head_dims, orders)]
    return list(problems(shapes, **kw))


def _fill(x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    if x.device.type != "meta":
        x.normal_(generator=generator)
    return x


def interpreting() -> bool:
    """True when this process's Triton kernels are the interpreter's (imported with TRITON_INTERPRET=1)."""
    from triton.runtime.jit import JITFunction

    from ..ops.triton.kernels import KERNELS

    return not any(isinstance(k, JITFunction) for k in KERNELS)


def launches(problem: Problem, *, target=None, device="meta", seed: Optional[int] = 0) -> list:
    """The :class:`~divattn.ops.triton.Launch` list of ``problem`` on ``target``.

    ``target``: ``None`` (the device's: the interpreter for CPU tensors) or an SM
    number (80, 90). ``device="meta"`` allocates nothing (for compiling); on a real
    device the inputs and the incoming gradients are random normal (``seed``) so the
    launches can run.
    """
    from ..ops import functions
    from ..ops.layout import split_qkv
    from ..ops.triton import plan_backward, plan_forward

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
        # As the op passes it: only a causal call carries the flag.
        extra = {"causal": True} if problem.causal else {}
        if problem.pass_ == "fwd":
            return plan_forward(op, q, k, v, o, lse, scale, cls=cls, o_cls=o_cls,
                                               cls_frames=cls_frames, lse_cls=lse_cls, target=target, **extra)
        # The backward reads what the forward wrote: run it where that is possible.
        if device.type != "meta":
            for launch in plan_forward(op, q, k, v, o, lse, scale, cls=cls, o_cls=o_cls,
                                                      cls_frames=cls_frames, lse_cls=lse_cls, **extra):
                launch.run()
        srcs, geom = functions.sources(views)
        grads = functions._grads(srcs, geom)
        dviews = functions._decode(grads, geom) if len(srcs) < geom[0] else grads
        d_buf = _fill(torch.empty_like(buf), gen)
        do, do_cls = functions._out_views(op, problem.has_cls, q, d_buf)
        return plan_backward(
            op, q, k, v, o, do, lse, *dviews[:3], scale,
            cls=cls, d_cls=tuple(dviews[3:]) if cls is not None else None, do_cls=do_cls,
            cls_frames=cls_frames, lse_cls=lse_cls, target=target, **extra)


__all__ = ["Problem", "problems", "gpu_problems", "variants", "launches", "PASSES", "DTYPES", "ARCHS",
           "HEAD_DIMS", "ORDERS", "interpreting"]
