"""The feed-forward half of a transformer block."""

from __future__ import annotations

from typing import Optional

from torch import nn

from .recompute import gelu_linear, norm_linear

ACTIVATIONS = ("gelu", "gelu_tanh")


def make_act(name: str) -> nn.Module:
    """``"gelu"``: exact GELU (TimeSformer, timm); ``"gelu_tanh"``: tanh approximation (ViViT/Flax)."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` then dropout; keys ``fc1``, ``fc2`` as in timm / TimeSformer.

    ``forward(x, norm)`` applies the pre-norm ``norm`` to ``x`` first. With ``memory="min"``
    the norm and ``fc1`` save ``x`` instead of ``norm(x)``, and the activation and ``fc2``
    save ``fc1``'s output instead of the activation's (:mod:`divattn.layers.recompute`),
    except while dropout between them is active.
    """

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.memory = "fast"

    def forward(self, x, norm: Optional[nn.Module] = None):
        if self.memory == "min":
            h = self.fc1(x) if norm is None else norm_linear(x, norm, self.fc1)
            if not (self.training and self.drop.p > 0):
                return self.drop(gelu_linear(h, self.act, self.fc2))
            return self.drop(self.fc2(self.drop(self.act(h))))
        if norm is not None:
            x = norm(x)
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
