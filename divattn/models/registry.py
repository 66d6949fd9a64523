"""Model registry, as in timm: ``@register_model``, ``create_model(name, **kw)``, ``list_models()``."""

from __future__ import annotations

import fnmatch
from typing import Callable

from torch import nn

_MODELS: dict = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a model entry point under its function name (a name may be registered once)."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"register_model: a model named {name!r} is already registered")
    _MODELS[name] = fn
    return fn


def list_models(pattern: str = "*") -> list:
    """Sorted names of the registered models matching the shell-style ``pattern``."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n, pattern))


def is_model(name: str) -> bool:
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]


def create_model(name: str, pretrained: bool = False, checkpoint_path=None, **kwargs) -> nn.Module:
    """Build the registered model ``name`` with config overrides, e.g.
    ``create_model("timesformer_base", num_classes=174, attention_type="joint_space_time")``.

    Keyword names follow timm: ``num_classes, num_frames, img_size, patch_size,
    embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_rate, drop_path_rate,
    attention_type`` (TimeSformer) / ``variant, temporal_depth`` (ViViT), ``backend``.
    ``checkpoint_path`` loads a local checkpoint strictly (see
    :func:`divattn.models.load_checkpoint`). No weights are downloaded, so
    ``pretrained=True`` raises ValueError; unknown keywords raise TypeError.
    """
    entry = model_entrypoint(name)
    if pretrained:
        raise ValueError(
            f"create_model({name!r}, pretrained=True): divattn downloads no weights; "
            "pass checkpoint_path= a local official, divattn or transformers checkpoint"
        )
    model = entry(**kwargs)
    if checkpoint_path is not None:
        from .checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint_path)
    return model
