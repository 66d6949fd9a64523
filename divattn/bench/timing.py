"""Timing and peak memory of one benchmark call.

The timed callable synchronises the device itself (a GPU kernel launch returns before
the kernel ends), runs the work ``inner`` times between synchronisations when one call
is too short to time alone, and is warmed up before timing (the first calls compile
and autotune). The reported number is the median over rounds.
"""

from __future__ import annotations

import ctypes
import math
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


# glibc's mallopt parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def pin_malloc() -> Optional[str]:
    """Fix glibc malloc's thresholds for a CPU benchmark run; what was set, or None.

    glibc serves an allocation above its mmap threshold (128 KiB at start) with fresh
    pages, and raises the threshold (at most to 32 MiB on 64-bit) each time it frees
    such a chunk. Whether a case ran before or after those raises decided whether its
    buffers were page-faulted in on every call: a CPU case's median moved by up to 1.3x
    between runs of the same code. The thresholds are pinned where glibc's own
    adjustment ends, the state a long-running process reaches.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc
        return None
    if mallopt(_M_MMAP_THRESHOLD, 32 << 20) != 1 or mallopt(_M_TRIM_THRESHOLD, 64 << 20) != 1:
        return None
    return "glibc mmap threshold 32 MiB, trim threshold 64 MiB"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class Plan:
    """How to time one call: ``warmup`` untimed calls, then ``rounds`` timed rounds of
    ``inner`` calls each, synchronising at the end of each round."""

    warmup: int
    rounds: int
    inner: int


@dataclass
class Budget:
    """Time to spend per case. ``min_round_s``: a round shorter than this (a GPU
    kernel of tens of microseconds) repeats the call ``inner`` times. ``retime_s``: what a
    run may spend at its end timing its disturbed cases again (see :func:`disturbed`)."""

    target_s: float = 1.0
    min_rounds: int = 5
    max_rounds: int = 100
    warmup: int = 2
    min_round_s: float = 0.0
    retime_s: float = 0.0

    @classmethod
    def for_device(cls, device: torch.device, quick: bool = False, smoke: bool = False) -> "Budget":
        """The device's budget; ``quick``: shorter timing; ``smoke``: three short rounds a
        case after one warmup call, enough to show that every case runs (CI), not a timing."""
        if smoke:
            return cls(target_s=0.01, min_rounds=3, max_rounds=3, warmup=1)
        if device.type == "cpu":
            # Up to 2000 rounds: a 60 us op's case then spans 0.12 s (300 rounds were 20 ms of
            # it), and disturbances of tens of ms on a shared CPU moved the median of whole
            # small-op cases by up to 1.8x between otherwise equal runs.
            # Disturbances also last seconds (a 256x256 matmul's median moved 1.0-1.2x from
            # one second to the next on a shared 2-core machine): up to 90 s go to timing
            # the cases they hit again, at the end of the run.
            return cls(target_s=0.2 if quick else 0.5, min_rounds=3, max_rounds=2000, warmup=3,
                       retime_s=0.0 if quick else 90.0)
        return cls(target_s=0.2 if quick else 1.0, min_rounds=10, max_rounds=200, warmup=3, min_round_s=2e-3,
                   retime_s=0.0 if quick else 30.0)


def timed(fn: Callable[[], object], device: torch.device, inner: int = 1) -> Callable[[], None]:
    """``fn`` run ``inner`` times, then the device synchronised: the callable to time."""
    def call():
        for _ in range(inner):
            fn()
        synchronize(device)
    return call


def plan(fn: Callable[[], object], device: torch.device, budget: Budget) -> Plan:
    """Warm ``fn`` up (compilation happens here, outside any timing) and size the rounds."""
    call = timed(fn, device)
    for _ in range(budget.warmup):
        call()
    start = time.perf_counter()
    call()
    once = max(time.perf_counter() - start, 1e-7)
    inner = max(1, math.ceil(budget.min_round_s / once)) if budget.min_round_s > 0 else 1
    rounds = int(min(budget.max_rounds, max(budget.min_rounds, budget.target_s / (once * inner))))
    return Plan(warmup=budget.warmup + 1, rounds=rounds, inner=inner)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    rounds: int
    inner: int
    spread: float  # median over the 10th percentile: about 1.0 in a calm run
    probe_ms: Optional[float] = None  # the slower of the probes before and after (CPU)


# A timing whose median is more than this over its 10th percentile, or whose probe took
# more than this times the run's fastest probe, was disturbed.
CALM = 1.10

_PROBE: dict = {}


def probe_ms(device: torch.device) -> Optional[float]:
    """On a CPU, the median time of a fixed small matmul (about 0.1 ms): a workload that
    never changes, timed before and after each case, so that a case timed while something
    else held the machine is recognised even when all of its rounds were slow. None elsewhere."""
    if device.type != "cpu":
        return None
    x = _PROBE.get("x")
    if x is None:
        x = _PROBE["x"] = torch.randn(160, 160, generator=torch.Generator().manual_seed(0))
    times = []
    for _ in range(11):
        start = time.perf_counter()
        torch.mm(x, x)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def with_probe(device: torch.device, run: Callable[[], object]) -> tuple:
    """``(run(), the slower of the probes before and after it)``; the probe is None off a CPU."""
    before = probe_ms(device)
    result = run()
    after = probe_ms(device)
    return result, (None if before is None else max(before, after))


def disturbance(spread: Optional[float], probe: Optional[float] = None, best_probe: Optional[float] = None) -> float:
    """How disturbed a timing looks, 1.0 when calm: the larger of its spread and its probe
    over the run's fastest probe."""
    d = spread or 1.0
    if probe and best_probe:
        d = max(d, probe / best_probe)
    return d


