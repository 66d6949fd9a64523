"""A synthetic video task whose label is the direction of motion.

Every clip shows ``num_objects`` shapes (square, disc or diamond, random size, a colour
that stands out from the background) moving together in a straight line at constant
speed over a textured background (random gratings) with per-frame sensor noise. The label is the direction of motion, one of
``num_directions`` evenly spaced angles (0 = rightwards, counter-clockwise), times
``num_speeds`` speed bins when more than one is asked for. The image wraps around
(the world is a torus), so at every frame the shape's position is uniform whatever the
label: one frame carries no information about it. Reversing a clip in time gives a
clip of the opposite direction drawn with the same probability, so any function of
the *set* of frames (a frame average, a per-frame model whose features are averaged)
scores the same on both; with four directions it can at best tell the axis of motion,
50% where chance is 25%. Temporal attention can read the order and solve it.

Clips are a pure function of a seed: :meth:`SyntheticMotion.render` of the same
:class:`MotionParams` gives the same pixels on any machine and in any process, so a
run is reproducible and resumable without storing data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch

from .sampling import split_key

SHAPES = ("square", "disc", "diamond")


@dataclass(frozen=True)
class MotionParams:
    """Everything that decides one clip's pixels (see :meth:`SyntheticMotion.draw`)."""

    label: int
    direction: int
    speed: float
    starts: Tuple[Tuple[float, float], ...]  # (x, y) of each object at frame 0
    shapes: Tuple[str, ...]
    radii: Tuple[float, ...]
    colors: Tuple[Tuple[float, float, float], ...]
    texture_seed: int
    noise_seed: int
    frames: Optional[int] = None  # the video's length when it is drawn (min_frames); None: num_frames


