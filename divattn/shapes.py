"""Named shapes: the papers' models on a GPU, small stand-ins on a CPU.

The benchmarks (:mod:`divattn.bench`) time them and the kernel report
(:mod:`divattn.kernels_report`) compiles their launches; this module imports neither.

An :class:`AttnShape` is one attention layer's q/k/v: batch B, T frames (temporal
tokens), N patches per frame, H heads of D, the token order of the qkv projection
(``"hwt"``: TimeSformer, ``"thw"``: ViViT) and whether a cls token leads the tokens.
A ``causal`` shape is the temporal attention of an ST transformer (frame t sees frames
``<= t``); it has that one op.
A :class:`RaggedShape` is a padded batch of clips of different lengths: each sample's
frame count is drawn from a fixed seed (mean about 60% of T), the padding at the end.
A :class:`ModelShape` is a bundled model and its input clip.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

# The ops of a layer; "spatial_cls" exists only where the tokens carry a cls token.
ATTENTION_OPS = ("temporal", "spatial", "spatial_cls", "joint")


@dataclass(frozen=True)
class AttnShape:
    name: str
    B: int
    T: int
    N: int
    H: int
    D: int
    order: str = "hwt"
    cls: bool = True
    label: str = ""
    causal: bool = False

    @property
    def tokens(self) -> int:
        """Tokens of one clip: ``[1 +] T*N``."""
        return int(self.cls) + self.T * self.N

    def ops(self) -> tuple:
        if self.causal:
            return ("temporal",)
        return tuple(op for op in ATTENTION_OPS if op != "spatial_cls" or self.cls)

    def q_shape(self, op: str) -> tuple:
        """q's shape for ``op``: ``(B, T, N, H, D)``, or ``(B, L, H, D)`` for joint over all tokens."""
        if op == "joint":
            return (self.B, self.tokens, self.H, self.D)
        return (self.B, self.T, self.N, self.H, self.D)

    def with_batch(self, B: Optional[int]) -> "AttnShape":
        return self if B is None else dataclasses.replace(self, B=int(B))

    def with_frames(self, T: int) -> "AttnShape":
        return dataclasses.replace(self, T=int(T), name=f"{self.name}@T{T}")

    def as_dict(self) -> dict:
        return {"kind": "attention", **dataclasses.asdict(self), "L": self.tokens}


@dataclass(frozen=True)
class RaggedShape(AttnShape):
    """A padded batch: sample b holds ``frames()[b]`` real frames of T (the rest padding).

    The counts are ``round(T * u)`` for u evenly spread over [0.2, 1] (the midpoints of B
    equal steps), in the order of a ``torch.randperm`` seeded with ``seed``: 60% of T on
    average up to rounding, whatever B; :meth:`as_dict` records the counts."""

    seed: int = 0

    def frames(self) -> tuple:
        import torch

        order = torch.randperm(self.B, generator=torch.Generator().manual_seed(self.seed)).tolist()
        return tuple(int(min(self.T, max(1, round(self.T * (0.2 + 0.8 * (i + 0.5) / self.B))))) for i in order)

    def ops(self) -> tuple:
        return ("temporal", "spatial")

    def with_frames(self, T: int) -> "RaggedShape":
        raise ValueError(f"{self.name}: a ragged shape's frames are drawn, not swept")

    def as_dict(self) -> dict:
        frames = self.frames()
        return {**super().as_dict(), "kind": "ragged", "frames": list(frames),
                "real_fraction": round(sum(frames) / (self.B * self.T), 4)}


@dataclass(frozen=True)
class ModelShape:
    name: str
    model: str
    B: int
    frames: int
    size: int
    kwargs: dict = field(default_factory=dict)
    label: str = ""

    def video_shape(self, in_chans: int = 3) -> tuple:
        return (self.B, in_chans, self.frames, self.size, self.size)

    def with_batch(self, B: Optional[int]) -> "ModelShape":
        return self if B is None else dataclasses.replace(self, B=int(B))

    def as_dict(self) -> dict:
        return {"kind": "model", **dataclasses.asdict(self)}


def _vit_b(name: str, T: int, N: int, order: str, cls: bool, label: str) -> AttnShape:
    return AttnShape(name, B=8, T=T, N=N, H=12, D=64, order=order, cls=cls, label=label)


# The papers' models (ViT-B: 12 heads of 64). ViViT-B/16x2: 32 frames in 2-frame tubelets.
GPU_SHAPES = {
    s.name: s for s in (
        _vit_b("timesformer_8x224", 8, 196, "hwt", True, "TimeSformer 8x224"),
        _vit_b("timesformer_hr_16x448", 16, 784, "hwt", True, "TimeSformer-HR 16x448"),
        _vit_b("timesformer_l_96x224", 96, 196, "hwt", True, "TimeSformer-L 96x224"),
        _vit_b("vivit_b_32x224", 16, 196, "thw", False, "ViViT-B/16x2 32x224 (16 tubelets)"),
        AttnShape("st_causal_16x256", B=8, T=16, N=256, H=12, D=64, order="thw", cls=False, causal=True,
                  label="ST transformer (Genie-like) causal temporal, 16 frames x 16x16 tokens"),
    )
}

