"""Loading checkpoints into the bundled models: reading, unwrapping, resizing, strict loading.

:func:`load_checkpoint` asks the model for the checkpoint in its own keys
(``model.convert_checkpoint``, see :class:`ConvertedCheckpoint`), resizes position /
time embeddings to the model's config, and loads strictly: any missing, unexpected or
mis-shaped key raises :class:`CheckpointMismatchError` naming every one of them. Each
model family owns its conversion: :class:`~divattn.models.VideoModel` reads a file
with ``torch.load(weights_only=True)`` (or takes a state dict) and unwraps it
(:func:`read_state_dict`: ``model_state`` / ``state_dict`` / ``model`` entries, the
official ``model.`` prefix, DDP's ``module.``), then renames keys with its
``checkpoint_filter_fn``: ``transformers`` Timesformer keys in
:mod:`~divattn.models.timesformer`, Vivit keys (and q/k/v fusing) in
:mod:`~divattn.models.vivit`, whose model also reads scenic (Flax msgpack) files and
trees through :mod:`divattn.models.scenic`. This module imports no model family.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch
from torch import nn

from .pos_embed import resize_pos_embed, resize_pos_embed_3d, resize_time_embed, square_grid

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


def _same_name(key: str) -> str:
    return key


@dataclass
class ConvertedCheckpoint:
    """A checkpoint in a model's own state-dict keys: what ``model.convert_checkpoint``
    gives :func:`load_checkpoint`.

    ``problems``: sentences about parameters that cannot fit the model, raised together
    with the strict load's; ``describe(key)``: how an error names ``key`` (e.g. with the
    checkpoint's own name for it).
    """

    state_dict: dict
    problems: list = field(default_factory=list)
    describe: Callable[[str], str] = _same_name


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


def layer_rules(layer: str, suffixes: dict) -> list:
    """Key-map rules ``<layer prefix><src>.(weight|bias) -> blocks.<i>.<dst>.<param>`` for
    :func:`rename_keys`; ``layer`` is a regex whose first group is the block index."""
    return [(re.compile(layer + re.escape(src) + r"\.(weight|bias)$"), rf"blocks.\1.{dst}.\2")
            for src, dst in suffixes.items()]


def top_rules(prefix: str, names: dict) -> list:
    """Key-map rules ``<prefix><src> -> <dst>`` for :func:`rename_keys`; ``prefix`` is a regex."""
    return [(re.compile(f"^{prefix}{re.escape(src)}$"), dst) for src, dst in names.items()]


def rename_keys(sd: dict, rules: list) -> dict:
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


def is_transformers_state_dict(sd: Mapping) -> bool:
    """True for a ``transformers`` Timesformer* / Vivit* state dict (it has their patch embedding key)."""
    return any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd)


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
    if not hasattr(model, "convert_checkpoint"):
        raise TypeError(f"load_checkpoint: expected a bundled TimeSformer or ViViT, got {type(model).__name__}")
    converted = model.convert_checkpoint(checkpoint)
    sd, problems, named = converted.state_dict, list(converted.problems), converted.describe
    report = LoadReport(resized=resize_embeddings(sd, model, interpolation, checkpoint_grid))
    own = model.state_dict()
    if ignore_head:
        report.ignored = sorted(k for k in set(sd) | set(own) if k.startswith("head."))
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
        own = {k: v for k, v in own.items() if not k.startswith("head.")}
    report.missing = sorted(set(own) - set(sd))
    report.unexpected = sorted(set(sd) - set(own))
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
