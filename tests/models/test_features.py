"""What users ask of a bundled model: features, heads, checkpointing, drop path, compile."""

import pytest
import torch

import divattn.models.base
from divattn.models import create_model

from .helpers import TINY, randomize, tiny, video

MODELS = [
    pytest.param("timesformer_base", dict(attention_type="divided_space_time"), 8, (2, 1 + 16 * 8, 64), id="timesformer-divided"),
    pytest.param("timesformer_base", dict(attention_type="space_only"), 8, (2, 17, 64), id="timesformer-space_only"),
    pytest.param("vivit_base", dict(variant="factorised_encoder", num_frames=4), 4, (2, 3, 64), id="vivit-2"),
    pytest.param("vivit_base", dict(variant="factorised_dot_product", num_frames=4), 4, (2, 32, 64), id="vivit-4"),
]


@pytest.mark.parametrize("name,kw,T,tokens", MODELS)
def test_features_pooling_and_heads(name, kw, T, tokens):
    m = randomize(tiny(name, **kw))
    x = video(T=T)
    with torch.no_grad():
        feats = m.forward_features(x)
        pooled = m.forward_head(feats, pre_logits=True)
        assert feats.shape == tokens and pooled.shape == (2, 64)
        torch.testing.assert_close(pooled, feats[:, 0] if m.global_pool == "token" else feats.mean(1))
        torch.testing.assert_close(m(x), m.head(pooled))
        m.reset_classifier(0)
        torch.testing.assert_close(m(x), pooled)
        m.double().reset_classifier(7)
        assert m.config.num_classes == m.num_classes == 7 and m.head.weight.dtype == torch.float64
        assert m(x.double()).shape == (2, 7)


@pytest.mark.parametrize("backend", ["torch", None], ids=["torch", "default"])
@pytest.mark.parametrize("name,kw,T,tokens", MODELS)
def test_gradient_checkpointing_recomputes_blocks_with_equal_gradients(name, kw, T, tokens, backend, monkeypatch):
    """With the default backend (here auto-dispatch to the Triton kernels) too."""
    m = randomize(tiny(name, **kw, backend=backend)).train()
    x = video(T=T)
    m(x).square().sum().backward()
    ref = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    calls = []
    real = divattn.models.base.checkpoint
    monkeypatch.setattr(divattn.models.base, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    m.set_grad_checkpointing()
    m(x).square().sum().backward()
    assert len(calls) == len(m.attention_layers())
    for n, p in m.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=1e-5, atol=1e-6, msg=n)
    with torch.no_grad():
        m(x)
    assert len(calls) == len(m.attention_layers())


def test_drop_path_rises_per_layer_and_only_acts_in_training():
    m = randomize(tiny("timesformer_base", depth=3, drop_path_rate=0.5))
    assert [b.drop_path.p for b in m.blocks] == [0.0, 0.25, 0.5]
    v = tiny("vivit_base", variant="factorised_encoder", num_frames=4, depth=3, temporal_depth=2, drop_path_rate=0.2)
    assert [b.drop_path.p for b in v.blocks] == pytest.approx([0.0, 0.1, 0.2])
    assert [b.drop_path.p for b in v.temporal_blocks] == pytest.approx([0.0, 0.2])
    x = video(B=8)
    plain = tiny("timesformer_base", depth=3)
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(m(x), plain(x))
        m.train()
        torch.manual_seed(1)
        a = m(x)
        torch.manual_seed(2)
        b = m(x)
    assert not torch.allclose(a, b)


def test_tiny_trainer_config_trains_fast():
    """The override set the trainer uses builds and takes an optimiser step on CPU."""
    for name, extra in (("timesformer_base", {}), ("vivit_base", {"variant": "factorised_encoder"})):
        m = create_model(name, **TINY, **extra, backend="torch")
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        x, y = video(), torch.tensor([0, 3])
        loss = torch.nn.functional.cross_entropy(m(x), y)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)


@pytest.mark.parametrize("name,kw", [
    pytest.param("timesformer_base", dict(attention_type="joint_space_time"), id="timesformer-joint"),
    pytest.param("vivit_base", dict(variant="factorised_dot_product", num_frames=4), id="vivit-4"),
])
def test_compile_fullgraph(name, kw):
    torch._dynamo.reset()
    m = randomize(tiny(name, **kw))
    x = video(T=m.config.num_frames)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), m(x), rtol=1e-5, atol=1e-5)


def test_compile_divided_runs():
    torch._dynamo.reset()
    m = randomize(tiny("timesformer_base")).train()
    x = video()
    compiled = torch.compile(m, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-5)


def test_compile_divided_fullgraph():
    torch._dynamo.reset()
    m = randomize(tiny("timesformer_base", depth=1))
    with torch.no_grad():
        torch.compile(m, fullgraph=True, backend="eager")(video())