# Small enough for a shared CPU; labelled CPU everywhere they appear.
CPU_SHAPES = {
    s.name: s for s in (
        AttnShape("cpu_timesformer_8x112", B=2, T=8, N=49, H=4, D=32, order="hwt", cls=True,
                  label="CPU stand-in: TimeSformer-like 8x112, 4 heads of 32"),
        AttnShape("cpu_vivit_8x112", B=2, T=8, N=49, H=4, D=32, order="thw", cls=False,
                  label="CPU stand-in: ViViT-like 8 tubelets x 112, 4 heads of 32"),
        AttnShape("cpu_st_causal_16x64", B=2, T=16, N=64, H=4, D=32, order="thw", cls=False, causal=True,
                  label="CPU stand-in: ST transformer causal temporal, 16 frames x 8x8 tokens, 4 heads of 32"),
    )
}

# Ragged batches (the padded-batch benchmark): divattn's per-sample frame counts against
# the dense computation over the padding and against one call per clip.
GPU_RAGGED = RaggedShape("ragged_timesformer_16x224", B=16, T=16, N=196, H=12, D=64, order="hwt", cls=False,
                         label="padded batch, 16 clips of up to 16 frames x 224 (ViT-B heads)")
CPU_RAGGED = RaggedShape("cpu_ragged_8x64", B=8, T=8, N=16, H=2, D=32, order="hwt", cls=False,
                         label="CPU stand-in: padded batch, 8 clips of up to 8 frames x 64 px, 2 heads of 32")

# Latency versus frames: the one shape whose T is swept (divided versus joint).
FRAMES = (1, 2, 4, 8, 16, 32, 64, 96)
GPU_SWEEP = GPU_SHAPES["timesformer_8x224"]
CPU_SWEEP = AttnShape("cpu_sweep_64px", B=1, T=8, N=16, H=2, D=32, order="hwt", cls=True,
                      label="CPU stand-in: TimeSformer-like 64 px (N=16), 2 heads of 32")

GPU_MODELS = {
    s.name: s for s in (
        ModelShape("timesformer_base_8x224", "timesformer_base", B=8, frames=8, size=224,
                   label="TimeSformer divided 8x224"),
        ModelShape("timesformer_base_joint_8x224", "timesformer_base", B=8, frames=8, size=224,
                   kwargs={"attention_type": "joint_space_time"}, label="TimeSformer joint 8x224"),
        ModelShape("timesformer_hr_16x448", "timesformer_hr", B=1, frames=16, size=448, label="TimeSformer-HR 16x448"),
        ModelShape("timesformer_large_96x224", "timesformer_large", B=1, frames=96, size=224,
                   label="TimeSformer-L 96x224"),
        ModelShape("vivit_b_fsa_32x224", "vivit_base", B=4, frames=32, size=224,
                   kwargs={"variant": "factorised_self_attention"}, label="ViViT-B/16x2 model 3 32x224"),
        ModelShape("vivit_b_joint_32x224", "vivit_base", B=4, frames=32, size=224,
                   kwargs={"variant": "spatio_temporal"}, label="ViViT-B/16x2 model 1 32x224"),
    )
}

_TINY = dict(embed_dim=64, depth=2, num_heads=4, patch_size=16, num_classes=10)
CPU_MODELS = {
    s.name: s for s in (
        ModelShape("cpu_timesformer_tiny_8x64", "timesformer_base", B=2, frames=8, size=64,
                   kwargs={**_TINY, "num_frames": 8, "img_size": 64},
                   label="CPU stand-in: TimeSformer divided, width 64, depth 2, 8x64"),
        ModelShape("cpu_timesformer_tiny_joint_8x64", "timesformer_base", B=2, frames=8, size=64,
                   kwargs={**_TINY, "num_frames": 8, "img_size": 64, "attention_type": "joint_space_time"},
                   label="CPU stand-in: TimeSformer joint, width 64, depth 2, 8x64"),
        ModelShape("cpu_vivit_tiny_fsa_16x64", "vivit_base", B=2, frames=16, size=64,
                   kwargs={**_TINY, "num_frames": 16, "img_size": 64, "variant": "factorised_self_attention"},
                   label="CPU stand-in: ViViT model 3, width 64, depth 2, 16x64"),
    )
}

ALL_SHAPES = {**GPU_SHAPES, **CPU_SHAPES, GPU_RAGGED.name: GPU_RAGGED, CPU_RAGGED.name: CPU_RAGGED}
ALL_MODELS = {**GPU_MODELS, **CPU_MODELS}


def defaults(device_type: str) -> dict:
    """The shapes a run on ``device_type`` covers unless told otherwise."""
    gpu = device_type != "cpu"
    return {
        "attention": list((GPU_SHAPES if gpu else CPU_SHAPES).values()),
        "sweep": GPU_SWEEP if gpu else CPU_SWEEP,
        "models": list((GPU_MODELS if gpu else CPU_MODELS).values()),
        "ragged": [GPU_RAGGED if gpu else CPU_RAGGED],
    }


def lookup(name: str):
    """An attention or model shape by name (ValueError listing the names otherwise)."""
    if name in ALL_SHAPES:
        return ALL_SHAPES[name]
    if name in ALL_MODELS:
        return ALL_MODELS[name]
    raise ValueError(f"unknown shape {name!r}; attention shapes: {', '.join(ALL_SHAPES)}; "
                     f"model shapes: {', '.join(ALL_MODELS)}")
