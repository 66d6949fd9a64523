"""backend="torch" (divattn.ops.torch_backend: torch's flash kernel on a CPU, SDPA
compositions elsewhere) against the fp64 reference (backend="reference")."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import divattn
from divattn import flops
from divattn.ops import reference, split_qkv, spatial_attention_tokens, tokens_major, torch_backend

from .cases import ATOL, CASES, assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_matches_reference(case, dtype):
    assert_close_to_reference(case, "torch", dtype)


def _op_grads(op, order, qkv, grad_out, T, N, backend="torch"):
    """Outputs and the packed qkv gradient of ``op`` on views of ``qkv`` (B, 1 + N*T, 3, H, D)."""
    qkv = qkv.detach().requires_grad_(True)
    q, k, v, cls = split_qkv(qkv, T, N, order=order, has_cls=True)
    if op == "temporal":
        outs = [tokens_major(divattn.temporal_attention(q, k, v, backend=backend))]
    elif op == "spatial":
        outs = [tokens_major(divattn.spatial_attention(q, k, v, backend=backend))]
    elif op == "spatial_cls":
        outs = [spatial_attention_tokens(q, k, v, cls, backend=backend).flatten(2)]
    else:
        outs = [divattn.joint_attention(*qkv.unbind(2), backend=backend).flatten(2)]
    (grad,) = torch.autograd.grad(outs[0], qkv, grad_out)
    return outs[0].detach(), grad


POISON = [
    # (what, token index into the B x (1 + N*T) tokens or the upstream gradient, qkv slot)
    ("q", 7, 0), ("k", 7, 1), ("v", 7, 2), ("k", 1, 1), ("v", -1, 2),
    ("q_cls", 0, 0), ("k_cls", 0, 1), ("v_cls", 0, 2),
    ("grad", 7, None), ("grad", 0, None),
]
# Short sequences (shorter than a CPU vector) and long ones (T=17 frames, N=20 patches).
SIZES = {"T3-N5": (3, 5), "T17-N20": (17, 20)}


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("what,token,slot", POISON, ids=[f"{w}{t}" for w, t, _ in POISON])
@pytest.mark.parametrize("order", ["hwt", "thw"])
@pytest.mark.parametrize("op", ["temporal", "spatial", "spatial_cls", "joint"])
@pytest.mark.parametrize("dtype,size", [(torch.float32, "T3-N5"), (torch.float16, "T3-N5"), (torch.float32, "T17-N20")],
                         ids=["float32-T3-N5", "float16-T3-N5", "float32-T17-N20"])
def test_non_finite_exactly_where_the_reference_has_them(op, order, what, token, slot, value, dtype, size):
    """One non-finite element of q, k, v (patch or cls token) or of the upstream gradient,
    in batch 1 only, makes non-finite exactly the output and gradient elements that the
    fp64 reference makes non-finite (and none in batch 0)."""
    T, N = SIZES[size]
    B, H, D = 2, 2, 8
    gen = torch.Generator().manual_seed(5)
    qkv = torch.randn(B, 1 + N * T, 3, H, D, generator=gen, dtype=torch.float64)
    L_out = 1 + N * T if op in ("spatial_cls", "joint") else N * T
    grad_out = torch.randn(B, L_out, H * D, generator=gen, dtype=torch.float64)
    if what == "grad":
        grad_out[1, token, 3] = value
    else:
        qkv[1, token, slot, 1, 3] = value
    ref_o, ref_g = _op_grads(op, order, qkv, grad_out, T, N, backend="reference")
    got_o, got_g = _op_grads(op, order, qkv.to(dtype), grad_out.to(dtype), T, N)
    assert torch.isfinite(ref_o[0]).all() and torch.isfinite(ref_g[0]).all()
    assert torch.equal(~torch.isfinite(got_o), ~torch.isfinite(ref_o)), "outputs"
    assert torch.equal(~torch.isfinite(got_g), ~torch.isfinite(ref_g)), "gradients"


def _op_outputs(op, order, qkv, T, N, backend="torch", separate=False):
    """The outputs of ``op`` on views of ``qkv`` without autograd (inference); with
    ``separate``, on copies of the views (tensors of their own)."""
    q, k, v, cls = split_qkv(qkv, T, N, order=order, has_cls=True)
    joint = qkv.unbind(2)
    if separate:
        q, k, v, cls, joint = q.clone(), k.clone(), v.clone(), [c.clone() for c in cls], [x.clone() for x in joint]
    with torch.no_grad():
        if op == "temporal":
            return tokens_major(divattn.temporal_attention(q, k, v, backend=backend))
        if op == "spatial":
            return tokens_major(divattn.spatial_attention(q, k, v, backend=backend))
        if op == "spatial_cls":
            return spatial_attention_tokens(q, k, v, cls, backend=backend).flatten(2)
        return divattn.joint_attention(*joint, backend=backend).flatten(2)


POISON_INFERENCE = [("q", 7, 0), ("k", 1, 1), ("v", 7, 2), ("v", -1, 2), ("q_cls", 0, 0), ("v_cls", 0, 2)]


@pytest.mark.parametrize("check", ["base", "packed", "separate"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("what,token,slot", POISON_INFERENCE, ids=[f"{w}{t}" for w, t, _ in POISON_INFERENCE])
@pytest.mark.parametrize("order", ["hwt", "thw"])
@pytest.mark.parametrize("op", ["temporal", "spatial", "spatial_cls", "joint"])
@pytest.mark.parametrize("size", list(SIZES))
def test_inference_non_finite_exactly_where_the_reference_has_them(op, order, what, token, slot, value, size,
                                                                   check, monkeypatch):
    """Without autograd only q and k need checking for NaN and inf: a non-finite v goes
    through the flash kernel and still makes non-finite exactly what the fp64 reference
    does. ``separate``: q, k, v are tensors of their own, and only q and k are read;
    ``packed``: views of one qkv, q and k read through one strided view; ``base``: views
    of a small qkv, all of it read in one pass, so any non-finite entry takes the reference."""
    if check == "packed":
        monkeypatch.setattr(torch_backend, "_SMALL", 0)
    T, N = SIZES[size]
    B, H, D = 2, 2, 8
    gen = torch.Generator().manual_seed(6)
    qkv = torch.randn(B, 1 + N * T, 3, H, D, generator=gen, dtype=torch.float64)
    qkv[1, token, slot, 1, 3] = value
    ref = _op_outputs(op, order, qkv, T, N, backend="reference")
    calls = []
    for name in ("temporal", "spatial", "joint"):
        fn = getattr(reference, name)
        monkeypatch.setattr(reference, name, lambda *a, fn=fn, **kw: calls.append(fn) or fn(*a, **kw))
    got = _op_outputs(op, order, qkv.float(), T, N, separate=check == "separate")
    assert torch.isfinite(ref[0]).all()
    assert torch.equal(~torch.isfinite(got), ~torch.isfinite(ref)), "outputs"
    ok = torch.isfinite(ref)
    torch.testing.assert_close(got.double()[ok], ref[ok], rtol=0, atol=ATOL[torch.float32])
    # only a poisoned q or k that the op reads takes the reference; a poisoned v runs on flash
    read = op in ("spatial_cls", "joint") or not what.endswith("_cls")
    assert bool(calls) == (check == "base" or (what[0] in "qk" and read)), calls


@pytest.mark.parametrize("order", ["hwt", "thw"])
@pytest.mark.parametrize("B", [1, 3, 9], ids=lambda b: f"B{b}")
def test_spatial_inference_matches_reference(order, B):
    """Without autograd, spatial attention over (h w t) views runs per batch element
    (up to MAX_SPLIT_BATCH) and writes the token-major output in q's order."""
    T, N, H, D = 5, 7, 2, 16
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(B, 1 + N * T, 3, H, D, generator=gen, dtype=torch.float64)
    q, k, v, _ = split_qkv(qkv, T, N, order=order, has_cls=True)
    ref = divattn.spatial_attention(q, k, v, backend="reference")
    q, k, v, _ = split_qkv(qkv.float(), T, N, order=order, has_cls=True)
    with torch.no_grad():
        got = divattn.spatial_attention(q, k, v, backend="torch")
    assert tokens_major(got).is_contiguous()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=ATOL[torch.float32])


