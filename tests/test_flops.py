"""divattn.flops: the papers' FLOP tables, and agreement with FlopCounterMode.

Paper-sized models are counted under FakeTensorMode (shapes only, nothing computed),
so these tests are fast on a CPU.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_backward_flop_count, sdpa_flop_count

import divattn
from divattn import flops
from divattn.models import create_model


def meta_model(name, **kw):
    with torch.device("meta"):
        return create_model(name, **kw)


def counted(model, video_shape, backward=False):
    """FlopCounterMode's per-op counts of one forward (and backward) on fake tensors."""
    model = model.to_empty(device="cpu")
    with FakeTensorMode(allow_non_fake_inputs=True):
        video = torch.empty(video_shape)
        with torch.set_grad_enabled(backward), FlopCounterMode(display=False) as fc:
            out = model(video)
            if backward:
                out.sum().backward()
    return {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("name,frames,size,paper", [
    # TimeSformer Table 1 / Section 4.3: TFLOPs of 3 views (1 temporal clip x 3 spatial crops).
    ("timesformer_base", 8, 224, 0.59),
    ("timesformer_hr", 16, 448, 5.11),
    ("timesformer_large", 96, 224, 7.14),
])
def test_timesformer_reproduces_the_paper(name, frames, size, paper):
    model = meta_model(name)
    assert (model.config.num_frames, model.config.img_size) == (frames, size)
    tflops = 3 * flops.macs(model, (1, 3, frames, size, size)) / 1e12
    assert abs(tflops - paper) < 0.005, f"{name}: {tflops:.4f} TFLOPs, paper {paper}"


def test_bundled_divided_block_saves_exactly_the_official_cls_copies():
    """TimeSformer-L bundled gives 7.13 (not 7.14) TFLOPs: the difference is exactly the
    official code's per-frame cls rows in the spatial qkv/proj minus the cls row the
    bundled temporal qkv computes and ignores."""
    model = meta_model("timesformer_large")
    c = model.config
    B, T, N, C = 1, 96, 196, c.embed_dim
    shape = (B, 3, T, 224, 224)
    official, bundled = flops.macs(model, shape), flops.macs(model, shape, implementation="bundled")
    extra_spatial_rows = T * (1 + N) - (1 + N * T)
    assert official - bundled == c.depth * B * (extra_spatial_rows * 4 * C * C - 3 * C * C)
    assert round(3 * bundled / 1e12, 2) == 7.13


@pytest.mark.parametrize("variant,paper", [
    # ViViT Table 2: ViViT-B/16x2, 32 frames at 224 px, GFLOPs of one view.
    ("spatio_temporal", 455.2),
    ("factorised_encoder", 284.4),
    ("factorised_self_attention", 372.3),
    ("factorised_dot_product", 277.1),
])
def test_vivit_reproduces_the_paper(variant, paper):
    model = meta_model("vivit_base", variant=variant)
    c = model.config
    assert (c.num_frames, c.img_size, c.patch_size, c.tubelet_size) == (32, 224, 16, 2)
    if variant == "factorised_encoder":
        assert c.temporal_depth == 4
    gflops = flops.macs(model, (1, 3, 32, 224, 224)) / 1e9
    assert abs(gflops - paper) / paper < 0.015, f"{variant}: {gflops:.1f} GFLOPs, paper {paper}"
    # Counted below the paper, never above: what the matmul-only count leaves out
    # (softmax, GELU, LayerNorm, adds) is what the papers' counter added.
    assert gflops < paper


MODELS = [
    ("timesformer_base", {}, (2, 3, 8, 224, 224)),
    ("timesformer_base", {}, (1, 3, 4, 96, 128)),  # another clip length and resolution than the config
    ("timesformer_base", {"attention_type": "joint_space_time"}, (1, 3, 8, 224, 224)),
    ("timesformer_base", {"attention_type": "space_only"}, (1, 3, 8, 224, 224)),
    ("vivit_base", {"variant": "spatio_temporal"}, (1, 3, 32, 224, 224)),
    ("vivit_base", {"variant": "factorised_encoder"}, (1, 3, 32, 224, 224)),
    ("vivit_base", {"variant": "factorised_self_attention"}, (1, 3, 32, 224, 224)),
    ("vivit_base", {"variant": "factorised_dot_product"}, (1, 3, 32, 224, 224)),
]


def _model_id(p):
    name, kw, shape = p
    return "-".join([name, *map(str, kw.values()), "x".join(map(str, shape[2:]))])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name,kw,shape", MODELS, ids=[_model_id(p) for p in MODELS])
def test_forward_matches_flop_counter(name, kw, shape, backend):
    """On the torch backend FlopCounterMode sees SDPA (its CPU flash op, whose formula divattn
    registers); on the kernel backend it sees the divattn::attn_fwd custom op and counts it
    with the registered formula."""
    model = meta_model(name, backend=backend, **kw)
    counts = counted(model, shape)
    expect = flops.count_macs(model, shape, implementation="bundled")
    assert sum(counts.values()) == 2 * expect.total
    assert counts["aten.convolution"] == 2 * expect.embed
    attention_op = "aten._scaled_dot_product_flash_attention_for_cpu" if backend == "torch" else "divattn.attn_fwd"
    assert counts[attention_op] == 2 * expect.attention
    assert expect.attention == sum(expect.by_op.values())


TINY = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=3)