def disturbed(spread: Optional[float], probe: Optional[float] = None, best_probe: Optional[float] = None) -> bool:
    """Whether a timing says something else ran meanwhile (its median well above its fast
    rounds, or its probe slower than the run's fastest); such a case is worth timing again."""
    return disturbance(spread, probe, best_probe) > CALM


def measure(fn: Callable[[], object], device: torch.device, budget: Optional[Budget] = None) -> Timing:
    """Median time of one call of ``fn``, in ms, with :func:`plan`'s warmup and rounds."""
    budget = budget or Budget.for_device(device)
    p = plan(fn, device, budget)
    call = timed(fn, device, p.inner)

    def rounds():
        times = []
        for _ in range(p.rounds):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) / p.inner)
        return times

    times, probe = with_probe(device, rounds)
    return from_seconds(times, p, probe)


def from_seconds(times, p: Plan, probe: Optional[float] = None) -> Timing:
    """A :class:`Timing` from per-call times in seconds (``probe``: see :func:`probe_ms`)."""
    ms = sorted(t * 1e3 for t in times)
    median = statistics.median(ms)
    p10 = ms[len(ms) // 10]
    return Timing(median_ms=median, min_ms=ms[0], max_ms=ms[-1], rounds=len(ms), inner=p.inner,
                  spread=median / p10 if p10 > 0 else 1.0, probe_ms=probe)


class _LiveStorages(TorchDispatchMode):
    """Bytes of tensor storages created under it and still alive; their peak.

    Storages are followed through weak references to the C++ storage (a tensor saved
    for backward stays alive after its Python object is gone). Scratch memory an op
    frees before returning is not seen.
    """

    def __init__(self, existing):
        super().__init__()
        from torch.multiprocessing.reductions import StorageWeakRef

        self._ref = StorageWeakRef
        self.ignore = {t.untyped_storage().data_ptr() for t in existing}
        self.tracked: dict = {}
        self.live = 0
        self.peak = 0

    def _sweep(self):
        for ptr, (ref, n) in list(self.tracked.items()):
            if ref.expired():
                self.live -= n
                del self.tracked[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._sweep()
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr, n = storage.data_ptr(), storage.nbytes()
            if n == 0 or ptr in self.ignore or ptr in self.tracked:
                continue
            self.tracked[ptr] = (self._ref(storage), n)
            self.live += n
            self.peak = max(self.peak, self.live)
        return out


def peak_memory_mb(fn: Callable[[], object], device: torch.device, existing=()) -> tuple:
    """(peak MB allocated during one call above what was allocated before it, method).

    CUDA: the caching allocator's statistics. CPU: the live storages the call creates,
    followed at the dispatcher (``existing``: tensors allocated before, not counted);
    None, with the reason as the method, for calls that cannot run under it.
    """
    if device.type == "cuda":
        synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20, "torch.cuda.max_memory_allocated"
    tracker = _LiveStorages(existing)
    try:
        with tracker:
            fn()
    except Exception as e:  # compiled code (higher-order ops) does not run under a dispatch mode
        return None, f"not measured: the call does not run under a dispatch mode ({type(e).__name__})"
    return tracker.peak / 2**20, "live tensor storages at the dispatcher (CPU)"
