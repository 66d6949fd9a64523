import copy

import pytest
import torch
from torch import nn

import divattn
import divattn.ops.functions
from divattn.models import create_model
from divattn.swap import TimesformerDividedLayer, TimesformerJointSelfAttention, VivitJointAttention

from .models.helpers import randomize

transformers = pytest.importorskip("transformers")

SMALL = dict(image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=128, num_labels=5)


def timesformer(attention_type="divided_space_time", **kw):
    torch.manual_seed(0)
    cfg = transformers.TimesformerConfig(patch_size=8, attention_type=attention_type, **{**SMALL, **kw})
    return randomize(transformers.TimesformerForVideoClassification(cfg).eval(), seed=1)


def vivit(**kw):
    torch.manual_seed(0)
    cfg = transformers.VivitConfig(tubelet_size=[2, 8, 8], **{**SMALL, **kw})
    return randomize(transformers.VivitForVideoClassification(cfg).eval(), seed=2)


def clip():
    return torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


CASES = [
    pytest.param(lambda: timesformer("divided_space_time"), TimesformerDividedLayer, id="timesformer-divided"),
    pytest.param(lambda: timesformer("joint_space_time"), TimesformerJointSelfAttention, id="timesformer-joint"),
    pytest.param(lambda: timesformer("space_only"), TimesformerJointSelfAttention, id="timesformer-space_only"),
    pytest.param(vivit, VivitJointAttention, id="vivit"),
]


@pytest.mark.parametrize("build,swapped_type", CASES)
def test_swap_keeps_weights_and_logits(build, swapped_type):
    model = build()
    x = clip()
    params = dict(model.named_parameters())
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(pixel_values=x).logits
    assert divattn.swap_attention(model, backend="torch") == 2
    assert sum(isinstance(m, swapped_type) for m in model.modules()) == 2
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    with torch.no_grad():
        after = model(pixel_values=x).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)

    modules = list(model.modules())
    assert divattn.swap_attention(model, backend="torch") == 2
    assert list(model.modules()) == modules
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, after, rtol=0, atol=0)


def test_divided_layers_feed_views_of_the_qkv_projection_to_the_kernels(monkeypatch):
    model = timesformer()
    x = clip()
    with torch.no_grad():
        before = model(pixel_values=x).logits
    seen = []
    real = divattn.ops.functions.run

    def run(backend, op, views, *args, **kwargs):
        q = views[0]
        seen.append((op, q._base.numel() if q._base is not None else None))
        return real(backend, op, views, *args, **kwargs)

    monkeypatch.setattr(divattn.ops.functions, "run", run)
    divattn.swap_attention(model, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, before, rtol=1e-4, atol=1e-5)
    qkv_output = 2 * (1 + 16 * 4) * 3 * 64  # q is a view of the Linear's (B, 1 + N*T, 3C) output, not of a copy
    assert seen == [("temporal", qkv_output), ("spatial", qkv_output)] * 2


def test_gradients_and_transformers_checkpointing_after_swap():
    eager, model = timesformer(), timesformer()
    divattn.swap_attention(model, backend="torch")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(m.gradient_checkpointing for m in model.modules() if isinstance(m, TimesformerDividedLayer))
    x = clip()
    for m in (eager, model):
        m.train()
        m(pixel_values=x).logits.square().sum().backward()
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_swapped_model_moves_and_copies():
    model = timesformer()
    divattn.swap_attention(model, backend="torch")
    twin = copy.deepcopy(model).double()
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(twin(pixel_values=x.double()).logits.float(), model(pixel_values=x).logits,
                                   rtol=1e-4, atol=1e-5)
    layer = twin.timesformer.encoder.layer[0]
    assert layer.divided.attn.qkv is layer.attention.attention.qkv


def test_output_attentions_is_refused():
    model = timesformer()
    divattn.swap_attention(model, backend="torch")
    with pytest.raises(ValueError, match="attention probabilities"):
        model(pixel_values=clip(), output_attentions=True)


def test_attention_dropout_is_left_alone_with_a_warning():
    model = timesformer(attention_probs_dropout_prob=0.1)
    with pytest.warns(UserWarning, match=r"attention dropout > 0 .*encoder.layer.0"):
        assert divattn.swap_attention(model) == 0
    assert not any(isinstance(m, TimesformerDividedLayer) for m in model.modules())


def test_bundled_models_get_their_backend_set():
    model = create_model("vivit_base", img_size=32, patch_size=8, embed_dim=64, depth=3, num_heads=2, num_frames=4,
                         variant="factorised_encoder", temporal_depth=2, backend="torch")
    assert divattn.swap_attention(model, backend="triton") == 5
    assert model.config.backend == "triton" and all(b.attn.backend == "triton" for b in model.temporal_blocks)
    wrapped = nn.Sequential(nn.Identity(), model)
    assert divattn.swap_attention(wrapped, backend=None) == 5
    assert model.config.backend is None and all(b.backend is None for b in model.blocks)


def test_nothing_to_swap_returns_zero_with_a_warning():
    with pytest.warns(UserWarning, match="found no attention to swap in Sequential"):
        assert divattn.swap_attention(nn.Sequential(nn.Linear(4, 4), nn.GELU())) == 0


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        divattn.swap_attention(timesformer(), backend="flash")
