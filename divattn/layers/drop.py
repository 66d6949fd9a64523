"""Stochastic depth."""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Zero whole samples (dim 0) with probability ``p`` and rescale the rest by 1/(1-p)."""
    scale = drop_path_scale(x, p, training)
    return x if scale is None else x * scale


def drop_path_scale(x: torch.Tensor, p: float, training: bool):
    """The per-sample factor ``(B, 1, ...)`` that :func:`drop_path` multiplies ``x`` by (0 or
    1/(1-p), drawn), or None where it is the identity."""
    if p == 0.0 or not training:
        return None
    keep = 1.0 - p
    return x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)


class DropPath(nn.Module):
    """Per-sample stochastic depth (timm's ``DropPath``); identity in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.p, self.training)

    def scale(self, x: torch.Tensor):
        """The factor this call would multiply ``x`` by (see :func:`drop_path_scale`), or None."""
        return drop_path_scale(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
