"""swap_attention on transformers Timesformer and Vivit models: same weights and outputs,
and every transformers feature the unswapped model has (attentions, gradient
checkpointing, masks, attention dropout, save/load, dtype moves, torch.compile)."""

import copy
import warnings

import pytest
import torch
from torch import nn

import divattn
import divattn.ops.functions
from divattn.models import create_model

from .models.helpers import randomize

transformers = pytest.importorskip("transformers")
from divattn import swap_transformers  # noqa: E402  (needs transformers)
from divattn.swap_transformers import (  # noqa: E402
    TimesformerDividedLayer,
    TimesformerJointSelfAttention,
    VivitJointAttention,
)

SMALL = dict(image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
             intermediate_size=128, num_labels=5)


def timesformer(attention_type="divided_space_time", **kw):
    torch.manual_seed(0)
    cfg = transformers.TimesformerConfig(patch_size=8, attention_type=attention_type, **{**SMALL, **kw})
    return randomize(transformers.TimesformerForVideoClassification(cfg).eval(), seed=1)


def vivit(attn_implementation="sdpa", **kw):
    torch.manual_seed(0)
    cfg = transformers.VivitConfig(tubelet_size=[2, 8, 8], **{**SMALL, **kw})
    model = transformers.VivitForVideoClassification._from_config(cfg, attn_implementation=attn_implementation)
    return randomize(model.eval(), seed=2)


def pair(build):
    """The same model twice: as built, and swapped (backend auto)."""
    plain, swapped = build(), build()
    assert divattn.swap_attention(swapped) == 2
    return plain, swapped


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
    real = divattn.ops.functions.sources

    def sources(views):
        q = views[0]
        seen.append(q._base.numel() if q._base is not None else None)
        return real(views)

    monkeypatch.setattr(divattn.ops.functions, "sources", sources)
    divattn.swap_attention(model, backend="triton")
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values=x).logits, before, rtol=1e-4, atol=1e-5)
    qkv_output = 2 * (1 + 16 * 4) * 3 * 64  # q is a view of the Linear's (B, 1 + N*T, 3C) output, not of a copy
    assert seen == [qkv_output] * 4


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


MODELS = [
    pytest.param(lambda: timesformer("divided_space_time"), id="timesformer-divided"),
    pytest.param(lambda: timesformer("joint_space_time"), id="timesformer-joint"),
    pytest.param(lambda: timesformer("space_only"), id="timesformer-space_only"),
    pytest.param(lambda: vivit("eager"), id="vivit-eager"),
    pytest.param(lambda: vivit("sdpa"), id="vivit-sdpa"),
]


