"""Sequence parallelism for divided attention: the frames of one clip sharded over a process group.

Divided attention is local in two dimensions: spatial attention needs whole frames,
temporal attention needs each patch's whole time line, and everything else in a block
(norms, projections, MLP) is per token. So the ranks of a group each hold a contiguous
run of frames (DSP, Zhao et al., ICML 2025): spatial attention runs with no
communication, and the temporal half of a block is wrapped in two re-sharding steps,
:meth:`FrameShards.frames_to_patches` before it and :meth:`FrameShards.patches_to_frames`
after it (each an all-to-all, and each the backward of the other).

What rank r of a group of P holds, for a clip of T frames of N patches of C channels:

- *frame-sharded* (everything but temporal attention): frames ``[t0_r, t1_r)`` of every
  patch, in the block's own token layout: ``(B, [1 +] N*T_r, C)`` in ``(h w t)`` or
  ``(t h w)`` order (a cls token first when the model has one, the same on every rank),
  or ``(B, T_r, N, C)`` (the ST transformer);
- *patch-sharded* (temporal attention): patches ``[n0_r, n1_r)`` of every frame,
  time-major ``(T, B, N_r, C)``. That is the order an all-to-all delivers (one
  contiguous run of frames from each source rank), and temporal attention reads it as
  ``(1, T, B*N_r, H, D)`` views of its qkv projection, with no copy; its output comes
  back time-major and is the send buffer of the way back.

T and N are split as evenly as they go (:func:`split_sizes`: T = 8 over 3 ranks is
3, 3, 2; N = 196 is 66, 65, 65). A rank holds no patches only when N < P; a group of more
ranks than frames is refused (:class:`SequenceParallelError`).

Communication per divided block and rank, forward (the backward sends the same again)::

    frames -> patches:  B * T_r * (N - N_r) * C  values (this rank's frames of the others' patches)
    patches -> frames:  B * (T - T_r) * N_r * C  values
    cls (TimeSformer):  one all-reduce of B * C values

With even splits both all-to-alls are ``B*N*T/P * C * (P-1)/P`` values: two all-to-alls
of C values per token, against DeepSpeed-Ulysses' four (q, k, v and o re-sharded by
heads) per attention, eight per divided block. ViViT model 4 (half the heads temporal)
sends C values per token out and C/2 back.

Copies: ``frames_to_patches`` writes its send buffer from the frame-sharded tokens (one
pass over this rank's shard, the pack) and computes on its receive buffer; the backward
unpacks the receive buffer into the input's gradient (one pass). ``patches_to_frames``
sends its time-major input as it is; with ``residual`` the receive buffer is added into
the residual in the same pass that writes the output (no copy of its own), and the
backward packs the gradient into its send buffer (one pass). No other copies.

Gradients: each rank's backward gives P times its share of the gradient of every
frame-sharded tensor and a share of the gradient of every tensor the ranks hold alike
(the cls token, the parameters, the logits) such that **the mean over the group of the
ranks' parameter gradients is the gradient of the whole clip**; :func:`average_gradients`
(or DDP averaging over the data x sequence ranks, as ``divattn train`` does) completes
it. Values the ranks hold alike must be computed alike: the ranks of a group draw the
same random numbers (seed them alike; stochastic depth drops the same samples
everywhere), and per-token dropout is refused in training.

The all-reduce that completes the cls token's mean over frames (:meth:`complete_cls`)
and any other sum over frames (:meth:`all_reduce`) reduce in the forward and in the
backward.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch
import torch.distributed as dist

ORDERS = ("hwt", "thw")


class SequenceParallelError(ValueError):
    """A sequence-parallel setup or input that cannot work: named, on every rank that sees it."""


def split_sizes(n: int, parts: int) -> tuple:
    """``n`` items over ``parts`` ranks as evenly as they go: the first ``n % parts`` get one more.

    >>> split_sizes(8, 3), split_sizes(196, 3), split_sizes(2, 3)
    ((3, 3, 2), (66, 65, 65), (1, 1, 0))
    """
    base, extra = divmod(int(n), int(parts))
    return tuple(base + (i < extra) for i in range(parts))


def _starts(sizes: Sequence[int]) -> list:
    out, at = [], 0
    for s in sizes:
        out.append(at)
        at += s
    return out


def _group_or_world(group):
    if not dist.is_available() or not dist.is_initialized():
        raise SequenceParallelError("sequence parallelism needs torch.distributed initialised "
                                    "(torch.distributed.init_process_group) before parallelize")
    return dist.group.WORLD if group is None else group


# -- the token layouts -------------------------------------------------------------------------

def _patches(x: torch.Tensor, T: int, order: str, has_cls: bool) -> torch.Tensor:
    """The ``(B, T, N, C)`` view of the patch tokens of a frame-sharded ``x``: a
    ``(B, [1 +] N*T, C)`` token buffer in ``order``, or a ``(B, T, N, C)`` tensor."""
    if x.dim() == 4:
        return x
    B, L, C = x.shape
    p = x[:, 1:] if has_cls else x
    N = (L - int(has_cls)) // T if T else 0
    if order == "hwt":
        return p.view(B, N, T, C).transpose(1, 2)
    return p.view(B, T, N, C)


@dataclass(frozen=True)
class _Layout:
    """A frame-sharded tensor's shape and token layout (what a switch back must produce)."""

    shape: tuple
    T: int
    N: int
    order: str
    has_cls: bool

    def empty(self, C: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_empty((*self.shape[:-1], C))


def _layout(fn: str, x: torch.Tensor, T: int, order: str, has_cls: bool) -> _Layout:
    if order not in ORDERS:
        raise ValueError(f"{fn}: order must be one of {ORDERS}, got {order!r}")
    if x.dim() == 4:
        if has_cls or order != "thw":
            raise ValueError(f"{fn}: a (B, T, N, C) tensor is frame-major ('thw') without cls")
        if x.shape[1] != T:
            raise SequenceParallelError(f"{fn}: x has {x.shape[1]} frames (dim 1), this rank holds {T}")
        return _Layout(tuple(x.shape), T, x.shape[2], order, False)
    if x.dim() != 3:
        raise ValueError(f"{fn}: x must be (B, [1 +] N*T, C) tokens or (B, T, N, C), got shape {tuple(x.shape)}")
    L = x.shape[1] - int(has_cls)
    if L < 0 or (T and L % T) or (not T and L):
        raise SequenceParallelError(f"{fn}: x has {x.shape[1]} tokens, not {int(has_cls)} + N*T with this rank's "
                                    f"T = {T} frames")
    return _Layout(tuple(x.shape), T, L // T if T else 0, order, has_cls)


# -- the two switches ---------------------------------------------------------------------------

def _all_to_all(send: torch.Tensor, recv_numel: int, send_splits: list, recv_splits: list, group) -> torch.Tensor:
    recv = send.new_empty(recv_numel)
    dist.all_to_all_single(recv, send, recv_splits, send_splits, group=group)
    return recv


def _to_patches(xp: torch.Tensor, frames: Sequence[int], rank: int, group) -> torch.Tensor:
    """Frame-sharded patch tokens ``(B, T_r, N, C)`` (any strides) -> this rank's patches of
    every frame, time-major ``(T, B, N_r, C)``: the send buffer is packed per destination
    (its patches of this rank's frames, ``(T_r, B, N_s, C)``), the receive buffer is the output."""
    B, Tr, N, C = xp.shape
    P = len(frames)
    patches = split_sizes(N, P)
    send = xp.new_empty(Tr * B * N * C)
    at = 0
    for n0, Ns in zip(_starts(patches), patches):
        send[at: at + Tr * B * Ns * C].view(Tr, B, Ns, C).copy_(xp[:, :, n0: n0 + Ns].transpose(0, 1))
        at += Tr * B * Ns * C
    Nr = patches[rank]
    recv = _all_to_all(send, sum(frames) * B * Nr * C, [Tr * B * Ns * C for Ns in patches],
                       [Ts * B * Nr * C for Ts in frames], group)
    return recv.view(sum(frames), B, Nr, C)


def _to_frames(y: torch.Tensor, out: torch.Tensor, frames: Sequence[int], rank: int, group,
               add: Optional[torch.Tensor] = None) -> None:
    """Patch-sharded time-major ``y`` ``(T, B, N_r, C)`` -> ``out`` ``(B, T_r, N, C)`` (a view of
    the frame-sharded output), plus ``add`` (the same view of a residual) when given: ``y``
    is the send buffer (one contiguous run of frames per destination), and each source's
    block of the receive buffer is written (or added) straight into ``out``."""
    T, B, Nr, C = y.shape
    P = len(frames)
    Tr, N = out.shape[1], out.shape[2]
    patches = split_sizes(N, P)
    recv = _all_to_all(y.contiguous().view(-1), Tr * B * N * C, [Ts * B * Nr * C for Ts in frames],
                       [Tr * B * Ns * C for Ns in patches], group)
    at = 0
    for n0, Ns in zip(_starts(patches), patches):
        block = recv[at: at + Tr * B * Ns * C].view(Tr, B, Ns, C).transpose(0, 1)
        if add is None:
            out[:, :, n0: n0 + Ns].copy_(block)
        else:
            torch.add(add[:, :, n0: n0 + Ns], block, out=out[:, :, n0: n0 + Ns])
        at += Tr * B * Ns * C


def _frames_like(layout: _Layout, C: int, like: torch.Tensor, residual: Optional[torch.Tensor]):
    """A new frame-sharded tensor of ``layout`` with C channels: the residual's cls row, or zeros."""
    out = layout.empty(C, like)
    if layout.has_cls:
        if residual is None:
            out[:, 0].zero_()
        else:
            out[:, 0] = residual[:, 0]
    return out


class _FramesToPatches(torch.autograd.Function):
    """Frame-sharded tokens -> time-major ``(T, B, N_r, C)``; backward: :class:`_PatchesToFrames`."""

    @staticmethod
    def forward(ctx, x, shards: "FrameShards", layout: _Layout):
        ctx.shards, ctx.layout = shards, layout
        xp = _patches(x, layout.T, layout.order, layout.has_cls)
        return _to_patches(xp, shards.frame_sizes, shards.rank, shards.group)

    @staticmethod
    def backward(ctx, g):
        shards, layout = ctx.shards, ctx.layout
        grad = _frames_like(layout, g.shape[-1], g, None)
        _to_frames(g, _patches(grad, layout.T, layout.order, layout.has_cls), shards.frame_sizes, shards.rank,
                   shards.group)
        return grad, None, None


class _PatchesToFrames(torch.autograd.Function):
    """Time-major ``(T, B, N_r, C)`` -> frame-sharded tokens (plus a residual); backward:
    :class:`_FramesToPatches` of the gradient."""

    @staticmethod
    def forward(ctx, y, residual, shards: "FrameShards", layout: _Layout):
        ctx.shards, ctx.layout, ctx.has_residual = shards, layout, residual is not None
        out = _frames_like(layout, y.shape[-1], y, residual)
        add = None if residual is None else _patches(residual, layout.T, layout.order, layout.has_cls)
        _to_frames(y, _patches(out, layout.T, layout.order, layout.has_cls), shards.frame_sizes, shards.rank,
                   shards.group, add)
        return out

    @staticmethod
    def backward(ctx, g):
        shards, layout = ctx.shards, ctx.layout
        gp = _to_patches(_patches(g, layout.T, layout.order, layout.has_cls), shards.frame_sizes, shards.rank,
                         shards.group)
        return gp, (g if ctx.has_residual else None), None, None


# -- sums over frames ---------------------------------------------------------------------------

class _AllReduceSum(torch.autograd.Function):
    """Sum over the group, forward and backward (a sum over frames: each rank's part is its frames')."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _CompleteCls(torch.autograd.Function):
    """``x[:, 0] = sum over ranks of weight * x[:, 0]``, in place (x is a fresh residual sum)."""

    @staticmethod
    def forward(ctx, x, weight: float, group):
        ctx.weight, ctx.group = weight, group
        row = x[:, 0] * weight
        dist.all_reduce(row, group=group)
        x[:, 0] = row
        ctx.mark_dirty(x)
        return x

    @staticmethod
    def backward(ctx, g):
        # g may be shared with another input's gradient: change a copy
        row = g[:, 0].contiguous()
        dist.all_reduce(row, group=ctx.group)
        g = g.clone()
        g[:, 0] = row * ctx.weight
        return g, None, None


class _AllToAll(torch.autograd.Function):
    """A flat all-to-all: ``send`` in chunks of ``send_splits`` elements, one per rank; backward:
    the same with the splits swapped."""

    @staticmethod
    def forward(ctx, send, send_splits: list, recv_splits: list, group):
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return _all_to_all(send.contiguous(), sum(recv_splits), send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, g):
        send_splits, recv_splits = ctx.splits
        return _all_to_all(g.contiguous(), sum(send_splits), recv_splits, send_splits, ctx.group), None, None, None


class _Gather(torch.autograd.Function):
    """Every rank's shard along ``dim``, in rank order (sizes ``sizes``); backward: the sum of
    the ranks' gradients, this rank's part. Shards of different sizes travel zero-padded to
    the largest (all_gather takes one shape)."""

    @staticmethod
    def forward(ctx, x, dim: int, sizes: tuple, rank: int, group):
        ctx.dim, ctx.start, ctx.size, ctx.group = dim, sum(sizes[:rank]), sizes[rank], group
        most = max(sizes)
        if min(sizes) == most:
            mine = x.contiguous()
        else:
            pad = list(x.shape)
            pad[dim] = most
            mine = x.new_zeros(pad)
            mine.narrow(dim, 0, sizes[rank]).copy_(x)
        parts = [torch.empty_like(mine) for _ in sizes]
        dist.all_gather(parts, mine, group=group)
        return torch.cat([p.narrow(dim, 0, s) for p, s in zip(parts, sizes)], dim)

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(g, group=ctx.group)
        return g.narrow(ctx.dim, ctx.start, ctx.size), None, None, None, None


# -- the group ----------------------------------------------------------------------------------

class FrameShards:
    """Which frames of a clip each rank of ``group`` holds, and the collectives over them.

    Args:
        group: a ``torch.distributed`` process group (None: the default group), every rank
            of which runs the same model on its shard of the same clip.
        num_frames: T, the clip's temporal tokens (frames, or tubelets when
            ``tubelet_size > 1``); at least the group's size.
        tubelet_size: frames per temporal token: a rank's video shard has
            ``tubelet_size`` times its tokens' frames.
        check_inputs: every :meth:`check_input` gathers each rank's input shape (one small
            all-gather), so that a rank given the wrong shard stops the whole group with
            one :class:`SequenceParallelError` instead of a mismatched collective. Turn it
            off only where the inputs are known to fit.

    Rank ``r`` holds tokens ``[start, stop)`` of ``frame_sizes`` (:func:`split_sizes`).
    A group of one rank is allowed (nothing is sent). The object is shared, not copied,
    by ``copy.deepcopy`` (an EMA copy of a model runs on the same group).
    """

    def __init__(self, group=None, num_frames: int = 1, *, tubelet_size: int = 1, check_inputs: bool = True):
        self.group = _group_or_world(group)
        self.rank = dist.get_rank(self.group)
        self.size = dist.get_world_size(self.group)
        if self.rank < 0:
            raise SequenceParallelError("FrameShards: this process is not a member of the group")
        for name, value in (("num_frames", num_frames), ("tubelet_size", tubelet_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SequenceParallelError(f"FrameShards: {name} must be a positive int, got {value!r}")
        if num_frames < self.size:
            raise SequenceParallelError(
                f"a sequence-parallel group of {self.size} ranks needs at least {self.size} temporal tokens, one per "
                f"rank; the clip has {num_frames} (a rank holding no frame is not supported): use a group of at "
                f"most {num_frames} ranks")
        self.num_frames = num_frames
        self.tubelet_size = tubelet_size
        self.check_inputs = bool(check_inputs)
        self.frame_sizes = split_sizes(num_frames, self.size)
        self.start = sum(self.frame_sizes[: self.rank])
        self.stop = self.start + self.frame_sizes[self.rank]

    def __deepcopy__(self, memo):
        return self

    def __repr__(self) -> str:
        return (f"FrameShards(rank {self.rank} of {self.size}, tokens [{self.start}, {self.stop}) of "
                f"{self.num_frames}, frames {self.frame_sizes})")

    @property
    def local_frames(self) -> int:
        """T_r: this rank's temporal tokens."""
        return self.stop - self.start

    @property
    def ranks(self) -> list:
        """The group's ranks in the default group."""
        return dist.get_process_group_ranks(self.group)

    # -- inputs ------------------------------------------------------------------------------

    def shard(self, video: torch.Tensor, dim: int = -3) -> torch.Tensor:
        """This rank's frames of a whole clip (a view), marked as a shard; ``dim`` is the frame dim
        (``(B, C, T, H, W)``: -3). Raises SequenceParallelError when the clip has not
        ``num_frames * tubelet_size`` frames."""
        T = video.shape[dim]
        want = self.num_frames * self.tubelet_size
        if T != want:
            raise SequenceParallelError(f"shard: the clip has {T} frames (dim {dim} of {tuple(video.shape)}), the "
                                        f"group was set up for {want}")
        ts = self.tubelet_size
        return mark_shard(video.narrow(dim, self.start * ts, self.local_frames * ts), self)

    def check_input(self, video: torch.Tensor, dim: int = -3) -> None:
        """Raise :class:`SequenceParallelError` (on every rank, when ``check_inputs``) unless every
        rank's ``video`` is its shard of clips of the same shape."""
        frames = [s * self.tubelet_size for s in self.frame_sizes]
        dim = dim % video.dim()
        shapes = [tuple(video.shape)]
        if self.check_inputs and self.size > 1:
            mine = torch.full((9,), -1, dtype=torch.int64, device=video.device)
            mine[0] = video.dim()
            mine[1: 1 + video.dim()] = torch.tensor(video.shape, dtype=torch.int64)
            got = [torch.empty_like(mine) for _ in range(self.size)]
            dist.all_gather(got, mine, group=self.group)
            shapes = [tuple(g[1: 1 + int(g[0])].tolist()) for g in got]
        ranks = range(self.size) if len(shapes) > 1 else [self.rank]
        bad = [f"rank {r} has {shape[dim] if len(shape) == video.dim() else '?'} frames, expected {frames[r]}"
               for r, shape in zip(ranks, shapes) if len(shape) != video.dim() or shape[dim] != frames[r]]
        if len({s[:dim] + s[dim + 1:] for s in shapes}) > 1:
            bad.append("the clips differ in other dims: " + ", ".join(f"rank {r} {s}" for r, s in zip(ranks, shapes)))
        if bad:
            raise SequenceParallelError(
                f"the inputs do not fit the frame shards (frames {frames} over ranks {list(range(self.size))} of a "
                f"{self.num_frames * self.tubelet_size}-frame clip, dim {dim}): " + "; ".join(bad)
                + "; give each rank its shard of the same clip (FrameShards.shard)")

    # -- the switches ------------------------------------------------------------------------

    def frames_to_patches(self, x: torch.Tensor, *, order: str = "thw", has_cls: bool = False) -> torch.Tensor:
        """Frame-sharded tokens -> this rank's patches of every frame, ``(T, B, N_r, C)`` time-major.

        ``x``: this rank's ``(B, [1 +] N*T_r, C)`` tokens in ``order`` (``"hwt"``: token
        ``[1 +] n*T_r + t``; ``"thw"``: ``[1 +] t*N + n``; the cls row, when ``has_cls``, is
        not sent and gets a zero gradient), or ``(B, T_r, N, C)``. One all-to-all; the
        backward is :meth:`patches_to_frames` of the gradient. Equivalent to (single process,
        P = 1)::

            _patches(x).permute(1, 0, 2, 3)[:, :, n0:n1]   # (B, T, N, C) -> (T, B, N_r, C)
        """
        layout = _layout("frames_to_patches", x, self.local_frames, order, has_cls)
        return _FramesToPatches.apply(x, self, layout)

    def patches_to_frames(self, y: torch.Tensor, like: torch.Tensor, *, residual: bool = False,
                          order: str = "thw", has_cls: bool = False) -> torch.Tensor:
        """Time-major ``y`` ``(T, B, N_r, C')`` -> frame-sharded tokens in the layout of ``like``
        (shape, ``order``, ``has_cls``) with C' channels.

        With ``residual``, returns ``like + y`` on the patch tokens and ``like``'s cls row
        (``y`` has ``like``'s channels), written in one pass; otherwise the cls row is zero.
        One all-to-all; the backward is :meth:`frames_to_patches` of the gradient.
        """
        layout = _layout("patches_to_frames", like, self.local_frames, order, has_cls)
        T, B, Nr, C = y.shape
        expect = (self.num_frames, like.shape[0], split_sizes(layout.N, self.size)[self.rank])
        if (T, B, Nr) != expect:
            raise SequenceParallelError(f"patches_to_frames: y has shape {tuple(y.shape)}, expected (T, B, N_r) = "
                                        f"{expect} for this rank")
        if residual and C != like.shape[-1]:
            raise ValueError(f"patches_to_frames: residual needs y with {like.shape[-1]} channels, got {C}")
        return _PatchesToFrames.apply(y, like if residual else None, self, layout)

    # -- sums --------------------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of ``x`` over the group, forward and backward: for sums over frames (each rank's
        ``x`` the sum over its own frames)."""
        return _AllReduceSum.apply(x, self.group)

    def complete_cls(self, x: torch.Tensor) -> torch.Tensor:
        """Turn each rank's cls row ``x[:, 0]``, computed from the mean over its own frames, into the
        mean over all frames: ``sum over ranks of (T_r / T) * x[:, 0]``, in place (``x`` a fresh
        result, e.g. a residual sum; its cls row an affine function of the per-frame mean).
        One all-reduce of ``B * C`` values, forward and backward."""
        return _CompleteCls.apply(x, self.local_frames / self.num_frames, self.group)

    def gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """All ranks' shards of ``x`` along ``dim`` (``frame_sizes`` of them), concatenated in rank
        order; differentiable (one all-gather forward, one all-reduce backward)."""
        dim = dim % x.dim()
        if x.shape[dim] != self.local_frames:
            raise SequenceParallelError(f"gather: x has {x.shape[dim]} along dim {dim}, this rank holds "
                                        f"{self.local_frames}")
        return _Gather.apply(x, dim, self.frame_sizes, self.rank, self.group)

    def agree(self, what: dict) -> None:
        """Raise :class:`SequenceParallelError` on every rank unless every rank passes the same
        ``what`` (and the same frames and group): one all-gather of objects over the group."""
        mine = {"ranks": self.ranks, "num_frames": self.num_frames, "tubelet_size": self.tubelet_size, **what}
        got = [None] * self.size
        dist.all_gather_object(got, mine, group=self.group)
        bad = [f"rank {r}: {', '.join(f'{k}={v!r}' for k, v in g.items() if got[0].get(k) != v)}"
               for r, g in enumerate(got) if g != got[0]]
        if bad:
            raise SequenceParallelError("the ranks of the group were set up differently (rank 0: "
                                        + ", ".join(f"{k}={v!r}" for k, v in got[0].items()) + "); " + "; ".join(bad))


_SHARD_MARK = "_divattn_frame_shard"


def mark_shard(x: torch.Tensor, shards: FrameShards) -> torch.Tensor:
    """Mark ``x`` as a rank's frame shard, so that a model that is not parallelized refuses it."""
    setattr(x, _SHARD_MARK, (shards.rank, shards.size, shards.num_frames))
    return x


