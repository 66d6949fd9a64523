import dataclasses

import pytest
import torch

import divattn.models as models
from divattn.layers.blocks import Block, DividedBlock

from .helpers import TINY, official_timesformer, randomize, tiny, video

TYPES = ("divided_space_time", "joint_space_time", "space_only")
CONFIG_FIELDS = {"name", "num_classes", "num_frames", "img_size", "patch_size", "tubelet_size", "in_chans",
                 "embed_dim", "depth", "num_heads", "mlp_ratio", "qkv_bias", "attention_type"}


def test_registry_names_and_defaults():
    assert {"timesformer_base", "timesformer_hr", "timesformer_large"} <= set(models.list_models())
    assert models.list_models("timesformer_h*") == ["timesformer_hr"]
    with torch.device("meta"):
        shapes = {n: models.create_model(n).config for n in ("timesformer_base", "timesformer_hr", "timesformer_large")}
    assert [(c.num_frames, c.img_size, c.attention_type) for c in shapes.values()] == [
        (8, 224, "divided_space_time"), (16, 448, "divided_space_time"), (96, 224, "divided_space_time")]


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown model 'timesformer_tiny'"):
        models.create_model("timesformer_tiny")
    with pytest.raises(ValueError, match="downloads no weights"):
        models.create_model("timesformer_base", pretrained=True)
    with pytest.raises(TypeError, match="num_layers"):
        models.create_model("timesformer_base", num_layers=3)
    with pytest.raises(ValueError, match="attention_type"):
        models.create_model("timesformer_base", attention_type="divided")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        models.create_model("timesformer_base", embed_dim=100, num_heads=3)
    with pytest.raises(ValueError, match="backend"):
        models.create_model("timesformer_base", **TINY, backend="tpu")


@pytest.mark.parametrize("attention_type", TYPES)
def test_config_is_complete_and_blocks_match_type(attention_type):
    m = tiny("timesformer_base", attention_type=attention_type)
    cfg = dataclasses.asdict(m.config)
    assert CONFIG_FIELDS <= set(cfg)
    assert cfg == m.config.to_dict()
    assert {k: cfg[k] for k in TINY} == TINY and cfg["tubelet_size"] == 1 and cfg["name"] == "timesformer_base"
    block = DividedBlock if attention_type == "divided_space_time" else Block
    assert all(type(b) is block for b in m.blocks)
    assert hasattr(m, "time_embed") == (attention_type != "space_only")


def test_official_state_dict_keys():
    keys = set(tiny("timesformer_base", depth=1).state_dict())
    per_block = {"norm1", "attn.qkv", "attn.proj", "temporal_norm1", "temporal_attn.qkv", "temporal_attn.proj",
                 "temporal_fc", "norm2", "mlp.fc1", "mlp.fc2"}
    expected = {"cls_token", "pos_embed", "time_embed"}
    expected |= {f"{m}.{p}" for m in ("patch_embed.proj", "norm", "head") for p in ("weight", "bias")}
    expected |= {f"blocks.0.{m}.{p}" for m in per_block for p in ("weight", "bias")}
    assert keys == expected


@pytest.mark.parametrize("attention_type", TYPES)
def test_logits_match_official_forward(attention_type):
    m = randomize(tiny("timesformer_base", attention_type=attention_type))
    x = video()
    with torch.no_grad():
        torch.testing.assert_close(m(x), official_timesformer(m, x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention_type", TYPES)
@pytest.mark.parametrize("frames,size", [(4, 32), (8, 48), (3, 24)], ids=["T4", "48px", "T3-24px"])
def test_other_clip_sizes_resize_embeddings_like_official(attention_type, frames, size):
    m = randomize(tiny("timesformer_base", attention_type=attention_type))
    x = video(T=frames, size=size)
    with torch.no_grad():
        torch.testing.assert_close(m(x), official_timesformer(m, x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(m(video()), official_timesformer(m, video()), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attention_type", TYPES)
def test_backward_reaches_every_parameter(attention_type):
    m = randomize(tiny("timesformer_base", attention_type=attention_type)).train()
    m(video()).square().sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_official_temporal_fc_init():
    m = tiny("timesformer_base", depth=3)
    assert m.blocks[0].temporal_fc.weight.abs().sum() > 0
    for blk in m.blocks[1:]:
        assert blk.temporal_fc.weight.abs().sum() == 0 and blk.temporal_fc.bias.abs().sum() == 0
    assert m.time_embed.abs().sum() == 0 and m.pos_embed.std() > 0


def test_video_shape_errors():
    m = tiny("timesformer_base")
    with pytest.raises(ValueError, match=r"5-D \(B, C, T, H, W\)"):
        m(torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="expected in_chans = 3"):
        m(torch.randn(1, 8, 3, 32, 32))
