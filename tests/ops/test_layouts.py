"""Layout guarantees: no copies on the fast path, token-major outputs, packed gradients,
NaN in padding never leaks, empty inputs, large fp16 inputs, deterministic backward."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import divattn
from divattn.ops import split_qkv, spatial_attention_tokens, tokens_major

from ..conftest import DEVICE
from .cases import Case, Spy, assert_close_to_reference, copies_outside_ops, packed_qkv, skip_reason

BACKEND = "triton"


def _needs(op, dtype=torch.float32, backend=BACKEND):
    why = skip_reason(backend, op, dtype)
    if why:
        pytest.skip(f"{backend}: {why}")


@pytest.mark.parametrize("order", ["hwt", "thw"])
@pytest.mark.parametrize("op", ["temporal", "spatial_cls"])
def test_fast_path_makes_no_copy(op, order, monkeypatch):
    """The kernels see the caller's views, write the returned buffer, and write the
    gradients into one buffer laid out like the qkv, which is what autograd returns."""
    _needs(op)
    B, T, N, H, D = 2, 3, 5, 2, 16
    base, q, k, v, cls = packed_qkv(B, T, N, H, D, order)

    # What the next layer does: read the output as (B, tokens, C) and project it.
    weight = torch.randn(B, T * N + (op != "temporal"), H * D, device=DEVICE)

    def step():
        if op == "temporal":
            out = divattn.temporal_attention(q, k, v, backend=BACKEND)
            flat = tokens_major(out)
        else:
            out = spatial_attention_tokens(q, k, v, cls, backend=BACKEND)
            flat = out.view(B, 1 + T * N, H * D)
        (grad,) = torch.autograd.grad((flat * weight).sum(), base)
        return out, grad

    step()  # geometry checks are cached after the first call
    spy = Spy(monkeypatch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, grad = step()
    assert copies_outside_ops(prof) == []

    (f,), (b,) = spy.fwd, spy.bwd
    for got, mine in zip((f["q"], f["k"], f["v"]), (q, k, v)):
        assert got.data_ptr() == mine.data_ptr() and got.stride() == mine.stride()
    assert f["o"].untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    grads = [b["dq"], b["dk"], b["dv"], *(b["d_cls"] or ())]
    assert {g.untyped_storage().data_ptr() for g in grads} == {grad.untyped_storage().data_ptr()}
    assert b["dq"].stride() == q.stride()
    if op == "temporal":
        # the cls rows of the qkv are not read by temporal attention: exactly zero gradient
        assert (grad[:, 0] == 0).all()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("order", ["hwt", "thw"])
def test_outputs_are_token_major_in_q_order(order):
    _needs("spatial_cls")
    B, T, N, H, D = 2, 3, 5, 2, 16
    _, q, k, v, cls = packed_qkv(B, T, N, H, D, order)
    o = divattn.temporal_attention(q, k, v, backend=BACKEND)
    flat = tokens_major(o)
    assert flat.data_ptr() == o.data_ptr() and flat.shape == (B, T * N, H * D) and flat.is_contiguous()
    if order == "hwt":
        assert o.stride()[1:3] == (H * D, T * H * D)  # token 1 + n*T + t
    else:
        assert o.stride()[1:3] == (N * H * D, H * D)  # token t*N + n
    o, o_cls = divattn.spatial_attention(q, k, v, cls, backend=BACKEND)
    toks = spatial_attention_tokens(q, k, v, cls, backend=BACKEND)
    assert o_cls.data_ptr() == o.data_ptr() - H * D * o.element_size()
    torch.testing.assert_close(toks[:, 0], o_cls, rtol=0, atol=0)
    torch.testing.assert_close(toks[:, 1:].reshape(B, T * N, H, D), tokens_major(o).view(B, T * N, H, D), rtol=0, atol=0)


@pytest.mark.parametrize("op", ["temporal", "spatial_cls", "joint"])
def test_nan_past_the_end_never_reaches_outputs(op):
    """q/k/v are slices of a buffer whose extra tokens and head-dim columns are NaN."""
    _needs(op)
    assert_close_to_reference(Case(op, 2, 3, 5, 2, 40, "hwt", "sliced"), BACKEND, torch.float32)


@pytest.mark.parametrize("shape", [(0, 3, 5, 2, 16), (2, 0, 5, 2, 16), (2, 3, 0, 2, 16), (2, 3, 5, 0, 16)],
                         ids=["B0", "T0", "N0", "H0"])
@pytest.mark.parametrize("op", ["temporal", "spatial", "joint"])
@pytest.mark.parametrize("backend", [BACKEND, "torch"])
def test_empty_inputs_give_empty_outputs_and_zero_grads(op, shape, backend):
    _needs(op, backend=backend)
    B, T, N, H, D = shape
    xs = [torch.randn(B, T, N, H, D, device=DEVICE, requires_grad=True) for _ in range(3)]
    if op == "joint":
        q, k, v = (x.view(B, T * N, H, D) for x in xs)
        o = divattn.joint_attention(q, k, v, backend=backend)
    else:
        fn = divattn.temporal_attention if op == "temporal" else divattn.spatial_attention
        o = fn(*xs, backend=backend)
    assert o.numel() == 0 and o.shape == xs[0].shape[:1] + o.shape[1:]
    grads = torch.autograd.grad(o.sum(), xs, allow_unused=True)
    for g, x in zip(grads, xs):
        assert g is None or (g.shape == x.shape and not g.any())


@pytest.mark.parametrize("backend", [BACKEND, "torch"])
def test_spatial_cls_without_patches_attends_to_cls_only(backend):
    """N = 0: every frame's only key is the cls token, so o_cls == v_cls."""
    _needs("spatial_cls", backend=backend)
    B, T, H, D = 2, 3, 2, 16
    xs = [torch.randn(B, T, 0, H, D, device=DEVICE, requires_grad=True) for _ in range(3)]
    cls = [torch.randn(B, H, D, device=DEVICE, requires_grad=True) for _ in range(3)]
    o, o_cls = divattn.spatial_attention(*xs, cls, backend=backend)
    assert o.numel() == 0
    torch.testing.assert_close(o_cls, cls[2])
    g = torch.randn_like(o_cls)
    dq, dk, dv = torch.autograd.grad((o_cls * g).sum(), cls)
    assert not dq.any() and not dk.any()
    torch.testing.assert_close(dv, g)


