"""Model registry, as in timm: ``@register_model``, ``list_models()``, ``model_entrypoint(name)``.

It imports no model: each model module registers its entry points when imported, and
:func:`divattn.models.create_model` (:mod:`~divattn.models.factory`) builds them.
"""

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
    """True when a model named ``name`` is registered."""
    return name in _MODELS


def model_entrypoint(name: str) -> Callable[..., nn.Module]:
    """The function registered as ``name``; ValueError naming the registered models otherwise."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(list_models())}")
    return _MODELS[name]
