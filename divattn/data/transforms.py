"""TimeSformer sampling and spatial transforms for decoded clips.

Temporal: a clip is ``num_frames`` frames ``sampling_rate`` apart; training takes one at
a random start, testing takes ``num_clips`` clips evenly spread over the video (one
clip: the centre). A video shorter than a clip's span repeats its last frame, or, with
variable frames, gives a shorter clip (:func:`clip_frames`) that a batch pads. Spatial, on ``uint8`` ``(T, H, W, 3)`` frames: training resizes the
short side to a random size in ``train_scale``, crops ``crop_size`` at random and flips
horizontally with probability 1/2 where allowed; testing resizes the short side to
``test_scale`` and takes ``num_crops`` crops along the long side (3: start, centre,
end). Both return normalised float32 ``(C, T, H, W)``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

KINETICS_MEAN = (0.45, 0.45, 0.45)
KINETICS_STD = (0.225, 0.225, 0.225)


def clip_indices(total: int, num_frames: int, sampling_rate: int, start: int) -> np.ndarray:
    """Frames ``start, start + rate, ...``, clamped to the last frame for short videos."""
    idx = start + sampling_rate * np.arange(num_frames)
    return np.clip(idx, 0, total - 1)


def clip_frames(total: int, num_frames: int, sampling_rate: int) -> int:
    """Frames of a clip of a ``total``-frame video that repeat none: ``num_frames``, or fewer
    (at least 1) when the video is shorter than a clip's span."""
    return max(1, min(num_frames, (total - 1) // sampling_rate + 1))


def train_clip_indices(total: int, num_frames: int, sampling_rate: int, rng: np.random.Generator) -> np.ndarray:
    span = (num_frames - 1) * sampling_rate + 1
    start = int(rng.integers(0, total - span + 1)) if total > span else 0
    return clip_indices(total, num_frames, sampling_rate, start)


def eval_clip_indices(total: int, num_frames: int, sampling_rate: int, num_clips: int) -> List[np.ndarray]:
    """``num_clips`` clips with evenly spread starts (one clip: centred)."""
    span = (num_frames - 1) * sampling_rate + 1
    room = max(total - span, 0)
    if num_clips == 1:
        starts = [room // 2]
    else:
        starts = [room * i // (num_clips - 1) for i in range(num_clips)]
    return [clip_indices(total, num_frames, sampling_rate, s) for s in starts]


def _resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``(T, H, W, 3)`` -> float ``(T, 3, h, w)`` in [0, 255] with ``min(h, w) == size``."""
    x = frames.permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    if h <= w:
        out = (size, max(size, round(w * size / h)))
    else:
        out = (max(size, round(h * size / w)), size)
    return F.interpolate(x, size=out, mode="bilinear", align_corners=False, antialias=True)


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """float ``(T, 3, H, W)`` in [0, 255] -> ``(3, T, H, W)`` normalised."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1) * 255.0
    return ((x - m) / s).transpose(0, 1).contiguous()


def train_transform(frames: torch.Tensor, rng: np.random.Generator, *, crop_size: int,
                    train_scale: Tuple[int, int], flip: bool, mean: Sequence[float] = KINETICS_MEAN,
                    std: Sequence[float] = KINETICS_STD) -> torch.Tensor:
    """Scale jitter, random crop, optional horizontal flip, normalisation: ``(C, T, S, S)``."""
    lo, hi = int(train_scale[0]), int(train_scale[1])
    if not crop_size <= lo <= hi:
        raise ValueError(f"train_scale {train_scale} must satisfy crop_size ({crop_size}) <= min <= max")
    x = _resize_short_side(frames, int(rng.integers(lo, hi + 1)))
    h, w = x.shape[-2:]
    top = int(rng.integers(0, h - crop_size + 1))
    left = int(rng.integers(0, w - crop_size + 1))
    x = x[..., top:top + crop_size, left:left + crop_size]
    if flip and rng.random() < 0.5:
        x = x.flip(-1)
    return _normalise(x, mean, std)


def eval_transform(frames: torch.Tensor, *, crop_size: int, test_scale: int, num_crops: int = 3,
                   mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD) -> torch.Tensor:
    """Short side to ``test_scale``, ``num_crops`` crops along the long side: ``(V, C, T, S, S)``."""
    if test_scale < crop_size:
        raise ValueError(f"test_scale ({test_scale}) must be >= crop_size ({crop_size})")
    x = _resize_short_side(frames, test_scale)
    h, w = x.shape[-2:]
    views = []
    for i in range(num_crops):
        frac = 0.5 if num_crops == 1 else i / (num_crops - 1)
        if w >= h:
            top, left = (h - crop_size) // 2, round((w - crop_size) * frac)
        else:
            top, left = round((h - crop_size) * frac), (w - crop_size) // 2
        views.append(_normalise(x[..., top:top + crop_size, left:left + crop_size], mean, std))
    return torch.stack(views)
