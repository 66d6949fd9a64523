"""Resizing position and time embeddings to another resolution or frame count.

Used at run time (a clip whose size differs from the config) and at load time (a
checkpoint trained at another size). ``mode="nearest"`` is what the official
TimeSformer code does at run time; ``"bicubic"`` / ``"bilinear"`` interpolate the
spatial grid smoothly and the time axis linearly.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

MODES = ("nearest", "bilinear", "bicubic")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"resize mode must be one of {MODES}, got {mode!r}")


def square_grid(num_positions: int) -> tuple:
    """``(g, g)`` for ``g*g == num_positions``; ValueError otherwise."""
    g = math.isqrt(num_positions)
    if g * g != num_positions:
        raise ValueError(f"cannot infer a square grid from {num_positions} positions; pass the grid explicitly")
    return g, g


def _interpolate(x: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
    """F.interpolate in fp32 on ``(1, C, *grid)``, cast back to the input dtype."""
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(x.float(), size=tuple(size), mode=mode, **kw).to(x.dtype)


def resize_grid(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int],
                mode: str = "nearest") -> torch.Tensor:
    """Resize ``(1, h*w, C)`` position embeddings laid out ``(h w)`` from ``old_grid`` to ``new_grid``."""
    _check_mode(mode)
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos
    C = pos.shape[-1]
    x = pos.reshape(1, *old_grid, C).permute(0, 3, 1, 2)
    return _interpolate(x, new_grid, mode).permute(0, 2, 3, 1).reshape(1, -1, C)


def resize_pos_embed(pos: torch.Tensor, new_grid: Sequence[int], *, num_prefix: int = 1,
                     old_grid: Optional[Sequence[int]] = None, mode: str = "nearest") -> torch.Tensor:
    """Resize ``(1, num_prefix + h*w, C)`` embeddings (cls first) to ``new_grid``.

    The prefix tokens (cls) are kept as they are; ``old_grid`` defaults to a square grid.
    """
    patches = pos[:, num_prefix:]
    old_grid = square_grid(patches.shape[1]) if old_grid is None else tuple(old_grid)
    if old_grid == tuple(new_grid):
        return pos
    return torch.cat([pos[:, :num_prefix], resize_grid(patches, old_grid, new_grid, mode)], 1)


def _known_equal(a, b) -> bool:
    """``a == b``; False for sizes that are symbolic (a dynamic frame count under
    ``torch.export``) and not provably equal, without specialising them: a resize to the
    same size is the identity, so the caller may take the resize branch for every size."""
    equal = a == b
    if isinstance(equal, torch.SymBool):
        from torch.fx.experimental.symbolic_shapes import statically_known_true

        return statically_known_true(equal)
    return bool(equal)


def resize_time_embed(time: torch.Tensor, num_frames: int, mode: str = "nearest") -> torch.Tensor:
    """Resize ``(1, T0, C)`` time embeddings to ``(1, num_frames, C)``: nearest, or linear otherwise.

    Exported with a dynamic frame count, the graph holds the resize (the identity when
    ``num_frames == T0``)."""
    _check_mode(mode)
    if _known_equal(time.shape[1], num_frames):
        return time
    x = _interpolate(time.transpose(1, 2), (num_frames,), "nearest" if mode == "nearest" else "linear")
    return x.transpose(1, 2)


def resize_pos_embed_3d(pos: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int], *,
                        num_prefix: int = 0, mode: str = "nearest") -> torch.Tensor:
    """Resize ``(1, num_prefix + T*h*w, C)`` embeddings laid out ``(t h w)`` (ViViT).

    ``old_grid`` / ``new_grid`` are ``(T, h, w)``; each frame's grid is resized with
    ``mode``, then the time axis as in :func:`resize_time_embed`.
    """
    _check_mode(mode)
    (T0, *hw0), (T1, *hw1) = tuple(old_grid), tuple(new_grid)
    if all(_known_equal(a, b) for a, b in zip((T0, *hw0), (T1, *hw1))):
        return pos
    C = pos.shape[-1]
    frames = pos[:, num_prefix:].reshape(T0, -1, C)
    frames = torch.cat([resize_grid(f[None], hw0, hw1, mode) for f in frames], 0)  # (T0, h1*w1, C)
    if not _known_equal(T1, T0):
        # time axis: (T0, P, C) -> (1, P*C, T0) -> (1, P*C, T1) -> (T1, P, C)
        P = frames.shape[1]
        x = frames.reshape(T0, P * C).t()[None]
        x = _interpolate(x, (T1,), "nearest" if mode == "nearest" else "linear")
        frames = x[0].t().reshape(T1, P, C)
    return torch.cat([pos[:, :num_prefix], frames.reshape(1, -1, C)], 1)
