"""Training configuration: built-in defaults, then a YAML file, then ``key=value`` overrides.

:data:`DEFAULTS` is the built-in run (the synthetic motion task and a tiny divided
TimeSformer, sized for a 2-core CPU). A YAML file may set any subset of its keys; an
override ``optim.lr=3e-4`` sets one, its value read as YAML (``[1, 2]``, ``null``,
``true``). Unknown keys are an error that names the closest known one. The resolved
config (with device-dependent values such as ``model.backend`` filled in) is written
to the output directory as ``config.yaml``.

The configs that ship with the package (``divattn/configs/*.yaml``: synthetic variants,
Kinetics, SSv2, UCF101, plain lists) are named by their file stem:
:func:`resolve_config` takes a path or such a name, :func:`list_configs` lists them.
"""

from __future__ import annotations

import copy
import difflib
import os
from typing import Iterable, Optional

DEFAULTS = {
    "seed": 0,
    # classify: cross-entropy on the clip's label; next_frame: regress frame t+1's pixels from
    # frames <= t (MSE, reported beside the copy-the-last-frame baseline; an ST transformer)
    "task": "classify",
    "device": "auto",  # auto (cuda when available, else cpu) | cpu | cuda | cuda:N
    "model": {
        "name": "timesformer_base",
        "attention_type": "divided_space_time",  # divided_space_time | joint_space_time | space_only | null (not passed)
        # auto: the reference "torch" path on CPU (the Triton kernels would run in the slow
        # interpreter there), divattn's auto dispatch (Triton first) on a GPU
        "backend": "auto",
        "patch_size": 8,
        "embed_dim": 96,
        "depth": 2,
        "num_heads": 3,
        "mlp_ratio": 2.0,
        "qkv_bias": True,
        "drop_path_rate": 0.0,
        "grad_checkpointing": False,
        # parameters to draw again from a truncated normal after the model is built, by name
        # suffix -> std (e.g. {time_embed: 0.02}: TimeSformer's zero time embedding starts as a
        # frame-order-blind model, a saddle that training from scratch leaves slowly)
        "reinit": {"time_embed": 1.0},
        "kwargs": {},  # any other create_model keyword
    },
    "data": {
        "dataset": "synthetic",  # synthetic | list | kinetics | ssv2 | ucf101
        "root": None,  # folder the paths in the annotation files are relative to
        "train_file": None,  # list file / Kinetics CSV / SSv2 JSON / UCF101 trainlist
        "val_file": None,
        "labels_file": None,  # SSv2 labels JSON, UCF101 classInd.txt
        "num_classes": None,  # None: from the annotations
        "num_frames": 8,
        "sampling_rate": 4,
        "crop_size": 32,
        "train_scale": [256, 320],  # short side drawn from this range before the random crop
        "test_scale": 224,  # short side before the test crops
        "test_crops": 3,
        "test_clips": 1,
        "flip": "auto",  # auto: on, except for ssv2 (its classes name left and right)
        "mean": [0.45, 0.45, 0.45],
        "std": [0.225, 0.225, 0.225],
        "decoder": "auto",  # auto (torchcodec when it imports, else pyav) | pyav | torchcodec
        "num_workers": 1,
        "synthetic": {
            "train_size": 4096,  # clips per epoch (fresh clips every epoch)
            "val_size": 1024,
            "num_directions": 4,
            "num_speeds": 1,
            "speed": [1.0, 2.0],  # pixels per frame
            "num_objects": 3,
            "radius": [3.0, 5.0],
            "contrast": 0.35,
            "texture": [0.02, 0.08],
            "noise": 0.02,
            "seed": 0,
        },
    },
    "optim": {
        "name": "adamw",  # adamw | sgd
        "lr": 2.0e-3,  # for the global batch (batch_size x accum_steps x processes)
        "weight_decay": 0.05,
        "momentum": 0.9,  # sgd
        "betas": [0.9, 0.999],  # adamw
        "clip_grad": 1.0,  # max gradient norm; null: off
    },
    "schedule": {
        "name": "cosine",  # cosine | step | constant
        "warmup_epochs": 1.0,
        "min_lr": 1.0e-5,  # cosine
        "milestones": [],  # step: epochs at which lr is multiplied by gamma
        "gamma": 0.1,
    },
    "train": {
        "epochs": 16,
        "batch_size": 32,  # per process
        "accum_steps": 1,
        "amp": "none",  # none | bf16 | fp16 (fp16 uses a GradScaler)
        "compile": False,
        # CPU intra-op threads per process; auto: the cores this process may use, less its data
        # workers, shared among the processes of a torchrun on this machine (more threads than
        # free cores makes every op wait for a descheduled thread)
        "threads": "auto",
        "ema_decay": None,  # e.g. 0.999: also keep an EMA of the weights and evaluate it
        "max_nonfinite": 5,  # stop after this many optimizer steps in a row with a NaN/inf loss
        "checkpoint_every": 50,  # optimizer steps between checkpoints (and at every epoch end); 0: epoch ends only
        "eval_every": 1,  # epochs between evaluations (the last epoch is always evaluated)
        "log_every": 10,  # optimizer steps between log lines (without a progress bar) and TensorBoard points
    },
    "eval": {
        "batch_size": 64,
    },
    "log": {
        "progress": "auto",  # auto (when stderr is a terminal) | true | false
        "tensorboard": True,
    },
}

