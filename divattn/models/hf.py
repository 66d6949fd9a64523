"""Bundled models from ``transformers`` Timesformer / Vivit models and state dicts (same weights, same logits)."""

from __future__ import annotations

import re
import warnings
from typing import Mapping, Optional

from torch import nn

from .checkpoint import load_checkpoint
from .timesformer import TimeSformer, TimeSformerConfig, transformers_to_timesformer
from .vivit import ViViT, ViViTConfig, transformers_to_vivit

_ACTS = {"gelu": "gelu", "gelu_fast": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}


def _square(value, what: str) -> int:
    if isinstance(value, (tuple, list)):
        if len(set(value)) != 1:
            raise ValueError(f"from_transformers: only square {what} are supported, got {tuple(value)}")
        value = value[0]
    return int(value)


def _common(cfg, num_classes: int, backend: Optional[str]) -> dict:
    act = cfg.hidden_act if isinstance(cfg.hidden_act, str) else None
    if act not in _ACTS:
        raise ValueError(f"from_transformers: hidden_act {cfg.hidden_act!r} is not supported "
                         f"(supported: {sorted(_ACTS)})")
    if getattr(cfg, "attention_probs_dropout_prob", 0.0):
        warnings.warn("from_transformers: attention_probs_dropout_prob > 0 is dropped (the divattn ops have no "
                      "dropout on attention probabilities); evaluation is unaffected", stacklevel=3)
    return dict(
        num_classes=num_classes, num_frames=cfg.num_frames, img_size=_square(cfg.image_size, "images"),
        in_chans=cfg.num_channels, embed_dim=cfg.hidden_size, depth=cfg.num_hidden_layers,
        num_heads=cfg.num_attention_heads, mlp_ratio=cfg.intermediate_size / cfg.hidden_size,
        qkv_bias=cfg.qkv_bias, drop_rate=float(cfg.hidden_dropout_prob), norm_eps=cfg.layer_norm_eps,
        act=_ACTS[act], backend=backend,
    )


def transformers_to_divattn(sd: Mapping, family: str) -> dict:
    """Rename a ``transformers`` ``Timesformer*`` / ``Vivit*`` state dict to bundled keys.

    ``family`` is ``"timesformer"`` or ``"vivit"``. Keys the maps do not know (a ViViT
    pooler, say) keep their names, so a strict load reports them.
    """
    if family == "timesformer":
        return transformers_to_timesformer(sd)
    if family == "vivit":
        return transformers_to_vivit(sd)
    raise ValueError(f"family must be 'timesformer' or 'vivit', got {family!r}")


def config_from_transformers(hf_model: nn.Module, backend: Optional[str] = None):
    """The bundled config equivalent to a ``transformers`` Timesformer* / Vivit* model."""
    cfg = getattr(hf_model, "config", None)
    model_type = getattr(cfg, "model_type", None)
    head = getattr(hf_model, "classifier", None)
    num_classes = head.out_features if isinstance(head, nn.Linear) else 0
    if model_type == "timesformer":
        return TimeSformerConfig(name="timesformer_base", patch_size=_square(cfg.patch_size, "patches"),
                                 attention_type=cfg.attention_type, drop_path_rate=float(cfg.drop_path_rate),
                                 **_common(cfg, num_classes, backend))
    if model_type == "vivit":
        t, ph, pw = cfg.tubelet_size
        return ViViTConfig(name="vivit_base", variant="spatio_temporal", tubelet_size=t,
                           patch_size=_square((ph, pw), "tubelets"), **_common(cfg, num_classes, backend))
    raise TypeError(f"from_transformers: expected a transformers Timesformer* or Vivit* model, "
                    f"got {type(hf_model).__name__} (model_type {model_type!r})")


def from_transformers(hf_model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """The bundled model with the weights of a ``transformers`` model, on the divattn ops.

    Accepts ``TimesformerForVideoClassification``, ``TimesformerModel``,
    ``VivitForVideoClassification`` and ``VivitModel`` (a model without a classifier
    becomes one with ``num_classes=0``; ``VivitModel``'s pooler has no counterpart and
    is dropped with a warning). The result is on the same device / dtype and in the
    same train / eval mode, and gives the same logits for the same clip, with the input
    transposed from transformers' ``(B, T, C, H, W)`` to ``(B, C, T, H, W)``.

    One exception: transformers' ``space_only`` Timesformer classifies every frame
    separately, while the bundled model (like the official code) averages the frames'
    tokens before the final norm and returns one prediction per clip.
    """
    config = config_from_transformers(hf_model, backend)
    sd = hf_model.state_dict()
    pooler = sorted(k for k in sd if re.match(r"(?:vivit\.)?pooler\.", k))
    if pooler:
        warnings.warn(f"from_transformers: dropping {pooler} (the bundled ViViT has no pooler)", stacklevel=2)
        sd = {k: v for k, v in sd.items() if k not in pooler}
    ref = next(hf_model.parameters())
    model = (TimeSformer if isinstance(config, TimeSformerConfig) else ViViT)(config)
    load_checkpoint(model, sd)
    return model.to(device=ref.device, dtype=ref.dtype).train(hf_model.training)