@pytest.mark.parametrize("order", ["hwt", "thw"])
def test_outputs_are_token_major_in_q_order(order):
    qkv = torch.randn(2, 1 + 5 * 3, 3, 2, 16)
    q, k, v, cls = split_qkv(qkv, 3, 5, order=order, has_cls=True)
    for fn in (divattn.temporal_attention, divattn.spatial_attention):
        o = fn(q, k, v, backend="torch")
        flat = tokens_major(o)
        assert flat.data_ptr() == o.data_ptr() and flat.is_contiguous()
    o, o_cls = divattn.spatial_attention(q, k, v, cls, backend="torch")
    assert o_cls.data_ptr() == o.data_ptr() - 2 * 16 * o.element_size()
    assert divattn.joint_attention(*qkv.unbind(2), backend="torch").is_contiguous()


@pytest.mark.parametrize("op,shape", [("temporal", (2, 5, 7, 3, 16)), ("spatial", (2, 5, 7, 3, 16)),
                                      ("spatial_cls", (2, 5, 7, 3, 16)), ("joint", (2, 11, 3, 16))])
def test_flop_counter_counts_the_attention(op, shape):
    xs = [torch.randn(shape, requires_grad=True) for _ in range(3)]
    with FlopCounterMode(display=False) as fc:
        if op == "joint":
            outs = [divattn.joint_attention(*xs, backend="torch")]
        elif op == "spatial_cls":
            cls = [torch.randn(shape[0], *shape[3:], requires_grad=True) for _ in range(3)]
            outs = list(divattn.spatial_attention(*xs, cls, backend="torch"))
        else:
            fn = divattn.temporal_attention if op == "temporal" else divattn.spatial_attention
            outs = [fn(*xs, backend="torch")]
    assert fc.get_total_flops() == flops.attention_flops(op, shape, "fwd")
    with FlopCounterMode(display=False) as fc:
        sum(o.sum() for o in outs).backward()
    assert fc.get_total_flops() == flops.attention_flops(op, shape, "bwd")


