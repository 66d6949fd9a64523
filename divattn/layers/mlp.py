"""The feed-forward half of a transformer block."""

from __future__ import annotations

from torch import nn

ACTIVATIONS = ("gelu", "gelu_tanh")


def make_act(name: str) -> nn.Module:
    """``"gelu"``: exact GELU (TimeSformer, timm); ``"gelu_tanh"``: tanh approximation (ViViT/Flax)."""
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")


class Mlp(nn.Module):
    """``fc2(drop(act(fc1(x))))`` then dropout; keys ``fc1``, ``fc2`` as in timm / TimeSformer."""

    def __init__(self, dim: int, hidden_dim: int, act: str = "gelu", drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
