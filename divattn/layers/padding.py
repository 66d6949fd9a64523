"""What the blocks hand the attention ops of a padded batch (their ``mask`` argument).

A block's ``mask`` is a bool tensor of the real tokens (``(B, T, N)``, joint blocks
``(B, L)``), or, when every sample's padding is whole frames at its end (clips shorter
than the batch's T, all at the batch's frame size), counts: :class:`Frames` for the divided
blocks and :class:`Lengths` for joint blocks whose real tokens are a prefix of each
sequence. Counts reach the ops as ``frames=`` / ``lengths=``, the cheap form, with which
the kernels skip whole tiles of padding; a mask is read per row (see the ops'
padded-batch docs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch


@dataclass(frozen=True)
class Frames:
    """A padded batch whose sample b is its first ``counts[b]`` frames (``(B,)`` ints on the
    host), every patch of those frames real."""

    counts: torch.Tensor


@dataclass(frozen=True)
class Lengths:
    """Joint-attention sequences whose sequence s is its first ``counts[s]`` tokens (``(S,)``
    ints on the host)."""

    counts: torch.Tensor


def op_padding(mask: Optional[Union[torch.Tensor, Frames, Lengths]]) -> dict:
    """The ops' keyword arguments for a block's ``mask``: ``{}``, ``{"frames": counts}``,
    ``{"lengths": counts}`` or ``{"mask": mask}``."""
    if mask is None:
        return {}
    if isinstance(mask, Frames):
        return {"frames": mask.counts}
    if isinstance(mask, Lengths):
        return {"lengths": mask.counts}
    return {"mask": mask}
