import dataclasses

import pytest
import torch

import divattn.models as models
from divattn.layers.blocks import Block, FactorisedDotProductBlock, FactorisedSelfAttentionBlock

from .helpers import randomize, reference_vivit, tiny, video

VARIANTS = ("spatio_temporal", "factorised_encoder", "factorised_self_attention", "factorised_dot_product")
CONFIG_FIELDS = {"name", "num_classes", "num_frames", "img_size", "patch_size", "tubelet_size", "in_chans",
                 "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "variant", "temporal_depth"}


def test_registry_names_and_defaults():
    assert {"vivit_base", "vivit_large"} <= set(models.list_models("vivit_*"))
    with torch.device("meta"):
        b = models.create_model("vivit_base").config
        big = models.create_model("vivit_large", variant="factorised_encoder").config
    assert (b.num_frames, b.img_size, b.patch_size, b.tubelet_size, b.variant) == (32, 224, 16, 2, "spatio_temporal")
    assert (big.embed_dim, big.depth, big.num_heads, big.temporal_depth) == (1024, 24, 16, 4)


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


def test_dot_product_block_does_not_concatenate_heads(monkeypatch):
    m = randomize(tiny("vivit_base", variant="factorised_dot_product", num_frames=4))
    x = m.embed(video(T=4))
    calls = []
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda *a, **k: calls.append(1) or real_cat(*a, **k))
    with torch.no_grad():
        m.blocks[0](x)
    assert calls == []
