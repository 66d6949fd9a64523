"""Parity with randomly initialised ``transformers`` models (the ``test`` extra installs it)."""

import pytest
import torch

from divattn.models import CheckpointMismatchError, create_model, from_transformers, load_checkpoint

from .helpers import randomize

transformers = pytest.importorskip("transformers")

HF_SMALL = dict(image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=256)


def hf_timesformer(attention_type="divided_space_time", head=True, **kw):
    torch.manual_seed(0)
    cfg = transformers.TimesformerConfig(patch_size=8, attention_type=attention_type, num_labels=5, **{**HF_SMALL, **kw})
    cls = transformers.TimesformerForVideoClassification if head else transformers.TimesformerModel
    return randomize(cls(cfg).eval(), seed=4)


def hf_vivit(head=True, **kw):
    torch.manual_seed(0)
    cfg = transformers.VivitConfig(tubelet_size=[2, 8, 8], num_labels=5, **{**HF_SMALL, **kw})
    cls = transformers.VivitForVideoClassification if head else transformers.VivitModel
    return randomize(cls(cfg).eval(), seed=5)


def clip(T=4, seed=0):
    return torch.randn(2, T, 3, 32, 32, generator=torch.Generator().manual_seed(seed))  # transformers' (B, T, C, H, W)


def same_parameters(hf, ours):
    return sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in ours.parameters())


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_timesformer_logits_and_features_match(attention_type):
    hf = hf_timesformer(attention_type)
    ours = from_transformers(hf, backend="torch")
    assert not ours.training and same_parameters(hf, ours)
    assert ours.config.attention_type == attention_type and ours.config.num_classes == 5
    x = clip()
    with torch.no_grad():
        out = hf(pixel_values=x, output_hidden_states=True)
        torch.testing.assert_close(ours(x.transpose(1, 2)), out.logits, rtol=1e-4, atol=1e-4)
        headless = from_transformers(hf.timesformer, backend="torch")
        assert headless.config.num_classes == 0
        torch.testing.assert_close(headless.forward_features(x.transpose(1, 2)),
                                   hf.timesformer(pixel_values=x).last_hidden_state, rtol=1e-4, atol=1e-4)


def test_timesformer_space_only_averages_frames_like_official():
    """transformers classifies each frame of a space_only model; the official model (and the
    bundled one) average the frames' tokens before the final norm."""
    hf = hf_timesformer("space_only")
    ours = from_transformers(hf, backend="torch")
    x = clip()
    with torch.no_grad():
        frames = hf(pixel_values=x, output_hidden_states=True).hidden_states[-1]  # (B*T, 1+N, C), pre-norm
        expected = hf.classifier(hf.timesformer.layernorm(frames.view(2, 4, *frames.shape[1:]).mean(1))[:, 0])
        torch.testing.assert_close(ours(x.transpose(1, 2)), expected, rtol=1e-4, atol=1e-4)


def test_vivit_logits_match():
    hf = hf_vivit()
    ours = from_transformers(hf, backend="torch")
    assert ours.config.variant == "spatio_temporal" and ours.config.act == "gelu_tanh" and same_parameters(hf, ours)
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(ours(x.transpose(1, 2)), hf(pixel_values=x).logits, rtol=1e-4, atol=1e-4)


def test_vivit_model_pooler_is_dropped_with_a_warning():
    hf = hf_vivit(head=False)
    with pytest.warns(UserWarning, match="pooler"):
        ours = from_transformers(hf, backend="torch")
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x.transpose(1, 2)), hf(pixel_values=x).last_hidden_state,
                                   rtol=1e-4, atol=1e-4)


def test_transformers_state_dict_files_load_into_registry_models(tmp_path):
    hf = hf_timesformer()
    torch.save(hf.state_dict(), tmp_path / "timesformer.bin")
    ours = create_model("timesformer_base", img_size=32, patch_size=8, num_frames=4, embed_dim=64, depth=2,
                        num_heads=2, num_classes=5, checkpoint_path=tmp_path / "timesformer.bin", backend="torch").eval()
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(ours(x.transpose(1, 2)), hf(pixel_values=x).logits, rtol=1e-4, atol=1e-4)


def test_vivit_hub_key_layout_loads():
    """Checkpoints on the Hub use the older ``encoder.layer.<i>.attention.attention.query`` names."""
    hf = hf_vivit()
    legacy = ((".attention.q_proj.", ".attention.attention.query."), (".attention.k_proj.", ".attention.attention.key."),
              (".attention.v_proj.", ".attention.attention.value."), (".attention.o_proj.", ".attention.output.dense."),
              (".mlp.fc1.", ".intermediate.dense."), (".mlp.fc2.", ".output.dense."), ("vivit.layers.", "vivit.encoder.layer."))
    old = {}
    for k, v in hf.state_dict().items():
        for new, before in legacy:
            k = k.replace(new, before)
        old[k] = v
    assert "vivit.encoder.layer.0.attention.attention.query.weight" in old and "vivit.encoder.layer.0.output.dense.bias" in old
    ours = create_model("vivit_base", img_size=32, patch_size=8, num_frames=4, embed_dim=64, depth=2, num_heads=2,
                        num_classes=5, backend="torch").eval()
    load_checkpoint(ours, old)
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(ours(x.transpose(1, 2)), hf(pixel_values=x).logits, rtol=1e-4, atol=1e-4)
    del old["vivit.encoder.layer.1.attention.attention.key.bias"]
    legacy_q = "vivit.encoder.layer.1.attention.attention.query.bias"
    with pytest.raises(CheckpointMismatchError, match=rf"blocks.1.attn.qkv.bias.*{legacy_q}"):
        load_checkpoint(ours, old)


def test_unsupported_activation_is_refused():
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        from_transformers(hf_timesformer(hidden_act="relu"))


@pytest.mark.parametrize("attention_type", ["divided_space_time", "joint_space_time"])
def test_attention_maps_match_transformers_attentions(attention_type):
    """transformers returns the spatial attention of divided layers as (B*T, H, 1+N, 1+N)."""
    hf = hf_timesformer(attention_type)
    ours = from_transformers(hf, backend="torch")
    x = clip()
    with torch.no_grad():
        theirs = hf(pixel_values=x, output_attentions=True).attentions
    key = "spatial" if attention_type == "divided_space_time" else "joint"
    for mine, ref in zip(ours.attention_maps(x.transpose(1, 2)), theirs, strict=True):
        torch.testing.assert_close(mine[key], ref.reshape(mine[key].shape), rtol=1e-4, atol=1e-5)
