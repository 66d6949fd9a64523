"""What the op tests share: the case grid, inputs and layouts, the comparison with the
fp64 reference (the one place tolerances live), and the copy and launch spies."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import divattn
from divattn.ops import BACKENDS, reference, split_qkv
from divattn.ops.dispatch import KernelBackend

from ..conftest import DEVICE

# err(kernel vs fp64) <= FACTOR * err(plain PyTorch in the same dtype vs fp64) + ATOL[dtype]
FACTOR = 2.0
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

KERNEL_BACKENDS = [name for name, be in BACKENDS.items() if isinstance(be, KernelBackend)]
# bf16 runs where a backend computes it right (on a GPU, and the emulated cuda kernels on a CPU)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def skip_reason(backend: str, op: str, dtype: torch.dtype, head_dim: int = 64):
    """Why ``backend`` cannot run here (the dispatcher's own sentences), or None."""
    reasons = BACKENDS[backend].not_supported_reasons(op, dtype, DEVICE, head_dim)
    return "; ".join(reasons) or None


@dataclass(frozen=True)
class Case:
    op: str  # temporal | spatial | spatial_cls | joint
    B: int
    T: int
    N: int
    H: int
    D: int
    order: str = "hwt"  # hwt | thw
    layout: str = "packed"  # packed | separate | transposed | sliced | expanded

    @property
    def id(self) -> str:
        return f"{self.op}-B{self.B}-T{self.T}-N{self.N}-H{self.H}-D{self.D}-{self.order}-{self.layout}"

    @property
    def has_cls(self) -> bool:
        return self.op == "spatial_cls"


# The op grid: every op, T over {1, 3, 8, 13}, N over {1, 49, 196}, D over {40, 64, 72},
# both token orders, every layout.
C = Case
CASES = [
    # temporal: T over {1, 3, 8, 13}, both orders, packed views of one qkv
    C("temporal", 2, 8, 49, 3, 64, "hwt"),
    C("temporal", 1, 13, 49, 2, 72, "thw"),
    C("temporal", 2, 3, 196, 1, 40, "hwt"),
    C("temporal", 1, 1, 49, 2, 64, "thw"),
    C("temporal", 2, 13, 1, 3, 40, "hwt"),
    C("temporal", 2, 8, 49, 2, 72, "thw", "separate"),
    C("temporal", 1, 3, 49, 3, 40, "hwt", "transposed"),
    C("temporal", 2, 8, 49, 1, 64, "hwt", "sliced"),
    C("temporal", 2, 3, 49, 2, 40, "hwt", "expanded"),
    # spatial without cls
    C("spatial", 1, 3, 196, 2, 64, "hwt"),
    C("spatial", 2, 8, 49, 1, 72, "thw"),
    C("spatial", 2, 1, 1, 3, 40, "hwt"),
    C("spatial", 1, 13, 49, 2, 40, "thw", "transposed"),
    C("spatial", 2, 3, 49, 2, 64, "hwt", "expanded"),
    # spatial with the cls token
    C("spatial_cls", 1, 8, 196, 1, 64, "hwt"),
    C("spatial_cls", 2, 3, 49, 3, 72, "thw"),
    C("spatial_cls", 2, 13, 1, 2, 40, "hwt"),
    C("spatial_cls", 1, 1, 49, 2, 64, "hwt"),
    C("spatial_cls", 2, 3, 49, 2, 40, "thw", "separate"),
    C("spatial_cls", 2, 8, 49, 1, 64, "hwt", "transposed"),
    C("spatial_cls", 2, 3, 49, 2, 72, "hwt", "sliced"),
    C("spatial_cls", 2, 3, 49, 2, 40, "thw", "expanded"),
    # joint attention over all tokens
    C("joint", 2, 3, 49, 2, 64, "hwt"),
    C("joint", 1, 1, 1, 3, 40, "hwt"),
    C("joint", 1, 8, 13, 1, 72, "hwt", "separate"),
]


def make_leaves(case: Case, gen: torch.Generator) -> list:
    """Dense fp64 tensors that the layout's views are taken from (the grad leaves)."""
    B, T, N, H, D = case.B, case.T, case.N, case.H, case.D
    L = 1 + N * T
    r = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    if case.layout in ("packed",):
        return [r(B, L, 3, H, D)]
    if case.layout == "sliced":
        # Extra head-dim columns and extra tokens past the end hold NaN.
        x = torch.full((B, L + 3, 3, H, D + 5), math.nan, dtype=torch.float64)
        x[:, :L, :, :, :D] = r(B, L, 3, H, D)
        return [x]
    if case.layout == "separate":
        return [r(B, T, N, H, D) for _ in range(3)] + [r(B, H, D) for _ in range(3)]
    if case.layout == "transposed":
        return [r(B, H, N, T, D) for _ in range(3)] + [r(H, B, D) for _ in range(3)]
    if case.layout == "expanded":
        return [r(1, T, N, H, D) for _ in range(3)] + [r(1, H, D) for _ in range(3)]
    raise ValueError(case.layout)


def make_views(case: Case, leaves: list):
    """q, k, v ``(B, T, N, H, D)`` (joint: ``(B, L, H, D)``) and cls views of ``leaves``."""
    B, T, N, H, D = case.B, case.T, case.N, case.H, case.D
    if case.layout in ("packed", "sliced"):
        qkv = leaves[0]
        if case.layout == "sliced":
            qkv = qkv[:, : 1 + N * T, :, :, :D]
        if case.op == "joint":
            q, k, v = qkv.unbind(2)
            return q, k, v, None
        q, k, v, cls = split_qkv(qkv, T, N, order=case.order, has_cls=True)
        return q, k, v, cls
    if case.layout == "separate":
        q, k, v, *cls = leaves
    elif case.layout == "transposed":
        q, k, v = (x.permute(0, 3, 2, 1, 4) for x in leaves[:3])
        cls = [c.permute(1, 0, 2) for c in leaves[3:]]
    elif case.layout == "expanded":
        q, k, v = (x.expand(B, T, N, H, D) for x in leaves[:3])
        cls = [c.expand(B, H, D) for c in leaves[3:]]
    if case.op == "joint":
        return tuple(x.reshape(B, T * N, H, D) for x in (q, k, v)) + (None,)
    return q, k, v, tuple(cls)


def call(case: Case, q, k, v, cls, backend: str, **padding):
    """Run the case's op (with the op's ``padding`` keywords: ``frames``, ``patches``,
    ``mask``; joint ``lengths``, ``mask``); returns a tuple of outputs."""
    if case.op == "temporal":
        return (divattn.temporal_attention(q, k, v, backend=backend, **padding),)
    if case.op == "spatial":
        return (divattn.spatial_attention(q, k, v, backend=backend, **padding),)
    if case.op == "spatial_cls":
        return divattn.spatial_attention(q, k, v, cls, backend=backend, **padding)
    return (divattn.joint_attention(q, k, v, backend=backend, **padding),)


@contextlib.contextmanager
def plain_precision():
    """The reference computed in the input dtype: the baseline for low-precision error."""
    old = reference.UPCAST
    reference.UPCAST = False
    try:
        yield
    finally:
        reference.UPCAST = old


def out_grads(outs, gen: torch.Generator):
    return [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]


def run(fn: Callable, leaves64: list, grads64: list, backend: str, dtype: torch.dtype, device=DEVICE):
    """Outputs and leaf gradients, as fp64 on CPU, of ``fn(leaves, backend)`` (a tuple of
    outputs) on ``leaves64`` cast to ``dtype`` on ``device``, against upstream ``grads64``."""
    leaves = [x.detach().to(device, dtype).requires_grad_(True) for x in leaves64]
    outs = fn(leaves, backend)
    loss = sum((o.float() * g.to(device, torch.float32)).sum() for o, g in zip(outs, grads64))
    used = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss, used, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(used, grads)]
    return [o.detach().double().cpu() for o in outs], [g.double().cpu() for g in grads], outs


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a - b).abs().nan_to_num(math.inf).max().item()


