"""Global-memory traffic of the planned launches, counted under the Triton interpreter.

Under ``TRITON_INTERPRET=1`` every load and store of a program passes through
``InterpreterBuilder.create_masked_load`` / ``create_masked_store`` (plain, block
pointer and descriptor loads and stores are built on them; atomics are hooked too)
with the element addresses, the mask, and ``grid_idx`` saying which program runs.
The counter records, per program, the set of 32-byte sectors (``address // 32``) of
the elements it loads and of those it stores, mask applied. A launch's traffic is
the number of distinct sectors of each program, summed over programs: a GPU program
that reads a sector twice usually hits its L1 or registers, two programs reading it
each pay for it. The distinct sectors of the whole launch (what an ideal L2 would
fetch) are reported beside it, and so are the FLOPs of the launch's ``tl.dot`` products
(``create_dot``: 2 M N K each), the tensor-core work it does.

The minimum a pass can move (:func:`divattn.flops.attention_bytes`): forward, read
q, k, v once and write o once; backward, read q, k, v, o, do once and write dq, dk,
dv once; with the cls token its q/k/v (and o_cls, do_cls; their gradients) each once
too. The fp32 statistics the kernels save and read back (log-sum-exp, the per-frame
cls outputs) are not in the minimum but are counted in the traffic, so a ratio of
1.0 is only reached by a pass that moves nothing else.

Counting runs the kernels, so the tensors must be CPU tensors in a process that
imported Triton with ``TRITON_INTERPRET=1``; :func:`measure` starts one when needed.
The launches can be planned for a GPU target (``target=90``: the H100's tiles), which
the interpreter runs as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

SECTOR = 32
# H100 SXM: HBM3 bandwidth and dense bf16/fp16 tensor-core peak (the modelled time).
H100_BYTES_PER_S = 3.35e12
H100_FLOPS_PER_S = 989e12


@dataclass
class LaunchTraffic:
    """Sectors one launch moves: per-program distinct (summed) and distinct over the launch."""

    kernel: str
    regime: str
    grid: tuple
    programs: int = 0
    load_sectors: int = 0
    store_sectors: int = 0
    unique_load_sectors: int = 0
    unique_store_sectors: int = 0
    dot_flops: int = 0

    @property
    def bytes(self) -> int:
        return (self.load_sectors + self.store_sectors) * SECTOR

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "bytes": self.bytes}


class _Recorder:
    def __init__(self):
        self.loads: dict = {}
        self.stores: dict = {}
        self.dot_flops = 0

    @staticmethod
    def _sectors(ptrs, mask) -> np.ndarray:
        addr = np.asarray(ptrs.data)
        if mask is None:
            sel = addr.reshape(-1)
        else:
            m = np.broadcast_to(np.asarray(mask.data, dtype=bool), addr.shape)
            sel = addr[m]
        return np.unique(sel.astype(np.uint64) // np.uint64(SECTOR))

    def record(self, book: dict, builder, ptrs, mask) -> None:
        idx = tuple(builder.grid_idx) if builder.grid_idx is not None else (0, 0, 0)
        book.setdefault(idx, []).append(self._sectors(ptrs, mask))

    def result(self, launch) -> LaunchTraffic:
        out = LaunchTraffic(kernel=launch.name, regime=launch.regime, grid=tuple(launch.grid))
        programs = set(self.loads) | set(self.stores)
        out.programs = len(programs)
        out.dot_flops = self.dot_flops
        all_loads, all_stores = [], []
        for idx in programs:
            if idx in self.loads:
                u = np.unique(np.concatenate(self.loads[idx]))
                out.load_sectors += int(u.size)
                all_loads.append(u)
            if idx in self.stores:
                u = np.unique(np.concatenate(self.stores[idx]))
                out.store_sectors += int(u.size)
                all_stores.append(u)
        out.unique_load_sectors = int(np.unique(np.concatenate(all_loads)).size) if all_loads else 0
        out.unique_store_sectors = int(np.unique(np.concatenate(all_stores)).size) if all_stores else 0
        return out


def _arg(args, kwargs, i, name):
    return args[i] if len(args) > i else kwargs.get(name)


@contextlib.contextmanager
def recording():
    """Hook the interpreter's memory ops; yields the recorder (reset per launch by :func:`count_launch`)."""
    from triton.runtime import interpreter

    cls = interpreter.InterpreterBuilder
    rec = _Recorder()
    saved = {}

    def hook(name, book, ptr_at, mask_at):
        orig = getattr(cls, name)
        saved[name] = orig

        def wrapper(self, *args, **kwargs):
            ptrs = _arg(args, kwargs, ptr_at[0], ptr_at[1])
            mask = _arg(args, kwargs, mask_at[0], mask_at[1]) if mask_at else None
            for b in book:
                rec.record(getattr(rec, b), self, ptrs, mask)
            return orig(self, *args, **kwargs)

        setattr(cls, name, wrapper)

    hook("create_masked_load", ("loads",), (0, "ptrs"), (1, "mask"))
    hook("create_masked_store", ("stores",), (0, "ptrs"), (2, "mask"))
    if hasattr(cls, "create_atomic_rmw"):
        hook("create_atomic_rmw", ("loads", "stores"), (1, "ptr"), (3, "mask"))
    if hasattr(cls, "create_atomic_cas"):
        hook("create_atomic_cas", ("loads", "stores"), (0, "ptr"), None)
    saved["create_dot"] = dot = cls.create_dot

    def counted_dot(self, a, b, *args, **kwargs):
        m, k = np.shape(a.data)[-2:]
        rec.dot_flops += 2 * m * k * np.shape(b.data)[-1] * int(np.prod(np.shape(a.data)[:-2], dtype=np.int64))
        return dot(self, a, b, *args, **kwargs)

    cls.create_dot = counted_dot
    try:
        yield rec
    finally:
        for name, orig in saved.items():
            setattr(cls, name, orig)


