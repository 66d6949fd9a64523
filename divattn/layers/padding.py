"""What the blocks hand the divided ops of a padded batch (their ``mask`` argument).

A block's ``mask`` is a ``(B, T, N)`` bool tensor of the real tokens, or :class:`Frames`
when every sample's padding is whole frames at its end (clips shorter than the batch's T,
all at the batch's frame size). Frames reach the ops as per-sample counts (``frames=``),
the form the Triton kernels take, skipping whole tiles of padding; a mask is read per key
and runs on the torch backend only (see the ops' padded-batch docs).
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


def op_padding(mask: Optional[Union[torch.Tensor, Frames]]) -> dict:
    """The ops' keyword arguments for a block's ``mask``: ``{}``, ``{"frames": counts}`` or ``{"mask": mask}``."""
    if mask is None:
        return {}
    if isinstance(mask, Frames):
        return {"frames": mask.counts}
    return {"mask": mask}
