import ast
import inspect
import pathlib
import pickle

import pytest
import torch

from divattn.models import (CheckpointMismatchError, TimeSformer, checkpoint, create_model, load_checkpoint,
                            read_state_dict, registry, transformers_to_divattn)
from divattn.models.pos_embed import resize_pos_embed, resize_time_embed

from .helpers import TINY, randomize, tiny, video


@pytest.fixture
def source():
    return randomize(tiny("timesformer_base"), seed=1)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("layout", ["official", "plain", "ddp", "state_dict_entry"])
def test_loads_official_and_plain_layouts(tmp_path, source, layout):
    sd = source.state_dict()
    obj = {
        "official": {"epoch": 15, "model_state": {f"model.{k}": v for k, v in sd.items()}, "cfg": "TRAIN:\n  ENABLE: True\n"},
        "plain": sd,
        "ddp": {f"module.model.{k}": v for k, v in sd.items()},
        "state_dict_entry": {"state_dict": sd, "step": 7},
    }[layout]
    path = tmp_path / "ckpt.pyth"
    torch.save(obj, path)
    model = tiny("timesformer_base")
    report = load_checkpoint(model, path)
    assert_same_weights(model, source)
    assert report.missing == report.unexpected == [] and report.resized == {}
    with torch.no_grad():
        torch.testing.assert_close(model(video()), source(video()))
    via_registry = create_model("timesformer_base", checkpoint_path=path, **TINY)
    assert_same_weights(via_registry, source)


def test_strict_errors_name_every_key(source):
    sd = source.state_dict()
    sd.pop("blocks.1.temporal_fc.bias")
    sd["blocks.0.extra.weight"] = torch.zeros(1)
    sd["norm.weight"] = torch.ones(65)
    with pytest.raises(CheckpointMismatchError) as e:
        load_checkpoint(tiny("timesformer_base"), sd)
    msg = str(e.value)
    for name in ("blocks.1.temporal_fc.bias", "blocks.0.extra.weight", "norm.weight: checkpoint (65,), model (64,)"):
        assert name in msg


def test_non_strict_loads_the_rest_and_says_what_it_skipped(source):
    sd = source.state_dict()
    sd.pop("head.bias")
    sd["fc_norm.weight"] = torch.ones(64)
    model = tiny("timesformer_base")
    with pytest.warns(UserWarning, match="head.bias"):
        report = load_checkpoint(model, sd, strict=False)
    assert report.missing == ["head.bias"] and report.unexpected == ["fc_norm.weight"]
    torch.testing.assert_close(model.head.weight, source.head.weight)


def test_ignore_head_for_another_label_set(source):
    model = tiny("timesformer_base", num_classes=7)
    with pytest.raises(CheckpointMismatchError, match=r"head.weight: checkpoint \(4, 64\), model \(7, 64\)"):
        load_checkpoint(model, source.state_dict())
    report = load_checkpoint(model, source.state_dict(), ignore_head=True)
    assert report.ignored == ["head.bias", "head.weight"]
    torch.testing.assert_close(model.blocks[1].attn.qkv.weight, source.blocks[1].attn.qkv.weight)


def test_weights_only_refuses_pickled_objects(tmp_path, source):
    path = tmp_path / "evil.pth"
    torch.save({"model_state": source.state_dict(), "callback": print}, path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tiny("timesformer_base"), path)


def test_no_state_dict_inside():
    with pytest.raises(CheckpointMismatchError, match="found no state dict"):
        read_state_dict({"epoch": 3, "optimizer": {"lr": 0.1}})


