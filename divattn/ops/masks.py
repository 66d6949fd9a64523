"""Padded batches: which tokens of q, k and v are real, as the ops receive it.

A call says it in up to three forms, combined with *and* (a token is real when every
given form says so):

- ``mask``: a ``(B, T, N)`` bool tensor (``(B, L)`` for joint attention), True for a
  real token; the general form (dropped tokens anywhere, frames of different sizes);
- ``frames``: ``(B,)`` integers, sample b's first ``frames[b]`` frames are real and the
  rest is padding (clips of different lengths);
- ``patches``: ``(B,)`` integers, the first ``patches[b]`` patches of every frame of
  sample b are real (frames of different sizes whose patches a model lays out first;
  joint attention calls it ``lengths``: the first ``lengths[b]`` tokens).

The counts are the cheap form: a kernel reads one number per sequence and skips whole
tiles, where a mask is read per row, and a tile is skipped only after its rows' mask is
read (the Triton kernels) or not at all (the CUDA kernels: padded rows are not loaded,
but their tiles are multiplied) (:meth:`Padding.kernel_counts` and
:meth:`Padding.kernel_mask` are what the kernels get). The counts are checked on the host,
so pass them as CPU tensors (or lists) to keep a call free of device syncs; a mask is
checked for its shape, dtype and device only.

:class:`Padding` is what the backends get: the given forms, checked, and the dense
``(B, T, N)`` mask they make (:meth:`Padding.dense`), built once per call.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

Counts = Union[torch.Tensor, Sequence[int]]


@dataclass
class Padding:
    """The real tokens of one call. ``shape`` is ``(B, T, N)`` (temporal: T = Tk, the key
    frames; joint: ``(B, L)``); ``mask`` is on q's device, the counts ``(B,)`` int64
    tensors on the host as checked, moved to q's device when the dense mask is built."""

    shape: tuple
    device: torch.device
    mask: Optional[torch.Tensor] = None
    frames: Optional[torch.Tensor] = None
    patches: Optional[torch.Tensor] = None
    _dense: Optional[torch.Tensor] = field(default=None, repr=False)

    def dense(self) -> torch.Tensor:
        """The ``(B, T, N)`` (joint: ``(B, L)``) bool mask of real tokens, on q's device."""
        if self._dense is None:
            B, rest = self.shape[0], self.shape[1:]
            out = self.mask
            # joint attention counts tokens (dim 1); the others frames (dim 1) and patches (dim 2)
            for counts, dim in ((self.frames, 1), (self.patches, len(self.shape) - 1)):
                if counts is not None:
                    view = [1] * len(self.shape)
                    view[dim] = self.shape[dim]
                    idx = torch.arange(self.shape[dim], device=self.device).view(view)
                    real = idx < counts.to(self.device).view([B] + [1] * len(rest))
                    out = real if out is None else out & real
            self._dense = out.expand(self.shape)
        return self._dense

    def kernel_counts(self, op: str) -> Optional[tuple]:
        """The counts as the kernels take them: ``(rows, groups)``, int32 ``(B,)`` on q's device
        (every row real where none is given), or None when only a mask is given
        (:meth:`kernel_mask`).

        The kernels see an op as S sequences indexed by ``(i0, i1, i2) = (b, i1, h)`` (the
        table of :mod:`divattn.ops.triton.kernels`): sequence ``(b, i1, h)`` has ``rows[b]``
        real key rows, its first ones, when ``i1 < groups[b]``, else none. Temporal: rows
        are frames, ``i1`` the patch; spatial: rows are patches, ``i1`` the frame; joint:
        rows are tokens and ``groups`` is 1. (The queries of temporal attention with Tq <
        Tk frames are the last Tq: ``rows[b] - (Tk - Tq)`` of them are real.)
        """
        if self.mask is not None and self.frames is None and self.patches is None:
            return None
        B = self.shape[0]
        full = lambda n: torch.full((B,), n, dtype=torch.int64)  # noqa: E731
        if op == "joint":
            rows, groups = self.patches if self.patches is not None else full(self.shape[1]), full(1)
        else:
            T, N = self.shape[1:]
            frames = self.frames if self.frames is not None else full(T)
            patches = self.patches if self.patches is not None else full(N)
            rows, groups = (frames, patches) if op == "temporal" else (patches, frames)
        both = torch.stack([rows, groups]).to(torch.int32)
        if self.device.type == "cuda":  # from pinned memory: the copy does not wait for the device
            both = both.pin_memory().to(self.device, non_blocking=True)
        else:
            both = both.to(self.device)
        return both[0], both[1]

    def kernel_mask(self, cls: bool) -> tuple:
        """The mask as the kernels take it: ``(mask, cls_weights)``, the given ``(B, T, N)``
        (joint: ``(B, L)``) bool mask on q's device and, with ``cls``, the ``(B, T)`` fp32
        :meth:`frame_weights` of this padding (counts included); ``(None, None)`` without a
        mask (the counts' frame weights are the kernels' own)."""
        if self.mask is None:
            return None, None
        return self.mask, (self.frame_weights().to(torch.float32) if cls else None)

    def real_queries(self, Tq: int) -> torch.Tensor:
        """The dense mask of the query tokens: the last ``Tq`` frames (temporal attention
        with fewer query frames than key frames), else the whole mask."""
        m = self.dense()
        return m if len(self.shape) == 2 or Tq == self.shape[1] else m[:, self.shape[1] - Tq:]

    def frame_weights(self) -> torch.Tensor:
        """``(B, T)`` weights of the cls query's per-frame outputs in ``o_cls``: 1 / the
        number of frames holding a real patch, on those frames, 0 on the others; 1/T on
        every frame of a sample with no real patch (each of its frames gives ``v_cls``)."""
        real = self.dense().any(2).to(torch.float64)
        n = real.sum(1, keepdim=True)
        return torch.where(n > 0, real / n.clamp_min(1), 1.0 / self.shape[1])