class SyntheticMotion(torch.utils.data.Dataset):
    """Clips of a shape moving over a texture; the label is the direction of motion.

    Item ``i`` (or a ``(i, seed)`` pair from :class:`divattn.data.EpochSampler`, which
    draws fresh clips every epoch) is ``(video, label, index)`` with ``video`` a float32
    ``(C, T, H, W)`` tensor normalised to mean 0, std 1 per channel (approximately) and
    ``label`` an int in ``[0, num_classes)``. Without a per-item seed, item ``i`` is a
    function of ``(seed, i)`` alone. With ``labels=False`` (next-frame prediction,
    where the clip is its own target) the label is -1: the same clips, no label.

    Args:
        length: number of items.
        num_frames, img_size: T and H = W.
        num_directions: even number of evenly spaced motion directions.
        num_speeds: speed bins, each a class of its own (1: speed is a nuisance).
        speed: (min, max) pixels per frame.
        num_objects: shapes per clip, all moving with the same velocity.
        radius: (min, max) half-size of a shape in pixels.
        contrast: how far a shape's brightness is from the background's mean (in [0, 1]).
        texture: (min, max) amplitude of each background grating.
        noise: standard deviation of per-frame pixel noise (pixels in [0, 1]).
        seed: base seed of the split (use different seeds for train and validation).
        labels: False to return -1 for every label.
        min_frames: each video's length is drawn from ``[min_frames, num_frames]``
            (None: every video has ``num_frames``). A shorter video's clip repeats its
            last frame up to ``num_frames``, or with ``variable_frames`` keeps its own
            length (``(C, T_b, H, W)``, padded by :func:`~divattn.data.collate_skipping`).
    """

    mean = (0.5, 0.5, 0.5)
    std = (0.15, 0.15, 0.15)

    def __init__(self, length: int = 10000, *, num_frames: int = 8, img_size: int = 32,
                 num_directions: int = 4, num_speeds: int = 1, speed: Sequence[float] = (1.0, 2.0),
                 num_objects: int = 1, radius: Sequence[float] = (3.0, 5.0), contrast: float = 0.35,
                 texture: Sequence[float] = (0.02, 0.08), noise: float = 0.04, seed: int = 0, labels: bool = True,
                 min_frames: Optional[int] = None, variable_frames: bool = False):
        if num_directions < 2 or num_directions % 2:
            raise ValueError(f"num_directions must be an even number >= 2 (each direction needs its reverse), got {num_directions}")
        if num_speeds < 1:
            raise ValueError(f"num_speeds must be >= 1, got {num_speeds}")
        if not 0 < speed[0] <= speed[1]:
            raise ValueError(f"speed must be (min, max) with 0 < min <= max, got {tuple(speed)}")
        if num_objects < 1:
            raise ValueError(f"num_objects must be >= 1, got {num_objects}")
        if not 0 < radius[0] <= radius[1]:
            raise ValueError(f"radius must be (min, max) with 0 < min <= max, got {tuple(radius)}")
        if min_frames is not None and not 1 <= min_frames <= num_frames:
            raise ValueError(f"min_frames must be in [1, num_frames = {num_frames}], got {min_frames}")
        self.length = int(length)
        self.num_frames = int(num_frames)
        self.img_size = int(img_size)
        self.num_directions = int(num_directions)
        self.num_speeds = int(num_speeds)
        self.speed = (float(speed[0]), float(speed[1]))
        self.num_objects = int(num_objects)
        self.radius = (float(radius[0]), float(radius[1]))
        self.contrast = float(contrast)
        self.texture = (float(texture[0]), float(texture[1]))
        self.noise = float(noise)
        self.seed = int(seed)
        self.labels = bool(labels)
        self.min_frames = self.num_frames if min_frames is None else int(min_frames)
        self.variable_frames = bool(variable_frames)

    @property
    def num_classes(self) -> int:
        return self.num_directions * self.num_speeds

    @property
    def class_names(self) -> list:
        names = []
        for d in range(self.num_directions):
            deg = round(360.0 * d / self.num_directions)
            for s in range(self.num_speeds):
                names.append(f"dir{deg}" + (f"_speed{s}" if self.num_speeds > 1 else ""))
        return names

    def __len__(self) -> int:
        return self.length

    def draw(self, seed: Union[int, Sequence[int]]) -> MotionParams:
        """The parameters of the clip for ``seed`` (an int or a sequence of ints)."""
        rng = np.random.default_rng(seed)
        label = int(rng.integers(self.num_classes))
        direction, speed_bin = divmod(label, self.num_speeds)
        lo, hi = self.speed
        width = (hi - lo) / self.num_speeds
        speed = lo + width * (speed_bin + float(rng.random()))
        k = self.num_objects
        starts = tuple((float(x), float(y)) for x, y in rng.random((k, 2)) * self.img_size)
        shapes = tuple(SHAPES[int(i)] for i in rng.integers(len(SHAPES), size=k))
        radii = tuple(float(r) for r in rng.uniform(*self.radius, size=k))
        # brighter or darker than the background's mean (0.5), with a random tint
        signs = rng.choice([-1.0, 1.0], size=(k, 1))
        colors = np.clip(0.5 + signs * self.contrast + rng.uniform(-0.1, 0.1, size=(k, 3)), 0.0, 1.0)
        colors = tuple(tuple(float(c) for c in row) for row in colors)
        texture_seed, noise_seed = (int(s) for s in rng.integers(0, 2**62, size=2))
        frames = None if self.min_frames == self.num_frames else int(rng.integers(self.min_frames, self.num_frames + 1))
        return MotionParams(label, direction, speed, starts, shapes, radii, colors, texture_seed, noise_seed, frames)

    def reverse(self, p: MotionParams) -> MotionParams:
        """The parameters whose clip is ``p``'s played backwards (same frames, reversed)."""
        direction = (p.direction + self.num_directions // 2) % self.num_directions
        dx, dy = self._velocity(p.direction, p.speed)
        last = (p.frames or self.num_frames) - 1
        starts = tuple(((x + dx * last) % self.img_size, (y + dy * last) % self.img_size) for x, y in p.starts)
        label = direction * self.num_speeds + p.label % self.num_speeds
        return replace(p, label=label, direction=direction, starts=starts)

    def _velocity(self, direction: int, speed: float) -> Tuple[float, float]:
        angle = 2.0 * math.pi * direction / self.num_directions
        return speed * math.cos(angle), -speed * math.sin(angle)

    def render(self, p: MotionParams) -> np.ndarray:
        """Pixels of the clip: float32 ``(T, H, W, 3)`` in ``[0, 1]`` (T: the video's length).

        Frame noise is drawn in time order from ``p.noise_seed`` for the frame at each
        position, so :meth:`reverse` gives the reversed clip up to that noise; pass
        ``noise=0`` to the dataset for an exact reversal.
        """
        S, T = self.img_size, p.frames or self.num_frames
        background = self._texture(p.texture_seed)
        coords = np.arange(S, dtype=np.float64) + 0.5
        dx, dy = self._velocity(p.direction, p.speed)
        frames = np.empty((T, S, S, 3), dtype=np.float32)
        noise_rng = np.random.default_rng(p.noise_seed)
        for t in range(T):
            frame = background.copy()
            for (x0, y0), shape, radius, color in zip(p.starts, p.shapes, p.radii, p.colors):
                cx, cy = (x0 + dx * t) % S, (y0 + dy * t) % S
                # signed distance on the torus, so a shape leaving one edge enters the other
                ox = (coords - cx + S / 2) % S - S / 2
                oy = (coords - cy + S / 2) % S - S / 2
                alpha = self._coverage(shape, radius, ox[None, :], oy[:, None])[..., None].astype(np.float32)
                frame = frame * (1.0 - alpha) + np.asarray(color, dtype=np.float32) * alpha
            frames[t] = frame
            if self.noise > 0:
                frames[t] += noise_rng.normal(0.0, self.noise, size=(S, S, 3)).astype(np.float32)
        np.clip(frames, 0.0, 1.0, out=frames)
        return frames

    @staticmethod
    def _coverage(shape: str, radius: float, ox: np.ndarray, oy: np.ndarray) -> np.ndarray:
        if shape == "square":
            dist = np.maximum(np.abs(ox), np.abs(oy))
        elif shape == "disc":
            dist = np.sqrt(ox * ox + oy * oy)
        elif shape == "diamond":
            dist = (np.abs(ox) + np.abs(oy)) / math.sqrt(2.0)
        else:
            raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
        return np.clip(radius + 0.5 - dist, 0.0, 1.0)

    def _texture(self, seed: int) -> np.ndarray:
        """A static ``(H, W, 3)`` background: a few random colour gratings, periodic on the torus."""
        rng = np.random.default_rng(seed)
        S = self.img_size
        xs = np.arange(S, dtype=np.float32)
        base = rng.uniform(0.4, 0.6, size=3).astype(np.float32)
        image = np.broadcast_to(base, (S, S, 3)).copy()
        for _ in range(3):
            fx, fy = rng.integers(-4, 5, size=2)
            phase = rng.uniform(0, 2 * math.pi)
            amp = rng.uniform(*self.texture, size=3).astype(np.float32)
            wave = np.sin(2 * math.pi * (fx * xs[None, :] + fy * xs[:, None]) / S + phase)
            image += wave[..., None] * amp
        return image

    def params_for(self, key) -> MotionParams:
        index, seed = split_key(key)
        return self.draw((self.seed, index) if seed is None else (self.seed, index, seed))

    def __getitem__(self, key):
        index, _ = split_key(key)
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} clips")
        p = self.params_for(key)
        frames = torch.from_numpy(self.render(p))  # (T, H, W, 3)
        if len(frames) < self.num_frames and not self.variable_frames:  # a short video: its last frame repeats
            frames = torch.cat([frames, frames[-1:].expand(self.num_frames - len(frames), -1, -1, -1)])
        mean = torch.tensor(self.mean).view(3, 1, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1, 1)
        video = (frames.permute(3, 0, 1, 2) - mean) / std
        return video.contiguous(), p.label if self.labels else -1, index
