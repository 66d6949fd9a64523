"""torch.compile(fullgraph=True) of every bundled model and of swapped transformers models
with the default backend (``backend=None``: auto-dispatch, here the Triton interpreter),
in eval and in a training step, with no graph break, and outputs and gradients as eager."""

import pytest
import torch

import divattn
from divattn.models import create_model

from .models.helpers import randomize, video

MICRO = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_frames=4, num_classes=3)

BUNDLED = [
    pytest.param("timesformer_base", dict(attention_type="divided_space_time"), id="timesformer-divided"),
    pytest.param("timesformer_base", dict(memory="min"), id="timesformer-divided-memory-min"),
    pytest.param("timesformer_base", dict(attention_type="joint_space_time"), id="timesformer-joint"),
    pytest.param("timesformer_base", dict(attention_type="space_only"), id="timesformer-space_only"),
    pytest.param("vivit_base", dict(variant="spatio_temporal"), id="vivit-1"),
    pytest.param("vivit_base", dict(variant="factorised_encoder", temporal_depth=1), id="vivit-2"),
    pytest.param("vivit_base", dict(variant="factorised_self_attention"), id="vivit-3"),
    pytest.param("vivit_base", dict(variant="factorised_dot_product"), id="vivit-4"),
    pytest.param("st_transformer_tiny", dict(num_classes=None), id="st-causal"),
]


def _bundled(name, kw):
    torch.manual_seed(0)
    kw = {**MICRO, **kw}
    if kw.pop("num_classes", 3) is None:  # the ST transformer predicts frames
        kw = {k: v for k, v in kw.items() if k != "num_classes"}
    else:
        kw["num_classes"] = 3
    model = randomize(create_model(name, **kw))
    assert model.config.backend is None
    return model


def _check(model, x, compile_backend="aot_eager"):
    """Eval outputs, then a training step's outputs and gradients, compiled and eager."""
    explained = torch._dynamo.explain(model.eval())(x)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
    model.train()
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        out = fn(x)
        out = out.logits if hasattr(out, "logits") else out
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("name,kw", BUNDLED)
def test_bundled_model_compiles_fullgraph_with_the_default_backend(name, kw, kernel_calls):
    model = _bundled(name, kw)
    _check(model, video(B=1, T=4, size=16))
    assert kernel_calls, "auto-dispatch should have picked the Triton kernels here"


def test_default_inductor_compiles_a_training_step():
    """The default compile backend (inductor, C++ on a CPU), not only aot_eager."""
    _check(_bundled("timesformer_base", {}), video(B=1, T=4, size=16), compile_backend="inductor")


transformers = pytest.importorskip("transformers")


def _timesformer():
    cfg = transformers.TimesformerConfig(image_size=16, patch_size=8, num_frames=4, hidden_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                         num_labels=3)
    return transformers.TimesformerForVideoClassification(cfg)


def _vivit():
    cfg = transformers.VivitConfig(image_size=16, num_frames=4, tubelet_size=[2, 8, 8], hidden_size=32,
                                   num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, num_labels=3)
    return transformers.VivitForVideoClassification(cfg)


class _Logits(torch.nn.Module):
    """The logits of a transformers model on a ``(B, C, T, H, W)`` clip."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(pixel_values=x.transpose(1, 2)).logits


@pytest.mark.parametrize("build", [_timesformer, _vivit], ids=["timesformer", "vivit"])
def test_swapped_transformers_model_compiles_fullgraph_with_the_default_backend(build, kernel_calls):
    torch.manual_seed(0)
    model = randomize(build())
    assert divattn.swap_attention(model) == 1
    _check(_Logits(model), video(B=1, T=4, size=16))
    assert kernel_calls


def test_dispatch_marks_its_memoised_choices_as_dynamo_does():
    """The dispatcher marks its memoised choices constant for dynamo (the fullgraph tests
    above need it) without importing torch._dynamo: its mark must be dynamo's own, and
    importing the ops must leave torch._dynamo unimported (about a second a process)."""
    import subprocess
    import sys

    from divattn.ops import dispatch

    def mark(decorate):
        fn = decorate(lambda: None)
        return {k: v for k, v in vars(fn).items()}

    assert mark(dispatch._constant_result) == mark(torch.compiler.assume_constant_result) != {}
    for fn in (dispatch._triton_runtime_reason, dispatch._cuda_runtime_reason, dispatch._fitting):
        assert fn._dynamo_marked_constant is True
    out = subprocess.run([sys.executable, "-c", "import sys, divattn.ops; print('torch._dynamo' in sys.modules)"],
                         capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
