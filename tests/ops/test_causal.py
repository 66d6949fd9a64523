"""Causal temporal attention and queries for the last frames (Tq < Tk): every backend
against the fp64 reference (forward and all gradients), frame-by-frame generation
against the full causal forward, bad inputs, the no-copy fast path, determinism,
torch.compile, and the launchers' ``causal`` flag."""

import dataclasses
import re

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import divattn
from divattn import BackendError
from divattn.ops import BACKENDS, dispatch, reference, split_qkv, tokens_major

from ..conftest import DEVICE
from .cases import CAUSAL_CASES, Spy, assert_causal_close_to_reference, copies_outside_ops, packed_qkv

BACKEND_NAMES = [name for name in BACKENDS if name != "reference"]


def _features(tq: int, tk: int, causal: bool) -> tuple:
    return (("causal",) if causal else ()) + (("fewer_queries",) if tq != tk else ())


def _needs(backend: str, dtype=torch.float32, features=("causal",), head_dim=64):
    reasons = BACKENDS[backend].not_supported_reasons("temporal", dtype, DEVICE, head_dim, features)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("cc", [pytest.param(c, id=c.id) for c in CAUSAL_CASES])
def test_matches_reference(cc, backend):
    _needs(backend, torch.float32, _features(cc.tq, cc.case.T, cc.causal), cc.case.D)
    assert_causal_close_to_reference(cc, backend, torch.float32)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("cc", [pytest.param(c, id=c.id) for c in (CAUSAL_CASES[2], CAUSAL_CASES[7])])
def test_matches_reference_fp16(cc, backend):
    _needs(backend, torch.float16, _features(cc.tq, cc.case.T, cc.causal), cc.case.D)
    assert_causal_close_to_reference(cc, backend, torch.float16)


