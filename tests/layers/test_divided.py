"""DividedSpaceTimeAttention equals the official block (output and every gradient) and
makes no rearrange/cat/repeat copies on its fast path."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from divattn.layers import DividedSpaceTimeAttention, add_after_first
from divattn.ops import BACKENDS

from ..conftest import DEVICE
from ..official import divided_block_attention

SHAPES = [
    pytest.param(2, 8, 9, 3, 48, id="B2-T8-N9-H3-C48"),
    pytest.param(1, 3, 49, 2, 80, id="B1-T3-N49-H2-C80"),
    pytest.param(2, 1, 4, 1, 40, id="B2-T1-N4-H1-C40"),
]


def _skip_unless(backend):
    why = BACKENDS[backend].not_supported_reasons("spatial_cls", torch.float32, DEVICE, 64)
    if why:
        pytest.skip(f"{backend}: {'; '.join(why)}")


def _layer(C, H, T, order, backend, seed=0):
    torch.manual_seed(seed)
    layer = DividedSpaceTimeAttention(C, H, T, qkv_bias=True, token_order=order, backend=backend)
    with torch.no_grad():
        for name, prm in layer.named_parameters():
            if name.endswith("bias") or "norm" in name:
                prm.add_(0.1 * torch.randn_like(prm))  # default init zeroes biases: make them count
    return layer.to(DEVICE)


def _to_hwt(x, T, N):
    """(t h w) tokens -> (h w t) tokens, cls first."""
    B, _, C = x.shape
    return torch.cat([x[:, :1], x[:, 1:].reshape(B, T, N, C).transpose(1, 2).reshape(B, N * T, C)], 1)


@pytest.mark.parametrize("order", ["hwt", "thw"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("B,T,N,H,C", SHAPES)
def test_matches_official_block(B, T, N, H, C, backend, order):
    _skip_unless(backend)
    layer = _layer(C, H, T, order, backend)
    x = torch.randn(B, 1 + N * T, C, device=DEVICE, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    params = dict(layer.named_parameters())
    grads = torch.autograd.grad((y * g).sum(), [x, *params.values()])

    p64 = {k: v.detach().double().cpu().requires_grad_(True) for k, v in params.items()}
    x64 = x.detach().double().cpu().requires_grad_(True)
    g64 = g.double().cpu()
    if order == "thw":
        want = _to_hwt(divided_block_attention(_to_hwt(x64, T, N), p64, T, H), N, T)  # back to (t h w)
    else:
        want = divided_block_attention(x64, p64, T, H)
    want_grads = torch.autograd.grad((want * g64).sum(), [x64, *p64.values()])

    torch.testing.assert_close(y.double().cpu(), want, rtol=1e-5, atol=2e-5)
    for name, got, ref in zip(["x", *params], grads, want_grads):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_fast_path_has_no_rearrange_cat_or_repeat_copies():
    _skip_unless("triton")
    B, T, N, H, C = 2, 3, 4, 2, 32
    layer = _layer(C, H, T, "hwt", "triton")
    x = torch.randn(B, 1 + N * T, C, device=DEVICE, requires_grad=True)
    g = torch.randn_like(x)  # a dense upstream gradient, as the MLP after the block gives
    (layer(x) * g).sum().backward()  # warm the geometry cache
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        (layer(x) * g).sum().backward()
    events = list(prof.events())
    ops = [(e.time_range.start, e.time_range.end) for e in events if e.name.startswith("divattn::")]
    copies = []
    for e in events:
        if any(s <= e.time_range.start and e.time_range.end <= t for s, t in ops):
            continue
        assert e.name not in {"aten::cat", "aten::repeat", "aten::contiguous", "aten::permute",
                              "aten::slice_backward", "aten::select_backward", "aten::as_strided_scatter"}
        if e.name in ("aten::copy_", "aten::clone"):
            parents, p = [], e.cpu_parent
            while p is not None:
                parents.append(p.name)
                p = p.cpu_parent
            if "aten::addmm" not in parents:  # linear's bias broadcast into its output
                copies.append((e.name, list(e.input_shapes[0])))
    # Backward: the gradient of the temporal residual skips the cls row of each sample,
    # and temporal_fc's GEMM needs it dense, so it is copied once (B, N*T, C).
    assert sorted(copies) == sorted([("aten::clone", [B, N * T, C]), ("aten::copy_", [B, N * T, C])]), copies


def test_add_after_first():
    x = torch.randn(2, 5, 3, requires_grad=True)
    r = torch.randn(2, 4, 3, requires_grad=True)
    y = add_after_first(x, r)
    torch.testing.assert_close(y, torch.cat([x[:, :1], x[:, 1:] + r], 1))
    gx, gr = torch.autograd.grad((y * y.detach()).sum(), [x, r])
    torch.testing.assert_close(gx, y.detach())
    torch.testing.assert_close(gr, y.detach()[:, 1:])
    with pytest.raises(ValueError, match="do not fit"):
        add_after_first(x, r[:, 1:])


def test_rejects_token_count_not_matching_num_frames():
    layer = DividedSpaceTimeAttention(16, 2, 4, backend="torch")
    with pytest.raises(ValueError, match="num_frames = 4"):
        layer(torch.randn(1, 1 + 7, 16))
