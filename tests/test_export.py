"""Export: ONNX (onnxruntime reproduces the ops and the models) and torch.export.

The ops' ONNX translations are checked against the fp64 reference with the op tests'
tolerances; the models' exports against their eager logits (1e-4), at the example's
batch and frame count and at others (the exports have both dynamic). The README's
"Export and deploy" example builds and runs an AOTInductor package (tests/test_readme.py).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from torch import nn

import divattn
import divattn.export as dx
from divattn.models import create_model, from_transformers

from .models.helpers import randomize
from .ops.cases import ATOL, FACTOR, C, case_fn, make_leaves, max_err, plain_precision

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
transformers = pytest.importorskip("transformers")
from divattn import swap_transformers  # noqa: E402  (needs transformers)

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_frames=8, num_classes=4)


def session(program, tmp_path):
    """Save the ONNX program as a file, check the file in full and open it in onnxruntime."""
    path = tmp_path / "model.onnx"
    program.save(str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess, *inputs):
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return [torch.from_numpy(y) for y in sess.run(None, feeds)]


# ---------------------------------------------------------------- the ops' translations

class Ops(nn.Module):
    """A case's op on views of the module's inputs (the case's leaves)."""

    def __init__(self, case, fn=None):
        super().__init__()
        self.fn = fn or case_fn(case)

    def forward(self, *leaves):
        return self.fn(list(leaves), "torch")


def _causal(Tq):
    """Causal temporal attention on (t h w) views of one qkv; queries for the last Tq frames."""
    def fn(leaves, backend):
        q, k, v = divattn.split_qkv(leaves[0][:, 1:], 8, 49, order="thw", has_cls=False)
        return (divattn.temporal_attention(q[:, 8 - Tq:], k, v, causal=True, backend=backend),)
    return fn


OP_CASES = [
    pytest.param(C("temporal", 2, 8, 49, 3, 64, "hwt"), None, id="temporal-T8-N49-hwt"),
    pytest.param(C("temporal", 2, 13, 1, 2, 40, "thw", "separate"), None, id="temporal-T13-N1-thw-separate"),
    pytest.param(C("temporal", 2, 8, 49, 2, 32, "thw"), _causal(8), id="temporal-causal-thw"),
    pytest.param(C("temporal", 2, 8, 49, 2, 32, "thw"), _causal(3), id="temporal-causal-Tq3-Tk8-thw"),
    pytest.param(C("spatial", 2, 3, 49, 2, 64, "hwt"), None, id="spatial-T3-N49-hwt"),
    pytest.param(C("spatial", 2, 8, 49, 1, 72, "thw"), None, id="spatial-T8-N49-D72-thw"),
    pytest.param(C("spatial_cls", 2, 8, 49, 2, 64, "hwt"), None, id="spatial_cls-T8-N49-hwt"),
    pytest.param(C("spatial_cls", 2, 3, 49, 3, 72, "thw", "separate"), None, id="spatial_cls-T3-N49-thw-separate"),
    pytest.param(C("spatial_cls", 2, 1, 49, 2, 64, "hwt"), None, id="spatial_cls-T1-N49"),
    pytest.param(C("joint", 2, 3, 49, 2, 64, "hwt"), None, id="joint-L148"),
]


# fp16 on the packed layouts, one case per op
FP16_CASES = [p for p in OP_CASES if p.values[0].layout == "packed"]


@pytest.mark.parametrize("case,fn,dtype", [pytest.param(*p.values, torch.float32, id=p.id + "-fp32") for p in OP_CASES]
                         + [pytest.param(*p.values, torch.float16, id=p.id + "-fp16") for p in FP16_CASES])
def test_op_translation_matches_fp64_reference(case, fn, dtype, tmp_path):
    """Each op exported with a dynamic batch, run by onnxruntime at the example's batch and
    at another, within the op tests' bar of the fp64 reference."""
    fn = fn or case_fn(case)
    module = Ops(case, fn).eval()
    gen = torch.Generator().manual_seed(0)
    example = [x.to(dtype) for x in make_leaves(case, gen)]
    batch = torch.export.Dim("batch", min=1, max=8)
    program = dx.export_onnx(module, tuple(example), dynamic_shapes=(tuple({0: batch} for _ in example),))
    sess = session(program, tmp_path)
    for B in (case.B, 3):
        leaves64 = make_leaves(C(case.op, B, case.T, case.N, case.H, case.D, case.order, case.layout), gen)
        ref = fn(leaves64, "reference")
        with plain_precision():
            low = fn([x.to(dtype) for x in leaves64], "reference")
        got = run(sess, *(x.to(dtype) for x in leaves64))
        assert len(got) == len(ref)
        for i, (g, lo, r) in enumerate(zip(got, low, ref)):
            assert g.dtype == dtype and g.shape == r.shape, f"out{i}: {g.dtype} {tuple(g.shape)}"
            bound = FACTOR * max_err(lo.double(), r) + ATOL[dtype] * max(1.0, r.abs().max().item())
            err = max_err(g.double(), r)
            assert err <= bound, f"B={B} out{i}: max err {err:.3e} > bound {bound:.3e}"


def test_graph_uses_standard_operators_and_no_batch_merging_reshape(tmp_path):
    """Temporal attention in (h w t) order: MatMul/Softmax over (B, N, H, T, D) views, no
    (B*N, T, .) reshape of q, k or v, and no op outside the default ONNX domain."""
    case = C("temporal", 2, 8, 49, 3, 64, "hwt")
    program = dx.export_onnx(Ops(case).eval(), tuple(make_leaves(case, torch.Generator().manual_seed(0))))
    graph = program.model_proto.graph
    ops = [n.op_type for n in graph.node]
    assert {n.domain for n in graph.node} <= {""}
    assert ops.count("MatMul") == 2 and ops.count("Softmax") == 1
    shapes = {tuple(d.dim_value for d in v.type.tensor_type.shape.dim) for v in graph.value_info}
    assert (2 * 49, 8, 3, 64) not in shapes and (2 * 49 * 3, 8, 64) not in shapes
    assert (2, 49, 3, 8, 8) in shapes  # the scores, batched over (b, n, h) as they lie


# ------------------------------------------------------------------------ the models

def _bundled(name, **kw):
    def build():
        torch.manual_seed(0)
        return randomize(create_model(name, **{**TINY, "backend": "torch", **kw}).eval())
    return build


def _st():
    torch.manual_seed(0)
    return randomize(create_model("st_transformer_tiny", img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2,
                                  num_frames=6, backend="torch").eval())


MODELS = [
    pytest.param(_bundled("timesformer_base"), (2, 3, 8, 32, 32), (3, 4), id="timesformer-divided"),
    pytest.param(_bundled("timesformer_base", attention_type="joint_space_time"), (2, 3, 8, 32, 32), (3, 4),
                 id="timesformer-joint"),
    pytest.param(_bundled("timesformer_base", attention_type="space_only"), (2, 3, 8, 32, 32), (3, 4),
                 id="timesformer-space_only"),
    pytest.param(_bundled("vivit_base", variant="spatio_temporal", tubelet_size=2), (2, 3, 8, 32, 32), (3, 4),
                 id="vivit-1-spatio_temporal"),
    pytest.param(_bundled("vivit_base", variant="factorised_encoder", tubelet_size=2), (2, 3, 8, 32, 32), (3, 4),
                 id="vivit-2-factorised_encoder"),
    pytest.param(_bundled("vivit_base", variant="factorised_self_attention", tubelet_size=2), (2, 3, 8, 32, 32),
                 (3, 12), id="vivit-3-factorised_self_attention"),
    pytest.param(_bundled("vivit_base", variant="factorised_dot_product", tubelet_size=2), (2, 3, 8, 32, 32), (3, 4),
                 id="vivit-4-factorised_dot_product"),
    pytest.param(_st, (2, 3, 6, 16, 16), (3, 3), id="st_transformer-causal"),
]


@pytest.mark.parametrize("build,shape,other", MODELS)
def test_bundled_model_onnx_reproduces_logits(build, shape, other, tmp_path):
    """Dynamic batch and frame count (:func:`divattn.export.dynamic_shapes`); the time /
    position embeddings resize inside the graph for the other frame count."""
    model = build()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    sess = session(dx.export_onnx(model, (x,), dynamic_shapes=dx.dynamic_shapes(model)), tmp_path)
    B, T = other
    for clip in (x, torch.randn(B, shape[1], T, *shape[3:], generator=gen)):
        with torch.no_grad():
            want = model(clip)
        (got,) = run(sess, clip)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


HF_SMALL = dict(image_size=32, num_frames=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=128, num_labels=5)


def _hf_timesformer():
    torch.manual_seed(0)
    cfg = transformers.TimesformerConfig(patch_size=8, **HF_SMALL)
    return randomize(transformers.TimesformerForVideoClassification(cfg).eval(), seed=1)


def _hf_vivit():
    torch.manual_seed(0)
    cfg = transformers.VivitConfig(tubelet_size=[2, 8, 8], **HF_SMALL)
    return randomize(transformers.VivitForVideoClassification(cfg).eval(), seed=2)


def _swapped_export_matches(build, tmp_path, holds_divattn=True):
    model = build()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 32, 32, generator=gen)
    with torch.no_grad():
        before = model(pixel_values=x).logits
    assert divattn.swap_attention(model, backend="torch") == 2
    ep = torch.export.export(model, (x,), dynamic_shapes=dx.dynamic_shapes(model, frames=False))
    assert any(n.target is torch.ops.divattn.attention.default for n in ep.graph.nodes) == holds_divattn
    sess = session(dx.export_onnx(ep, (x,)), tmp_path)
    for clip in (x, torch.randn(3, 4, 3, 32, 32, generator=gen)):
        with torch.no_grad():
            want = model(pixel_values=clip).logits
        (got,) = run(sess, clip)[:1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    (got,) = run(sess, x)[:1]
    torch.testing.assert_close(got, before, rtol=1e-4, atol=1e-4)


def test_swapped_transformers_timesformer_onnx(tmp_path):
    _swapped_export_matches(_hf_timesformer, tmp_path)


def test_swapped_transformers_vivit_onnx(tmp_path):
    """Traced, transformers 5's VivitModel passes an (all-True) attention mask, so the
    swapped layers run the attention they replaced (with its warning): the export holds
    transformers' attention, and reproduces the logits."""
    with pytest.warns(UserWarning, match="attention_mask runs on the transformers attention"):
        swap_transformers._WARNED.discard("vivit-mask")
        _swapped_export_matches(_hf_vivit, tmp_path, holds_divattn=False)


def test_every_backend_exports_the_same_graph(tmp_path):
    """The exported program holds divattn::attention with the model's backend; ONNX ignores it."""
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    graphs = {}
    for backend in ("torch", "triton"):
        model = _bundled("timesformer_base")()
        model.set_backend(backend)
        program = dx.export_onnx(model, (x,))
        calls = [n for n in program.exported_program.graph.nodes if n.target is torch.ops.divattn.attention.default]
        assert len(calls) == 2 * TINY["depth"] and all(n.args[-1] == backend for n in calls)
        graphs[backend] = [(n.op_type, str(n.attribute)) for n in program.model_proto.graph.node]
    assert graphs["triton"] == graphs["torch"]


# ---------------------------------------------------------------------- torch.export

def test_torch_export_keeps_the_ops_and_loads_back(tmp_path):
    model = _bundled("timesformer_base")()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 32, 32, generator=gen)
    ep = torch.export.export(model, (x,), dynamic_shapes=dx.dynamic_shapes(model))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.divattn.attention.default) == 4
    assert targets.count(torch.ops.divattn.add_after_first.default) == 2
    assert not any("scaled_dot_product" in str(t) for t in targets)
    torch.export.save(ep, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2")
    for clip in (x, torch.randn(3, 3, 5, 32, 32, generator=gen)):
        with torch.no_grad():
            torch.testing.assert_close(loaded.module()(clip), model(clip), rtol=1e-5, atol=1e-5)


def test_exported_op_has_no_backward():
    model = _bundled("timesformer_base")()
    ep = torch.export.export(model, (torch.randn(2, 3, 8, 32, 32),))
    with pytest.raises(RuntimeError, match="inference op of exported programs .* train the model itself"):
        ep.module()(torch.randn(2, 3, 8, 32, 32)).sum().backward()


# ---------------------------------------------------------------------------- errors

def test_exported_op_refuses_a_q_in_another_token_order():
    qkv = torch.randn(1, 1 + 4 * 3, 3, 2, 8)
    q, k, v, _ = divattn.split_qkv(qkv, 3, 4, order="hwt", has_cls=True)
    with pytest.raises(ValueError, match="'hwt' token order; the exported graph was traced with 'thw'"):
        torch.ops.divattn.attention(q, k, v, None, None, None, "temporal", "thw", 0.35, False, "torch")


def test_dynamic_shapes_names_what_cannot_be_dynamic():
    with pytest.raises(dx.ExportError, match=r"frames \(dim 1 of pixel_values\) cannot be dynamic .*"
                                             r"TimesformerEmbeddings.*from_transformers"):
        dx.dynamic_shapes(_hf_timesformer())
    with pytest.raises(dx.ExportError, match=r"frames \(dim 1 of pixel_values\).*VivitEmbeddings"):
        dx.dynamic_shapes(_hf_vivit())
    with pytest.raises(dx.ExportError, match=r"frames \(dim 2 of the video\) can be at most 6 .*num_frames"):
        dx.dynamic_shapes(_st(), max_frames=8)
    with pytest.raises(dx.ExportError, match="neither a bundled divattn model nor"):
        dx.dynamic_shapes(nn.Linear(2, 2))
    (dims,) = dx.dynamic_shapes(_bundled("vivit_base", tubelet_size=2)(), batch=False)
    assert list(dims) == [2]


def test_converted_transformers_model_exports_dynamic_frames(tmp_path):
    """What the frames error advises: the bundled model converted from transformers."""
    hf = _hf_timesformer()
    model = from_transformers(hf, backend="torch")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 32, 32, generator=gen)
    sess = session(dx.export_onnx(model, (x,), dynamic_shapes=dx.dynamic_shapes(model)), tmp_path)
    clip = torch.randn(1, 3, 6, 32, 32, generator=gen)
    with torch.no_grad():
        torch.testing.assert_close(run(sess, clip)[0], model(clip), rtol=1e-4, atol=1e-4)


def test_export_onnx_errors_say_what_to_change(monkeypatch):
    with pytest.raises(dx.ExportError, match="dynamo exporter only; drop dynamo=False"):
        dx.export_onnx(nn.Linear(2, 2), (torch.randn(1, 2),), dynamo=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else
                        find_spec(name, *a))
    with pytest.raises(dx.ExportError, match=r"needs onnxscript.*pip install 'divattn\[export\]'"):
        dx.onnx_translations()