@pytest.mark.parametrize("mode", ["nearest", "bicubic"])
@pytest.mark.parametrize("attention_type", ["divided_space_time", "space_only"])
def test_load_time_resize_equals_run_time_resize(source, mode, attention_type):
    source = randomize(tiny("timesformer_base", attention_type=attention_type, interpolation=mode), seed=2)
    target = tiny("timesformer_base", attention_type=attention_type, num_frames=4, img_size=48, interpolation=mode)
    report = load_checkpoint(target, source.state_dict())
    expected = {"pos_embed": ((1, 17, 64), (1, 37, 64))}
    if attention_type != "space_only":
        expected["time_embed"] = ((1, 8, 64), (1, 4, 64))
        torch.testing.assert_close(target.time_embed, resize_time_embed(source.time_embed, 4, mode))
    assert report.resized == expected
    torch.testing.assert_close(target.pos_embed, resize_pos_embed(source.pos_embed, (6, 6), mode=mode))
    clip = video(T=4, size=48)
    with torch.no_grad():
        torch.testing.assert_close(target(clip), source(clip), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["spatio_temporal", "factorised_encoder", "factorised_self_attention"])
def test_vivit_round_trip_and_resize(variant):
    source = randomize(tiny("vivit_base", variant=variant, num_frames=4), seed=3)
    same = tiny("vivit_base", variant=variant, num_frames=4)
    load_checkpoint(same, source.state_dict())
    assert_same_weights(same, source)
    bigger = tiny("vivit_base", variant=variant, num_frames=8, img_size=48)
    if variant != "factorised_encoder":
        with pytest.raises(CheckpointMismatchError, match="checkpoint_grid"):
            load_checkpoint(bigger, source.state_dict())
    report = load_checkpoint(bigger, source.state_dict(), checkpoint_grid=(2, 4, 4))
    assert set(report.resized) == ({"pos_embed", "temporal_pos_embed"} if variant == "factorised_encoder" else {"pos_embed"})
    for clip, model in ((video(T=8, size=48), bigger), (video(T=8), tiny("vivit_base", variant=variant, num_frames=8)),
                        (video(T=4, size=48), tiny("vivit_base", variant=variant, num_frames=4, img_size=48))):
        if model is not bigger:
            load_checkpoint(model, source.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(model(clip), source(clip), rtol=1e-5, atol=1e-5)


def test_load_checkpoint_calls_the_models_own_conversion(source):
    class Renamed(TimeSformer):
        def checkpoint_filter_fn(self, state_dict):
            return {k.removeprefix("legacy."): v for k, v in state_dict.items()}

    model = Renamed(tiny("timesformer_base").config)
    load_checkpoint(model, {f"legacy.{k}": v for k, v in source.state_dict().items()})
    assert_same_weights(model, source)
    with pytest.raises(CheckpointMismatchError, match="unexpected keys: .*'legacy.cls_token'"):
        load_checkpoint(tiny("timesformer_base"), {f"legacy.{k}": v for k, v in source.state_dict().items()})


def test_layouts_a_model_cannot_convert_are_refused():
    st = create_model("st_transformer_tiny", img_size=32, patch_size=8, num_frames=4, depth=1)
    hf_like = {"embeddings.patch_embeddings.projection.weight": torch.zeros(1)}
    with pytest.raises(TypeError, match="expected a bundled TimeSformer or ViViT, got STTransformer"):
        load_checkpoint(st, hf_like)
    scenic = pathlib.Path(__file__).parent / "fixtures" / "scenic_vivit_m4_checkpoint"
    with pytest.raises(TypeError, match="scenic checkpoint holds a ViViT, not a STTransformer"):
        load_checkpoint(st, scenic)
    with pytest.raises(TypeError, match="expected a bundled TimeSformer or ViViT, got Linear"):
        load_checkpoint(torch.nn.Linear(2, 2), {"weight": torch.zeros(2, 2), "bias": torch.zeros(2)})
    with pytest.raises(ValueError, match="family must be 'timesformer' or 'vivit', got 'st'"):
        transformers_to_divattn(hf_like, "st")


@pytest.mark.parametrize("module, allowed", [(registry, set()), (checkpoint, {"pos_embed"})],
                         ids=["registry", "checkpoint"])
def test_registry_and_loader_import_no_model(module, allowed):
    """timm's shape: the registry and the generic loader know no model; models register
    themselves and own their checkpoint conversion."""
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom) and node.level:
            imported |= {node.module} if node.module else {a.name for a in node.names}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            imported |= {n for n in names if n.startswith("divattn")}
    assert imported == allowed
