"""Inputs, layouts and tolerances shared by the op tests (the one place tolerances live)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

import divattn
from divattn.ops import BACKENDS, reference, split_qkv

from ..conftest import DEVICE

# err(kernel vs fp64) <= FACTOR * err(plain PyTorch in the same dtype vs fp64) + ATOL[dtype]
FACTOR = 2.0
ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

KERNEL_BACKENDS = [name for name in BACKENDS if name != "torch"]
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


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


def call(case: Case, q, k, v, cls, backend: str):
    """Run the case's op; returns a tuple of outputs."""
    if case.op == "temporal":
        return (divattn.temporal_attention(q, k, v, backend=backend),)
    if case.op == "spatial":
        return (divattn.spatial_attention(q, k, v, backend=backend),)
    if case.op == "spatial_cls":
        return divattn.spatial_attention(q, k, v, cls, backend=backend)
    return (divattn.joint_attention(q, k, v, backend=backend),)


@contextlib.contextmanager
def reference_backend():
    """``backend="torch"`` computed by :mod:`divattn.ops.reference`, the ground truth.

    The torch backend proper is the fast SDPA composition; the tests compare against the
    plain softmax reference, in fp64 and (for the low-precision baseline) in the dtype.
    """
    from divattn.ops import api

    old = api.torch_backend
    api.torch_backend = reference
    try:
        yield
    finally:
        api.torch_backend = old


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


def run(case: Case, leaves64: list, grads64: list, backend: str, dtype: torch.dtype, device=DEVICE):
    """Outputs and leaf gradients, as fp64 on CPU, of the case run in ``dtype`` on ``device``."""
    leaves = [x.detach().to(device, dtype).requires_grad_(True) for x in leaves64]
    q, k, v, cls = make_views(case, leaves)
    outs = call(case, q, k, v, cls, backend)
    loss = sum((o.float() * g.to(device, torch.float32)).sum() for o, g in zip(outs, grads64))
    used = [x for x in leaves if x.requires_grad]
    grads = torch.autograd.grad(loss, used, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(used, grads)]
    return [o.detach().double().cpu() for o in outs], [g.double().cpu() for g in grads], outs


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a - b).abs().nan_to_num(math.inf).max().item()


def assert_close_to_reference(case: Case, backend: str, dtype: torch.dtype, seed: int = 0):
    """Forward outputs and every leaf gradient against fp64, with the dtype's bar."""
    gen = torch.Generator().manual_seed(seed)
    leaves64 = make_leaves(case, gen)
    q, k, v, cls = make_views(case, [x.requires_grad_(False) for x in leaves64])
    with reference_backend():
        grads64 = out_grads(call(case, q, k, v, cls, "torch"), gen)
        ref_o, ref_g, _ = run(case, leaves64, grads64, "torch", torch.float64, device="cpu")
        with plain_precision():
            low_o, low_g, _ = run(case, leaves64, grads64, "torch", dtype)
    got_o, got_g, raw = run(case, leaves64, grads64, backend, dtype)

    names = [f"out{i}" for i in range(len(ref_o))] + [f"grad{i}" for i in range(len(ref_g))]
    for name, got, low, ref in zip(names, got_o + got_g, low_o + low_g, ref_o + ref_g):
        if case.layout == "sliced" and name.startswith("grad"):
            # The padding (NaN in the input) gets exactly zero gradient; compare the rest.
            pad = torch.zeros_like(got, dtype=torch.bool)
            pad[:, 1 + case.N * case.T:] = True
            pad[..., case.D:] = True
            assert (got[pad] == 0).all(), f"{name}: gradient leaked into padding"
            got, low, ref = (torch.where(pad, 0.0, x) for x in (got, low, ref))
        assert torch.isfinite(got).all(), f"{case.id} {backend} {dtype}: {name} has non-finite values"
        bound = FACTOR * max_err(low, ref) + ATOL[dtype] * max(1.0, ref.abs().max().item() if ref.numel() else 1.0)
        err = max_err(got, ref)
        assert err <= bound, f"{case.id} {backend} {dtype}: {name} max err {err:.3e} > bound {bound:.3e}"
    return raw

