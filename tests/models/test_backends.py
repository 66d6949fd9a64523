"""The bundled models give the same outputs and gradients on the Triton kernels (run by the
interpreter on CPU; tests/conftest.py sets TRITON_INTERPRET=1) as on the reference path."""

import pytest
import torch

from divattn.models import create_model

from .helpers import randomize

MICRO = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_frames=4, num_classes=3)
CASES = [
    pytest.param("timesformer_base", dict(attention_type="divided_space_time"), True, id="timesformer-divided"),
    pytest.param("timesformer_base", dict(attention_type="joint_space_time"), False, id="timesformer-joint"),
    pytest.param("timesformer_base", dict(attention_type="space_only"), False, id="timesformer-space_only"),
    pytest.param("vivit_base", dict(variant="spatio_temporal"), False, id="vivit-1"),
    pytest.param("vivit_base", dict(variant="factorised_encoder", temporal_depth=1), False, id="vivit-2"),
    pytest.param("vivit_base", dict(variant="factorised_self_attention"), True, id="vivit-3"),
    pytest.param("vivit_base", dict(variant="factorised_dot_product"), True, id="vivit-4"),
]


def outputs_and_grads(model, x):
    model.zero_grad()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name,kw,check_grads", CASES)
def test_triton_matches_torch(name, kw, check_grads, kernel_calls):
    model = randomize(create_model(name, **{**MICRO, **kw}, backend="torch"))
    x = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref_out, ref_grads = outputs_and_grads(model, x) if check_grads else (model(x).detach(), None)
    assert kernel_calls == []
    assert model.set_backend("triton") == len(model.blocks) + len(getattr(model, "temporal_blocks", ()))
    if check_grads:
        out, grads = outputs_and_grads(model, x)
        for n in ref_grads:
            torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-4, atol=1e-5, msg=n)
    else:
        with torch.no_grad():
            out = model(x)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    assert kernel_calls, "the Triton backend was never called"


def test_global_backend_from_environment(monkeypatch, kernel_calls):
    model = randomize(create_model("timesformer_base", **MICRO)).eval()
    assert model.config.backend is None
    x = torch.randn(1, 3, 4, 16, 16)
    monkeypatch.setenv("DIVATTN_BACKEND", "torch")
    with torch.no_grad():
        ref = model(x)
    assert kernel_calls == []
    monkeypatch.setenv("DIVATTN_BACKEND", "triton")
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-4, atol=1e-5)
    assert kernel_calls == ["temporal", "spatial"]
