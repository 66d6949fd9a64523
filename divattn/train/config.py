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
import math
import os
import re
from typing import Callable, Iterable, Optional

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
        # what the blocks save for the backward: fast (every matmul input) | min (LayerNorm and
        # GELU outputs recomputed in the backward: about 2/3 of the activation memory)
        "memory": "fast",
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
        # clips keep their own frame count up to num_frames (a short video is padded, not
        # looped); a batch pads them and the model and loss skip the padding (torch backend)
        "variable_frames": False,
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
        # before the first step, decode the header of every validation file (so a broken one stops
        # the run now, not after an epoch); false skips it for very large sets
        "probe_val": True,
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
            "min_frames": None,  # video lengths drawn from [min_frames, num_frames]; null: all num_frames
        },
    },
    "optim": {
        "name": "adamw",  # adamw | sgd
        "lr": 2.0e-3,  # for the global batch (batch_size x accum_steps x processes / parallel.sequence)
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
        "batch_size": 32,  # per process (per group of parallel.sequence processes that share each clip)
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
        # seconds any collective of a torchrun may wait for the other processes before this one
        # stops, naming the process that did not come (the longest wait in a healthy run: rank 0
        # writing a checkpoint, or the slowest rank's evaluation)
        "dist_timeout_s": 600,
    },
    "eval": {
        "batch_size": 64,
    },
    "parallel": {
        # processes that share each clip, each holding a run of its frames (sequence parallelism:
        # divattn.sequence_parallel); a torchrun of W processes is then a (W / sequence) x sequence
        # data x sequence DeviceMesh. 1: every process its own clips (data parallelism only)
        "sequence": 1,
    },
    "log": {
        "progress": "auto",  # auto (when stderr is a terminal) | true | false
        "tensorboard": True,
    },
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
    yaml = _yaml()

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)?(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789."))
    try:
        return yaml.load(stream, Loader=Loader)
    except yaml.YAMLError as e:
        raise ConfigError("not valid YAML: " + " ".join(str(e).split())) from None


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
    try:
        value = _safe_load(raw) if raw.strip() else None
    except ConfigError as e:
        raise ConfigError(f"override {text!r}: {e}") from None
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
        try:
            with open(path, encoding="utf-8") as f:
                loaded = _safe_load(f) or {}
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot read it ({e.strerror or e})") from None
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


class Spec:
    """What one config key takes: ``problem(value)`` is None, or a phrase saying what is expected."""

    def __init__(self, expected: str, ok: Callable[[object], bool]):
        self.expected = expected
        self.ok = ok

    def problem(self, value) -> Optional[str]:
        try:
            return None if self.ok(value) else self.expected
        except TypeError:
            return self.expected


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(lo: int = 0) -> Spec:
    return Spec("a positive integer" if lo == 1 else f"an integer >= {lo}",
                lambda v: _is_int(v) and v >= lo)


def _num(lo: float = 0.0, *, above: bool = False, below: Optional[float] = None, upto: Optional[float] = None,
         null: bool = False) -> Spec:
    """A finite number >= lo (> lo with ``above``), < ``below`` or <= ``upto`` when given."""
    left = "(" if above else "["
    if below is not None or upto is not None:
        what = f"a number in {left}{lo:g}, {below if below is not None else upto:g}{')' if below is not None else ']'}"
    else:
        what = f"a number {'>' if above else '>='} {lo:g}"

    def ok(v):
        if v is None:
            return null
        return (_is_num(v) and (v > lo if above else v >= lo) and (below is None or v < below)
                and (upto is None or v <= upto))

    return Spec(("null or " if null else "") + what, ok)


def _nums(n: Optional[int] = None, lo: float = 0.0, *, ints: bool = False, rising: bool = False) -> Spec:
    item = "integers" if ints else "numbers"
    what = f"a list of {n} {item} >= {lo:g}" if n else f"a list of {item} >= {lo:g}"
    if rising:
        what += ", the first <= the second"

    def ok(v):
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all((_is_int(x) if ints else _is_num(x)) and x >= lo for x in v)
                and (not rising or v[0] <= v[1]))

    return Spec(what, ok)


def _choice(*allowed) -> Spec:
    def show(a):
        return "null" if a is None else str(a).lower() if isinstance(a, bool) else repr(a)

    return Spec("one of " + ", ".join(map(show, allowed)),
                lambda v: any(v is a or (type(v) is type(a) and v == a) for a in allowed))


def _path() -> Spec:
    return Spec("null or a path (a string)", lambda v: v is None or (isinstance(v, str) and v != ""))


_BOOL = Spec("true or false", lambda v: isinstance(v, bool))
_MAPPING = Spec("a mapping (KEY: VALUE, e.g. {drop_rate: 0.1})", lambda v: v is None or isinstance(v, dict))
_STDS = Spec("a mapping of parameter-name suffix -> std > 0 (e.g. {time_embed: 0.02})",
             lambda v: v is None or (isinstance(v, dict) and all(isinstance(k, str) and _is_num(x) and x > 0
                                                                 for k, x in v.items())))