def shard_of(x) -> Optional[tuple]:
    """``(rank, group size, frames of the clip)`` when ``x`` is marked as a frame shard, else None."""
    return getattr(x, _SHARD_MARK, None)


def shard_frames(video: torch.Tensor, group=None, *, dim: int = -3, tubelet_size: int = 1) -> torch.Tensor:
    """This rank's frames of ``video`` (a view, marked as a shard): the whole clip on every rank of
    ``group`` in, the frames of :class:`FrameShards` out (``dim`` the frame dim)."""
    T = video.shape[dim]
    if T % tubelet_size:
        raise SequenceParallelError(f"shard_frames: {T} frames is not a multiple of tubelet_size {tubelet_size}")
    shards = FrameShards(group, T // tubelet_size, tubelet_size=tubelet_size, check_inputs=False)
    return shards.shard(video, dim)


def gather_frames(x: torch.Tensor, group=None, *, num_frames: int, dim: int = -3) -> torch.Tensor:
    """The whole clip from every rank's frames of it (``num_frames`` in all): the inverse of
    :func:`shard_frames`; differentiable."""
    return FrameShards(group, num_frames, check_inputs=False).gather(x, dim)


def shard_tokens(x: torch.Tensor, group=None, *, num_frames: int, order: str, has_cls: bool) -> torch.Tensor:
    """This rank's frames of a whole clip's ``(B, [1 +] N*T, C)`` token buffer in ``order``: a new
    ``(B, [1 +] N*T_r, C)`` buffer in the same order (the cls row kept)."""
    shards = FrameShards(group, num_frames, check_inputs=False)
    B, L, C = x.shape
    N = (L - int(has_cls)) // num_frames
    _layout("shard_tokens", x, num_frames, order, has_cls)
    mine = _patches(x, num_frames, order, has_cls)[:, shards.start: shards.stop]
    local = x.new_empty((B, int(has_cls) + N * shards.local_frames, C))
    if has_cls:
        local[:, 0] = x[:, 0]
    _patches(local, shards.local_frames, order, has_cls).copy_(mine)
    return local


def gather_tokens(x: torch.Tensor, group=None, *, num_frames: int, order: str, has_cls: bool) -> torch.Tensor:
    """The whole clip's ``(B, [1 +] N*T, C)`` token buffer from every rank's frames of it (this
    rank's cls row kept): the inverse of :func:`shard_tokens`; differentiable."""
    shards = FrameShards(group, num_frames, check_inputs=False)
    layout = _layout("gather_tokens", x, shards.local_frames, order, has_cls)
    every = shards.gather(_patches(x, layout.T, order, has_cls), 1)  # (B, T, N, C)
    B, T, N, C = every.shape
    if order == "hwt":
        every = every.transpose(1, 2)
    tokens = every.reshape(B, T * N, C)
    return torch.cat([x[:, :1], tokens], 1) if has_cls else tokens


def all_to_all(send: torch.Tensor, send_splits: Sequence[int], recv_splits: Sequence[int], group=None) -> torch.Tensor:
    """A differentiable all-to-all of a flat ``send`` buffer (``send_splits[s]`` elements for rank
    s, ``recv_splits[s]`` from it); the backward is the same exchange the other way. For
    compositions of other layouts (the Ulysses block of ``divattn bench``)."""
    return _AllToAll.apply(send, list(send_splits), list(recv_splits), _group_or_world(group))


def all_gather(x: torch.Tensor, dim: int, group=None) -> torch.Tensor:
    """Every rank's ``x`` (all of one shape) concatenated along ``dim`` in rank order;
    differentiable (backward: the sum of the ranks' gradients, this rank's part), e.g. the
    heads a head-sharded composition computed."""
    group = _group_or_world(group)
    size = dist.get_world_size(group)
    dim = dim % x.dim()
    return _Gather.apply(x, dim, (x.shape[dim],) * size, dist.get_rank(group), group)


def average_gradients(parameters: Iterable[torch.nn.Parameter], group=None) -> None:
    """Average the gradients of ``parameters`` over ``group``: after every rank's backward on its
    shard, each then holds the gradient of the whole clip. (DDP over the data x sequence
    ranks does the same as part of its all-reduce.)"""
    group = _group_or_world(group)
    size = dist.get_world_size(group)
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or size == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.div_(size)
    at = 0
    for g in grads:
        g.copy_(flat[at: at + g.numel()].view_as(g))
        at += g.numel()


# -- counting what is sent --------------------------------------------------------------------

@dataclass
class Communication:
    """Bytes one rank handed to collectives: ``sent[kind]`` per kind, ``calls[kind]`` how many.

    ``all_to_all_single``: the bytes of the input destined for other ranks;
    ``all_reduce``: the tensor's bytes (its payload; a ring all-reduce moves 2(P-1)/P of
    it per rank); ``all_gather``: the tensor's bytes times the other ranks.
    """

    sent: dict = field(default_factory=dict)
    calls: dict = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)
        self.calls[kind] = self.calls.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.sent.values())


