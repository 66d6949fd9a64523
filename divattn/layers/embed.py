"""Patch and tubelet embeddings of a video ``(B, C, T, H, W)``."""

from __future__ import annotations

import torch
from torch import nn


def check_video(video: torch.Tensor, in_chans: int, patch_size: int, tubelet_size: int = 1) -> None:
    """Raise ValueError unless ``video`` is ``(B, in_chans, T, H, W)`` with T, H, W large enough."""
    if video.dim() != 5:
        raise ValueError(f"video must be 5-D (B, C, T, H, W), got shape {tuple(video.shape)}")
    B, C, T, H, W = video.shape
    if C != in_chans:
        raise ValueError(f"video has {C} channels (dim 1 of (B, C, T, H, W)), expected in_chans = {in_chans}")
    if H < patch_size or W < patch_size:
        raise ValueError(f"video frames are {H}x{W}, smaller than the patch size {patch_size}")
    if T < tubelet_size or T % tubelet_size != 0:
        raise ValueError(f"video has T = {T} frames, expected a positive multiple of the tubelet size {tubelet_size}")


class PatchEmbed(nn.Module):
    """Per-frame patch embedding (TimeSformer): ``proj`` is ``Conv2d(in_chans, dim, p, stride=p)``.

    ``forward(video)`` takes ``(B, C, T, H, W)`` and returns ``(B*T, N, dim)`` with frames
    in ``(b t)`` order and patches in ``(h w)`` order, N = (H // p) * (W // p).
    """

    def __init__(self, patch_size: int = 16, in_chans: int = 3, dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        check_video(video, self.in_chans, self.patch_size)
        B, C, T, H, W = video.shape
        frames = video.transpose(1, 2).reshape(B * T, C, H, W)
        return self.proj(frames).flatten(2).transpose(1, 2)


class TubeletEmbed(nn.Module):
    """Tubelet embedding (ViViT): ``proj`` is ``Conv3d(in_chans, dim, (t, p, p), stride=(t, p, p))``.

    ``forward(video)`` takes ``(B, C, T, H, W)`` and returns the ``(B, dim, T // t, H // p,
    W // p)`` grid; ``.flatten(2).transpose(1, 2)`` gives tokens in ``(t h w)`` order.
    """

    def __init__(self, patch_size: int = 16, tubelet_size: int = 2, in_chans: int = 3, dim: int = 768):
        super().__init__()
        self.patch_size = patch_size
        self.tubelet_size = tubelet_size
        self.in_chans = in_chans
        size = (tubelet_size, patch_size, patch_size)
        self.proj = nn.Conv3d(in_chans, dim, kernel_size=size, stride=size)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        check_video(video, self.in_chans, self.patch_size, self.tubelet_size)
        return self.proj(video)