@pytest.mark.parametrize("build", MODELS)
@pytest.mark.parametrize("via", ["argument", "config"])
def test_output_attentions_are_the_eager_probabilities(build, via):
    """Swapped layers compute the probabilities on the eager path for that call: the same
    as the unswapped model in eager mode (a Vivit configured for SDPA included, which
    unswapped returns none of)."""
    plain, swapped = pair(build)
    x = clip()
    kw = {"output_attentions": True}
    if via == "config":
        try:
            plain.config.output_attentions = True
        except ValueError as e:  # transformers refuses it for SDPA, swapped or not
            with pytest.raises(ValueError, match=str(e)[:40]):
                swapped.config.output_attentions = True
            return
        swapped.config.output_attentions = True
        kw = {}
    if isinstance(plain, transformers.VivitForVideoClassification):
        plain.set_attn_implementation("eager")
    with torch.no_grad():
        want, got = plain(pixel_values=x, **kw), swapped(pixel_values=x, **kw)
    assert len(got.attentions) == len(want.attentions) == 2
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [MODELS[0], MODELS[3]])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_behaves_as_unswapped(build, reentrant):
    """Swapped layers stay GradientCheckpointingLayers: every_n_layers picks the same
    layers, and the gradients match the unswapped model's."""
    plain, swapped = pair(build)
    layers = [m for m in swapped.modules() if isinstance(m, transformers.modeling_layers.GradientCheckpointingLayer)]
    assert len(layers) == 2
    x = clip()
    kwargs = dict(activation_checkpointing_kwargs={"use_reentrant": reentrant}, every_n_layers=2)
    for m in (plain, swapped):
        m.activation_checkpointing_enable(**kwargs)
        m.train()
    flags = lambda m: [layer.gradient_checkpointing for layer in m.modules()  # noqa: E731
                       if isinstance(layer, transformers.modeling_layers.GradientCheckpointingLayer)]
    assert flags(swapped) == flags(plain) == [True, False]
    inp = x.clone().requires_grad_(True)  # reentrant checkpointing needs an input that requires grad
    for m in (plain, swapped):
        torch.manual_seed(0)
        m(pixel_values=inp).logits.square().sum().backward()
    for (name, p), q in zip(plain.named_parameters(), swapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_checkpointed_layers_run_the_ops_in_the_recomputation(kernel_calls):
    plain, swapped = pair(timesformer)
    swapped.activation_checkpointing_enable()
    swapped.train()
    swapped(pixel_values=clip()).logits.sum().backward()
    # forward, then the recomputation in the backward: the fused ops both times
    assert kernel_calls == ["temporal", "spatial"] * 4


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_vivit_attention_mask_runs_the_replaced_attention_with_a_warning(impl):
    plain, swapped = pair(lambda: vivit(impl))
    x = clip()
    mask = torch.ones(2, 1 + 2 * 4 * 4, dtype=torch.long)
    mask[1, 20:] = 0
    swap_transformers._WARNED.discard("vivit-mask")
    with torch.no_grad():
        want = plain(pixel_values=x, attention_mask=mask).logits
        with pytest.warns(UserWarning, match="attention_mask runs on the transformers attention"):
            got = swapped(pixel_values=x, attention_mask=mask).logits
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once
            swapped(pixel_values=x, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(want[1], plain(pixel_values=x).logits[1].detach())  # the mask mattered


@pytest.mark.parametrize("build", [lambda: timesformer(attention_probs_dropout_prob=0.1),
                                   lambda: timesformer("joint_space_time", attention_probs_dropout_prob=0.1),
                                   lambda: vivit(attention_probs_dropout_prob=0.1)],
                         ids=["timesformer-divided", "timesformer-joint", "vivit"])
def test_attention_dropout_is_swapped_and_trains_as_unswapped(build, kernel_calls):
    """Layers with attention dropout are swapped: in eval the ops run; a training call
    runs the replaced code with the dropout (one warning), so with the same seed it gives
    the unswapped model's outputs and gradients."""
    plain, swapped = pair(build)
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(swapped(pixel_values=x).logits, plain(pixel_values=x).logits,
                                   rtol=1e-5, atol=1e-5)
    assert kernel_calls
    kernel_calls.clear()
    swap_transformers._WARNED.clear()
    plain.train()
    swapped.train()
    outs = []
    for m in (plain, swapped):
        torch.manual_seed(3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = m(pixel_values=x).logits
        out.square().sum().backward()
        outs.append((out, [w for w in caught if "attention dropout" in str(w.message)]))
    (want, none), (got, warned) = outs
    assert not none and len(warned) == 1
    assert kernel_calls == []
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), swapped.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("build", [MODELS[0], MODELS[1], MODELS[4]])
def test_save_pretrained_round_trip_and_dtype(build, tmp_path):
    plain, swapped = pair(build)
    swapped.save_pretrained(tmp_path)
    loaded = type(plain).from_pretrained(tmp_path).eval()
    assert list(loaded.state_dict()) == list(swapped.state_dict())
    x = clip()
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, plain(pixel_values=x).logits, rtol=1e-5, atol=1e-6)
        twin = swapped.to(torch.float64)
        assert all(p.dtype == torch.float64 for p in twin.parameters())
        torch.testing.assert_close(twin(pixel_values=x.double()).logits.float(), plain(pixel_values=x).logits,
                                   rtol=1e-4, atol=1e-5)


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


def test_transformers_swap_plugin_swaps_models_at_construction(tmp_path):
    """divattn.testing.transformers_swap (for running transformers' own model tests on
    swapped models) swaps a Timesformer as it is built."""
    import subprocess
    import sys

    (tmp_path / "test_built.py").write_text(
        "import transformers\n"
        "from divattn.swap_transformers import TimesformerDividedLayer\n"
        "def test_built_models_are_swapped():\n"
        "    cfg = transformers.TimesformerConfig(image_size=16, patch_size=8, num_frames=2, hidden_size=32,\n"
        "                                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)\n"
        "    model = transformers.TimesformerForVideoClassification(cfg)\n"
        "    assert isinstance(model.timesformer.encoder.layer[0], TimesformerDividedLayer)\n")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "divattn.testing.transformers_swap",
                          "-p", "no:cacheprovider", str(tmp_path / "test_built.py")],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "divattn: swapped" in out.stdout
