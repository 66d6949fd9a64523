"""scenic (Flax msgpack) ViViT checkpoints: the reader, the renaming, strict errors, logits.

Checkpoint files are written by Flax's own serializer (``flax.serialization.to_bytes``,
what ``flax.training.checkpoints.save_checkpoint`` writes) when Flax imports, and by a
restatement of it (``helpers.flax_msgpack_bytes``) otherwise; the committed fixture was
written by Flax from scenic's ViViT model 4, with the logits scenic's code computed, and
the restatement is checked against its bytes."""

import json
import pathlib
import warnings

import numpy as np
import pytest
import torch

from divattn.models import CheckpointMismatchError, create_model, load_checkpoint
from divattn.models.scenic import FlaxArray, ScenicCheckpointError, read_flax_msgpack, scenic_params

from .helpers import flax_msgpack_bytes, flax_params, randomize, scenic_vivit, tiny, to_numpy_tree, video

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from flax import serialization as flax_serialization
except ImportError:
    flax_serialization = None

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
WRITERS = [pytest.param("flax", marks=pytest.mark.skipif(flax_serialization is None, reason="flax is not installed")),
           "msgpack"]
CASES = [
    pytest.param("spatio_temporal", {}, id="m1-token"),
    pytest.param("spatio_temporal", dict(classifier="gap", representation_size=6), id="m1-gap-repr"),
    pytest.param("factorised_encoder", dict(temporal_depth=2, temporal_num_heads=4, temporal_mlp_dim=40),
                 id="m2-token-temporal4heads"),
    pytest.param("factorised_encoder", dict(temporal_depth=1, classifier="gmp"), id="m2-gmp"),
    pytest.param("factorised_self_attention", dict(attention_order="time_space"), id="m3-time_space"),
    pytest.param("factorised_dot_product", dict(num_heads=4, classifier="gsp", representation_size=5),
                 id="m4-4heads-gsp-repr"),
]


def serialize(tree, writer: str) -> bytes:
    return flax_serialization.to_bytes(tree) if writer == "flax" else flax_msgpack_bytes(tree)


def train_state(params, layout: str) -> dict:
    """scenic's ``TrainState`` (``params``) or the ``flax.optim`` one of the released checkpoints."""
    rng = np.array([0, 42], dtype=np.uint32)
    if layout == "params":
        return {"opt_state": {"0": {"count": np.int32(5)}}, "params": params, "global_step": 5, "model_state": {},
                "rng": rng, "metadata": {"chrono": {"accum_train_time": 1.5}}}
    return {"optimizer": {"target": params, "state": {"step": np.int32(5), "param_states": {}}}, "global_step": 5,
            "model_state": {}, "rng": rng, "accum_train_time": 1.5}


def fixture_model(backend: str = "torch"):
    cfg = json.loads((FIXTURES / "scenic_vivit_m4.json").read_text())["divattn"]
    return create_model("vivit_base", **cfg, backend=backend).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fixture_written_by_flax_gives_scenic_logits(backend):
    model = fixture_model(backend)
    report = load_checkpoint(model, FIXTURES / "scenic_vivit_m4_checkpoint")
    assert report.missing == report.unexpected == [] and report.resized == {}
    io = read_flax_msgpack(FIXTURES / "scenic_vivit_m4_io.msgpack")
    clip = io["video"].tensor().permute(0, 4, 1, 2, 3)  # (B, T, H, W, C) -> (B, C, T, H, W)
    with torch.no_grad():
        torch.testing.assert_close(model(clip), io["logits"].tensor(), rtol=1e-5, atol=1e-6)


def test_fixture_layout_as_read():
    tree = read_flax_msgpack(FIXTURES / "scenic_vivit_m4_checkpoint")
    assert set(tree) == {"optimizer", "global_step", "model_state", "rng"}
    step = tree["optimizer"]["state"]["step"]
    assert step.scalar and step.dtype == "int32" and step.tensor().item() == 0
    assert tree["rng"].dtype == "uint32" and tree["rng"].shape == (2,)
    params = scenic_params(tree)
    assert params is tree["optimizer"]["target"]
    attn = params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]
    assert attn["query"]["kernel"].shape == (8, 4, 2) and attn["out"]["kernel"].shape == (4, 2, 8)
    assert params["embedding"]["kernel"].tensor().shape == (2, 2, 2, 3, 8)


@pytest.mark.parametrize("name", ["scenic_vivit_m4_checkpoint", "scenic_vivit_m4_io.msgpack"])
def test_msgpack_restatement_writes_flax_bytes(name):
    """The writer these tests use when Flax is absent reproduces the Flax-written fixture."""
    data = (FIXTURES / name).read_bytes()
    assert flax_msgpack_bytes(to_numpy_tree(read_flax_msgpack(data))) == data


