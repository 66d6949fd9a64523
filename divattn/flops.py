"""Analytic FLOP / MAC model of the ops and the bundled models, and FlopCounterMode support.

Conventions (they reproduce the papers' tables; see ``tests/test_flops.py``):

- A multiply-accumulate (MAC) is one multiply plus one add; FLOPs = 2 * MACs. The
  TimeSformer and ViViT papers print MACs and call them FLOPs (fvcore's convention).
- Counted: every matmul (the linear layers, the head, and the two products of
  attention, ``q @ k^T`` and ``p @ v``) and the patch / tubelet embedding
  convolution. Not counted: softmax, LayerNorm, GELU, bias and residual adds,
  pooling. This is also what ``torch.utils.flop_counter.FlopCounterMode`` counts, so
  a forward of a bundled model under it gives ``2 * macs(model, shape,
  implementation="bundled")`` exactly.
- Attention forward = 2 matmuls. Attention backward = 5 matmuls (the scores are
  recomputed from the saved log-sum-exp, as in torch's own SDPA backward formula), so
  forward + backward = 3.5x the forward. A linear layer's backward is 2x its forward
  (input and weight gradients); the embedding convolution's backward is 1x (the video
  needs no gradient).

Two implementations of the same architecture are counted (``implementation=``):

- ``"official"`` (the default of :func:`macs`): the arithmetic of the code the papers
  measured. In the official TimeSformer divided block the temporal qkv / proj /
  temporal_fc run on the ``N*T`` patch tokens and the spatial qkv / proj on ``T*(1+N)``
  rows, the cls token repeated in every frame. TimeSformer-L's 7.14 TFLOPs is
  reproduced only this way.
- ``"bundled"``: what divattn's bundled model computes (FlopCounterMode agrees with it
  to the MAC). Its divided block runs the temporal qkv and the spatial qkv / proj once
  on the ``1 + N*T`` tokens, without the per-frame cls copies: 0.1% (TimeSformer-L) or
  less fewer MACs than the official code.

For ViViT (all four variants) the two are the same.

Shapes follow the ops: ``(B, T, N, H, D)`` for temporal / spatial, ``(B, L, H, D)``
for joint. Temporal attention may be causal and may have fewer query frames than key
frames (``kv_frames``, query frame i being frame ``Tk - Tq + i``); its count is then
the pairs it really computes: query frame i against key frames ``0 .. Tk - Tq + i``,
``Tq * (Tk - Tq) + Tq * (Tq + 1) / 2`` pairs per sequence instead of ``Tq * Tk``.

A padded batch (``mask``, ``frames``, ``patches`` as the ops take them; see
:mod:`divattn.ops.masks`) counts only its real pairs, a real query against a real key:
per frame ``r**2`` for spatial attention over its r real patches, ``(1 + r)**2`` with the
cls token for a frame that holds a real patch (a frame without one adds nothing: its cls
output is not used), per patch the real query frames against the real key frames they
see for temporal attention, ``r**2`` per sample for joint attention over r real tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

ATTENTION_OPS = ("temporal", "spatial", "spatial_cls", "joint")
PASSES = ("fwd", "bwd", "fwd+bwd")

# Matmuls per pass, relative to the forward's two (see the module docstring).
_ATTN_PASS_FACTOR = {"fwd": 2, "bwd": 5, "fwd+bwd": 7}


def _check_op(op: str, shape: Sequence[int], causal: bool = False, kv_frames: Optional[int] = None) -> tuple:
    if op not in ATTENTION_OPS:
        raise ValueError(f"op must be one of {ATTENTION_OPS}, got {op!r}")
    shape = tuple(int(s) for s in shape)
    want = 4 if op == "joint" else 5
    if len(shape) != want:
        layout = "(B, L, H, D)" if op == "joint" else "(B, T, N, H, D)"
        raise ValueError(f"{op} attention takes a q shape {layout}, got {shape}")
    if (causal or kv_frames is not None) and op != "temporal":
        raise ValueError(f"causal and kv_frames apply to temporal attention only, got op {op!r}")
    if kv_frames is not None and not shape[1] <= int(kv_frames):
        raise ValueError(f"kv_frames = {kv_frames} is fewer than the q frames Tq = {shape[1]} of shape {shape}")
    return shape


def _sequences(op: str, shape: tuple, kv_frames: Optional[int] = None) -> tuple:
    """(number of softmax rows' groups, query rows, key rows, head dim) of one op."""
    if op == "joint":
        B, L, H, D = shape
        return B * H, L, L, D
    B, T, N, H, D = shape
    if op == "temporal":
        return B * N * H, T, T if kv_frames is None else int(kv_frames), D
    if op == "spatial":
        return B * T * H, N, N, D
    # spatial_cls: every frame's queries and keys are [cls] + its N patches.
    return B * T * H, 1 + N, 1 + N, D


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def attention_pairs(lq: int, lk: int, causal: bool = False) -> int:
    """(query, key) pairs of one sequence: ``lq * lk``, or with ``causal`` (query i being
    position ``lk - lq + i``, seeing keys ``0 .. lk - lq + i``) ``lq * (lk - lq) + lq * (lq + 1) / 2``."""
    if not causal:
        return lq * lk
    return lq * (lk - lq) + lq * (lq + 1) // 2


def attention_macs(op: str, shape: Sequence[int], pass_: str = "fwd", *, causal: bool = False,
                   kv_frames: Optional[int] = None, mask=None, frames=None, patches=None) -> int:
    """MACs of one attention op on a q of ``shape``.

    ``op``: ``"temporal"``, ``"spatial"``, ``"spatial_cls"`` (spatial with the cls
    token) or ``"joint"``; ``pass_``: ``"fwd"``, ``"bwd"`` or ``"fwd+bwd"``. The
    forward is ``q @ k^T`` and ``p @ v``: ``2 * groups * pairs * D`` MACs, with
    ``Lq * Lk`` pairs per sequence. Temporal only: ``kv_frames`` is Tk when k and v
    have more frames than q (default: q's T); ``causal`` counts only the pairs a
    causal op computes (:func:`attention_pairs`). ValueError for these with another
    op, or for ``kv_frames`` below q's T. ``mask``, ``frames``, ``patches`` (joint:
    ``mask`` ``(B, L)`` and ``patches`` as its ``lengths``): a padded batch, whose real
    pairs only are counted (:func:`real_pairs`; checked as the ops check them).
    """
    shape = _check_op(op, shape, causal, kv_frames)
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    groups, lq, lk, d = _sequences(op, shape, kv_frames)
    if mask is None and frames is None and patches is None:
        return _ATTN_PASS_FACTOR[pass_] * groups * attention_pairs(lq, lk, causal) * d
    heads = shape[-2]
    return _ATTN_PASS_FACTOR[pass_] * heads * d * real_pairs(op, shape, mask=mask, frames=frames, patches=patches,
                                                             causal=causal, kv_frames=kv_frames)


def attention_flops(op: str, shape: Sequence[int], pass_: str = "fwd", *, causal: bool = False,
                    kv_frames: Optional[int] = None, mask=None, frames=None, patches=None) -> int:
    """FLOPs (2 per MAC) of one attention op; see :func:`attention_macs`."""
    return 2 * attention_macs(op, shape, pass_, causal=causal, kv_frames=kv_frames, mask=mask, frames=frames,
                              patches=patches)


def real_pairs(op: str, shape: Sequence[int], *, mask=None, frames=None, patches=None, causal: bool = False,
               kv_frames: Optional[int] = None) -> int:
    """The (query, key) pairs of one head of a padded batch that are both real (see the
    module docstring), for a q of ``shape`` and the padding as the ops take it."""
    import torch

    from .ops.masks import resolve

    shape = _check_op(op, shape, causal, kv_frames)
    if op == "joint":
        tokens = shape[:2]
    else:
        tokens = (shape[0], shape[1] if kv_frames is None else int(kv_frames), shape[2])
    device = mask.device if isinstance(mask, torch.Tensor) else torch.device("cpu")
    padding = resolve("real_pairs", torch.empty(0, device=device), mask, frames, patches, tokens)
    return _real_pairs(op, padding.dense(), causal, shape[1])


def _real_pairs(op: str, real, causal: bool, Tq: int) -> int:
    """:func:`real_pairs` of the dense mask ``real`` ``(B, Tk, N)`` (joint: ``(B, L)``) with Tq query frames."""
    import torch

    real = real.to(torch.int64)
    if op == "joint":
        return int(real.sum(1).square().sum())
    if op == "temporal":
        Tk = real.shape[1]
        real_q = real[:, Tk - Tq:]
        if not causal:
            return int((real_q.sum(1) * real.sum(1)).sum())
        # query frame i (frame Tk - Tq + i) sees the real key frames up to its own
        return int((real_q * real.cumsum(1)[:, Tk - Tq:]).sum())
    r = real.sum(2)  # (B, T) real patches per frame
    if op == "spatial":
        return int(r.square().sum())
    return int(torch.where(r > 0, (1 + r).square(), 0).sum())


def attention_bytes(op: str, shape: Sequence[int], itemsize: int, pass_: str = "fwd", *,
                    kv_frames: Optional[int] = None) -> int:
    """The least memory traffic of one attention op, in bytes.

    Forward: read q, k, v once and write o once. Backward: read q, k, v, o, do and write
    dq, dk, dv. With the cls token, its three ``(B, H, D)`` vectors are read and ``o_cls``
    written (backward: cls q/k/v, o_cls, do_cls read, their three gradients written).
    Temporal with ``kv_frames`` (Tk): k, v and their gradients have Tk frames, q, o, do
    and dq the Tq of ``shape``. Softmax statistics (the log-sum-exp) are not counted;
    causal attention moves the same bytes.
    """
    shape = _check_op(op, shape, False, kv_frames)
    if pass_ not in PASSES:
        raise ValueError(f"pass_ must be one of {PASSES}, got {pass_!r}")
    n = _numel(shape)
    n_kv = n if kv_frames is None else _numel((shape[0], int(kv_frames), *shape[2:]))
    if op == "spatial_cls":
        B, _, _, H, D = shape
        n += B * H * D
        n_kv = n
    # (tensors shaped like q, tensors shaped like k) per pass
    per_pass = {"fwd": (2, 2), "bwd": (4, 4)}
    passes = ("fwd", "bwd") if pass_ == "fwd+bwd" else (pass_,)
    return sum(per_pass[p][0] * n + per_pass[p][1] * n_kv for p in passes) * int(itemsize)


@dataclass
class MacCount:
    """MACs of one forward, by part. ``attention`` is the attention core (``q @ k^T`` and
    ``p @ v``; per op in ``by_op``); ``linear`` every other matmul in the blocks (qkv,
    proj, temporal_fc, MLP); ``embed`` the patch / tubelet convolution; ``head`` the
    classifier."""

    embed: int = 0
    linear: int = 0
    attention: int = 0
    head: int = 0
    by_op: dict = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.embed + self.linear + self.attention + self.head

    def add_attention(self, op: str, shape: Sequence[int], times: int = 1, *, causal: bool = False,
                      kv_frames: Optional[int] = None) -> None:
        m = times * attention_macs(op, shape, causal=causal, kv_frames=kv_frames)
        self.attention += m
        self.by_op[op] = self.by_op.get(op, 0) + m

    def train_step_flops(self) -> int:
        """FLOPs of forward + backward: linear and head 3x, embedding 2x, attention 3.5x."""
        return 2 * (3 * (self.linear + self.head) + 2 * self.embed) + 7 * self.attention

    def as_dict(self) -> dict:
        return {"embed": self.embed, "linear": self.linear, "attention": self.attention, "head": self.head,
                "total": self.total, "attention_by_op": dict(self.by_op)}


def _mlp_hidden(c) -> int:
    return int(c.embed_dim * c.mlp_ratio)


def _joint_block(count: MacCount, c, seqs: int, L: int) -> None:
    """One pre-norm block with joint attention over ``seqs`` sequences of ``L`` tokens."""
    C, H = c.embed_dim, c.num_heads
    rows = seqs * L
    count.linear += rows * C * 3 * C + rows * C * C + 2 * rows * C * _mlp_hidden(c)
    count.add_attention("joint", (seqs, L, H, C // H))


def _video_grid(model, video_shape: Sequence[int]) -> tuple:
    c = model.config
    if len(video_shape) != 5:
        raise ValueError(f"video_shape must be (B, C, T, H, W), got {tuple(video_shape)}")
    B, Cin, T, Hpx, Wpx = (int(s) for s in video_shape)
    if Cin != c.in_chans:
        raise ValueError(f"video_shape has {Cin} channels, the model expects in_chans = {c.in_chans}")
    if Hpx < c.patch_size or Wpx < c.patch_size:
        raise ValueError(f"video frames {Hpx}x{Wpx} are smaller than the patch size {c.patch_size}")
    if T < c.tubelet_size or T % c.tubelet_size != 0:
        raise ValueError(f"video_shape has T = {T} frames, expected a positive multiple of the tubelet size "
                         f"{c.tubelet_size}")
    return B, T // c.tubelet_size, (Hpx // c.patch_size) * (Wpx // c.patch_size)


IMPLEMENTATIONS = ("official", "bundled")


def _timesformer(model, B: int, T: int, N: int, implementation: str) -> MacCount:
    c = model.config
    C, H = c.embed_dim, c.num_heads
    D = C // H
    count = MacCount(embed=B * T * N * C * c.in_chans * c.patch_size ** 2)
    if c.attention_type == "space_only":
        for _ in range(c.depth):
            _joint_block(count, c, B * T, 1 + N)
    elif c.attention_type == "joint_space_time":
        for _ in range(c.depth):
            _joint_block(count, c, B, 1 + N * T)
    else:
        L = 1 + N * T
        if implementation == "official":
            temporal_qkv_rows, spatial_rows = N * T, T * (1 + N)
        else:
            # The cls row of the temporal qkv is computed and ignored; the spatial qkv
            # and proj see the cls token once, not once per frame.
            temporal_qkv_rows, spatial_rows = L, L
        for _ in range(c.depth):
            # temporal qkv, temporal proj and temporal_fc; spatial qkv and proj; MLP
            count.linear += B * (temporal_qkv_rows * C * 3 * C + 2 * N * T * C * C + spatial_rows * 4 * C * C)
            count.linear += B * 2 * L * C * _mlp_hidden(c)
            count.add_attention("temporal", (B, T, N, H, D))
            count.add_attention("spatial_cls", (B, T, N, H, D))
    count.head = B * C * c.num_classes
    return count


def _vivit(model, B: int, Tt: int, N: int) -> MacCount:
    c = model.config
    C, H = c.embed_dim, c.num_heads
    D = C // H
    count = MacCount(embed=B * Tt * N * C * c.in_chans * c.tubelet_size * c.patch_size ** 2)
    L = Tt * N
    for _ in range(c.depth):
        if c.variant == "spatio_temporal":
            _joint_block(count, c, B, 1 + L)
        elif c.variant == "factorised_encoder":
            _joint_block(count, c, B * Tt, 1 + N)
        elif c.variant == "factorised_self_attention":
            count.linear += B * (2 * (L * C * 3 * C + L * C * C) + 2 * L * C * _mlp_hidden(c))
            count.add_attention("spatial", (B, Tt, N, H, D))
            count.add_attention("temporal", (B, Tt, N, H, D))
        else:
            count.linear += B * (L * C * 3 * C + L * C * C + 2 * L * C * _mlp_hidden(c))
            count.add_attention("spatial", (B, Tt, N, H // 2, D))
            count.add_attention("temporal", (B, Tt, N, H - H // 2, D))
    if c.variant == "factorised_encoder":
        for _ in range(c.temporal_depth):
            _joint_block(count, c, B, 1 + Tt)
    count.head = B * C * c.num_classes
    return count


def count_macs(model, video_shape: Sequence[int], implementation: str = "official") -> MacCount:
    """MACs of one forward of a bundled model on a video of ``video_shape`` ``(B, C, T, H, W)``, by part.

    Analytic, from ``model.config`` (no forward is run): TimeSformer
    (``divided_space_time``, ``joint_space_time``, ``space_only``) and ViViT (all four
    variants). ``implementation``: ``"official"`` (the code the papers measured) or
    ``"bundled"`` (divattn's model; see the module docstring). Raises TypeError for
    other models and ValueError for a video shape the model cannot take.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    config = getattr(model, "config", None)
    name = type(model).__name__
    if name == "TimeSformer" and hasattr(config, "attention_type"):
        return _timesformer(model, *_video_grid(model, video_shape), implementation)
    if name == "ViViT" and hasattr(config, "variant"):
        return _vivit(model, *_video_grid(model, video_shape))
    raise TypeError(f"count_macs: expected a bundled TimeSformer or ViViT, got {type(model).__name__}")


def macs(model, video_shape: Sequence[int], implementation: str = "official") -> int:
    """Multiply-accumulates of one forward of a bundled model on a ``(B, C, T, H, W)`` video.

    The papers' "FLOPs" (for a 3-view TimeSformer number, multiply by 3). See
    :func:`count_macs` for the parts (attention core separately), and the module
    docstring for what is counted and for ``implementation``::

        m = divattn.models.create_model("timesformer_base")
        divattn.flops.macs(m, (1, 3, 8, 224, 224)) * 3 / 1e12   # 0.587: the paper's 0.59 "TFLOPs"
    """
    return count_macs(model, video_shape, implementation).total


def train_step_flops(model, video_shape: Sequence[int], implementation: str = "bundled") -> int:
    """FLOPs of one forward + backward of a bundled model (optimizer update not counted)."""
    return count_macs(model, video_shape, implementation).train_step_flops()


def _view_shapes(geom: Sequence[int], count: int) -> list:
    """The shapes of the first ``count`` views (q, k, ...) in a ``divattn::attn_fwd`` geometry list."""
    shapes, pos = [], 1
    for _ in range(count):
        nd = geom[pos + 2]
        shapes.append(tuple(geom[pos + 3:pos + 3 + nd]))
        pos += 3 + 2 * nd
    return shapes


def _op_name(op: str, has_cls: bool) -> str:
    return "spatial_cls" if op == "spatial" and has_cls else op


def _count(geom, op, has_cls, causal, pass_, rows=None, groups=None, mask=None) -> int:
    name = _op_name(op, has_cls)
    q_shape, k_shape = _view_shapes(geom, 2)
    if rows is not None or mask is not None:  # a padded batch (the kernels' counts, mask): its real pairs
        heads, d = q_shape[-2], q_shape[-1]
        real = None if rows is None else _counts_dense(op, k_shape, rows, groups)
        if mask is not None:
            real = mask.to("cpu") if real is None else real & mask.to("cpu")
        return 2 * _ATTN_PASS_FACTOR[pass_] * heads * d * _real_pairs(name, real, bool(causal), q_shape[1])
    if name != "temporal":
        return attention_flops(name, q_shape, pass_)
    return attention_flops(name, q_shape, pass_, causal=bool(causal), kv_frames=k_shape[1])


def _counts_dense(op: str, k_shape: tuple, rows, groups):
    """The ``(B, Tk, N)`` (joint: ``(B, L)``) real tokens of the kernels' ``(rows, groups)`` counts
    (:meth:`divattn.ops.masks.Padding.kernel_counts`, undone), on the host."""
    import torch

    from .ops.masks import Padding

    rows, groups = rows.to("cpu", torch.int64), groups.to("cpu", torch.int64)
    cpu = torch.device("cpu")
    if op == "joint":
        return Padding(tuple(k_shape[:2]), cpu, patches=rows).dense()
    frames, patches = (rows, groups) if op == "temporal" else (groups, rows)
    return Padding(tuple(k_shape[:3]), cpu, frames=frames, patches=patches).dense()


def _fwd_formula(srcs, geom, op, has_cls, scale, backend, causal, rows=None, groups=None, mask=None, *args,
                 out_val=None, **kwargs) -> int:
    return _count(geom, op, has_cls, causal, "fwd", rows, groups, mask)


def _bwd_formula(srcs, geom, op, has_cls, scale, backend, causal, rows=None, groups=None, mask=None, *args,
                 out_val=None, **kwargs) -> int:
    return _count(geom, op, has_cls, causal, "bwd", rows, groups, mask)


def _padded_count(q, q_cls, mask, op, causal, pass_) -> int:
    name = _op_name(op, q_cls is not None)
    heads, d = q.shape[-2], q.shape[-1]
    return 2 * _ATTN_PASS_FACTOR[pass_] * heads * d * _real_pairs(name, mask, bool(causal), q.shape[1])


def _padded_fwd_formula(q, k, v, q_cls, k_cls, v_cls, mask, op, scale, causal, *args, out_val=None, **kwargs) -> int:
    return _padded_count(q, q_cls, mask, op, causal, "fwd")


def _padded_bwd_formula(grad, q, k, v, q_cls, k_cls, v_cls, mask, op, scale, causal, *args, out_val=None,
                        **kwargs) -> int:
    return _padded_count(q, q_cls, mask, op, causal, "bwd")


def register() -> None:
    """Teach ``torch.utils.flop_counter.FlopCounterMode`` the divattn custom ops (idempotent).

    ``divattn::attn_fwd`` counts :func:`attention_flops` ``(..., "fwd")`` and
    ``divattn::attn_bwd`` the ``"bwd"`` count, of causal temporal attention and of
    fewer query than key frames too (read from the op's arguments);
    ``divattn::padded_attention`` and ``divattn::padded_attention_bwd`` (the torch
    backend's op on a padded batch while FlopCounterMode counts) the real pairs of
    their mask only. Called when this module is imported, which :mod:`divattn.ops` does.
    """
    import torch
    from torch.utils import flop_counter

    from .ops import functions, torch_backend  # noqa: F401  (define the custom ops)

    for packet, formula in ((torch.ops.divattn.attn_fwd, _fwd_formula), (torch.ops.divattn.attn_bwd, _bwd_formula),
                            (torch.ops.divattn.padded_attention, _padded_fwd_formula),
                            (torch.ops.divattn.padded_attention_bwd, _padded_bwd_formula)):
        if packet not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(packet, get_raw=True)(formula)


register()

__all__ = [
    "macs",
    "count_macs",
    "train_step_flops",
    "MacCount",
    "IMPLEMENTATIONS",
    "attention_macs",
    "attention_flops",
    "attention_bytes",
    "attention_pairs",
    "real_pairs",
    "register",
]
