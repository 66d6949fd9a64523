import copy
import dataclasses

import pytest
import torch

import divattn.models as models
from divattn.layers.blocks import Block, FactorisedDotProductBlock, FactorisedSelfAttentionBlock
from divattn.models import load_checkpoint

from .helpers import (
    scenic_encoder_block,
    randomize,
    reference_vivit,
    scenic_factorized_dot_product_attention,
    scenic_vivit,
    tiny,
    video,
)

VARIANTS = ("spatio_temporal", "factorised_encoder", "factorised_self_attention", "factorised_dot_product")
CONFIG_FIELDS = {"name", "num_classes", "num_frames", "img_size", "patch_size", "tubelet_size", "in_chans",
                 "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "variant", "temporal_depth",
                 "temporal_num_heads", "temporal_mlp_dim", "attention_order", "classifier", "representation_size"}
# scenic's options, each against the line-by-line restatement of scenic's code
SCENIC_CASES = [
    pytest.param("spatio_temporal", {}, id="m1-token"),
    pytest.param("spatio_temporal", dict(classifier="gap"), id="m1-gap"),
    pytest.param("spatio_temporal", dict(classifier="gmp", representation_size=6), id="m1-gmp-repr"),
    pytest.param("factorised_encoder", dict(temporal_depth=2), id="m2-token"),
    pytest.param("factorised_encoder", dict(temporal_depth=2, temporal_num_heads=4, temporal_mlp_dim=40),
                 id="m2-token-temporal4heads-mlp40"),
    pytest.param("factorised_encoder", dict(temporal_depth=1, classifier="gap", temporal_num_heads=1,
                                            representation_size=5), id="m2-gap-repr-temporal1head"),
    pytest.param("factorised_encoder", dict(temporal_depth=1, classifier="gsp"), id="m2-gsp"),
    pytest.param("factorised_self_attention", {}, id="m3-space_time"),
    pytest.param("factorised_self_attention", dict(attention_order="time_space"), id="m3-time_space"),
    pytest.param("factorised_self_attention", dict(classifier="gmp", representation_size=3), id="m3-gmp-repr"),
    pytest.param("factorised_dot_product", {}, id="m4-gap"),
    pytest.param("factorised_dot_product", dict(num_heads=4, classifier="gsp", representation_size=6),
                 id="m4-4heads-gsp-repr"),
]


def test_registry_names_and_defaults():
    assert {"vivit_base", "vivit_large"} <= set(models.list_models("vivit_*"))
    with torch.device("meta"):
        b = models.create_model("vivit_base").config
        big = models.create_model("vivit_large", variant="factorised_encoder").config
    assert (b.num_frames, b.img_size, b.patch_size, b.tubelet_size, b.variant) == (32, 224, 16, 2, "spatio_temporal")
    assert (big.embed_dim, big.depth, big.num_heads, big.temporal_depth) == (1024, 24, 16, 4)
    assert (big.temporal_num_heads, big.temporal_mlp_dim, big.classifier) == (16, 4096, "token")
    assert (b.classifier, b.representation_size, b.attention_order, b.temporal_num_heads) == ("token", None,
                                                                                               "space_time", None)
    with torch.device("meta"):
        m3 = models.create_model("vivit_base", variant="factorised_self_attention").config
        m4 = models.create_model("vivit_base", variant="factorised_dot_product").config
    assert (m3.classifier, m3.attention_order, m4.classifier) == ("gap", "space_time", "gap")


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_and_structure(variant):
    m = tiny("vivit_base", variant=variant, num_frames=4)
    cfg = dataclasses.asdict(m.config)
    assert CONFIG_FIELDS <= set(cfg)
    assert cfg["temporal_depth"] == (4 if variant == "factorised_encoder" else 0)
    block = {"factorised_self_attention": FactorisedSelfAttentionBlock,
             "factorised_dot_product": FactorisedDotProductBlock}.get(variant, Block)
    assert all(type(b) is block for b in m.blocks)
    assert hasattr(m, "cls_token") == (variant in ("spatio_temporal", "factorised_encoder"))


