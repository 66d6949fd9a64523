"""Config layering (defaults, YAML, overrides), validation, and the shipped configs."""

import glob
import os

import pytest
import yaml

from divattn.__main__ import main
from divattn.train import DEFAULTS, ConfigError, load_config
from divattn.train.config import SCHEMA, diff, keys, list_configs, parse_override, resolve_config

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "..", "divattn", "configs", "*.yaml")))


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
    ("train.amp=fp8", r"train.amp='fp8' \(str\): expected one of 'none', 'bf16', 'fp16'"),
    ("train.epochs=0", r"train.epochs=0 \(int\): expected a positive integer"),
    ("train.batch_size=2.5", r"train.batch_size=2.5 \(float\): expected a positive integer"),
    ("train.ema_decay=1.5", r"train.ema_decay=1.5 \(float\): expected null or a number in \(0, 1\)"),
    ("optim.clip_grad=0", r"optim.clip_grad=0 \(int\): expected null or a number > 0"),
    ("optim.lr=[1]", r"optim.lr=\[1\] \(list\): expected a number >= 0"),
    ("optim.lr=.nan", r"optim.lr=nan \(float\): expected a number >= 0"),
    ("data.flip=1", r"data.flip=1 \(int\): expected one of 'auto', true, false"),
    ("data.train_scale=[320, 256]", r"data.train_scale=\[320, 256\] \(list\): expected a list of 2 integers"),
    ("device=gpu", r"device='gpu' \(str\): expected 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ("train.dist_timeout_s=0", r"train.dist_timeout_s=0 \(int\): expected a number > 0"),
    ("model.reinit={time_embed: x}", r"model.reinit=\{'time_embed': 'x'\} \(dict\): expected a mapping"),
    ("train.epochs=[", r"override 'train.epochs=\[': not valid YAML"),
    # the values the issue found passing as far as the first step, or failing there with a TypeError
    ("data.num_workers=abc", r"data.num_workers='abc' \(str\): expected an integer >= 0"),
    ("train.checkpoint_every=abc", r"train.checkpoint_every='abc' \(str\): expected an integer >= 0"),
    ("optim.clip_grad=abc", r"optim.clip_grad='abc' \(str\): expected null or a number > 0"),
    ("train.ema_decay=abc", r"train.ema_decay='abc' \(str\): expected null or a number in \(0, 1\)"),
    ("model.depth=abc", r"model.depth='abc' \(str\): expected a positive integer"),
    ("data.synthetic.train_size=abc", r"data.synthetic.train_size='abc' \(str\): expected a positive integer"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_every_key_has_a_type_and_the_defaults_fit_it():
    assert sorted(keys(DEFAULTS)) == sorted(SCHEMA)
    for path in CONFIGS:
        load_config(path)  # validated


def test_print_config_validates(capsys):
    assert main(["train", "model.depth=abc", "--print-config"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "divattn train: model.depth='abc' (str): expected a positive integer\n"


def test_a_yaml_error_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train: [epochs: 3\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        load_config(str(path))


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


def test_builtin_configs_are_the_shipped_files():
    builtin = list_configs()
    assert sorted(os.path.realpath(path) for path, _ in builtin.values()) == [os.path.realpath(p) for p in CONFIGS]
    assert "synthetic_space_only" in builtin and "kinetics400_timesformer" in builtin
    for name, (_, summary) in builtin.items():
        assert summary.endswith((".", ")")) and not summary.startswith("#"), (name, summary)


def test_a_builtin_name_loads_like_its_file():
    path, _ = list_configs()["synthetic_space_only"]
    by_path = load_config(path)
    assert by_path["model"]["attention_type"] == "space_only"
    assert load_config("synthetic_space_only") == by_path
    assert load_config("synthetic_space_only.yaml") == by_path


def test_an_existing_path_wins_over_a_builtin_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "synthetic_joint").write_text("train:\n  epochs: 3\n")
    assert resolve_config("synthetic_joint") == "synthetic_joint"
    assert load_config("synthetic_joint")["model"]["attention_type"] == DEFAULTS["model"]["attention_type"]


def test_a_wrong_name_lists_the_builtin_names():
    with pytest.raises(ConfigError, match=r"'synthetic_jiont' is neither a file nor a built-in config; "
                                          r"did you mean synthetic_joint\?") as info:
        load_config("synthetic_jiont")
    for name in list_configs():
        assert name in str(info.value)


def test_cli_lists_configs_and_rejects_a_wrong_name(capsys):
    assert main(["train", "--list-configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == list(list_configs())
    assert main(["train", "--config", "no_such_config", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "no_such_config" in err and "synthetic_space_only" in err and "Traceback" not in err
    assert main(["train", "--config", "synthetic_joint", "--print-config"]) == 0
    assert "attention_type: joint_space_time" in capsys.readouterr().out