@pytest.mark.parametrize("name,kw,shape", [
    ("timesformer_base", {"num_frames": 2}, (2, 3, 2, 32, 32)),
    ("vivit_base", {"variant": "factorised_dot_product", "num_frames": 4}, (1, 3, 4, 32, 32)),
    ("vivit_base", {"variant": "factorised_encoder", "num_frames": 4, "temporal_depth": 1}, (1, 3, 4, 32, 32)),
], ids=["timesformer-divided", "vivit-model4", "vivit-model2"])
def test_train_step_matches_flop_counter(name, kw, shape):
    """Forward + backward through the custom ops (Triton interpreter, tiny model, real
    tensors: the packed-gradient path runs) equals :func:`flops.train_step_flops`."""
    torch.manual_seed(0)
    model = create_model(name, backend="triton", **TINY, **kw)
    with FlopCounterMode(display=False) as fc:
        model(torch.randn(shape)).sum().backward()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert fc.get_total_flops() == flops.train_step_flops(model, shape)
    expect = flops.count_macs(model, shape, implementation="bundled")
    assert counts["divattn.attn_bwd"] == 5 * expect.attention


OPS = [
    ("temporal", (2, 5, 7, 3, 16)),
    ("spatial", (2, 5, 7, 3, 16)),
    ("spatial_cls", (2, 5, 7, 3, 16)),
    ("joint", (2, 11, 3, 16)),
]


def _call(op, shape, backend, requires_grad=False):
    q, k, v = (torch.randn(shape, requires_grad=requires_grad) for _ in range(3))
    if op == "temporal":
        return [divattn.temporal_attention(q, k, v, backend=backend)]
    if op == "spatial":
        return [divattn.spatial_attention(q, k, v, backend=backend)]
    if op == "joint":
        return [divattn.joint_attention(q, k, v, backend=backend)]
    B, _, _, H, D = shape
    cls = tuple(torch.randn(B, H, D, requires_grad=requires_grad) for _ in range(3))
    return list(divattn.spatial_attention(q, k, v, cls, backend=backend))


@pytest.mark.parametrize("op,shape", OPS, ids=[o for o, _ in OPS])
def test_op_formulas_match_flop_counter(op, shape):
    with FlopCounterMode(display=False) as fc:
        _call(op, shape, "torch")
    assert fc.get_total_flops() == flops.attention_flops(op, shape, "fwd")
    with FakeTensorMode():
        with FlopCounterMode(display=False) as fc:
            outs = _call(op, shape, "triton", requires_grad=True)
            sum(o.sum() for o in outs).backward()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    assert counts == {
        "divattn.attn_fwd": flops.attention_flops(op, shape, "fwd"),
        "divattn.attn_bwd": flops.attention_flops(op, shape, "bwd"),
    }


def test_attention_conventions_are_torchs_sdpa_formulas():
    B, L, H, D = 2, 37, 3, 24
    sdpa_shape = (B, H, L, D)
    assert flops.attention_flops("joint", (B, L, H, D), "fwd") == sdpa_flop_count(sdpa_shape, sdpa_shape, sdpa_shape)
    assert flops.attention_flops("joint", (B, L, H, D), "bwd") == sdpa_backward_flop_count(
        sdpa_shape, sdpa_shape, sdpa_shape, sdpa_shape)
    assert flops.attention_macs("temporal", (2, 8, 196, 12, 64), "fwd+bwd") == 7 * 2 * 196 * 12 * 8 * 8 * 64


def test_attention_bytes_are_the_least_traffic():
    shape = (2, 8, 196, 12, 64)
    n = 2 * 8 * 196 * 12 * 64
    assert flops.attention_bytes("temporal", shape, 2, "fwd") == 4 * n * 2
    assert flops.attention_bytes("spatial", shape, 2, "bwd") == 8 * n * 2
    assert flops.attention_bytes("spatial_cls", shape, 4, "fwd+bwd") == 12 * (n + 2 * 12 * 64) * 4
    assert flops.attention_bytes("joint", (2, 100, 12, 64), 2, "fwd") == 4 * 2 * 100 * 12 * 64 * 2