def case_fn(case: Case, **padding) -> Callable:
    """``fn(leaves, backend)``: the case's op on its views of ``leaves`` (with ``padding``, see :func:`call`)."""
    return lambda leaves, backend: call(case, *make_views(case, leaves), backend, **padding)


def assert_close_to_reference(case: Case, backend: str, dtype: torch.dtype, seed: int = 0, fn=None):
    """Forward outputs and every leaf gradient of ``fn`` (default: the case's op) on
    ``backend`` in ``dtype`` against the fp64 reference, with the dtype's bar: the error
    may be ``FACTOR`` times the plain softmax's in ``dtype`` plus ``ATOL[dtype]``; fp64 must
    match to rounding. With the sliced layout the padding's gradient must be exactly zero.
    Returns the raw outputs."""
    fn = fn or case_fn(case)
    gen = torch.Generator().manual_seed(seed)
    leaves64 = make_leaves(case, gen)
    grads64 = out_grads(fn([x.requires_grad_(False) for x in leaves64], "reference"), gen)
    ref_o, ref_g, _ = run(fn, leaves64, grads64, "reference", torch.float64, device="cpu")
    with plain_precision():
        low_o, low_g, _ = run(fn, leaves64, grads64, "reference", dtype)
    got_o, got_g, raw = run(fn, leaves64, grads64, backend, dtype)

    names = [f"out{i}" for i in range(len(ref_o))] + [f"grad{i}" for i in range(len(ref_g))]
    for name, got, low, ref in zip(names, got_o + got_g, low_o + low_g, ref_o + ref_g):
        what = f"{case.id} {backend} {dtype}: {name}"
        if case.layout == "sliced" and name.startswith("grad"):
            # The padding (NaN in the input) gets exactly zero gradient; compare the rest.
            pad = torch.zeros_like(got, dtype=torch.bool)
            pad[:, 1 + case.N * case.T:] = True
            pad[..., case.D:] = True
            assert (got[pad] == 0).all(), f"{what}: gradient leaked into padding"
            got, low, ref = (torch.where(pad, 0.0, x) for x in (got, low, ref))
        assert torch.isfinite(got).all(), f"{what} has non-finite values"
        if dtype == torch.float64:
            torch.testing.assert_close(got, ref, msg=lambda m: f"{what}: {m}")
            continue
        bound = FACTOR * max_err(low, ref) + ATOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
        err = max_err(got, ref)
        assert err <= bound, f"{what} max err {err:.3e} > bound {bound:.3e}"
    return raw


