"""Initialise a bundled video model from an image ViT (timm key layout), as the papers do.

The ViT state dict has ``cls_token, pos_embed, patch_embed.proj, blocks.<i>.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm, head``.

TimeSformer (official ``load_pretrained``): everything loads by name; divided blocks
copy ``attn`` into ``temporal_attn`` and ``norm1`` into ``temporal_norm1``;
``temporal_fc`` is zero in every block but the first (``temporal_fc="official"``), in
all blocks (``"all"``) or left as initialised (``"none"``); ``time_embed`` is zero.

ViViT: the 2-D patch filter becomes the tubelet filter by its central frame
(``tubelet_init="central_frame"``: the other frames' weights zero) or by inflation
(``"inflate"``: repeated over the tubelet's frames and divided by their number); the
spatial position embeddings are repeated over the temporal tokens (models 1, 3, 4) or
used per frame (model 2); model 2's ViT ``norm`` becomes ``spatial_norm`` and its
temporal transformer keeps its fresh init; model 3's temporal attention starts at zero
(the paper's init, ``temporal_init="zeros"``) or as a copy of the spatial one
(``"copy"``). Models 3 and 4 have no cls token, so the ViT's is not used.

Position embeddings are resized to the model's grid (``interpolation``, default the
config's). A ViT ``head`` whose shape fits is loaded, otherwise left as initialised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from .checkpoint import CheckpointMismatchError, read_state_dict
from .pos_embed import resize_pos_embed
from .timesformer import TimeSformer
from .vivit import ViViT

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")


@dataclass
class ViTInitReport:
    """``loaded``: model keys set from the ViT; ``fresh``: model keys the ViT does not provide
    (set as described above or left as initialised); ``unused``: ViT keys not used."""

    loaded: list = field(default_factory=list)
    fresh: list = field(default_factory=list)
    unused: list = field(default_factory=list)


def _tubelet(weight: torch.Tensor, frames: int, how: str) -> torch.Tensor:
    """``(C, in, p, p)`` -> ``(C, in, frames, p, p)``."""
    if how == "inflate":
        return weight[:, :, None].repeat(1, 1, frames, 1, 1) / frames
    if how == "central_frame":
        out = weight.new_zeros(weight.shape[:2] + (frames,) + weight.shape[2:])
        out[:, :, frames // 2] = weight
        return out
    raise ValueError(f"tubelet_init must be 'central_frame' or 'inflate', got {how!r}")


def _block_targets(model: nn.Module, rest: str, temporal_init: str) -> list:
    """Model keys (relative to a block) that the ViT block key ``rest`` initialises."""
    targets = [rest]
    divided = isinstance(model, TimeSformer) and model.config.attention_type == "divided_space_time"
    copy_temporal = divided or (getattr(model.config, "variant", "") == "factorised_self_attention")
    if copy_temporal and rest.startswith("norm1."):
        targets.append("temporal_" + rest)
    if copy_temporal and rest.startswith("attn.") and (divided or temporal_init == "copy"):
        targets.append("temporal_" + rest)
    return targets


def _fresh_patterns(model: nn.Module) -> tuple:
    """Model keys that no ViT provides, by design."""
    if isinstance(model, TimeSformer):
        return ("time_embed", ".temporal_fc.")
    variant = model.config.variant
    if variant == "factorised_encoder":
        return ("temporal_cls_token", "temporal_pos_embed", "temporal_blocks.", "norm.")
    if variant == "factorised_self_attention":
        return (".temporal_attn.",)
    return ()


def init_from_vit(model: nn.Module, vit, *, temporal_fc: str = "official", tubelet_init: str = "central_frame",
                  temporal_init: str = "zeros", interpolation: Optional[str] = None,
                  strict: bool = True) -> ViTInitReport:
    """Initialise a bundled TimeSformer / ViViT from an image ViT state dict (or file), in place.

    Args:
        model: a bundled :class:`~divattn.models.TimeSformer` or :class:`~divattn.models.ViViT`.
        vit: a timm-layout ViT state dict, or a path / checkpoint holding one.
        temporal_fc: TimeSformer divided blocks' ``temporal_fc``: ``"official"`` (zero in
            blocks >= 1), ``"all"`` (zero everywhere) or ``"none"`` (as initialised).
        tubelet_init: ViViT: ``"central_frame"`` or ``"inflate"``.
        temporal_init: ViViT model 3's temporal attention: ``"zeros"`` or ``"copy"``.
        interpolation: how to resize the position embeddings (default the config's).
        strict: raise when a ViT key is not used (other than a head that does not fit) or
            a model key other than the fresh ones above is not provided.

    Raises:
        CheckpointMismatchError naming the keys (and shapes) that do not fit.
    """
    if not isinstance(model, (TimeSformer, ViViT)):
        raise TypeError(f"init_from_vit: expected a bundled TimeSformer or ViViT, got {type(model).__name__}")
    if temporal_fc not in ("official", "all", "none"):
        raise ValueError(f"temporal_fc must be 'official', 'all' or 'none', got {temporal_fc!r}")
    if temporal_init not in ("zeros", "copy"):
        raise ValueError(f"temporal_init must be 'zeros' or 'copy', got {temporal_init!r}")
    vit = read_state_dict(vit)
    c = model.config
    mode = c.interpolation if interpolation is None else interpolation
    own = model.state_dict()
    out, source, unused = {}, {}, []
    is_vivit = isinstance(model, ViViT)
    has_cls = hasattr(model, "cls_token")

    def put(dst: str, src: str, value: torch.Tensor) -> None:
        out[dst], source[dst] = value, src

    for key, value in vit.items():
        m = _BLOCK.match(key)
        if m is not None:
            for rest in _block_targets(model, m.group(2), temporal_init):
                put(f"blocks.{m.group(1)}.{rest}", key, value)
        elif key == "cls_token" and not has_cls:
            unused.append(key)
        elif key == "pos_embed":
            pos = resize_pos_embed(value, c.grid, mode=mode)
            if not has_cls:
                pos = pos[:, 1:]
            if is_vivit and c.variant != "factorised_encoder":
                pos = torch.cat([pos[:, :int(has_cls)], pos[:, int(has_cls):].repeat(1, c.temporal_tokens, 1)], 1)
            put(key, key, pos)
        elif key == "patch_embed.proj.weight" and is_vivit:
            put(key, key, _tubelet(value, c.tubelet_size, tubelet_init))
        elif key.startswith("norm.") and is_vivit and c.variant == "factorised_encoder":
            put("spatial_" + key, key, value)
        elif key.startswith("head.") and (key not in own or own[key].shape != value.shape):
            unused.append(key)
        else:
            put(key, key, value)
    placed = {source[k] for k in out if k in own}
    unexpected = sorted({source[k] for k in out} - placed)
    unused = sorted(unused + unexpected)
    out = {k: v for k, v in out.items() if k in own}
    fresh = sorted(set(own) - set(out))
    missing = [k for k in fresh if not k.startswith("head.") and not any(p in k for p in _fresh_patterns(model))]
    shapes = [f"{k}: ViT gives {tuple(v.shape)}, model has {tuple(own[k].shape)}" for k, v in out.items()
              if v.shape != own[k].shape]
    problems = []
    if strict:
        problems += [f"ViT keys the model has no place for: {unexpected}"] if unexpected else []
        problems += [f"model keys the ViT does not provide: {missing}"] if missing else []
    if shapes:
        problems.append("shape mismatches: " + "; ".join(shapes))
    if problems:
        raise CheckpointMismatchError(f"init_from_vit into {c.name}: " + " | ".join(problems))
    model.load_state_dict(out, strict=False)
    _zero_fresh(model, temporal_fc, temporal_init)
    return ViTInitReport(loaded=sorted(out), fresh=fresh, unused=unused)


@torch.no_grad()
def _zero_fresh(model: nn.Module, temporal_fc: str, temporal_init: str) -> None:
    if isinstance(model, TimeSformer):
        if hasattr(model, "time_embed"):
            model.time_embed.zero_()
        if temporal_fc != "none":
            for i, blk in enumerate(model.blocks):
                if hasattr(blk, "temporal_fc") and (i > 0 or temporal_fc == "all"):
                    blk.temporal_fc.weight.zero_()
                    blk.temporal_fc.bias.zero_()
    elif model.config.variant == "factorised_self_attention" and temporal_init == "zeros":
        for blk in model.blocks:
            for p in blk.temporal_attn.parameters():
                p.zero_()
