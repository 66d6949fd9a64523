import pytest
import torch

from divattn.models import CheckpointMismatchError, init_from_vit
from divattn.models.pos_embed import resize_pos_embed

from .helpers import randomize, tiny, video


def image_vit(img_size=32, **kw):
    """A timm-layout image ViT: a space_only TimeSformer on one frame has exactly its keys."""
    return randomize(tiny("timesformer_base", attention_type="space_only", num_frames=1, img_size=img_size, **kw), seed=9)


def still_clip(T, size=32):
    """A clip whose T frames are all the same image, and that image as a 1-frame clip."""
    frame = video(T=1, size=size, seed=3)
    return frame.expand(-1, -1, T, -1, -1).contiguous(), frame


def test_timesformer_from_vit_is_the_vit_on_still_clips():
    """With temporal_fc zero, a divided TimeSformer on a clip of T identical frames computes
    the image ViT on that frame: each frame's spatial attention is the ViT's and the
    frames' cls outputs are equal, so their mean is too."""
    vit = image_vit()
    model = randomize(tiny("timesformer_base", num_frames=4))
    report = init_from_vit(model, vit.state_dict(), temporal_fc="all")
    assert report.unused == [] and "time_embed" in report.fresh
    assert "blocks.1.temporal_attn.qkv.weight" in report.loaded and "blocks.0.temporal_fc.weight" in report.fresh
    clip, frame = still_clip(4)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), vit(frame), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.blocks[1].temporal_attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    torch.testing.assert_close(model.blocks[0].temporal_norm1.weight, vit.blocks[0].norm1.weight)
    assert model.time_embed.abs().sum() == 0


@pytest.mark.parametrize("option,zero_blocks", [("official", [1, 2]), ("all", [0, 1, 2]), ("none", [])])
def test_temporal_fc_options(option, zero_blocks):
    model = randomize(tiny("timesformer_base", depth=3))
    init_from_vit(model, image_vit(depth=3).state_dict(), temporal_fc=option)
    assert [i for i, b in enumerate(model.blocks) if b.temporal_fc.weight.abs().sum() == 0] == zero_blocks


@pytest.mark.parametrize("mode", ["nearest", "bicubic"])
def test_position_embeddings_resize_to_the_model_grid(mode):
    vit = image_vit(img_size=48)
    model = tiny("timesformer_base", interpolation=mode)
    init_from_vit(model, vit.state_dict())
    torch.testing.assert_close(model.pos_embed, resize_pos_embed(vit.pos_embed, (4, 4), mode=mode))


@pytest.mark.parametrize("how", ["central_frame", "inflate"])
def test_vivit_factorised_encoder_spatial_stage_is_the_vit(how):
    vit = image_vit()
    model = randomize(tiny("vivit_base", variant="factorised_encoder", num_frames=4, act="gelu", temporal_depth=1))
    report = init_from_vit(model, vit.state_dict(), tubelet_init=how)
    assert "temporal_blocks.0.attn.qkv.weight" in report.fresh and "spatial_norm.weight" in report.loaded
    w = model.patch_embed.proj.weight
    if how == "central_frame":
        torch.testing.assert_close(w[:, :, 1], vit.patch_embed.proj.weight)
        assert w[:, :, 0].abs().sum() == 0
    else:
        torch.testing.assert_close(w.sum(2), vit.patch_embed.proj.weight)
    clip, frame = still_clip(4)
    with torch.no_grad():
        x = model._run_blocks(model.blocks, model.embed(clip))
        per_frame = model.spatial_norm(x[:, 0]).view(2, 2, -1)
        vit_features = vit.forward_head(vit.forward_features(frame), pre_logits=True)
    torch.testing.assert_close(per_frame, vit_features[:, None].expand(-1, 2, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["spatio_temporal", "factorised_self_attention", "factorised_dot_product"])
def test_vivit_position_embeddings_repeat_over_time(variant):
    vit = image_vit()
    model = tiny("vivit_base", variant=variant, num_frames=4)
    report = init_from_vit(model, vit.state_dict())
    has_cls = variant == "spatio_temporal"
    assert ("cls_token" in report.unused) != has_cls
    pos = model.pos_embed[:, int(has_cls):].view(2, 16, -1)
    torch.testing.assert_close(pos, vit.pos_embed[:, 1:].expand(2, -1, -1))
    if variant == "factorised_self_attention":
        assert all(p.abs().sum() == 0 for b in model.blocks for p in b.temporal_attn.parameters())
        init_from_vit(model, vit.state_dict(), temporal_init="copy")
        torch.testing.assert_close(model.blocks[1].temporal_attn.proj.weight, vit.blocks[1].attn.proj.weight)


def test_mismatches_are_named():
    vit = image_vit(depth=3).state_dict()
    vit["pre_logits.fc.weight"] = torch.zeros(64, 64)
    with pytest.raises(CheckpointMismatchError) as e:
        init_from_vit(tiny("timesformer_base"), vit)
    assert "pre_logits.fc.weight" in str(e.value) and "blocks.2.attn.qkv.weight" in str(e.value)
    report = init_from_vit(tiny("timesformer_base"), vit, strict=False)
    assert "pre_logits.fc.weight" in report.unused and "blocks.2.mlp.fc2.bias" in report.unused
    with pytest.raises(CheckpointMismatchError, match="blocks.2.norm1.weight"):
        init_from_vit(tiny("timesformer_base", depth=3), image_vit(depth=2).state_dict())
    with pytest.raises(CheckpointMismatchError, match=r"patch_embed.proj.weight: ViT gives \(64, 3, 16, 16\)"):
        init_from_vit(tiny("timesformer_base"), image_vit(img_size=64, patch_size=16).state_dict())


def test_a_head_that_does_not_fit_is_not_used():
    model = tiny("timesformer_base", num_classes=7)
    report = init_from_vit(model, image_vit().state_dict())
    assert report.unused == ["head.bias", "head.weight"] and "head.weight" in report.fresh