def test_custom_ops_are_registered_once():
    flops.register()
    flops.register()
    assert torch.ops.divattn.attn_fwd in flop_registry
    assert torch.ops.divattn.attn_bwd in flop_registry


def test_bad_inputs_raise():
    model = meta_model("timesformer_base")
    with pytest.raises(TypeError, match="TimeSformer or ViViT"):
        flops.macs(torch.nn.Linear(2, 2), (1, 3, 8, 224, 224))
    with pytest.raises(ValueError, match="in_chans"):
        flops.macs(model, (1, 1, 8, 224, 224))
    with pytest.raises(ValueError, match=r"\(B, C, T, H, W\)"):
        flops.macs(model, (3, 8, 224, 224))
    with pytest.raises(ValueError, match="tubelet"):
        flops.macs(meta_model("vivit_base"), (1, 3, 7, 224, 224))
    with pytest.raises(ValueError, match="implementation"):
        flops.macs(model, (1, 3, 8, 224, 224), implementation="fvcore")
    with pytest.raises(ValueError, match="op must be"):
        flops.attention_macs("cross", (1, 2, 3, 4, 5))
    with pytest.raises(ValueError, match=r"\(B, L, H, D\)"):
        flops.attention_macs("joint", (1, 2, 3, 4, 5))


@pytest.mark.parametrize("tq,tk", [(1, 1), (3, 3), (8, 8), (13, 13), (1, 8), (3, 8), (0, 5)])
def test_causal_pairs_are_the_unmasked_pairs(tq, tk):
    from divattn.ops.reference import causal_mask

    assert flops.attention_pairs(tq, tk, causal=True) == int(causal_mask(tq, tk).sum())
    assert flops.attention_pairs(tq, tk) == tq * tk
    B, N, H, D = 2, 7, 3, 16
    assert flops.attention_macs("temporal", (B, tq, N, H, D), "fwd", causal=True, kv_frames=tk) == \
        2 * B * N * H * int(causal_mask(tq, tk).sum()) * D


def test_causal_and_kv_frames_counts():
    shape = (2, 8, 196, 12, 64)
    full = flops.attention_macs("temporal", shape, "fwd+bwd")
    assert flops.attention_macs("temporal", shape, "fwd+bwd", causal=True) == full * 36 // 64  # T(T+1)/2 of T^2
    # one new frame against 8 cached ones: causal or not, it sees all 8
    one = (2, 1, 196, 12, 64)
    assert flops.attention_macs("temporal", one, causal=True, kv_frames=8) == \
        flops.attention_macs("temporal", one, kv_frames=8) == 2 * 2 * 196 * 12 * 8 * 64
    n = 2 * 196 * 12 * 64
    assert flops.attention_bytes("temporal", one, 2, "fwd", kv_frames=8) == (2 * n + 2 * 8 * n) * 2
    assert flops.attention_bytes("temporal", one, 2, "bwd", kv_frames=8) == (4 * n + 4 * 8 * n) * 2
    assert flops.attention_bytes("temporal", shape, 2, "fwd", kv_frames=8) == flops.attention_bytes(
        "temporal", shape, 2, "fwd")
    with pytest.raises(ValueError, match="temporal attention only"):
        flops.attention_macs("spatial", shape, causal=True)
    with pytest.raises(ValueError, match="temporal attention only"):
        flops.attention_bytes("joint", (2, 11, 3, 16), 2, kv_frames=11)
    with pytest.raises(ValueError, match="kv_frames = 4 is fewer than the q frames Tq = 8"):
        flops.attention_macs("temporal", shape, kv_frames=4)


@pytest.mark.parametrize("tq,tk,causal", [(5, 5, True), (2, 5, True), (2, 5, False)],
                         ids=["causal", "last-frames-causal", "last-frames"])
def test_causal_formulas_match_flop_counter(tq, tk, causal):
    """The custom ops' formulas read causal and the key frames from the op's arguments."""
    B, N, H, D = 2, 7, 3, 16
    with FakeTensorMode():
        with FlopCounterMode(display=False) as fc:
            q = torch.randn(B, tq, N, H, D, requires_grad=True)
            k, v = (torch.randn(B, tk, N, H, D, requires_grad=True) for _ in range(2))
            divattn.temporal_attention(q, k, v, causal=causal, backend="triton").sum().backward()
    counts = {str(k): v for k, v in fc.get_flop_counts()["Global"].items()}
    kw = dict(causal=causal, kv_frames=tk)
    assert counts == {
        "divattn.attn_fwd": flops.attention_flops("temporal", (B, tq, N, H, D), "fwd", **kw),
        "divattn.attn_bwd": flops.attention_flops("temporal", (B, tq, N, H, D), "bwd", **kw),
    }
    if causal:
        assert counts["divattn.attn_fwd"] < flops.attention_flops("temporal", (B, tq, N, H, D), "fwd", kv_frames=tk)
