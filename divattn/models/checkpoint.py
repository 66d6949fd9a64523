"""Loading checkpoints into the bundled models: official, divattn, ``transformers`` and scenic layouts.

:func:`load_checkpoint` reads a file with ``torch.load(weights_only=True)`` (or takes a
state dict), unwraps it (``model_state`` / ``state_dict`` / ``model`` entries, the
official ``model.`` prefix, DDP's ``module.``), renames ``transformers`` Timesformer /
Vivit keys through the key maps below, resizes position / time embeddings to the
model's config, and loads strictly: any missing, unexpected or mis-shaped key raises
:class:`CheckpointMismatchError` naming every one of them. A scenic (Flax msgpack)
ViViT checkpoint file, or its restored parameter tree, is read and renamed by
:mod:`divattn.models.scenic` first, and errors name the scenic parameters too.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Mapping, Optional

import torch
from torch import nn

from .pos_embed import resize_pos_embed, resize_pos_embed_3d, resize_time_embed, square_grid
from .scenic import ScenicCheckpointError, is_flax_msgpack_file, read_flax_msgpack, scenic_name, scenic_params, \
    scenic_to_divattn

WRAPPERS = ("model_state", "state_dict", "model", "module")
PREFIXES = ("module.", "model.")


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys or shapes do not fit the model; the message names each one."""


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did: keys resized (``key: (old shape, new shape)``),
    keys left out on request (``ignored``), and, with ``strict=False``, the missing and
    unexpected keys."""

    resized: dict = field(default_factory=dict)
    ignored: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)


def read_state_dict(checkpoint) -> dict:
    """The ``{name: tensor}`` state dict inside a checkpoint file or object.

    ``checkpoint`` is a path (loaded with ``torch.load(map_location="cpu",
    weights_only=True)``) or a mapping. Wrappers ``model_state`` (official TimeSformer),
    ``state_dict``, ``model``, ``module`` are unwrapped, as are the key prefixes
    ``module.`` and ``model.`` when every key has them.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, Mapping):
        raise TypeError(f"checkpoint must be a path or a mapping, got {type(checkpoint).__name__}")
    sd = checkpoint
    while not any(isinstance(v, torch.Tensor) for v in sd.values()):
        inner = next((sd[k] for k in WRAPPERS if isinstance(sd.get(k), Mapping)), None)
        if inner is None:
            raise CheckpointMismatchError(
                f"found no state dict in the checkpoint: it has no tensors and none of the entries "
                f"{WRAPPERS}; its keys are {sorted(map(str, sd))[:20]}"
            )
        sd = inner
    bad = sorted(k for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise CheckpointMismatchError(f"state dict entries that are not tensors: {bad}")
    sd = dict(sd)
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _layer_map(layer: str, suffixes: dict) -> list:
    """Regex rules ``<layer prefix><src>.(weight|bias) -> blocks.<i>.<dst>.<param>``."""
    return [(re.compile(layer + re.escape(src) + r"\.(weight|bias)$"), rf"blocks.\1.{dst}.\2")
            for src, dst in suffixes.items()]


def _top_map(prefix: str, names: dict) -> list:
    return [(re.compile(f"^{prefix}{re.escape(src)}$"), dst) for src, dst in names.items()]


_TIMESFORMER_HF = [
    *_top_map(r"(?:timesformer\.)?", {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.time_embeddings": "time_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }),
    *_top_map("", {"classifier.weight": "head.weight", "classifier.bias": "head.bias"}),
    *_layer_map(r"^(?:timesformer\.)?encoder\.layer\.(\d+)\.", {
        "layernorm_before": "norm1",
        "attention.attention.qkv": "attn.qkv",
        "attention.output.dense": "attn.proj",
        "temporal_layernorm": "temporal_norm1",
        "temporal_attention.attention.qkv": "temporal_attn.qkv",
        "temporal_attention.output.dense": "temporal_attn.proj",
        "temporal_dense": "temporal_fc",
        "layernorm_after": "norm2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    }),
]

# transformers >= 5 names ViViT layers ``layers.<i>`` with q/k/v/o projections; earlier
# versions (and the checkpoints on the Hub) use ``encoder.layer.<i>`` with query/key/value.
_VIVIT_LAYER = r"^(?:vivit\.)?(?:layers|encoder\.layer)\.(\d+)\."
_VIVIT_HF = [
    *_top_map(r"(?:vivit\.)?", {
        "embeddings.cls_token": "cls_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }),
    *_top_map("", {"classifier.weight": "head.weight", "classifier.bias": "head.bias"}),
    *_layer_map(_VIVIT_LAYER, {
        "layernorm_before": "norm1",
        "attention.o_proj": "attn.proj",
        "attention.output.dense": "attn.proj",
        "layernorm_after": "norm2",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
        "intermediate.dense": "mlp.fc1",
        "output.dense": "mlp.fc2",
    }),
]
_VIVIT_QKV = re.compile(_VIVIT_LAYER + r"attention\.(?:(q|k|v)_proj|attention\.(query|key|value))\.(weight|bias)$")


def _rename(sd: dict, rules: list) -> dict:
    """Apply the first matching rule to each key; keys no rule matches are kept as they are."""
    out = {}
    for key, value in sd.items():
        new = key
        for pattern, repl in rules:
            if pattern.match(key):
                new = pattern.sub(repl, key)
                break
        if new in out:
            raise CheckpointMismatchError(f"two checkpoint keys map to {new!r} (one is {key!r})")
        out[new] = value
    return out


def _fuse_vivit_qkv(sd: dict) -> dict:
    """Concatenate transformers' separate q, k, v projections into ``blocks.<i>.attn.qkv``."""
    parts, out = {}, {}
    for key, value in sd.items():
        m = _VIVIT_QKV.match(key)
        if m is None:
            out[key] = value
            continue
        which = "qkv"[("q", "k", "v", "query", "key", "value").index(m.group(2) or m.group(3)) % 3]
        parts.setdefault((m.group(1), m.group(4)), {})[which] = (key, value)
    for (layer, param), got in parts.items():
        if set(got) == {"q", "k", "v"}:
            out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat([got[w][1] for w in "qkv"], 0)
        else:
            out.update(dict(got.values()))
    return out


def is_transformers_state_dict(sd: Mapping) -> bool:
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd)


def transformers_to_divattn(sd: Mapping, family: str) -> dict:
    """Rename a ``transformers`` ``Timesformer*`` / ``Vivit*`` state dict to bundled keys.

    ``family`` is ``"timesformer"`` or ``"vivit"``. Keys the maps do not know (a ViViT
    pooler, say) keep their names, so a strict load reports them.
    """
    if family == "timesformer":
        return _rename(dict(sd), _TIMESFORMER_HF)
    if family == "vivit":
        return _rename(_fuse_vivit_qkv(dict(sd)), _VIVIT_HF)
    raise ValueError(f"family must be 'timesformer' or 'vivit', got {family!r}")


def _family(model: nn.Module) -> str:
    from .timesformer import TimeSformer
    from .vivit import ViViT

    if isinstance(model, TimeSformer):
        return "timesformer"
    if isinstance(model, ViViT):
        return "vivit"
    raise TypeError(f"load_checkpoint: expected a bundled TimeSformer or ViViT, got {type(model).__name__}")


def _vivit_grid(tokens: int, model, grid: Optional[tuple]) -> tuple:
    """``(T, h, w)`` of a checkpoint's ``(t h w)`` position embeddings with ``tokens`` entries:
    ``grid`` when given, else the model's T with a square frame grid, else the model's frame
    grid with another T."""
    c = model.config
    if grid is not None:
        if tokens != grid[0] * grid[1] * grid[2]:
            raise CheckpointMismatchError(f"pos_embed: checkpoint_grid {tuple(grid)} does not have {tokens} positions")
        return tuple(grid)
    N = c.grid[0] * c.grid[1]
    if tokens % c.temporal_tokens == 0:
        try:
            return (c.temporal_tokens, *square_grid(tokens // c.temporal_tokens))
        except ValueError:
            pass
    if tokens % N == 0:
        return (tokens // N, *c.grid)
    raise CheckpointMismatchError(
        f"pos_embed: cannot tell the (T, h, w) grid of {tokens} checkpoint positions for a model with "
        f"T = {c.temporal_tokens}, grid {c.grid}; pass checkpoint_grid=(T, h, w)"
    )


def resize_embeddings(sd: dict, model: nn.Module, mode: Optional[str] = None,
                      checkpoint_grid: Optional[tuple] = None) -> dict:
    """Resize the checkpoint's position / time embeddings to ``model``'s config in place.

    Returns ``{key: (old shape, new shape)}`` for the keys it resized; ``mode`` defaults
    to ``model.config.interpolation``; ``checkpoint_grid`` is the ``(T, h, w)`` token grid
    of a ViViT checkpoint whose frame count and resolution both differ from the model's.
    """
    c = model.config
    mode = c.interpolation if mode is None else mode
    own = dict(model.named_parameters())
    resized = {}
    for key in ("pos_embed", "time_embed", "temporal_pos_embed"):
        if key not in sd or key not in own or sd[key].shape == own[key].shape:
            continue
        old, want = sd[key], own[key]
        if old.dim() != 3 or old.shape[-1] != want.shape[-1]:
            continue  # reported as a shape mismatch
        prefix = int(hasattr(model, "temporal_cls_token" if key == "temporal_pos_embed" else "cls_token"))
        if key == "time_embed":
            new = resize_time_embed(old, want.shape[1], mode)
        elif key == "temporal_pos_embed":
            new = torch.cat([old[:, :prefix], resize_time_embed(old[:, prefix:], want.shape[1] - prefix, mode)], 1)
        elif getattr(c, "variant", "factorised_encoder") == "factorised_encoder":
            new = resize_pos_embed(old, c.grid, num_prefix=prefix, mode=mode)
        else:
            old_grid = _vivit_grid(old.shape[1] - prefix, model, checkpoint_grid)
            new = resize_pos_embed_3d(old, old_grid, (c.temporal_tokens, *c.grid), num_prefix=prefix, mode=mode)
        sd[key] = new
        resized[key] = (tuple(old.shape), tuple(new.shape))
    return resized


def _is_scenic(checkpoint) -> bool:
    if isinstance(checkpoint, (str, os.PathLike)):
        return os.path.isfile(checkpoint) and is_flax_msgpack_file(checkpoint)
    return isinstance(checkpoint, Mapping) and scenic_params(checkpoint) is not None


def _read_scenic(checkpoint, model: nn.Module):
    """``(state dict, {bundled key: scenic path}, problems)`` of a scenic checkpoint file or tree."""
    if _family(model) != "vivit":
        raise TypeError(f"load_checkpoint: a scenic checkpoint holds a ViViT, not a {type(model).__name__}")
    tree = read_flax_msgpack(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    params = scenic_params(tree)
    if params is None:
        raise CheckpointMismatchError(
            f"found no ViViT parameters in the Flax checkpoint: none of params, optimizer.target, target holds "
            f"embedding / Transformer / SpatialTransformer; its keys are {sorted(map(str, tree))[:20]}")
    conv = scenic_to_divattn(params, model)
    return conv.state_dict, conv.names, conv.problems


def load_checkpoint(model: nn.Module, checkpoint, *, strict: bool = True, ignore_head: bool = False,
                    interpolation: Optional[str] = None, checkpoint_grid: Optional[tuple] = None) -> LoadReport:
    """Load an official, divattn, ``transformers`` or scenic checkpoint into a bundled model.

    Args:
        model: a bundled :class:`~divattn.models.TimeSformer` or :class:`~divattn.models.ViViT`.
        checkpoint: a path (``torch.load(weights_only=True)``; a file in Flax's msgpack
            format, as scenic writes, is read with :mod:`divattn.models.scenic` instead,
            no JAX needed) or a state dict / checkpoint dict (see :func:`read_state_dict`)
            or a restored scenic train state / parameter tree.
        strict: when True (default) any missing or unexpected key raises; when False the
            matching keys load, the others are listed in the report and in a warning.
        ignore_head: leave ``head.*`` as initialised (fine-tuning to another label set);
            the report lists the keys left out.
        interpolation: how to resize position / time embeddings of another size
            (default ``model.config.interpolation``).
        checkpoint_grid: ``(T, h, w)`` tokens of a ViViT checkpoint's position embeddings,
            needed only when both its frame count and its resolution differ from the model's.

    Raises:
        CheckpointMismatchError naming every missing, unexpected and mis-shaped key (for
        a scenic checkpoint, with the scenic parameter path of each, and every attention
        kernel whose head count differs from the model's).
    """
    names, problems = {}, []
    from_scenic = _is_scenic(checkpoint)
    if from_scenic:
        try:
            sd, names, problems = _read_scenic(checkpoint, model)
        except ScenicCheckpointError as e:
            raise CheckpointMismatchError(f"cannot read the scenic checkpoint: {e}") from e
    else:
        sd = read_state_dict(checkpoint)
        if is_transformers_state_dict(sd):
            sd = transformers_to_divattn(sd, _family(model))
    report = LoadReport(resized=resize_embeddings(sd, model, interpolation, checkpoint_grid))
    own = model.state_dict()
    if ignore_head:
        report.ignored = sorted(k for k in set(sd) | set(own) if k.startswith("head."))
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        own = {k: v for k, v in own.items() if not k.startswith("head.")}
    report.missing = sorted(set(own) - set(sd))
    report.unexpected = sorted(set(sd) - set(own))

    def named(key: str) -> str:
        if not from_scenic:
            return key
        source = names.get(key) or scenic_name(key, model)
        source = "+".join(source) if isinstance(source, list) else source
        return key if source == key else f"{key} (scenic {source})"

    shapes = sorted(f"{named(k)}: checkpoint {tuple(sd[k].shape)}, model {tuple(own[k].shape)}"
                    for k in set(sd) & set(own) if sd[k].shape != own[k].shape)
    if report.missing and strict:
        problems.append(f"missing keys: {[named(k) for k in report.missing]}")
    if report.unexpected and strict:
        problems.append(f"unexpected keys: {[named(k) for k in report.unexpected]}")
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise CheckpointMismatchError(f"checkpoint does not fit {type(model).__name__} "
                                      f"({model.config.name}): " + " | ".join(problems))
    if report.missing or report.unexpected:
        warnings.warn(f"load_checkpoint(strict=False): missing keys {report.missing}, "
                      f"unexpected keys {report.unexpected}", stacklevel=2)
    model.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return report