@pytest.mark.parametrize("order", ["hwt", "thw"])
def test_compiles_fullgraph(order):

    def block(qkv):
        q, k, v, cls = split_qkv(qkv, 3, 5, order=order, has_cls=True)
        o = tokens_major(divattn.temporal_attention(q, k, v, backend="torch"))
        s = tokens_major(divattn.spatial_attention(q, k, v, backend="torch"))
        toks = spatial_attention_tokens(q, k, v, cls, backend="torch")
        j = divattn.joint_attention(*qkv.unbind(2), backend="torch")
        return o.sum() + s.square().sum() + toks.sum() * 0.5 + j.mean()

    qkv = torch.randn(1, 1 + 5 * 3, 3, 2, 16, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    (g_eager,) = torch.autograd.grad(block(qkv), qkv)
    out = compiled(qkv)
    (g_comp,) = torch.autograd.grad(out, qkv)
    torch.testing.assert_close(out, block(qkv))
    torch.testing.assert_close(g_comp, g_eager)


@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_non_finite_key_frame_that_no_query_frame_is(value, causal):
    """With queries for the last frames only, a non-finite value in an earlier key frame
    still propagates exactly as in the reference (the finiteness check covers all of k)."""
    B, T, N, H, D = 2, 17, 3, 2, 8
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(B, N * T, 3, H, D, generator=gen, dtype=torch.float64)
    qkv[1, 0, 1, 1, 3] = value  # thw: token 0 is frame 0 of patch 0; slot 1 is k
    grad_out = torch.randn(B, 3, N, H, D, generator=gen, dtype=torch.float64)

    def outs(backend):
        x = qkv.to(torch.float32).requires_grad_(True)
        q, k, v = split_qkv(x, T, N, order="thw", has_cls=False)
        o = divattn.temporal_attention(q[:, -3:], k, v, causal=causal, backend=backend)
        (g,) = torch.autograd.grad(o, x, grad_out.to(o.dtype))
        return o.detach(), g

    ref = outs("reference")
    got = outs("torch")
    for a, b in zip(got, ref):
        assert torch.equal(~torch.isfinite(a), ~torch.isfinite(b))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("order,has_cls", [("hwt", True), ("hwt", False), ("thw", True), ("thw", False)],
                         ids=["hwt-cls", "hwt", "thw-cls", "thw"])
def test_temporal_inference_matches_reference(order, has_cls, causal):
    """Without autograd, temporal attention over views that do not merge runs per batch element."""
    B, T, N, H, D = 3, 5, 7, 2, 16
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, int(has_cls) + N * T, 3, H, D, generator=gen, dtype=torch.float64)
    q, k, v, *_ = split_qkv(qkv, T, N, order=order, has_cls=has_cls)
    ref = divattn.temporal_attention(q, k, v, causal=causal, backend="reference")
    q, k, v, *_ = split_qkv(qkv.float(), T, N, order=order, has_cls=has_cls)
    with torch.no_grad():
        got = divattn.temporal_attention(q, k, v, causal=causal, backend="torch")
        last = divattn.temporal_attention(q[:, -2:], k, v, causal=causal, backend="torch")
    assert tokens_major(got).is_contiguous()
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=ATOL[torch.float32])
    torch.testing.assert_close(last.double(), ref[:, -2:], rtol=0, atol=ATOL[torch.float32])


@pytest.mark.parametrize("order", ["hwt", "thw"])
def test_torch_func_grad_matches_autograd(order):
    """Under torch.func transforms the ops are composed from SDPA (the flash path's
    autograd.Function has no functorch rule); the gradients are autograd's."""
    qkv = torch.randn(2, 1 + 5 * 3, 3, 2, 8, generator=torch.Generator().manual_seed(4))

    def loss(x):
        q, k, v, cls = split_qkv(x, 3, 5, order=order, has_cls=True)
        t = tokens_major(divattn.temporal_attention(q, k, v, backend="torch"))
        s = spatial_attention_tokens(q, k, v, cls, backend="torch")
        j = divattn.joint_attention(*x.unbind(2), backend="torch")
        return t.square().sum() + s.sum() + j.mean()

    x = qkv.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss(x), x)
    torch.testing.assert_close(torch.func.grad(loss)(qkv), expected)
