"""Config layering (defaults, YAML, overrides), validation, and the shipped configs."""

import glob
import os

import pytest
import yaml

from divattn.train import DEFAULTS, ConfigError, load_config
from divattn.train.config import diff, parse_override

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "configs", "*.yaml")))


def test_defaults_are_valid_and_unchanged_by_loading():
    cfg = load_config()
    assert cfg == DEFAULTS and cfg is not DEFAULTS
    assert cfg["model"]["backend"] == "auto"


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 0.01\n  name: sgd\ntrain:\n  epochs: 3\n")
    cfg = load_config(str(path), ["train.epochs=5", "data.train_scale=[8, 9]", "train.ema_decay=0.99",
                                  "model.kwargs={drop_rate: 0.1}"])
    assert cfg["optim"]["lr"] == 0.01 and cfg["optim"]["name"] == "sgd"
    assert cfg["train"]["epochs"] == 5 and cfg["data"]["train_scale"] == [8, 9]
    assert cfg["train"]["ema_decay"] == 0.99 and cfg["model"]["kwargs"] == {"drop_rate": 0.1}
    assert cfg["optim"]["weight_decay"] == DEFAULTS["optim"]["weight_decay"]
    assert sorted(diff(DEFAULTS, cfg))[0].startswith("data.train_scale")


def test_override_values_are_yaml():
    assert parse_override("a.b=3e-4") == {"a": {"b": 3e-4}}
    assert parse_override("a=null") == {"a": None}
    assert parse_override("a=true") == {"a": True}
    assert parse_override("a=x=y") == {"a": "x=y"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("train.epochs")


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "did you mean optim.lr"),
    ("nope=1", "unknown config key 'nope'"),
    ("optim=3", "is a section"),
    ("train.amp=fp8", "train.amp must be one of"),
    ("train.epochs=0", "positive integer"),
    ("train.batch_size=2.5", "positive integer"),
    ("train.ema_decay=1.5", "ema_decay"),
    ("optim.clip_grad=0", "clip_grad"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown config key 'train.epoch'; did you mean train.epochs"):
        load_config(str(path))


def test_a_written_config_loads_back(tmp_path):
    path = tmp_path / "config.yaml"
    cfg = load_config(None, ["optim.lr=0.5"])
    path.write_text(yaml.safe_dump({**cfg, "resolved": {"device": "cpu"}}))
    assert load_config(str(path)) == cfg


def test_shipped_configs_load():
    assert len(CONFIGS) >= 3
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg["data"]["dataset"] in ("synthetic", "list", "kinetics", "ssv2", "ucf101"), path