@pytest.mark.skipif(flax_serialization is None, reason="flax is not installed")
def test_msgpack_restatement_equals_flax():
    tree = train_state(flax_params(randomize(tiny("vivit_base", variant="factorised_encoder", num_frames=4,
                                                   temporal_depth=1))), "optimizer")
    assert flax_msgpack_bytes(tree) == flax_serialization.to_bytes(tree)


@pytest.mark.parametrize("layout", ["params", "optimizer"])
@pytest.mark.parametrize("writer", WRITERS)
@pytest.mark.parametrize("variant,kw", CASES)
def test_round_trip_logits(tmp_path, variant, kw, writer, layout):
    source = randomize(tiny("vivit_base", variant=variant, num_frames=4, **kw), seed=5)
    path = tmp_path / "checkpoint_5"
    path.write_bytes(serialize(train_state(flax_params(source), layout), writer))
    target = tiny("vivit_base", variant=variant, num_frames=4, **kw)
    report = load_checkpoint(target, path)
    assert report.missing == report.unexpected == []
    ts, ss = target.state_dict(), source.state_dict()
    assert ts.keys() == ss.keys()
    for k in ts:
        torch.testing.assert_close(ts[k], ss[k], rtol=0, atol=0, msg=k)
    x = video(T=4)
    with torch.no_grad():
        out = target(x)
        torch.testing.assert_close(out, source(x), rtol=0, atol=0)
        ref = scenic_vivit(source, x)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_in_memory_trees_and_registry(tmp_path):
    source = randomize(tiny("vivit_base", variant="factorised_dot_product", num_frames=4), seed=6)
    params = flax_params(source)
    for tree in (params, {"params": params}, train_state(params, "optimizer")):
        target = tiny("vivit_base", variant="factorised_dot_product", num_frames=4)
        load_checkpoint(target, tree)
        torch.testing.assert_close(target.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)
    path = tmp_path / "checkpoint_1"
    path.write_bytes(flax_msgpack_bytes(train_state(params, "params")))
    via_registry = create_model("vivit_base", checkpoint_path=path, img_size=32, patch_size=8, embed_dim=64, depth=2,
                                num_heads=2, num_frames=4, num_classes=4, variant="factorised_dot_product")
    torch.testing.assert_close(via_registry.head.weight, source.head.weight)


def test_two_d_embedding_kernel_loads_as_one_frame_tubelets():
    """scenic's ``temporal_sampling`` embeds frames with a 2-D ``(h, w, in, out)`` Conv."""
    source = randomize(tiny("vivit_base", num_frames=4, tubelet_size=1), seed=7)
    params = flax_params(source)
    params["embedding"]["kernel"] = params["embedding"]["kernel"][0]
    target = tiny("vivit_base", num_frames=4, tubelet_size=1)
    load_checkpoint(target, {"params": params})
    torch.testing.assert_close(target.patch_embed.proj.weight, source.patch_embed.proj.weight, rtol=0, atol=0)


def test_strict_errors_name_scenic_parameters():
    params = flax_params(randomize(tiny("vivit_base", variant="factorised_dot_product", num_frames=4, num_heads=4)))
    blocks = params["Transformer"]
    del blocks["encoderblock_1"]["MlpBlock_0"]["Dense_1"]["bias"]
    blocks["encoderblock_0"]["Extra_0"] = {"kernel": np.zeros((2, 2), np.float32)}
    params["output_projection"]["kernel"] = np.zeros((64, 5), np.float32)
    attn = blocks["encoderblock_1"]["MultiHeadDotProductAttention_0"]
    for part in ("query", "key", "value"):
        attn[part]["kernel"] = attn[part]["kernel"].reshape(64, 2, 32)
        attn[part]["bias"] = attn[part]["bias"].reshape(2, 32)
    attn["out"]["kernel"] = attn["out"]["kernel"].reshape(2, 32, 64)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tiny("vivit_base", variant="factorised_dot_product", num_frames=4, num_heads=4), params)
    msg = str(e.value)
    for expected in (
        "blocks.1.mlp.fc2.bias (scenic Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias)",
        "Transformer/encoderblock_0/Extra_0/kernel",
        "head.weight (scenic output_projection/kernel): checkpoint (5, 64), model (4, 64)",
        "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/query/kernel: the checkpoint has 2 heads of 32, "
        "the model's blocks.1.attn has 4",
        "Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out/kernel: the checkpoint has 2 heads",
    ):
        assert expected in msg, expected


def test_attention_parts_that_cannot_be_fused():
    params = flax_params(randomize(tiny("vivit_base", num_frames=4)))
    del params["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_0"]["key"]["kernel"]
    attn1 = params["Transformer"]["encoderblock_1"]["MultiHeadDotProductAttention_0"]
    attn1["query"]["bias"] = attn1["query"]["bias"].reshape(-1)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tiny("vivit_base", num_frames=4), params)
    msg = str(e.value)
    assert "Transformer/encoderblock_0/MultiHeadDotProductAttention_0: the checkpoint has query, value kernel but " \
           "not all of query, key, value" in msg
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_0: the query / key / value bias must each be " \
           "(heads, head_dim), all of one shape, got (64,), (2, 32), (2, 32)" in msg
    assert "blocks.0.attn.qkv.weight (scenic Transformer/encoderblock_0/MultiHeadDotProductAttention_0/" \
           "{query,key,value}/kernel)" in msg