@contextlib.contextmanager
def count_communication():
    """Count the bytes this process hands to ``torch.distributed`` collectives while inside:
    ``with count_communication() as comm: ...; comm.sent`` (see :class:`Communication`).
    Wraps ``all_to_all_single``, ``all_reduce`` and ``all_gather`` of ``torch.distributed``
    (the calls this module, and ``torch.distributed.nn``, make); not thread-safe."""
    comm = Communication()
    real = {name: getattr(dist, name) for name in ("all_to_all_single", "all_reduce", "all_gather")}

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None,
                          async_op=False):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        splits = input_split_sizes or [input.numel() // size] * size
        per = input.numel() // max(1, sum(splits)) if sum(splits) else 0
        comm.add("all_to_all_single", (sum(splits) - splits[rank]) * per * input.element_size())
        return real["all_to_all_single"](output, input, output_split_sizes, input_split_sizes, group=group,
                                         async_op=async_op)

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        comm.add("all_reduce", tensor.numel() * tensor.element_size())
        return real["all_reduce"](tensor, op=op, group=group, async_op=async_op)

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        comm.add("all_gather", tensor.numel() * tensor.element_size() * (dist.get_world_size(group) - 1))
        return real["all_gather"](tensor_list, tensor, group=group, async_op=async_op)

    patched = {"all_to_all_single": all_to_all_single, "all_reduce": all_reduce, "all_gather": all_gather}
    for name, fn in patched.items():
        setattr(dist, name, fn)
    try:
        yield comm
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)


def divided_block_bytes(B: int, T: int, N: int, C: int, P: int, rank: int, *, element_size: int = 4,
                        cls: bool = True, backward: bool = True) -> dict:
    """The formula: bytes rank ``rank`` of ``P`` sends for one divided block (see the module
    docstring), ``{"all_to_all_single": ..., "all_reduce": ...}``; doubled with ``backward``."""
    Tr = split_sizes(T, P)[rank]
    Nr = split_sizes(N, P)[rank]
    a2a = B * Tr * (N - Nr) * C + B * (T - Tr) * Nr * C
    reduce = B * C if cls and P > 1 else 0
    times = 2 if backward else 1
    out = {"all_to_all_single": times * a2a * element_size}
    if reduce:
        out["all_reduce"] = times * reduce * element_size
    return out


__all__ = [
    "FrameShards", "SequenceParallelError", "split_sizes", "shard_frames", "gather_frames", "shard_tokens",
    "gather_tokens", "all_to_all", "all_gather", "average_gradients", "count_communication", "Communication", "divided_block_bytes",
    "mark_shard", "shard_of",
]