def zero_padded(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, T, N, ...)`` (joint: ``(B, L, ...)``) with the tokens where ``real`` ``(B, T, N)``
    is False set to zero, out of place: a padded token's values (NaN included) reach no
    output, and autograd gives them zero gradients."""
    return torch.where(real[(...,) + (None,) * (x.dim() - real.dim())], x, 0.0)


def with_real_cls(real: torch.Tensor) -> torch.Tensor:
    """The real tokens ``real`` ``(..., L)`` with a real cls token in front: ``(..., 1 + L)``."""
    return torch.cat([real.new_ones(*real.shape[:-1], 1), real], -1)


def integers(fn: str, name: str, value, layout: str, what: str = "") -> torch.Tensor:
    """``value`` (an integer tensor or a sequence of ints) as an int64 CPU tensor, or TypeError
    naming it: ``layout`` is the shape a message asks for (``"(B,)"``), ``what`` what the
    numbers count. The caller checks the shape."""
    hold = f"{fn}: {name} must hold integers" + (f" ({what})" if what else "")
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_floating_point() or value.is_complex():
            raise TypeError(f"{hold}, got dtype {value.dtype}")
        return value.detach().to("cpu", torch.int64)
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{fn}: {name} must be a {layout} integer tensor or a sequence of ints, "
                        f"got {type(value).__name__}") from None
    if t.dtype == torch.bool or t.is_floating_point():
        raise TypeError(f"{hold}, got {value!r}")
    return t.to(torch.int64)


def _counts(fn: str, name: str, counts, B: int, limit: int, what: str) -> torch.Tensor:
    """``counts`` as a ``(B,)`` int64 CPU tensor, or TypeError / ValueError naming it."""
    t = integers(fn, name, counts, "(B,)", f"{what} per sample")
    if tuple(t.shape) != (B,):
        raise ValueError(f"{fn}: {name} must have shape (B,) = ({B},), one count per sample, got {tuple(t.shape)}")
    bad = ((t < 0) | (t > limit)).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise ValueError(f"{fn}: {name}[{i}] = {int(t[i])} is outside [0, {limit}] ({what} of a sample, "
                         f"of the {limit} the inputs hold)")
    return t


def resolve(fn: str, q: torch.Tensor, mask, frames, patches, shape: tuple) -> Optional[Padding]:
    """The :class:`Padding` of a call with q ``q`` whose tokens are ``shape`` ``(B, T, N)``
    (joint: ``(B, L)``; ``patches`` then counts tokens), or None when nothing is given.

    Raises TypeError for a mask that is not a bool tensor or counts that are not
    integers, ValueError for a mask of another shape or device than the tokens, or
    counts of the wrong shape or out of ``[0, T]`` (``[0, N]``, ``[0, L]``).
    """
    if mask is None and frames is None and patches is None:
        return None
    shape = tuple(shape)
    joint = len(shape) == 2
    if mask is not None:
        layout = "(B, L)" if joint else "(B, T, N)"
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"{fn}: mask must be a {layout} bool tensor (True = real token), got "
                            f"{type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"{fn}: mask must be a bool tensor (True = real token), got dtype {mask.dtype}")
        if tuple(mask.shape) != shape:
            raise ValueError(f"{fn}: mask has shape {tuple(mask.shape)}, expected {layout} = {tuple(shape)}")
        if mask.device != q.device:
            raise ValueError(f"{fn}: mask is on device {mask.device}, expected {q.device} like q")
    B = shape[0]
    if frames is not None:
        frames = _counts(fn, "frames", frames, B, shape[1], "real frames")
    if patches is not None:
        name, what = ("lengths", "real tokens") if joint else ("patches", "real patches per frame")
        patches = _counts(fn, name, patches, B, shape[-1], what)
    return Padding(shape, q.device, mask, frames, patches)
