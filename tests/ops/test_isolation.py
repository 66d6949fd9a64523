"""Sequences stay isolated: a NaN or inf in one sequence reaches only what it would in PyTorch.

One element of q, k, v, the cls q/k/v or the upstream gradient is made non-finite; the
outputs and the qkv gradient of every backend must be non-finite exactly where the
fp64 reference's are — in particular, a sequence that shares a packed tile with the
poisoned one stays finite. The Triton kernels run with the CPU interpreter's tiles and
with the tiles a GPU (sm_90) gets, so the packings a GPU uses are covered too.
"""

import math

import pytest
import torch

import divattn

from ..conftest import DEVICE
from .cases import skip_reason

B, T, H, D = 1, 8, 2, 16
POS = dict(b=0, t=3, n=5, h=1, d=2)  # the poisoned element
# (op, N): temporal packs 8-frame sequences; spatial N=7 (+cls: 8 rows) packs frames.
OPS = [("temporal", 16), ("spatial", 7), ("spatial_cls", 7), ("spatial_cls", 16)]
TILES = ["interpreter", "sm90"]


def _qkv(op: str, N: int, order: str, where: str, value: float, dtype: torch.dtype):
    has_cls = op == "spatial_cls"
    gen = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, int(has_cls) + N * T, 3, H, D, generator=gen, dtype=torch.float64)
    grad = torch.randn(B, int(has_cls) + N * T, H, D, generator=gen, dtype=torch.float64)
    b, t, n, h, d = POS.values()
    token = int(has_cls) + (n * T + t if order == "hwt" else t * N + n)
    if where in ("q", "k", "v"):
        qkv[b, token, "qkv".index(where), h, d] = value
    elif where in ("q_cls", "k_cls", "v_cls"):
        qkv[b, 0, "qkv".index(where[0]), h, d] = value
    elif where == "do":
        grad[b, token, h, d] = value
    elif where == "do_cls":
        grad[b, 0, h, d] = value
    return qkv.to(dtype), grad.to(dtype)


def _run(op: str, N: int, order: str, qkv: torch.Tensor, grad: torch.Tensor, backend):
    """The output tokens ``(B, [1 +] T*N, ...)`` in storage order and the qkv gradient."""
    has_cls = op == "spatial_cls"
    qkv = qkv.detach().to(DEVICE).requires_grad_(True)
    views = divattn.split_qkv(qkv, T, N, order=order, has_cls=has_cls)
    q, k, v = views[:3]
    if has_cls:
        out = divattn.ops.spatial_attention_tokens(q, k, v, views[3], backend=backend)
    else:
        fn = divattn.temporal_attention if op == "temporal" else divattn.spatial_attention
        out = divattn.tokens_major(fn(q, k, v, backend=backend))
    (d_qkv,) = torch.autograd.grad(out, qkv, grad.to(DEVICE).reshape(out.shape))
    return out.detach(), d_qkv


@pytest.fixture(params=TILES)
def tiles(request, monkeypatch):
    if request.param == "sm90":
        from divattn.ops import triton_kernels

        monkeypatch.setattr(triton_kernels, "_target", lambda device, target: 90 if target is None else target)
    return request.param


WHERE = ["q", "k", "v", "do"]
WHERE_CLS = WHERE + ["q_cls", "k_cls", "v_cls", "do_cls"]
# NaN and inf alternate over the poisoned tensors, the other way round in the other order.
CASES = [
    pytest.param(op, N, order, where, value, id=f"{op}-N{N}-{order}-{where}-{value}")
    for op, N in OPS
    for j, order in enumerate(("hwt", "thw"))
    for i, where in enumerate(WHERE_CLS if op == "spatial_cls" else WHERE)
    for value in [(math.nan, math.inf)[(i + j) % 2]]
]


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("op,N,order,where,value", CASES)
def test_non_finite_stays_in_its_sequence(op, N, order, where, value, backend, tiles):
    dtype = torch.float32
    why = skip_reason(backend, op, dtype, D)
    if why:
        pytest.skip(f"{backend}: {why}")
    if tiles != "interpreter" and backend != "triton":
        pytest.skip("tile configurations are the Triton backend's")
    qkv, grad = _qkv(op, N, order, where, value, dtype)
    ref_o, ref_g = _run(op, N, order, qkv.double(), grad.double(), "reference")
    got_o, got_g = _run(op, N, order, qkv, grad, backend)
    bad_ref_o, bad_got_o = ~torch.isfinite(ref_o), ~torch.isfinite(got_o.cpu())
    bad_ref_g, bad_got_g = ~torch.isfinite(ref_g), ~torch.isfinite(got_g.cpu())
    assert bad_ref_o.any() or bad_ref_g.any(), "the poison must reach something"
    assert torch.equal(bad_got_o, bad_ref_o), (
        f"outputs non-finite at {bad_got_o.nonzero().tolist()[:8]}, reference at {bad_ref_o.nonzero().tolist()[:8]}")
    assert torch.equal(bad_got_g, bad_ref_g), (
        f"gradients non-finite at {bad_got_g.nonzero().tolist()[:8]}, reference at {bad_ref_g.nonzero().tolist()[:8]}")
    # finite values elsewhere are still right
    ok = ~bad_ref_o
    torch.testing.assert_close(got_o.cpu().double()[ok], ref_o[ok], rtol=1e-4, atol=1e-4)
    ok = ~bad_ref_g
    torch.testing.assert_close(got_g.cpu().double()[ok], ref_g[ok], rtol=1e-4, atol=1e-4)