@pytest.mark.parametrize("op", ["temporal", "spatial_cls"])
def test_fp16_inputs_scaled_by_ten_stay_finite(op):
    _needs(op, torch.float16)
    B, T, N, H, D = 2, 8, 13, 2, 64
    gen = torch.Generator().manual_seed(1)
    qkv = (torch.randn(B, 1 + N * T, 3, H, D, generator=gen) * 10).to(DEVICE, torch.float16).requires_grad_(True)
    q, k, v, cls = split_qkv(qkv, T, N, order="hwt", has_cls=True)
    ref = split_qkv(qkv.detach().double().cpu(), T, N, order="hwt", has_cls=True)
    if op == "temporal":
        o, r = divattn.temporal_attention(q, k, v, backend=BACKEND), divattn.temporal_attention(*ref[:3], backend="torch")
        outs, refs = [o], [r]
    else:
        outs = list(divattn.spatial_attention(q, k, v, cls, backend=BACKEND))
        refs = list(divattn.spatial_attention(*ref, backend="torch"))
    (grad,) = torch.autograd.grad(sum(o.float().sum() for o in outs), qkv)
    for o, r in zip(outs, refs):
        assert torch.isfinite(o).all()
        # softmax of logits ~ +-800 is one-hot-like; fp16 rounding of the output is the bar
        assert (o.double().cpu() - r).abs().max() <= 1e-2 * r.abs().max()
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("op", ["temporal", "spatial_cls", "joint"])
def test_backward_is_bitwise_deterministic(op):
    _needs(op)
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(3)
        qkv = torch.randn(2, 1 + 49 * 3, 3, 2, 40, generator=gen).to(DEVICE).requires_grad_(True)
        q, k, v, cls = split_qkv(qkv, 3, 49, order="hwt", has_cls=True)
        if op == "temporal":
            outs = [divattn.temporal_attention(q, k, v, backend=BACKEND)]
        elif op == "joint":
            outs = [divattn.joint_attention(*qkv.unbind(2), backend=BACKEND)]
        else:
            outs = list(divattn.spatial_attention(q, k, v, cls, backend=BACKEND))
        (grad,) = torch.autograd.grad(sum((o * (1 + o.detach())).sum() for o in outs), qkv)
        runs.append(grad)
    assert torch.equal(runs[0], runs[1])


def test_compiles_fullgraph():
    """The ops are torch.library custom ops: torch.compile captures them in one graph."""
    _needs("spatial_cls")
    B, T, N, H, D = 1, 3, 5, 2, 16

    def block(qkv):
        q, k, v, cls = split_qkv(qkv, T, N, order="hwt", has_cls=True)
        o = divattn.temporal_attention(q, k, v, backend=BACKEND)
        toks = spatial_attention_tokens(q, k, v, cls, backend=BACKEND)
        return tokens_major(o).sum() + toks.sum() * 0.5

    qkv = torch.randn(B, 1 + N * T, 3, H, D, device=DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    (g_eager,) = torch.autograd.grad(block(qkv), qkv)
    out = compiled(qkv)
    (g_comp,) = torch.autograd.grad(out, qkv)
    torch.testing.assert_close(out, block(qkv))
    torch.testing.assert_close(g_comp, g_eager)
