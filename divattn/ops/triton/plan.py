"""Host side of the Triton kernels: the tile table, regimes, tilings, plans and launches.

A *plan* is the list of :class:`Launch` records one pass makes (the attention kernel,
then with a cls token the epilogue that reduces the per-frame cls buffers); the op
runs it (:func:`forward`, :func:`backward`), the static report compiles it and the
traffic model counts it (:mod:`divattn.kernels_report`). Argument names are those of
:mod:`~divattn.ops.triton.kernels` (see its legend); each kernel's names are read once,
and a launch that misses one or passes one the kernel does not take is refused.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from . import kernels

LOG2E = 1.4426950408889634
FRAME_MAX = 256  # longest sequence (with cls) that one program keeps to itself


@dataclass(frozen=True)
class Launch:
    """One kernel launch, as data: what the static report compiles and the traffic model counts.

    ``args`` are the kernel's runtime arguments by parameter name (tensors, ints,
    floats), ``constexprs`` its compile-time ones; :meth:`run` launches it.
    """

    kernel: object
    grid: tuple
    args: dict
    constexprs: dict
    num_warps: int
    num_stages: int
    regime: str
    tile: Optional[str] = None  # the tile-table row of the tile, where one applies
    max_registers: Optional[int] = None  # ptxas's per-thread register cap (.maxnreg); None: ptxas picks

    @property
    def name(self) -> str:
        fn = getattr(self.kernel, "fn", self.kernel)
        return getattr(fn, "__name__", str(fn))

    @property
    def options(self) -> dict:
        """The launch options the JIT compiles with."""
        out = dict(num_warps=self.num_warps, num_stages=self.num_stages)
        if self.max_registers is not None:
            out["maxnreg"] = self.max_registers
        return out

    def run(self) -> None:
        self.kernel[self.grid](**self.args, **self.constexprs, **self.options)


class _Kernel:
    """A jit kernel with its parameter names, read once: :meth:`launch` binds arguments by name, strictly."""

    def __init__(self, kernel):
        self.kernel = kernel
        fn = getattr(kernel, "fn", kernel)
        self.name = fn.__name__
        params = inspect.signature(fn).parameters.values()
        self.constexprs = frozenset(p.name for p in params if "constexpr" in str(p.annotation))
        self.runtime = frozenset(p.name for p in params) - self.constexprs

    def launch(self, grid: tuple, args: dict, constexprs: dict, num_warps: int, num_stages: int,
               regime: str, tile: Optional[str] = None, max_registers: Optional[int] = None) -> Launch:
        for given, wanted, what in ((args, self.runtime, "arguments"), (constexprs, self.constexprs, "constexprs")):
            missing = sorted(wanted - given.keys())
            extra = sorted(given.keys() - wanted)
            if missing or extra:
                raise TypeError(f"{self.name}: {what} missing {missing or 'none'}, not taken {extra or 'none'}")
        return Launch(self.kernel, grid, args, constexprs, num_warps, num_stages, regime, tile, max_registers)


_FWD = _Kernel(kernels._attn_fwd_kernel)
_BWD = _Kernel(kernels._attn_bwd_kernel)
_CLS_MEAN = _Kernel(kernels._cls_mean_kernel)
_CLS_GRAD = _Kernel(kernels._cls_grad_kernel)


def _target(device: torch.device, target):
    """The compile target a plan is made for: "interpreter" on CPU, else the SM number."""
    if target is not None:
        return target
    if device.type != "cuda":
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


# Tile configurations, as data: (regime, pass, head-dim bucket) -> candidate (rows, num_warps,
# num_stages[, max_registers]), best first, for sm_90 (Hopper and newer) in _HOPPER; _AMPERE holds
# the sm_80 (mma.sync) rows that differ, _CLS the rows that differ with a cls token (either arch).
# "rows" is the tile height GROUP * SEQ. The first candidate is what runs; on a GPU the
# candidates are the pruned tuning space (see :func:`_run`). Head-dim buckets (:func:`_bucket`):
# 32 (D <= 32), 64 and 128 (multiples of 16 up to 64 / 128), 40 and 72 (the other D up to 64 /
# 128: their rows load unvectorised and hold more registers), 256.
#
# max_registers is the per-thread register cap given to ptxas (the launch's ``maxnreg``, PTX
# ``.maxnreg``). Without one, the ptxas Triton 3.9 runs (``--regAllocOptLevel=2``) picks the
# count itself and, to keep 2 or 3 blocks resident, sometimes spills a few bytes at 80 or 128
# registers; with a cap it allocates what the code needs up to the cap. 255 lets a build use
# what it needs (one block of 8 warps per SM above 128 registers, two of 4 warps); 128 keeps
# two blocks of 8 warps. A row has a cap only where, without one, a build spilled.
#
# Chosen with `python -m divattn kernels`: no register spill in any fp16/bf16 build at D <= 128
# on sm_80 / sm_90 (the report's head dims, every code path; its record in
# benchmarks/results/kernels/builds.json), then the most resident blocks. The interpreter (CPU)
# runs small tiles of its own.
_HOPPER = {
    ("packed", "fwd", 32): [(64, 8, 2)],
    ("packed", "fwd", 40): [(64, 8, 2)],
    ("packed", "fwd", 64): [(64, 4, 2)],
    ("packed", "fwd", 72): [(32, 8, 2)],
    ("packed", "fwd", 128): [(32, 8, 2, 128), (64, 8, 2)],
    ("packed", "fwd", 256): [(16, 8, 1)],
    ("packed", "bwd", 32): [(32, 8, 1)],
    ("packed", "bwd", 40): [(16, 8, 1)],
    ("packed", "bwd", 64): [(32, 8, 1)],
    ("packed", "bwd", 72): [(16, 8, 1)],
    ("packed", "bwd", 128): [(16, 4, 1)],
    ("packed", "bwd", 256): [(16, 8, 1)],
    ("frame", "fwd", 32): [(64, 8, 2), (32, 8, 2)],
    ("frame", "fwd", 40): [(64, 8, 2), (32, 8, 2)],
    ("frame", "fwd", 64): [(64, 8, 2), (32, 8, 2, 255)],
    ("frame", "fwd", 72): [(32, 8, 2)],
    ("frame", "fwd", 128): [(32, 8, 2)],
    ("frame", "fwd", 256): [(16, 8, 1)],
    ("frame", "bwd", 32): [(64, 8, 1), (32, 8, 1, 255)],
    ("frame", "bwd", 40): [(32, 8, 1)],
    ("frame", "bwd", 64): [(64, 8, 1), (32, 8, 1)],
    ("frame", "bwd", 72): [(16, 8, 1, 255)],
    ("frame", "bwd", 128): [(16, 8, 1, 255), (16, 4, 1, 255)],
    ("frame", "bwd", 256): [(16, 8, 1)],
    ("long", "fwd", 32): [(64, 8, 2), (32, 8, 2)],
    ("long", "fwd", 40): [(64, 8, 2), (32, 8, 2)],
    ("long", "fwd", 64): [(64, 8, 2), (32, 8, 2)],
    ("long", "fwd", 72): [(32, 8, 2)],
    ("long", "fwd", 128): [(32, 8, 2)],
    ("long", "fwd", 256): [(16, 8, 1)],
    ("long", "bwd", 32): [(32, 8, 1, 255), (64, 8, 1)],
    ("long", "bwd", 40): [(32, 8, 1), (64, 8, 1)],
    ("long", "bwd", 64): [(32, 8, 1), (64, 8, 1)],
    ("long", "bwd", 72): [(16, 8, 1, 255)],
    ("long", "bwd", 128): [(16, 8, 1, 255), (16, 4, 1)],
    ("long", "bwd", 256): [(16, 8, 1)],
}
_AMPERE = {
    ("packed", "fwd", 32): [(64, 8, 2, 128)],
    ("packed", "fwd", 72): [(32, 8, 2, 255)],
    ("packed", "fwd", 128): [(32, 4, 2)],
    ("frame", "fwd", 32): [(32, 8, 2)],
    ("frame", "fwd", 40): [(32, 8, 2)],
    ("frame", "fwd", 64): [(32, 8, 2)],
    ("frame", "bwd", 32): [(32, 4, 1, 255)],
    ("frame", "bwd", 40): [(16, 8, 1)],
    ("frame", "bwd", 64): [(32, 8, 1)],
    ("long", "fwd", 32): [(32, 4, 2)],
    ("long", "fwd", 40): [(32, 8, 2, 255)],
    ("long", "fwd", 64): [(32, 8, 2)],
    ("long", "bwd", 32): [(32, 8, 1)],
    ("long", "bwd", 40): [(32, 8, 1)],
    ("long", "bwd", 64): [(32, 8, 1)],
}
# With a cls token the backward holds more per row (the cls row's merged loads): fewer rows.
_CLS = {
    ("frame", "bwd", 32): [(32, 8, 1)],
    ("frame", "bwd", 40): [(32, 8, 1)],
    ("frame", "bwd", 64): [(32, 8, 1)],
    ("frame", "bwd", 72): [(16, 8, 1)],
    ("frame", "bwd", 128): [(16, 8, 1)],
    ("long", "bwd", 32): [(32, 8, 1)],
    ("long", "bwd", 40): [(32, 8, 1)],
    ("long", "bwd", 64): [(32, 8, 1)],
    ("long", "bwd", 72): [(16, 8, 1)],
    ("long", "bwd", 128): [(16, 8, 1)],
}

# A padded batch (counts or a token mask) holds each row's real-row predicates beside the
# tile: the rows that differ for it, where the dense row's builds spilled (either arch; rows
# below a packed sequence's own length are raised to it, :func:`tile_candidates`).
_PADDED = {
    ("packed", "fwd", 40): [(32, 8, 2)],
    ("packed", "fwd", 72): [(16, 8, 2)],
    ("long", "fwd", 72): [(16, 8, 2)],
    ("long", "fwd", 128): [(16, 8, 2)],
}


def _table_row(regime: str, pass_: str, bucket: int, arch: int, cls: bool, padded: bool = False) -> tuple:
    """``(name, candidates)`` of the table row that applies, e.g. ``("_AMPERE[('frame', 'bwd', 64)]", [...])``."""
    key = (regime, pass_, bucket)
    name, table = (("_PADDED", _PADDED) if padded and key in _PADDED else ("_CLS", _CLS) if cls and key in _CLS
                   else ("_AMPERE", _AMPERE) if arch == 80 and key in _AMPERE else ("_HOPPER", _HOPPER))
    return f"{name}[{key!r}]", table[key]


TILES = {
    (regime, pass_, bucket, "half", arch, cls): _table_row(regime, pass_, bucket, arch, cls)[1]
    for arch in (80, 90)
    for (regime, pass_, bucket) in _HOPPER
    for cls in (False, True)
}
INTERPRETER_ROWS = 32


def _bucket(D: int) -> int:
    """The head-dim bucket of the tile table that serves head dim ``D`` (see the table's comment)."""
    block_d = max(16, triton.next_power_of_2(D))
    if block_d <= 32 or block_d > 128:
        return max(block_d, 32)
    return block_d if D % 16 == 0 else {64: 40, 128: 72}[block_d]


def _arch(target) -> int:
    """The table an SM number reads: 80 (Ampere, mma.sync) below 90, else 90."""
    return 90 if int(target) >= 90 else 80


def _regime(rows_per_seq: int, rows: int) -> str:
    if triton.next_power_of_2(max(rows_per_seq, 1)) <= rows:
        return "packed"
    return "frame" if rows_per_seq <= FRAME_MAX else "long"


def tile_candidates(rows_per_seq: int, D: int, dtype: torch.dtype, target, pass_: str, has_cls: bool = False,
                    padded: bool = False) -> list:
    """Candidate ``(regime, rows, num_warps, num_stages, max_registers)`` for sequences of ``rows_per_seq`` rows (cls included).

    The regime follows from the first (dense) packed entry: sequences that fit its tile
    are packed, longer ones up to FRAME_MAX rows take the frame regime, the rest the long
    one. fp32 inputs take half the rows of the half-precision entries (twice the bytes
    per element). A ``padded`` batch takes the ``_PADDED`` rows where there are some, a
    packed tile at least one sequence high.
    """
    if target == "interpreter":
        return [(_regime(rows_per_seq, INTERPRETER_ROWS), INTERPRETER_ROWS, 4, 1, None)]
    bucket, arch = _bucket(D), _arch(target)
    shrink = 2 if dtype == torch.float32 else 1
    first_packed = TILES[("packed", pass_, bucket, "half", arch, has_cls)][0][0] // shrink
    regime = _regime(rows_per_seq, max(16, first_packed))
    out = []
    for rows, warps, stages, *regs in _table_row(regime, pass_, bucket, arch, has_cls, padded)[1]:
        rows = max(16, rows // shrink)
        if regime == "packed" and triton.next_power_of_2(max(rows_per_seq, 1)) > rows:
            if not padded:
                continue
            rows = triton.next_power_of_2(rows_per_seq)
        candidate = (regime, rows, warps, stages, regs[0] if regs else None)
        if candidate not in out:
            out.append(candidate)
    return out


@dataclass(frozen=True)
class Tiling:
    """How one problem is tiled: its ``n_seq`` sequences (indexed by (i0, i1, i2), i1 and i2
    running over ``n_i1`` and ``n_i2``), query rows L and key rows L_k (the cls row excluded),
    and the tile configuration: ``group`` sequences of ``seq`` rows per tile, ``n_q`` /
    ``n_k`` query / key tiles per sequence, ``tiles_per_prog`` of them per program."""

    n_seq: int
    n_i1: int
    n_i2: int
    L: int
    L_k: int
    has_cls: bool
    regime: str
    group: int
    seq: int
    block_d: int
    n_q: int
    n_k: int
    tiles_per_prog: int
    num_warps: int
    num_stages: int
    tile: Optional[str] = None  # the tile-table row it came from (None in the interpreter)
    max_registers: Optional[int] = None  # the row's register cap per thread (None: ptxas picks)


def tile_config(op: str, q: torch.Tensor, k: torch.Tensor, has_cls: bool, target, pass_: str,
                candidate=None, padded: bool = False) -> Tiling:
    """The tiling of ``op`` on q, k (sequences of L + cls query rows, L_k + cls key rows) for ``target``.

    ``candidate`` is one of :func:`tile_candidates`; by default the first.
    """
    (n_i0, n_i1, n_i2, L), _ = _geometry(q, op)
    L_k = _geometry(k, op)[0][3]
    q_rows, k_rows = L + int(has_cls), L_k + int(has_cls)
    regime, rows, warps, stages, regs = candidate or tile_candidates(max(q_rows, k_rows), q.shape[-1], q.dtype, target,
                                                               pass_, has_cls, padded)[0]
    if regime == "packed":
        seq = triton.next_power_of_2(max(q_rows, k_rows, 1))
        group = rows // seq
    else:
        seq, group = rows, 1
    n_q, n_k = triton.cdiv(max(q_rows, 1), seq), triton.cdiv(max(k_rows, 1), seq)
    D = q.shape[-1]
    block_d = max(16, triton.next_power_of_2(D))
    tile = None if target == "interpreter" else _table_row(regime, pass_, _bucket(D), _arch(target), has_cls,
                                                           padded)[0]
    return Tiling(n_i0 * n_i1 * n_i2, n_i1, n_i2, L, L_k, has_cls, regime, group, seq, block_d,
                  n_q, n_k, max(n_q, n_k) if regime != "long" else 1, warps, stages, tile, regs)


def _geometry(x: torch.Tensor, op: str):
    """(n_i0, n_i1, n_i2, L) and the matching strides (0, 1, 2, L) of a q/k/v/o-like tensor."""
    if op == "temporal":  # (B, T, N, H, D): sequences (b, n, h), rows t
        B, T, N, H, _ = x.shape
        return (B, N, H, T), (x.stride(0), x.stride(2), x.stride(3), x.stride(1))
    if op == "spatial":  # sequences (b, t, h), rows n
        B, T, N, H, _ = x.shape
        return (B, T, H, N), (x.stride(0), x.stride(1), x.stride(3), x.stride(2))
    if op == "joint":  # (B, L, H, D): sequences (b, h), rows l
        B, L, H, _ = x.shape
        return (B, 1, H, L), (x.stride(0), 0, x.stride(2), x.stride(1))
    raise ValueError(f"unknown op {op!r}")


def _strides(op: str, **views) -> dict:
    """``stride_<name>0/1/2/L`` of each view, by the kernels' names."""
    return {f"stride_{name}{axis}": st for name, x in views.items()
            for axis, st in zip(("0", "1", "2", "L"), _geometry(x, op)[1])}


def _cls_strides(**vectors) -> dict:
    """``stride_<name>c0/c2`` of each ``(B, H, D)`` cls vector (0 for a name given None)."""
    return {f"stride_{name}c{axis}": (0 if x is None else x.stride(i)) for name, x in vectors.items()
            for i, axis in enumerate(("0", "2"))}


def _prec(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _sequences(t: Tiling) -> dict:
    return dict(n_seq=t.n_seq, n_i1=t.n_i1, n_i2=t.n_i2, L=t.L, L_k=t.L_k, n_q_tiles=t.n_q, n_k_tiles=t.n_k,
                tiles_per_prog=t.tiles_per_prog)


def problem_candidates(op: str, pass_: str, q: torch.Tensor, k: torch.Tensor, has_cls: bool, target,
                       padded: bool = False) -> list:
    """The :func:`tile_candidates` of ``op`` on q, k for ``target`` (default: q's device): the
    first runs, the others only when tuning on a GPU picks them (:func:`_run`)."""
    L, L_k = _geometry(q, op)[0][3], _geometry(k, op)[0][3]
    return tile_candidates(max(L, L_k) + int(has_cls), q.shape[-1], q.dtype, _target(q.device, target), pass_,
                           has_cls, padded)


_TUNED: dict = {}


def _run(make_plan, op: str, pass_: str, q: torch.Tensor, k: torch.Tensor, has_cls: bool, padded: bool) -> None:
    """Launch the plan with the first tile candidate or, on a GPU with several, the fastest.

    On a GPU the table's candidates for a problem are timed once (``triton.testing.do_bench``)
    and the winner is kept for that problem size; ``DIVATTN_AUTOTUNE=0`` always runs
    the first. Every launch writes its outputs whole, so timing runs are harmless.
    """
    target = _target(q.device, None)
    (n_i0, n_i1, n_i2, L), _ = _geometry(q, op)
    rows_per_seq = max(L, _geometry(k, op)[0][3]) + int(has_cls)
    candidates = problem_candidates(op, pass_, q, k, has_cls, target, padded)
    choice = candidates[0]
    if len(candidates) > 1 and q.device.type == "cuda" and os.environ.get("DIVATTN_AUTOTUNE", "1") != "0":
        key = (op, pass_, rows_per_seq, q.shape[-1], q.dtype, n_i0 * n_i1 * n_i2, target, padded)
        choice = _TUNED.get(key)
        if choice is None:
            from triton.testing import do_bench

            times = [do_bench(lambda c=c: [launch.run() for launch in make_plan(c)], warmup=5, rep=20)
                     for c in candidates]
            choice = _TUNED[key] = candidates[times.index(min(times))]
    for launch in make_plan(choice):
        launch.run()


def _count_args(counts: Optional[tuple], dummy: torch.Tensor) -> tuple:
    """``(args, constexprs)`` of a padded batch's counts: ``REAL_ROWS``, ``REAL_GROUPS`` (any
    pointer, never read, without counts) and ``COUNTS``."""
    rows, groups = counts if counts is not None else (dummy, dummy)
    return dict(REAL_ROWS=rows, REAL_GROUPS=groups), dict(COUNTS=counts is not None)


def _mask_args(op: str, mask: Optional[torch.Tensor], cls_weights: Optional[torch.Tensor],
               dummy: torch.Tensor) -> tuple:
    """``(args, constexprs)`` of a token mask: ``MASK`` (the ``(B, T, N)`` / ``(B, L)`` bool mask
    as uint8, any strides), ``CLS_W`` (its ``(B, T)`` cls frame weights, contiguous), their
    strides over (i0, i1, rows) and ``MASKED``; any pointer and zero strides without one."""
    if mask is None:
        return dict(MASK=dummy, CLS_W=dummy, stride_m0=0, stride_m1=0, stride_mL=0), dict(MASKED=False)
    s = mask.stride()
    # the (i0, i1, row) of each op (kernels' table): temporal (b, n, t), spatial (b, t, n), joint (b, -, l)
    strides = (s[0], 0, s[1]) if op == "joint" else (s[0], s[2], s[1]) if op == "temporal" else s
    weights = dummy if cls_weights is None else cls_weights.to(torch.float32).contiguous()
    return (dict(MASK=mask.view(torch.uint8), CLS_W=weights, stride_m0=strides[0], stride_m1=strides[1],
                 stride_mL=strides[2]), dict(MASKED=True))


def _masked_cap(t: Tiling, mask: Optional[torch.Tensor]) -> Optional[int]:
    """The backward's register cap: the tile row's, or with a mask 255 where the row sets none.
    A masked backward holds each key tile's mask predicates beside its bounds through the
    query loop; at the rows' own allocation (128 registers to keep two blocks of 8 warps
    resident) ptxas spills a few bytes for them, with a cap it takes what they need instead
    (one block resident: a mask costs occupancy, not local-memory traffic)."""
    return t.max_registers if mask is None or t.max_registers is not None else 255


def plan_forward(op, q, k, v, o, lse, scale, *, causal=False, cls=None, o_cls=None, cls_frames=None,
                 lse_cls=None, counts=None, mask=None, cls_weights=None, target=None, candidate=None) -> list:
    """The launches :func:`forward` makes for these arguments, on ``target`` (default: q's device).

    ``candidate``: a tile configuration from :func:`tile_candidates` (default: the first).
    """
    has_cls = cls is not None
    t = tile_config(op, q, k, has_cls, _target(q.device, target), "fwd", candidate,
                    counts is not None or mask is not None)
    D = q.shape[-1]
    if has_cls:
        qc, kc, vc = cls
        cls_args = dict(Q_CLS=qc, K_CLS=kc, V_CLS=vc, O_CLS_FR=cls_frames, LSE_CLS_FR=lse_cls)
    else:  # never read: any pointer, zero strides
        qc = kc = vc = None
        cls_args = dict(Q_CLS=q, K_CLS=k, V_CLS=v, O_CLS_FR=lse, LSE_CLS_FR=lse)
    count_args, count_flag = _count_args(counts, lse)
    mask_args, mask_flag = _mask_args(op, mask, cls_weights, lse)
    cls_w = mask_args.pop("CLS_W")
    plan = []
    if t.n_seq > 0 and t.L + has_cls > 0:
        plan.append(_FWD.launch(
            (triton.cdiv(t.n_seq, t.group), triton.cdiv(t.n_q, t.tiles_per_prog)),
            dict(Q=q, K=k, V=v, O=o, LSE=lse, **cls_args, **count_args, **mask_args,
                 **_strides(op, q=q, k=k, v=v, o=o),
                 **_cls_strides(q=qc, k=kc, v=vc), **_sequences(t), D=D, qk_scale=scale * LOG2E),
            dict(HAS_CLS=has_cls, GROUP=t.group, SEQ=t.seq, BLOCK_D=t.block_d, PREC=_prec(q.dtype),
                 CAUSAL=bool(causal), **count_flag, **mask_flag),
            t.num_warps, t.num_stages, t.regime, t.tile, t.max_registers))
    if has_cls:
        B, T, N, H, _ = q.shape
        if B * H > 0:
            plan.append(_CLS_MEAN.launch(
                (B * H,), dict(O_CLS_FR=cls_frames, O_CLS=o_cls, **count_args, CLS_W=cls_w, **_cls_strides(o=o_cls),
                               H=H, T=T, D=D, inv_T=1.0 / T),
                dict(BLOCK_D=t.block_d, **count_flag, **mask_flag), 1, 1, "epilogue"))
    return plan


def forward(op, q, k, v, o, lse, scale, *, causal=False, cls=None, o_cls=None, cls_frames=None, lse_cls=None,
            counts=None, mask=None, cls_weights=None):
    """Write attention outputs into ``o`` (and ``o_cls``) and row log-sum-exps into ``lse``.

    ``q, k, v, o`` are views in the op's layout (any strides, head dim contiguous);
    ``lse`` is a contiguous fp32 ``(S*L,)``; with ``cls``, ``o_cls`` is ``(B, H, D)``,
    ``cls_frames`` a contiguous fp32 ``(B, H, T, D)`` of per-frame cls outputs and
    ``lse_cls`` a contiguous fp32 ``(B, H, T)``; ``counts`` the ``(rows, groups)`` of a padded
    batch (:meth:`divattn.ops.masks.Padding.kernel_counts`) or None; ``mask`` and
    ``cls_weights`` its token mask and cls frame weights
    (:meth:`~divattn.ops.masks.Padding.kernel_mask`) or None.
    """
    _run(lambda c: plan_forward(op, q, k, v, o, lse, scale, causal=causal, cls=cls, o_cls=o_cls,
                                cls_frames=cls_frames, lse_cls=lse_cls, counts=counts, mask=mask,
                                cls_weights=cls_weights, candidate=c),
         op, "fwd", q, k, cls is not None, counts is not None or mask is not None)


def plan_backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, *,
                  causal=False, cls=None, d_cls=None, do_cls=None, cls_frames=None, lse_cls=None, counts=None,
                  mask=None, cls_weights=None, target=None, candidate=None) -> list:
    """The launches :func:`backward` makes (cls scratch buffers allocated on q's device)."""
    has_cls = cls is not None
    t = tile_config(op, q, k, has_cls, _target(q.device, target), "bwd", candidate,
                    counts is not None or mask is not None)
    D = q.shape[-1]
    if has_cls:
        B, T, N, H, _ = q.shape
        qc, kc, vc = cls
        # per-frame partial gradients of the cls q/k/v, summed over frames by the epilogue
        partials = torch.empty((3, B, H, T, D), dtype=torch.float32, device=q.device)
        cls_args = dict(Q_CLS=qc, K_CLS=kc, V_CLS=vc, DO_CLS=do_cls, O_CLS_FR=cls_frames, LSE_CLS_FR=lse_cls,
                        DQ_CLS_FR=partials[0], DK_CLS_FR=partials[1], DV_CLS_FR=partials[2])
        inv_T = 1.0 / T
    else:  # never read: any pointer, zero strides
        qc = kc = vc = do_cls = None
        cls_args = dict(Q_CLS=q, K_CLS=k, V_CLS=v, DO_CLS=do, O_CLS_FR=lse, LSE_CLS_FR=lse, DQ_CLS_FR=lse,
                        DK_CLS_FR=lse, DV_CLS_FR=lse)
        inv_T = 1.0
    count_args, count_flag = _count_args(counts, lse)
    mask_args, mask_flag = _mask_args(op, mask, cls_weights, lse)
    plan = []
    if t.n_seq > 0 and t.L + has_cls > 0:
        plan.append(_BWD.launch(
            (triton.cdiv(t.n_seq, t.group), triton.cdiv(max(t.n_q, t.n_k), t.tiles_per_prog)),
            dict(Q=q, K=k, V=v, O=o, DO=do, LSE=lse, DQ=dq, DK=dk, DV=dv, **cls_args, **count_args, **mask_args,
                 **_strides(op, q=q, k=k, v=v, o=o, do=do, dq=dq, dk=dk, dv=dv),
                 **_cls_strides(q=qc, k=kc, v=vc, do=do_cls), **_sequences(t), D=D, qk_scale=scale * LOG2E,
                 scale=scale, inv_T=inv_T),
            dict(HAS_CLS=has_cls, GROUP=t.group, SEQ=t.seq, BLOCK_D=t.block_d, PREC=_prec(q.dtype),
                 SINGLE=t.n_q == 1 and t.n_k == 1, CAUSAL=bool(causal), **count_flag, **mask_flag),
            t.num_warps, t.num_stages, t.regime, t.tile, _masked_cap(t, mask)))
    if has_cls and B * H > 0:
        dqc, dkc, dvc = d_cls
        plan.append(_CLS_GRAD.launch(
            (B * H,),
            dict(DQ_CLS_FR=partials[0], DK_CLS_FR=partials[1], DV_CLS_FR=partials[2], DQ_CLS=dqc, DK_CLS=dkc,
                 DV_CLS=dvc, **_cls_strides(dq=dqc, dk=dkc, dv=dvc), H=H, T=T, D=D),
            dict(BLOCK_D=t.block_d), 1, 1, "epilogue"))
    return plan


def backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, *,
             causal=False, cls=None, d_cls=None, do_cls=None, cls_frames=None, lse_cls=None, counts=None, mask=None,
             cls_weights=None):
    """Write dq, dk, dv (and the cls grads ``d_cls``) for the forward above.

    Every element of dq/dk/dv/d_cls is written once; nothing is accumulated across
    programs, so the result does not depend on launch order.
    """
    _run(lambda c: plan_backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, causal=causal, cls=cls, d_cls=d_cls,
                                 do_cls=do_cls, cls_frames=cls_frames, lse_cls=lse_cls, counts=counts,
                                 mask=mask, cls_weights=cls_weights, candidate=c),
         op, "bwd", q, k, cls is not None, counts is not None or mask is not None)


__all__ = ["forward", "backward", "plan_forward", "plan_backward", "Launch", "Tiling", "LOG2E", "TILES",
           "tile_candidates", "problem_candidates", "tile_config"]