def _check_interpreted(launch) -> None:
    from triton.runtime.jit import JITFunction

    if isinstance(launch.kernel, JITFunction):
        raise RuntimeError(f"{launch.name} is a compiled JITFunction: counting traffic needs the kernels imported "
                           "with TRITON_INTERPRET=1 (measure() starts such a process)")


def count_launch(launch) -> LaunchTraffic:
    """Run one launch under the interpreter and count its sectors."""
    _check_interpreted(launch)
    with recording() as rec:
        launch.run()
    return rec.result(launch)


def count(launch_list: Sequence) -> list:
    """:func:`count_launch` for each launch, in order (later launches read what earlier ones wrote)."""
    return [count_launch(launch) for launch in launch_list]


@dataclass
class PassTraffic:
    """The traffic of one problem's pass against its minimum, and the modelled H100 time."""

    problem: str
    op: str
    pass_: str
    dtype: str
    q_shape: tuple
    target: object
    launches: list = field(default_factory=list)
    min_bytes: int = 0
    flops: int = 0

    @property
    def bytes(self) -> int:
        return sum(t.bytes for t in self.launches)

    @property
    def load_bytes(self) -> int:
        return sum(t.load_sectors for t in self.launches) * SECTOR

    @property
    def store_bytes(self) -> int:
        return sum(t.store_sectors for t in self.launches) * SECTOR

    @property
    def unique_bytes(self) -> int:
        return sum(t.unique_load_sectors + t.unique_store_sectors for t in self.launches) * SECTOR

    @property
    def ratio(self) -> float:
        return self.bytes / self.min_bytes if self.min_bytes else float("nan")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["launches"] = [t.as_dict() for t in self.launches]
        d.update(bytes=self.bytes, load_bytes=self.load_bytes, store_bytes=self.store_bytes,
                 unique_bytes=self.unique_bytes, ratio=self.ratio)
        return d


def minimum_bytes(problem) -> int:
    from ..flops import attention_bytes
    from .problems import DTYPES

    itemsize = DTYPES[problem.dtype].itemsize
    return attention_bytes(problem.op, problem.q_shape, itemsize, problem.pass_)


def modelled_ms(nbytes: float, flops: float) -> float:
    """H100 time of a pass that moves ``nbytes`` and does ``flops``: the larger of the two limits."""
    return max(nbytes / H100_BYTES_PER_S, flops / H100_FLOPS_PER_S) * 1e3


def count_problem(problem, target=90) -> PassTraffic:
    """Plan ``problem`` on CPU tensors for ``target`` and count every launch of its pass.

    For ``bwd`` the forward runs first (uncounted) so the backward reads real statistics.
    """
    from ..flops import attention_flops
    from .problems import launches

    plan = launches(problem, target=target, device="cpu")
    return PassTraffic(problem=problem.id, op=problem.op, pass_=problem.pass_, dtype=problem.dtype,
                       q_shape=tuple(problem.q_shape), target=target, launches=count(plan),
                       min_bytes=minimum_bytes(problem),
                       flops=attention_flops(problem.op, problem.q_shape, problem.pass_,
                                             **({"causal": True} if problem.causal else {})))


def measure(problems: Sequence, target=90) -> list:
    """:func:`count_problem` for each problem, as dicts; in a child process with
    ``TRITON_INTERPRET=1`` unless this process already interprets."""
    from .problems import interpreting

    if os.environ.get("TRITON_INTERPRET") == "1" and interpreting():
        return [count_problem(p, target).as_dict() for p in problems]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    payload = json.dumps({"target": target, "problems": [p.to_dict() for p in problems]})
    proc = subprocess.run([sys.executable, "-m", "divattn.kernels_report.traffic"], input=payload,
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"the traffic process failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


def _main() -> None:
    spec = json.loads(sys.stdin.read())
    from .problems import Problem

    out = [count_problem(Problem.from_dict(p), spec["target"]).as_dict() for p in spec["problems"]]
    json.dump(out, sys.stdout)


__all__ = ["LaunchTraffic", "PassTraffic", "recording", "count", "count_launch", "count_problem", "measure",
           "minimum_bytes", "modelled_ms", "H100_BYTES_PER_S", "H100_FLOPS_PER_S", "SECTOR"]


if __name__ == "__main__":
    _main()