def test_config_errors():
    with pytest.raises(ValueError, match="variant"):
        models.create_model("vivit_base", variant="model2")
    with pytest.raises(ValueError, match="temporal_depth applies to factorised_encoder only"):
        models.create_model("vivit_base", variant="spatio_temporal", temporal_depth=2)
    with pytest.raises(ValueError, match="num_heads must be even"):
        models.create_model("vivit_base", variant="factorised_dot_product", img_size=32, patch_size=8,
                            embed_dim=48, num_heads=3, depth=1, num_frames=4)
    m = tiny("vivit_base", num_frames=4)
    with pytest.raises(ValueError, match="multiple of the tubelet size 2"):
        m(video(T=3))
    small = dict(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, num_frames=4)
    bad = [
        (dict(variant="factorised_self_attention", classifier="token"), "has no cls token"),
        (dict(variant="factorised_dot_product", classifier="token"), "has no cls token"),
        (dict(classifier="cls"), "classifier must be one of"),
        (dict(attention_order="time_space"), "attention_order applies to factorised_self_attention only"),
        (dict(variant="factorised_self_attention", attention_order="spacetime"), "attention_order must be one of"),
        (dict(temporal_num_heads=4), "temporal_num_heads applies to factorised_encoder only"),
        (dict(variant="factorised_dot_product", temporal_mlp_dim=32), "temporal_mlp_dim applies"),
        (dict(variant="factorised_encoder", temporal_num_heads=3), "not divisible by temporal_num_heads 3"),
        (dict(variant="factorised_encoder", temporal_mlp_dim=0), "temporal_mlp_dim must be a positive int"),
        (dict(representation_size=0), "representation_size must be a positive int"),
    ]
    for kw, match in bad:
        with pytest.raises(ValueError, match=match):
            models.create_model("vivit_base", **small, **kw)


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_eager_reference(variant):
    depth = 2 if variant == "factorised_encoder" else None
    m = randomize(tiny("vivit_base", variant=variant, num_frames=4, temporal_depth=depth))
    x = video(T=4)
    with torch.no_grad():
        torch.testing.assert_close(m(x), reference_vivit(m, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_other_clip_sizes_run_and_keep_config_size_exact(variant):
    m = randomize(tiny("vivit_base", variant=variant, num_frames=4))
    with torch.no_grad():
        assert m(video(T=8, size=48)).shape == (2, 4)
        assert m(video(T=2, size=24)).shape == (2, 4)
        torch.testing.assert_close(m(video(T=4)), reference_vivit(m, video(T=4)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_backward_reaches_every_parameter(variant):
    m = randomize(tiny("vivit_base", variant=variant, num_frames=4)).train()
    m(video(T=4)).square().sum().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


@pytest.mark.parametrize("variant,kw", SCENIC_CASES)
def test_logits_match_scenic_restatement(variant, kw):
    m = randomize(tiny("vivit_base", variant=variant, num_frames=4, **kw))
    x = video(T=4)
    with torch.no_grad():
        ref = scenic_vivit(m, x)
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@pytest.mark.parametrize("variant,kw", [SCENIC_CASES[5], SCENIC_CASES[8], SCENIC_CASES[11]])
def test_scenic_options_on_triton_match_torch(variant, kw):
    m = randomize(tiny("vivit_base", variant=variant, num_frames=4, **kw))
    x = video(T=4)
    with torch.no_grad():
        ref = m(x)
        m.set_backend("triton")
        torch.testing.assert_close(m(x), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def _swap_head_halves(blk):
    """The same block with heads [0, H/2) and [H/2, H) exchanged in qkv and proj."""
    H, D = blk.attn.num_heads, blk.attn.head_dim
    h = H // 2
    order = torch.cat([torch.arange(h, H), torch.arange(h)])
    swapped = copy.deepcopy(blk)
    with torch.no_grad():
        w = blk.attn.qkv.weight.view(3, H, D, -1)[:, order].reshape_as(blk.attn.qkv.weight)
        b = blk.attn.qkv.bias.view(3, H, D)[:, order].reshape(-1)
        p = blk.attn.proj.weight.view(-1, H, D)[:, order].reshape_as(blk.attn.proj.weight)
        swapped.attn.qkv.weight.copy_(w)
        swapped.attn.qkv.bias.copy_(b)
        swapped.attn.proj.weight.copy_(p)
    return swapped


@pytest.mark.parametrize("heads", [2, 4])
def test_dot_product_heads_follow_scenic_split(heads):
    """Heads [0, H/2) over time, [H/2, H) over space: the block against scenic's head split
    (``scenic_factorized_dot_product_attention``, restated from model_utils.py), and the
    other assignment is told apart."""
    m = randomize(tiny("vivit_base", variant="factorised_dot_product", num_frames=8, num_heads=heads))
    blk = m.blocks[0]
    B, T, N, C = 2, 4, 16, 64
    blk.num_frames = T
    x = torch.randn(B, T * N, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = scenic_encoder_block(blk, x.view(B, T, N, C), scenic_factorized_dot_product_attention)
        ref = ref.reshape(B, T * N, C)
        torch.testing.assert_close(blk(x), ref, rtol=1e-5, atol=1e-5)
        other = _swap_head_halves(blk)
        assert (other(x) - ref).abs().max() > 1e-2
        maps = blk.attention_maps(x)
    assert maps["temporal"].shape == (B, N, heads // 2, T, T) and maps["spatial"].shape == (B, T, heads // 2, N, N)
    q, k, _ = blk.attn.qkv(blk.norm1(x)).view(B, T, N, 3, heads, C // heads).unbind(3)
    logits = torch.einsum("btnhd,bsnhd->bnhts", q[..., : heads // 2, :], k[..., : heads // 2, :]) * blk.attn.scale
    torch.testing.assert_close(maps["temporal"], logits.softmax(-1), rtol=1e-5, atol=1e-6)


def test_time_space_block_runs_temporal_first():
    m = randomize(tiny("vivit_base", variant="factorised_self_attention", num_frames=4, attention_order="time_space"))
    blk = m.blocks[0]
    x = m.embed(video(T=4))
    with torch.no_grad():
        y = blk._temporal(x)
        expected = blk._spatial(y)
        expected = expected + blk.mlp(blk.norm2(expected))
        torch.testing.assert_close(blk(x), expected)
        q, k, _ = blk._qkv(blk.temporal_attn, x, blk.temporal_norm1)
        temporal = blk.attention_maps(x)["temporal"]
    torch.testing.assert_close(temporal, (torch.einsum("btnhd,bsnhd->bnhts", q, k) * blk.temporal_attn.scale)
                               .softmax(-1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant,kw", [SCENIC_CASES[2], SCENIC_CASES[5], SCENIC_CASES[8], SCENIC_CASES[11]])
def test_scenic_options_train(variant, kw):
    m = randomize(tiny("vivit_base", variant=variant, num_frames=4, **kw)).train()
    m(video(T=4)).square().sum().backward()
    assert [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_representation_layer_and_features():
    m = randomize(tiny("vivit_base", variant="factorised_dot_product", num_frames=4, classifier="gmp",
                       representation_size=6))
    assert m.num_features == 6 and m.head.weight.shape == (4, 6)
    assert {"pre_logits.fc.weight", "pre_logits.fc.bias"} <= set(m.state_dict())
    with torch.no_grad():
        feats = m.forward_features(video(T=4))
        pooled = m.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(pooled, torch.tanh(m.pre_logits.fc(feats.amax(1))))
        torch.testing.assert_close(m.forward_head(feats), m.head(pooled))
    m.reset_classifier(7)
    assert m.head.weight.shape == (7, 6)
    assert "pre_logits.fc.weight" not in tiny("vivit_base", num_frames=4).state_dict()


@pytest.mark.parametrize("variant", ["spatio_temporal", "factorised_encoder"])
def test_pooling_models_resize_like_run_time(variant):
    """Models 1 and 2 without a cls token: no prefix in the position embeddings, when
    resized at load time or at run time."""
    depth = 1 if variant == "factorised_encoder" else None
    source = randomize(tiny("vivit_base", variant=variant, num_frames=4, classifier="gap", temporal_depth=depth), 3)
    assert not hasattr(source, "cls_token") and not hasattr(source, "temporal_cls_token")
    N = 16
    assert source.pos_embed.shape[1] == (N if variant == "factorised_encoder" else 2 * N)
    target = tiny("vivit_base", variant=variant, num_frames=8, img_size=48, classifier="gap", temporal_depth=depth)
    report = load_checkpoint(target, source.state_dict(), checkpoint_grid=(2, 4, 4))
    assert report.resized["pos_embed"][1][1] == (36 if variant == "factorised_encoder" else 4 * 36)
    clip = video(T=8, size=48)
    with torch.no_grad():
        torch.testing.assert_close(target(clip), source(clip), rtol=1e-5, atol=1e-5)


def test_dot_product_block_does_not_concatenate_heads(monkeypatch):
    m = randomize(tiny("vivit_base", variant="factorised_dot_product", num_frames=4))
    x = m.embed(video(T=4))
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    with torch.no_grad():
        m.blocks[0](x)
    assert calls == []