# aten ops that copy or fill: none may run between the ops on the fast path
COPIES = {
    "aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::repeat", "aten::index_put_",
    "aten::as_strided_scatter", "aten::slice_backward", "aten::select_backward", "aten::zeros", "aten::zero_",
}


class Spy:
    """Wraps a kernel module's launchers and records the tensors they receive."""

    def __init__(self, monkeypatch, backend: str = "triton"):
        mod = BACKENDS[backend].kernels()
        self.fwd, self.bwd = [], []
        fwd, bwd = mod.forward, mod.backward

        def forward(op, q, k, v, o, *a, **kw):
            self.fwd.append(dict(q=q, k=k, v=v, o=o, cls=kw.get("cls")))
            return fwd(op, q, k, v, o, *a, **kw)

        def backward(op, q, k, v, o, do, lse, dq, dk, dv, *a, **kw):
            self.bwd.append(dict(dq=dq, dk=dk, dv=dv, d_cls=kw.get("d_cls")))
            return bwd(op, q, k, v, o, do, lse, dq, dk, dv, *a, **kw)

        monkeypatch.setattr(mod, "forward", forward)
        monkeypatch.setattr(mod, "backward", backward)


def packed_qkv(B, T, N, H, D, order, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(B, 1 + N * T, 3 * H * D, generator=gen).to(DEVICE, dtype).requires_grad_(True)
    q, k, v, cls = split_qkv(base.view(B, 1 + N * T, 3, H, D), T, N, order=order, has_cls=True)
    return base, q, k, v, cls


def copies_outside_ops(prof):
    events = list(prof.events())
    ops = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("divattn::")]
    return sorted({
        e.name for e in events
        if e.name in COPIES and not any(s <= e.time_range.start and e.time_range.end <= t for s, t in ops)
    })


@dataclass(frozen=True)
class Causal:
    """A temporal :class:`Case` whose queries are the last ``tq`` of its ``T`` frames."""

    case: Case
    tq: int
    causal: bool = True

    @property
    def id(self) -> str:
        return f"{self.case.id}-Tq{self.tq}-{'causal' if self.causal else 'full'}"


def causal_case(T, tq, N, H, D, order, layout="packed", causal=True, B=2):
    return Causal(Case("temporal", B, T, N, H, D, order, layout), tq, causal)


CAUSAL_CASES = [
    # Tq == Tk: the full causal forward, T over {1, 3, 8, 13} and 40 (two 32-row tiles)
    causal_case(1, 1, 7, 2, 40, "thw"),
    causal_case(3, 3, 7, 2, 64, "hwt"),
    causal_case(8, 8, 5, 2, 72, "thw", "separate"),
    causal_case(13, 13, 3, 2, 40, "hwt", "transposed"),
    causal_case(8, 8, 5, 1, 64, "hwt", "sliced"),
    causal_case(13, 13, 3, 2, 40, "thw", "expanded"),
    causal_case(40, 40, 2, 1, 64, "hwt", B=1),
    # Tq < Tk: the last frames against all frames so far, causal and not
    causal_case(8, 3, 5, 2, 64, "thw"),
    causal_case(13, 1, 3, 2, 40, "hwt", "separate"),
    causal_case(13, 5, 3, 2, 72, "hwt", "transposed", causal=False),
    causal_case(40, 2, 2, 1, 40, "thw", "sliced", B=1),
    causal_case(3, 1, 7, 2, 64, "thw", "expanded", causal=False),
]


