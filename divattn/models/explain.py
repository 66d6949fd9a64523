"""Attention rollout for the bundled models, and a PNG heatmap over the clip's frames.

Attention rollout (Abnar & Zuidema, 2020) multiplies each layer's head-averaged
attention, mixed half-and-half with the identity for the residual, from the first
layer to the last; the cls token's row says how much each input patch contributes to
the prediction. In a divided block the tokens pass through temporal and then spatial
attention, so a layer contributes ``(I + A_spatial)/2 @ (I + A_temporal)/2`` where
both are written as ``(1 + N*T)``-square matrices over the block's tokens: temporal
attention mixes the T tokens of each patch (the cls token maps to itself), spatial
attention mixes each frame's tokens with the cls token, and the cls row is the mean
over frames of the cls query's per-frame attention (the official cls averaging).
"""

from __future__ import annotations

import os
import struct
import zlib

import torch
import torch.nn.functional as F

from .timesformer import TimeSformer
from .vivit import ViViT


def _temporal_matrix(temporal: torch.Tensor) -> torch.Tensor:
    """``(B, N, T, T)`` head-averaged temporal attention -> ``(B, L, L)`` over ``[cls] + (h w t)``."""
    B, N, T, _ = temporal.shape
    A = temporal.new_zeros(B, 1 + N * T, 1 + N * T)
    A[:, 0, 0] = 1
    n = torch.arange(N)
    A[:, 1:, 1:].view(B, N, T, N, T)[:, n, :, n, :] = temporal.transpose(0, 1)
    return A


def _spatial_matrix(spatial: torch.Tensor) -> torch.Tensor:
    """``(B, T, 1+N, 1+N)`` head-averaged spatial attention (cls first) -> ``(B, L, L)``."""
    B, T, N1, _ = spatial.shape
    N = N1 - 1
    A = spatial.new_zeros(B, 1 + N * T, 1 + N * T)
    t = torch.arange(T)
    A[:, 1:, 1:].view(B, N, T, N, T)[:, :, t, :, t] = spatial[:, :, 1:, 1:].transpose(0, 1)
    A[:, 1:, 0] = spatial[:, :, 1:, 0].transpose(1, 2).reshape(B, N * T)
    A[:, 0, 0] = spatial[:, :, 0, 0].mean(1)
    A[:, 0, 1:] = (spatial[:, :, 0, 1:].transpose(1, 2) / T).reshape(B, N * T)
    return A


def _with_residual(A: torch.Tensor) -> torch.Tensor:
    A = 0.5 * A + 0.5 * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return A / A.sum(-1, keepdim=True)


@torch.no_grad()
def attention_rollout(model, video: torch.Tensor) -> torch.Tensor:
    """How much each patch of each frame contributes to the cls token, by attention rollout.

    Supports TimeSformer ``divided_space_time`` (the divided rollout in the module
    docstring) and ``joint_space_time``, and ViViT ``spatio_temporal``.

    Args:
        model: a bundled model (its blocks' ``attention_maps`` are used, on the
            reference softmax).
        video: ``(B, C, T, H, W)``.

    Returns:
        ``(B, T', h, w)`` relevance, each sample scaled to [0, 1]; T' is the number of
        frames (TimeSformer) or temporal tokens (ViViT), ``(h, w)`` the patch grid.
    """
    c = model.config
    kind = getattr(c, "attention_type", getattr(c, "variant", None))
    if not ((isinstance(model, TimeSformer) and kind in ("divided_space_time", "joint_space_time"))
            or (isinstance(model, ViViT) and kind == "spatio_temporal")):
        raise ValueError(f"attention_rollout: supports TimeSformer divided / joint and ViViT spatio_temporal, "
                         f"not {type(model).__name__} {kind!r}")
    B, _, T, H, W = video.shape
    T = T // c.tubelet_size
    h, w = H // c.patch_size, W // c.patch_size
    R = None
    for maps in model.attention_maps(video):
        if "joint" in maps:
            layer = _with_residual(maps["joint"].mean(1))
        else:
            temporal = maps["temporal"].mean(2)  # (B, N, T, T)
            spatial = maps["spatial"].mean(2)    # (B, T, 1+N, 1+N)
            layer = _with_residual(_spatial_matrix(spatial)) @ _with_residual(_temporal_matrix(temporal))
        R = layer if R is None else layer @ R
    rel = R[:, 0, 1:]
    # (h w t) order for TimeSformer, (t h w) for ViViT
    rel = rel.view(B, h, w, T).permute(0, 3, 1, 2) if isinstance(model, TimeSformer) else rel.view(B, T, h, w)
    lo = rel.flatten(1).min(1).values.view(B, 1, 1, 1)
    hi = rel.flatten(1).max(1).values.view(B, 1, 1, 1)
    return (rel - lo) / (hi - lo).clamp_min(1e-12)


def write_png(path, rgb: torch.Tensor) -> str:
    """Write an ``(H, W, 3)`` uint8 image as an 8-bit RGB PNG (no dependencies); returns the path."""
    if rgb.dim() != 3 or rgb.shape[2] != 3 or rgb.dtype != torch.uint8:
        raise ValueError(f"write_png: expected an (H, W, 3) uint8 tensor, got {tuple(rgb.shape)} {rgb.dtype}")
    H, W, _ = rgb.shape
    rows = torch.cat([torch.zeros(H, 1, dtype=torch.uint8), rgb.reshape(H, W * 3).cpu()], 1)  # filter byte 0

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows.numpy().tobytes(), 6)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)
    return os.fspath(path)


def _colormap(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> RGB in [0, 1], blue through green and yellow to red (a 'jet'-like map)."""
    r = (1.5 - (4 * x - 3).abs()).clamp(0, 1)
    g = (1.5 - (4 * x - 2).abs()).clamp(0, 1)
    b = (1.5 - (4 * x - 1).abs()).clamp(0, 1)
    return torch.stack([r, g, b], -1)


def heatmap_image(frames: torch.Tensor, heat: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Frames side by side with the heatmap blended over each: ``(H, T*W, 3)`` uint8.

    ``frames``: ``(C, T, H, W)`` (any range; scaled to [0, 1] over the clip; 1 or 3
    channels); ``heat``: ``(T, h, w)`` in [0, 1], upsampled bilinearly to ``(H, W)``.
    """
    C, T, H, W = frames.shape
    if heat.shape[0] != T:
        raise ValueError(f"heatmap_image: {heat.shape[0]} heatmaps for {T} frames")
    f = frames.detach().float().cpu()
    f = (f - f.min()) / (f.max() - f.min()).clamp_min(1e-12)
    f = f.expand(3, -1, -1, -1) if C == 1 else f[:3]
    up = F.interpolate(heat.detach().float().cpu()[:, None], size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    img = (1 - alpha) * f.permute(1, 2, 3, 0) + alpha * _colormap(up.clamp(0, 1))  # (T, H, W, 3)
    img = img.permute(1, 0, 2, 3).reshape(H, T * W, 3)
    return (img * 255).round().clamp(0, 255).to(torch.uint8)


def save_rollout_png(model, video: torch.Tensor, path, *, sample: int = 0, alpha: float = 0.5) -> str:
    """Write the attention rollout of ``video[sample]`` as a PNG heatmap over its frames.

    The image is ``H`` pixels high and ``T' * W`` wide: the T' frames side by side (for
    ViViT, the first frame of each tubelet), each blended with its upsampled heatmap.
    Returns the path.
    """
    heat = attention_rollout(model, video[sample:sample + 1])[0]
    frames = video[sample][:, ::model.config.tubelet_size]
    return write_png(path, heatmap_image(frames, heat, alpha))