CHOICES = {
    "task": ("classify", "next_frame"),
    "model.attention_type": ("divided_space_time", "joint_space_time", "space_only", None),
    "model.backend": ("auto", "torch", "triton", "cuda", None),
    "data.dataset": ("synthetic", "list", "kinetics", "ssv2", "ucf101"),
    "data.flip": ("auto", True, False),
    "data.decoder": ("auto", "pyav", "torchcodec"),
    "optim.name": ("adamw", "sgd"),
    "schedule.name": ("cosine", "step", "constant"),
    "train.amp": ("none", "bf16", "fp16"),
    "log.progress": ("auto", True, False),
}

# mappings whose keys are free (anything goes in them)
FREE = ("model.kwargs", "model.reinit")


CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A config file or override that does not fit :data:`DEFAULTS`."""


def list_configs() -> dict:
    """The built-in configs: ``{name: (path, summary)}``, sorted by name.

    The summary is the first sentence of the file's leading comment.
    """
    out = {}
    if os.path.isdir(CONFIG_DIR):
        for file in sorted(os.listdir(CONFIG_DIR)):
            if not file.endswith(".yaml"):
                continue
            path = os.path.join(CONFIG_DIR, file)
            words = []
            with open(path, encoding="utf-8") as f:
                for line in f:
                    # the comment's prose ends at its indented example command
                    if not line.startswith("#") or line.startswith("#  "):
                        break
                    words.append(line[1:].strip())
            text = " ".join(words)
            end = text.find(". ")
            out[file[: -len(".yaml")]] = (path, text if end < 0 else text[: end + 1])
    return out


def resolve_config(name_or_path: str) -> str:
    """The YAML file for ``--config``: an existing path, else a built-in name (``.yaml`` optional).

    Raises :class:`ConfigError` listing the built-in names when it is neither.
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    builtin = list_configs()
    name = name_or_path[: -len(".yaml")] if name_or_path.endswith(".yaml") else name_or_path
    if name in builtin:
        return builtin[name][0]
    close = difflib.get_close_matches(name, list(builtin), n=1)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ConfigError(f"config {name_or_path!r} is neither a file nor a built-in config{hint} "
                      f"(built-in: {', '.join(builtin) or 'none installed'})")


def _yaml():
    try:
        import yaml
    except ImportError as e:
        raise ConfigError("reading YAML configs needs PyYAML (pip install pyyaml)") from e
    return yaml


def _safe_load(stream):
    """``yaml.safe_load`` that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""
    import re

    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789."))
    return yaml.load(stream, Loader=Loader)


def merge(base: dict, update: dict, prefix: str = "") -> dict:
    """``base`` with ``update`` merged in; every key of ``update`` must exist in ``base``."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in out:
            close = difflib.get_close_matches(str(key), [str(k) for k in out], n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {path!r}{hint}")
        if isinstance(out[key], dict) and path not in FREE:
            if not isinstance(value, dict):
                raise ConfigError(f"config key {path!r} is a section; got {value!r}")
            out[key] = merge(out[key], value, prefix=path + ".")
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> dict:
    """``"a.b=value"`` -> ``{"a": {"b": value}}`` with ``value`` read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. optim.lr=3e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    value = _safe_load(raw) if raw.strip() else None
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def load_config(path: Optional[str] = None, overrides: Iterable[str] = (), base: Optional[dict] = None) -> dict:
    """``base`` (default :data:`DEFAULTS`), then the YAML file ``path``, then ``overrides``; validated.

    ``path`` may also name a built-in config (:func:`resolve_config`).
    """
    cfg = copy.deepcopy(DEFAULTS if base is None else base)
    if path is not None:
        path = resolve_config(path)
        with open(path, encoding="utf-8") as f:
            loaded = _safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        loaded.pop("resolved", None)  # what a run wrote next to its checkpoints
        try:
            cfg = merge(cfg, loaded)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for text in overrides:
        cfg = merge(cfg, parse_override(text))
    validate(cfg)
    return cfg


def get(cfg: dict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def validate(cfg: dict) -> None:
    """Raise :class:`ConfigError` for values out of their range or choices."""
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise ConfigError(f"{key} must be one of {list(allowed)}, got {get(cfg, key)!r}")
    positive = ("data.num_frames", "data.sampling_rate", "data.crop_size", "data.test_crops", "data.test_clips",
                "train.epochs", "train.batch_size", "train.accum_steps", "train.max_nonfinite", "train.eval_every",
                "train.log_every", "eval.batch_size")
    for key in positive:
        value = get(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    if get(cfg, "train.checkpoint_every") < 0:
        raise ConfigError(f"train.checkpoint_every must be >= 0, got {get(cfg, 'train.checkpoint_every')!r}")
    if get(cfg, "data.num_workers") < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {get(cfg, 'data.num_workers')!r}")
    for key in ("optim.lr", "optim.weight_decay", "schedule.min_lr", "schedule.warmup_epochs"):
        value = get(cfg, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key} must be a number >= 0, got {value!r}")
    threads = get(cfg, "train.threads")
    if threads != "auto" and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"train.threads must be 'auto' or a positive integer, got {threads!r}")
    ema = get(cfg, "train.ema_decay")
    if ema is not None and not 0.0 < ema < 1.0:
        raise ConfigError(f"train.ema_decay must be null or in (0, 1), got {ema!r}")
    clip = get(cfg, "optim.clip_grad")
    if clip is not None and clip <= 0:
        raise ConfigError(f"optim.clip_grad must be null or > 0, got {clip!r}")


def dump(cfg: dict) -> str:
    return _yaml().safe_dump(cfg, sort_keys=False, default_flow_style=None)


def diff(old: dict, new: dict, prefix: str = "") -> list:
    """Dotted keys whose values differ between two configs of the same shape."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and f"{prefix}{key}" not in FREE:
            out += diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out
