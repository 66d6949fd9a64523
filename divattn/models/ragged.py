"""Padded batches of clips of different lengths and sizes, as the bundled models take them.

A model call ``model(video, frames=..., sizes=..., mask=...)`` takes one padded
``(B, C, T, H, W)`` video and says what of it each sample really holds:

- ``frames``: ``(B,)`` ints, sample b is its first ``frames[b]`` frames (the rest of T is
  padding; for ViViT a multiple of the tubelet size);
- ``sizes``: ``(B, 2)`` ints, sample b's frames are ``sizes[b] = (height, width)`` pixels
  at the top left of the padded ``H x W`` (the rest is padding);
- ``mask``: ``(B, T', h, w)`` bool on the video's device, over the model's token grid
  (T' = T / tubelet size, h x w patches of the padded frames): False drops a token
  (VideoMAE-style masking), on top of the padding the other two say.

:func:`ragged_batch` checks them into a :class:`Ragged`, which gives the token mask the
blocks' attention takes and the per-sample position and time embeddings: each sample's
resized from the model's own as the single-clip path resizes them for a clip of that
size, so each sample's outputs are the clip's own outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..layers.padding import Frames, Lengths
from ..ops.masks import integers
from .pos_embed import resize_grid, resize_pos_embed_3d, resize_time_embed


@dataclass
class Ragged:
    """The real tokens of a padded batch: ``frames`` ``(B,)`` and ``grids`` ``(B, 2)`` (real
    token frames and patch rows / columns per sample, int64 on the host), ``keep`` an
    optional ``(B, T, h, w)`` token mask, ``shape`` the padded token grid ``(T, h, w)``."""

    frames: torch.Tensor
    grids: torch.Tensor
    keep: Optional[torch.Tensor]
    shape: tuple
    device: torch.device
    _tokens: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def batch(self) -> int:
        return self.frames.shape[0]

    def tokens(self) -> torch.Tensor:
        """``(B, T, N)`` bool, N = h*w patches in ``(h w)`` order: the real tokens (the op mask)."""
        if self._tokens is None:
            T, h, w = self.shape
            frames, grids = self.frames.to(self.device), self.grids.to(self.device)
            t = torch.arange(T, device=self.device)[None, :, None, None] < frames[:, None, None, None]
            r = torch.arange(h, device=self.device)[None, None, :, None] < grids[:, 0, None, None, None]
            c = torch.arange(w, device=self.device)[None, None, None, :] < grids[:, 1, None, None, None]
            real = t & r & c
            if self.keep is not None:
                real = real & self.keep
            self._tokens = real.reshape(self.batch, T, h * w)
        return self._tokens

    def divided(self):
        """The real tokens as the divided blocks take them (:mod:`divattn.layers.padding`):
        :class:`~divattn.layers.padding.Frames` when every sample's padding is whole frames at
        its end (no size below the video's, no token mask), the counts the Triton kernels take;
        else the ``(B, T, N)`` mask of :meth:`tokens`."""
        return Frames(self.frames) if self.whole_frames else self.tokens()

    @property
    def whole_frames(self) -> bool:
        """Whether every sample's padding is whole frames at its end: no size below the
        video's, no token mask."""
        _, h, w = self.shape
        return self.keep is None and bool((self.grids == torch.tensor([h, w])).all())

    def lengths(self, prefix: int, *, per_frame: bool = False, frame_tokens: Optional[int] = None) -> Lengths:
        """For :attr:`whole_frames`: the real tokens of the joint blocks' sequences as
        :class:`~divattn.layers.padding.Lengths`, ``prefix`` real tokens (a cls) first, then
        ``frame_tokens`` a frame (default its h*w patches) in ``(t h w)`` order: one sequence
        a sample, or with ``per_frame`` one a frame (``(B*T,)``, ``(b t)`` order)."""
        T, h, w = self.shape
        n = h * w if frame_tokens is None else frame_tokens
        if per_frame:
            real = torch.arange(T)[None, :] < self.frames[:, None]
            return Lengths((real.to(torch.int64) * n + prefix).reshape(-1))
        return Lengths(self.frames * n + prefix)

    def real_frames(self) -> torch.Tensor:
        """``(B, T)`` bool: the frames that hold a real token."""
        return self.tokens().any(2)

    def per_sample(self, key: Callable[[int], tuple], make: Callable[[tuple], torch.Tensor]) -> torch.Tensor:
        """``torch.stack([make(key(b)) for b])``, calling ``make`` once per distinct key."""
        made: dict = {}
        out = []
        for b in range(self.batch):
            k = key(b)
            if k not in made:
                made[k] = make(k)
            out.append(made[k])
        return torch.stack(out)

    def grid_embed(self, pos: torch.Tensor, old_grid: Sequence[int], mode: str) -> torch.Tensor:
        """``(B, h*w, C)``: the ``(1, h0*w0, C)`` patch position embeddings ``pos`` resized
        per sample to its patch grid (:func:`resize_grid`), zero on the padding."""
        _, h, w = self.shape

        def make(grid):
            out = pos.new_zeros(h, w, pos.shape[-1])
            out[:grid[0], :grid[1]] = resize_grid(pos, old_grid, grid, mode).view(*grid, -1)
            return out.view(h * w, -1)

        return self.per_sample(lambda b: tuple(self.grids[b].tolist()), make)

    def time_embed(self, time: torch.Tensor, mode: str) -> torch.Tensor:
        """``(B, T, C)``: the ``(1, T0, C)`` time embeddings resized per sample to its frames
        (:func:`resize_time_embed`), zero on the padding."""
        T = self.shape[0]

        def make(key):
            (frames,) = key
            out = time.new_zeros(T, time.shape[-1])
            out[:frames] = resize_time_embed(time, frames, mode)[0]
            return out

        return self.per_sample(lambda b: (int(self.frames[b]),), make)

    def grid3d_embed(self, pos: torch.Tensor, old_grid: Sequence[int], num_prefix: int, mode: str) -> torch.Tensor:
        """``(B, num_prefix + T*h*w, C)``: ``(t h w)`` position embeddings resized per sample to
        its ``(frames, rows, cols)`` (:func:`resize_pos_embed_3d`), zero on the padding."""
        T, h, w = self.shape

        def make(key):
            out = pos.new_zeros(T, h, w, pos.shape[-1])
            resized = resize_pos_embed_3d(pos, old_grid, key, num_prefix=num_prefix, mode=mode)[0]
            out[:key[0], :key[1], :key[2]] = resized[num_prefix:].view(*key, -1)
            return torch.cat([resized[:num_prefix], out.view(T * h * w, -1)])

        return self.per_sample(lambda b: (int(self.frames[b]), *self.grids[b].tolist()), make)


def _ints(name: str, who: str, value, shape: tuple, layout: str) -> torch.Tensor:
    t = integers(who, name, value, layout)
    if tuple(t.shape) != shape:
        raise ValueError(f"{who}: {name} must have shape {shape}, got {tuple(t.shape)}")
    return t


def ragged_batch(video: torch.Tensor, *, frames=None, sizes=None, mask=None, patch_size: int,
                 tubelet_size: int = 1, who: str = "model") -> Optional[Ragged]:
    """The :class:`Ragged` of a padded ``(B, C, T, H, W)`` video (see the module docstring),
    or None when none of ``frames``, ``sizes``, ``mask`` is given.

    Raises TypeError / ValueError naming the argument: counts that are not integers of
    shape ``(B,)`` / ``(B, 2)``, a frame count outside ``[1, T]`` or not a multiple of
    the tubelet size, a size outside ``[patch_size, H] x [patch_size, W]``, a mask that is
    not a bool ``(B, T', h, w)`` tensor on the video's device.
    """
    if frames is None and sizes is None and mask is None:
        return None
    B, _, T, H, W = video.shape
    shape = (T // tubelet_size, H // patch_size, W // patch_size)
    if frames is None:
        frames = torch.full((B,), T, dtype=torch.int64)
    else:
        frames = _ints("frames", who, frames, (B,), "(B,)")
        bad = ((frames < 1) | (frames > T) | (frames % tubelet_size != 0)).nonzero()
        if bad.numel():
            i = int(bad[0, 0])
            what = f" and a multiple of the tubelet size {tubelet_size}" if tubelet_size > 1 else ""
            raise ValueError(f"{who}: frames[{i}] = {int(frames[i])} must be in [1, {T}] (the video's T){what}")
    if sizes is None:
        grids = torch.tensor([shape[1:]], dtype=torch.int64).expand(B, 2)
    else:
        sizes = _ints("sizes", who, sizes, (B, 2), "(B, 2)")
        for i in range(B):
            h, w = sizes[i].tolist()
            if not (patch_size <= h <= H and patch_size <= w <= W):
                raise ValueError(f"{who}: sizes[{i}] = ({h}, {w}) must be within [{patch_size}, {H}] x "
                                 f"[{patch_size}, {W}] (the patch size and the video's H x W)")
        grids = sizes // patch_size
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{who}: mask must be a bool tensor (True = keep the token), got "
                            f"{mask.dtype if isinstance(mask, torch.Tensor) else type(mask).__name__}")
        if tuple(mask.shape) != (B, *shape):
            raise ValueError(f"{who}: mask has shape {tuple(mask.shape)}, expected (B, T', h, w) = {(B, *shape)}, "
                             f"the token grid of the video")
        if mask.device != video.device:
            raise ValueError(f"{who}: mask is on device {mask.device}, expected {video.device} like the video")
    return Ragged(frames // tubelet_size, grids, mask, shape, video.device)