# Every key of DEFAULTS and what it takes (a test checks the two list the same keys).
SCHEMA = {
    "seed": _int(),
    "task": _choice("classify", "next_frame"),
    "device": Spec("'auto', 'cpu', 'cuda' or 'cuda:N'",
                   lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None),
    "model.name": Spec("a model name (a string; python -c 'import divattn.models as m; print(m.list_models())')",
                       lambda v: isinstance(v, str) and v != ""),
    "model.attention_type": _choice("divided_space_time", "joint_space_time", "space_only", None),
    "model.backend": _choice("auto", "torch", "triton", "cuda", None),
    "model.patch_size": _int(1),
    "model.embed_dim": _int(1),
    "model.depth": _int(1),
    "model.num_heads": _int(1),
    "model.mlp_ratio": _num(above=True),
    "model.qkv_bias": _BOOL,
    "model.drop_path_rate": _num(below=1.0),
    "model.grad_checkpointing": _BOOL,
    "model.memory": _choice("fast", "min"),
    "model.reinit": _STDS,
    "model.kwargs": _MAPPING,
    "data.dataset": _choice("synthetic", "list", "kinetics", "ssv2", "ucf101"),
    "data.root": _path(),
    "data.train_file": _path(),
    "data.val_file": _path(),
    "data.labels_file": _path(),
    "data.num_classes": Spec("null or a positive integer", lambda v: v is None or (_is_int(v) and v >= 1)),
    "data.num_frames": _int(1),
    "data.variable_frames": _BOOL,
    "data.sampling_rate": _int(1),
    "data.crop_size": _int(1),
    "data.train_scale": _nums(2, 1, ints=True, rising=True),
    "data.test_scale": _int(1),
    "data.test_crops": _int(1),
    "data.test_clips": _int(1),
    "data.flip": _choice("auto", True, False),
    "data.mean": _nums(3),
    "data.std": Spec("a list of 3 numbers > 0", lambda v: isinstance(v, list) and len(v) == 3
                     and all(_is_num(x) and x > 0 for x in v)),
    "data.decoder": _choice("auto", "pyav", "torchcodec"),
    "data.num_workers": _int(0),
    "data.probe_val": _BOOL,
    "data.synthetic.train_size": _int(1),
    "data.synthetic.val_size": _int(1),
    "data.synthetic.num_directions": _int(1),
    "data.synthetic.num_speeds": _int(1),
    "data.synthetic.speed": _nums(2, rising=True),
    "data.synthetic.num_objects": _int(1),
    "data.synthetic.radius": _nums(2, rising=True),
    "data.synthetic.contrast": _num(),
    "data.synthetic.texture": _nums(2, rising=True),
    "data.synthetic.noise": _num(),
    "data.synthetic.seed": _int(),
    "data.synthetic.min_frames": Spec("null or a positive integer", lambda v: v is None or (_is_int(v) and v >= 1)),
    "optim.name": _choice("adamw", "sgd"),
    "optim.lr": _num(),
    "optim.weight_decay": _num(),
    "optim.momentum": _num(below=1.0),
    "optim.betas": Spec("a list of 2 numbers in [0, 1)", lambda v: isinstance(v, list) and len(v) == 2
                        and all(_is_num(x) and 0 <= x < 1 for x in v)),
    "optim.clip_grad": _num(above=True, null=True),
    "schedule.name": _choice("cosine", "step", "constant"),
    "schedule.warmup_epochs": _num(),
    "schedule.min_lr": _num(),
    "schedule.milestones": _nums(),
    "schedule.gamma": _num(above=True),
    "train.epochs": _int(1),
    "train.batch_size": _int(1),
    "train.accum_steps": _int(1),
    "train.amp": _choice("none", "bf16", "fp16"),
    "train.compile": _BOOL,
    "train.threads": Spec("'auto' or a positive integer", lambda v: v == "auto" or (_is_int(v) and v >= 1)),
    "train.ema_decay": _num(above=True, below=1.0, null=True),
    "train.max_nonfinite": _int(1),
    "train.checkpoint_every": _int(0),
    "train.eval_every": _int(1),
    "train.log_every": _int(1),
    "train.dist_timeout_s": _num(above=True),
    "eval.batch_size": _int(1),
    "parallel.sequence": _int(1),
    "log.progress": _choice("auto", True, False),
    "log.tensorboard": _BOOL,
}


def keys(cfg: dict, prefix: str = "") -> list:
    """The dotted keys of ``cfg``'s leaves (a free mapping is one leaf)."""
    out = []
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and path not in FREE:
            out += keys(value, path + ".")
        else:
            out.append(path)
    return out


def validate(cfg: dict) -> None:
    """Raise :class:`ConfigError` naming the key, the value and what it takes, for the first
    value of the wrong type or out of its range (every key of :data:`SCHEMA`)."""
    for key, spec in SCHEMA.items():
        value = get(cfg, key)
        expected = spec.problem(value)
        if expected is not None:
            raise ConfigError(f"{key}={_show(value)} ({type(value).__name__}): expected {expected}")


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