def test_non_strict_loads_the_rest():
    source = randomize(tiny("vivit_base", num_frames=4, representation_size=6), seed=8)
    params = flax_params(source)
    del params["Transformer"]["encoder_norm"]["bias"]
    target = tiny("vivit_base", num_frames=4)
    with pytest.warns(UserWarning, match="norm.bias"):
        report = load_checkpoint(target, params, strict=False, ignore_head=True)
    assert report.missing == ["norm.bias"] and report.unexpected == ["pre_logits.fc.bias", "pre_logits.fc.weight"]
    assert report.ignored == ["head.bias", "head.weight"]
    torch.testing.assert_close(target.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_another_variant_is_named():
    params = flax_params(randomize(tiny("vivit_base", variant="factorised_self_attention", num_frames=4)))
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tiny("vivit_base", variant="factorised_dot_product", num_frames=4), params)
    msg = str(e.value)
    assert "blocks.0.temporal_norm1.weight (scenic Transformer/encoderblock_0/LayerNorm_time/scale)" in msg
    assert "blocks.0.temporal_attn.qkv.weight (scenic Transformer/encoderblock_0/MultiHeadDotProductAttention_time/" \
           "query/kernel+" in msg
    assert "blocks.0.attn.qkv.weight (scenic Transformer/encoderblock_0/MultiHeadDotProductAttention_space" not in msg


def test_resizes_position_embeddings():
    source = randomize(tiny("vivit_base", num_frames=4), seed=9)
    target = tiny("vivit_base", num_frames=8, img_size=48)
    report = load_checkpoint(target, {"params": flax_params(source)}, checkpoint_grid=(2, 4, 4))
    assert report.resized == {"pos_embed": ((1, 33, 64), (1, 145, 64))}
    clip = video(T=8, size=48)
    with torch.no_grad():
        torch.testing.assert_close(target(clip), source(clip), rtol=1e-5, atol=1e-5)


def test_reader_dtypes_scalars_and_chunked_arrays():
    import msgpack

    def ext(shape, dtype, data, code=1):
        return msgpack.ExtType(code, msgpack.packb((shape, dtype, data), use_bin_type=True))

    bf16 = torch.randn(3, 4).to(torch.bfloat16)
    full = np.arange(10, dtype=np.float32).reshape(2, 5)
    flat = full.reshape(-1)
    data = msgpack.packb({
        "bf16": ext([3, 4], "bfloat16", bf16.view(torch.int16).numpy().tobytes()),
        "step": ext([], "int64", np.int64(7).tobytes(), code=3),
        "z": msgpack.ExtType(2, msgpack.packb((1.5, -2.0))),
        "big": {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 5},
                "chunks": {"0": ext([6], "float32", flat[:6].tobytes()), "1": ext([4], "float32", flat[6:].tobytes())}},
        "list": {"0": 1, "1": "two"},
    })
    tree = read_flax_msgpack(data)
    assert torch.equal(tree["bf16"].tensor(), bf16)
    assert tree["step"].scalar and tree["step"].tensor().item() == 7
    assert tree["z"] == complex(1.5, -2.0)
    assert isinstance(tree["big"], FlaxArray) and torch.equal(tree["big"].tensor(), torch.from_numpy(full))
    assert tree["list"] == {"0": 1, "1": "two"}
    with pytest.raises(ScenicCheckpointError, match="dtype 'float8_e4m3b11fnuz'"):
        read_flax_msgpack(msgpack.packb({"x": ext([1], "float8_e4m3b11fnuz", b"\0")}))["x"].tensor()


def test_bad_files(tmp_path):
    data = (FIXTURES / "scenic_vivit_m4_checkpoint").read_bytes()
    (tmp_path / "truncated").write_bytes(data[:-200])
    with pytest.raises(CheckpointMismatchError, match="cannot read the scenic checkpoint"):
        load_checkpoint(fixture_model(), tmp_path / "truncated")
    with pytest.raises(ScenicCheckpointError, match="is a directory"):
        read_flax_msgpack(tmp_path)
    (tmp_path / "no_params").write_bytes(flax_msgpack_bytes({"step": 3, "opt": {"lr": np.float32(0.1)}}))
    with pytest.raises(CheckpointMismatchError, match="found no"):
        load_checkpoint(fixture_model(), tmp_path / "no_params")
    with pytest.raises(TypeError, match="scenic checkpoint holds a ViViT"):
        load_checkpoint(tiny("timesformer_base"), FIXTURES / "scenic_vivit_m4_checkpoint")
