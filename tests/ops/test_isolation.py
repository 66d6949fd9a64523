"""Sequences stay isolated: a NaN or inf in one sequence reaches only what it would in PyTorch.

One element of q, k, v, the cls q/k/v or the upstream gradient is made non-finite; the
outputs and the qkv gradient of every backend must be non-finite exactly where the
fp64 reference's are — in particular, a sequence that shares a packed tile with the
poisoned one stays finite. The Triton kernels run with the CPU interpreter's tiles and
with the tiles a GPU (sm_90) gets, so the packings a GPU uses are covered too.
"""

import pytest
import torch

from .cases import ISO_D as D
from .cases import ISOLATION_CASES, TILES, isolation_run, poisoned_qkv, skip_reason


@pytest.fixture(params=TILES)
def tiles(request, monkeypatch):
    if request.param == "sm90":
        from divattn.ops.triton import plan

        monkeypatch.setattr(plan, "_target", lambda device, target: 90 if target is None else target)
    return request.param


@pytest.mark.parametrize("backend", ["triton", "cuda", "torch"])
@pytest.mark.parametrize("op,N,order,where,value", ISOLATION_CASES)
def test_non_finite_stays_in_its_sequence(op, N, order, where, value, backend, tiles):
    dtype = torch.float32
    why = skip_reason(backend, op, dtype, D)
    if why:
        pytest.skip(f"{backend}: {why}")
    if tiles != "interpreter" and backend != "triton":
        pytest.skip("tile configurations are the Triton backend's")
    qkv, grad = poisoned_qkv(op, N, order, where, value, dtype)
    ref_o, ref_g = isolation_run(op, N, order, qkv.double(), grad.double(), "reference")
    got_o, got_g = isolation_run(op, N, order, qkv, grad, backend)
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