def causal_views(cc: Causal, leaves):
    q, k, v, _ = make_views(cc.case, leaves)
    return q[:, cc.case.T - cc.tq:], k, v


def assert_causal_close_to_reference(cc: Causal, backend: str, dtype: torch.dtype, **padding):
    """:func:`assert_close_to_reference` for temporal attention with the last ``cc.tq`` query frames
    (and the op's ``padding`` keywords, see :func:`call`)."""

    def fn(leaves, backend):
        return (divattn.temporal_attention(*causal_views(cc, leaves), causal=cc.causal, backend=backend, **padding),)

    assert_close_to_reference(cc.case, backend, dtype, fn=fn)


# Isolation cases: one poisoned element of q, k, v, a cls vector or the upstream gradient.
ISO_B, ISO_T, ISO_H, ISO_D = 1, 8, 2, 16
POS = dict(b=0, t=3, n=5, h=1, d=2)  # the poisoned element
# (op, N): temporal packs 8-frame sequences; spatial N=7 (+cls: 8 rows) packs frames.
ISOLATION_OPS = [("temporal", 16), ("spatial", 7), ("spatial_cls", 7), ("spatial_cls", 16)]
TILES = ["interpreter", "sm90"]


def poisoned_qkv(op: str, N: int, order: str, where: str, value: float, dtype: torch.dtype):
    """A ``(B, [1 +] N*T, 3, H, D)`` qkv and an upstream gradient, one element of ``where`` set to ``value``."""
    has_cls = op == "spatial_cls"
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(ISO_B, int(has_cls) + N * ISO_T, 3, ISO_H, ISO_D, generator=gen, dtype=torch.float64)
    grad = torch.randn(ISO_B, int(has_cls) + N * ISO_T, ISO_H, ISO_D, generator=gen, dtype=torch.float64)
    b, t, n, h, d = POS.values()
    token = int(has_cls) + (n * ISO_T + t if order == "hwt" else t * N + n)
    if where in ("q", "k", "v"):
        qkv[b, token, "qkv".index(where), h, d] = value
    elif where in ("q_cls", "k_cls", "v_cls"):
        qkv[b, 0, "qkv".index(where[0]), h, d] = value
    elif where == "do":
        grad[b, token, h, d] = value
    elif where == "do_cls":
        grad[b, 0, h, d] = value
    return qkv.to(dtype), grad.to(dtype)


def isolation_run(op: str, N: int, order: str, qkv: torch.Tensor, grad: torch.Tensor, backend):
    """The output tokens ``(B, [1 +] T*N, ...)`` in storage order and the qkv gradient."""
    has_cls = op == "spatial_cls"
    qkv = qkv.detach().to(DEVICE).requires_grad_(True)
    views = divattn.split_qkv(qkv, ISO_T, N, order=order, has_cls=has_cls)
    q, k, v = views[:3]
    if has_cls:
        out = divattn.ops.spatial_attention_tokens(q, k, v, views[3], backend=backend)
    else:
        fn = divattn.temporal_attention if op == "temporal" else divattn.spatial_attention
        out = divattn.tokens_major(fn(q, k, v, backend=backend))
    (d_qkv,) = torch.autograd.grad(out, qkv, grad.to(DEVICE).reshape(out.shape))
    return out.detach(), d_qkv


WHERE = ["q", "k", "v", "do"]
WHERE_CLS = WHERE + ["q_cls", "k_cls", "v_cls", "do_cls"]
# NaN and inf alternate over the poisoned tensors, the other way round in the other order.
ISOLATION_CASES = [
    pytest.param(op, N, order, where, value, id=f"{op}-N{N}-{order}-{where}-{value}")
    for op, N in ISOLATION_OPS
    for j, order in enumerate(("hwt", "thw"))
    for i, where in enumerate(WHERE_CLS if op == "spatial_cls" else WHERE)
    for value in [(math.nan, math.inf)[(i + j) % 2]]
]