def test_reference_mask_is_bottom_right():
    """Query frame i of Tq is frame Tk - Tq + i and sees key frames 0 .. Tk - Tq + i."""
    for tq, tk in [(1, 1), (3, 3), (1, 5), (2, 5), (0, 4)]:
        mask = reference.causal_mask(tq, tk)
        for i in range(tq):
            assert mask[i].tolist() == [j <= tk - tq + i for j in range(tk)]
    # the first frame of a full causal forward sees only itself: its output is its value
    q, k, v = (torch.randn(2, 4, 3, 2, 8, dtype=torch.float64) for _ in range(3))
    o = divattn.temporal_attention(q, k, v, causal=True, backend="torch")
    torch.testing.assert_close(o[:, 0], v[:, 0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("order", ["hwt", "thw"])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_generation_frame_by_frame_equals_the_full_causal_forward(backend, order, chunk):
    """Rolling out ``chunk`` frames at a time (queries for the new frames, keys and
    values of every frame so far, as a model's cache holds them) gives the full causal
    forward's outputs, and the gradients the steps send to q, k and v sum to its gradients."""
    _needs(backend, torch.float32, ("causal", "fewer_queries"), 16)
    T, N = 7, 3
    base, q, k, v, _ = packed_qkv(2, T, N, 2, 16, order)
    full = divattn.temporal_attention(q, k, v, causal=True, backend=backend)
    g = torch.randn(full.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    (grad_full,) = torch.autograd.grad((full * g).sum(), base)

    steps, loss = [], 0.0
    for t0 in range(0, T, chunk):
        t1 = min(t0 + chunk, T)
        o = divattn.temporal_attention(q[:, t0:t1], k[:, :t1], v[:, :t1], causal=True, backend=backend)
        assert o.shape == (2, t1 - t0, N, 2, 16)
        steps.append(o)
        loss = loss + (o * g[:, t0:t1]).sum()
    (grad_steps,) = torch.autograd.grad(loss, base)
    torch.testing.assert_close(torch.cat(steps, 1), full)
    torch.testing.assert_close(grad_steps, grad_full)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_one_query_frame_causal_is_the_non_causal_op(backend):
    """The last frame sees every frame: causal and non-causal agree for Tq = 1."""
    _needs(backend, torch.float32, ("causal", "fewer_queries"), 16)
    q = torch.randn(2, 1, 5, 2, 16, device=DEVICE)
    k, v = (torch.randn(2, 6, 5, 2, 16, device=DEVICE) for _ in range(2))
    a = divattn.temporal_attention(q, k, v, causal=True, backend=backend)
    b = divattn.temporal_attention(q, k, v, causal=False, backend=backend)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_no_query_frames(backend):
    """Tq = 0 against Tk = 3: an empty output, and zero gradients for k and v."""
    _needs(backend, torch.float32, ("causal", "fewer_queries"), 16)
    q = torch.randn(2, 0, 5, 2, 16, device=DEVICE, requires_grad=True)
    k, v = (torch.randn(2, 3, 5, 2, 16, device=DEVICE, requires_grad=True) for _ in range(2))
    o = divattn.temporal_attention(q, k, v, causal=True, backend=backend)
    assert o.shape == (2, 0, 5, 2, 16)
    for g in torch.autograd.grad(o.sum(), (q, k, v), allow_unused=True):
        assert g is None or not g.any()


def _qkv(B=1, Tq=2, Tk=3, N=4, H=2, D=8):
    return torch.randn(B, Tq, N, H, D), torch.randn(B, Tk, N, H, D), torch.randn(B, Tk, N, H, D)


def test_more_query_than_key_frames_names_the_shapes():
    q, k, v = _qkv(Tq=5, Tk=3)
    with pytest.raises(ValueError, match=r"q has Tq = 5 frames, more than the Tk = 3 of k and v \(q shape "
                                         r"\(1, 5, 4, 2, 8\), k shape \(1, 3, 4, 2, 8\)\)"):
        divattn.temporal_attention(q, k, v, causal=True, backend="torch")
    with pytest.raises(ValueError, match="Tq = 5"):
        divattn.temporal_attention(q, k, v, backend="torch")


@pytest.mark.parametrize("dim,size", [(0, 2), (2, 5), (3, 3), (4, 16)], ids=["B", "N", "H", "D"])
def test_keys_must_match_queries_except_in_frames(dim, size):
    q, k, v = _qkv()
    shape = list(k.shape)
    shape[dim] = size
    bad = torch.randn(shape)
    want = tuple(q.shape[:1]) + (3,) + tuple(q.shape[2:])
    with pytest.raises(ValueError, match=re.escape(f"k has shape {tuple(shape)}, expected {want} like q")):
        divattn.temporal_attention(q, bad, bad, causal=True, backend="torch")


def test_values_must_have_the_key_frames():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match=r"v has shape \(1, 2, 4, 2, 8\), expected \(1, 3, 4, 2, 8\) like k"):
        divattn.temporal_attention(q, k, torch.randn(1, 2, 4, 2, 8), causal=True, backend="torch")


def test_backend_without_the_features_refuses_with_a_sentence(monkeypatch):
    """A forced backend that declares neither feature names them (every backend serves both today)."""
    for name in BACKENDS:
        assert {"causal", "fewer_queries"} <= set(BACKENDS[name].features), name
    monkeypatch.setitem(BACKENDS, "cuda", dataclasses.replace(BACKENDS["cuda"], features=()))
    q, k, v = _qkv()
    with pytest.raises(BackendError) as e:
        divattn.temporal_attention(q, k, v, causal=True, backend="cuda")
    msg = str(e.value)
    assert "cannot run temporal attention (causal, fewer_queries)" in msg
    cuda_line = next(line for line in msg.splitlines() if line.startswith("  cuda: "))
    assert dispatch.FEATURES["causal"] + " is not implemented" in cuda_line
    assert dispatch.FEATURES["fewer_queries"] + " is not implemented" in cuda_line
    for name in BACKENDS:
        reasons = BACKENDS[name].not_supported_reasons("temporal", q.dtype, q.device, 8, ("causal", "fewer_queries"))
        assert f"  {name}: " + ("; ".join(reasons) or "available") in msg
    reasons = BACKENDS["cuda"].not_supported_reasons("temporal", torch.float16, torch.device("cuda"), 64, ("causal",))
    assert dispatch.FEATURES["causal"] + " is not implemented" in reasons
    assert not any("not implemented" in r for r in BACKENDS["cuda"].not_supported_reasons(
        "temporal", torch.float16, torch.device("cuda"), 64))
    with pytest.raises(ValueError, match="unknown feature 'sliding'"):
        BACKENDS["torch"].not_supported_reasons("temporal", torch.float32, torch.device("cpu"), 8, ("sliding",))


def test_auto_dispatch_skips_backends_without_the_feature(monkeypatch):
    """A backend that does not declare causal is passed over by auto-dispatch."""
    monkeypatch.setitem(BACKENDS, "triton", dataclasses.replace(BACKENDS["triton"], features=()))
    be = dispatch.select("temporal", torch.float32, DEVICE, 16, None, ("causal",))
    assert be.name != "triton" and "causal" in be.features
    with pytest.raises(BackendError, match=r"triton: causal attention \(frame t attends to frames 0..t\) is not"):
        dispatch.select("temporal", torch.float32, DEVICE, 16, "triton", ("causal",))


@pytest.mark.parametrize("tq", [8, 1], ids=["Tq8", "Tq1"])
@pytest.mark.parametrize("order", ["hwt", "thw"])
def test_fast_path_makes_no_copy(order, tq, monkeypatch):
    """Causal, and the last frame against all frames: the kernels see the caller's views,
    get ``causal=True``, write the returned buffer and the gradients into one buffer
    laid out like the qkv."""
    backend = "triton"
    _needs(backend, torch.float32, _features(tq, 8, True), 16)
    B, T, N, H, D = 2, 8, 5, 2, 16
    base, q, k, v, _ = packed_qkv(B, T, N, H, D, order)
    qs = q[:, T - tq:]
    weight = torch.randn(B, tq * N, H * D, device=DEVICE)

    def step():
        out = divattn.temporal_attention(qs, k, v, causal=True, backend=backend)
        (grad,) = torch.autograd.grad((tokens_major(out) * weight).sum(), base)
        return out, grad

    step()
    spy = Spy(monkeypatch, backend)
    calls = []
    mod = BACKENDS[backend].kernels()
    for name in ("forward", "backward"):
        wrapped = getattr(mod, name)

        def record(*a, _wrapped=wrapped, _name=name, **kw):
            calls.append((_name, kw.get("causal")))
            return _wrapped(*a, **kw)

        monkeypatch.setattr(mod, name, record)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out, grad = step()
    assert copies_outside_ops(prof) == []
    assert calls == [("forward", True), ("backward", True)]
    (f,), (b,) = spy.fwd, spy.bwd
    for got, mine in zip((f["q"], f["k"], f["v"]), (qs, k, v)):
        assert got.data_ptr() == mine.data_ptr() and got.stride() == mine.stride() and got.shape == mine.shape
    assert f["o"].untyped_storage().data_ptr() == out.untyped_storage().data_ptr()
    assert {x.untyped_storage().data_ptr() for x in (b["dq"], b["dk"], b["dv"])} == {grad.untyped_storage().data_ptr()}
    assert b["dq"].shape == qs.shape and b["dk"].shape == k.shape
    assert (grad[:, 0] == 0).all()  # the cls rows are not read
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("tq", [13, 4], ids=["Tq13", "Tq4"])
def test_backward_is_bitwise_deterministic(tq):
    _needs("triton", torch.float32, _features(tq, 13, True), 40)
    runs = []
    for _ in range(2):
        base, q, k, v, _ = packed_qkv(2, 13, 7, 2, 40, "hwt")
        o = divattn.temporal_attention(q[:, 13 - tq:], k, v, causal=True, backend="triton")
        (grad,) = torch.autograd.grad((o * (1 + o.detach())).sum(), base)
        runs.append(grad)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_compiles_fullgraph(backend):
    """A causal step and a last-frame step in one graph; outputs and gradients as eager."""
    _needs(backend, torch.float32, ("causal", "fewer_queries"), 16)
    T, N = 3, 5

    def block(base):
        q, k, v, _ = split_qkv(base.view(1, 1 + N * T, 3, 2, 16), T, N, order="hwt", has_cls=True)
        full = divattn.temporal_attention(q, k, v, causal=True, backend=backend)
        last = divattn.temporal_attention(q[:, -1:], k, v, causal=True, backend=backend)
        return tokens_major(full).sum() + tokens_major(last).square().sum()

    base = torch.randn(1, 1 + N * T, 3 * 2 * 16, device=DEVICE, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    (g_eager,) = torch.autograd.grad(block(base), base)
    out = compiled(base)
    (g_comp,) = torch.autograd.grad(out, base)
    torch.testing.assert_close(out, block(base))
    torch.testing.assert_close(g_comp, g_eager)
