"""P processes of a gloo group on this CPU, for the tests, with deadlines everywhere.

:class:`Ranks` starts P processes once (each joins a process group over a file store with a
collective timeout of ``collective_s`` seconds) and runs test functions on all of them:
``ranks.run(fn, *args)`` calls ``fn(rank, P, *args)`` on every rank and returns the P
results in rank order. A rank that raises reports ``Failed(type, message, traceback)`` in
its place; a process that dies reports ``Failed("ProcessExited", ...)``; a call past its
deadline kills the group and fails the test, so no test hangs. :func:`run` does the same on a fresh group, for tests that break
theirs on purpose, or leave the group to ``fn`` (as under torchrun). ``fn`` must be a
module-level function (the processes are spawned).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass

import pytest


@dataclass
class Failed:
    type: str
    message: str
    traceback: str


def _serve(rank, world, store, collective_s, env, tasks, results):
    os.environ.update(env)
    import torch
    import torch.distributed as dist
    import torch.distributed.nn  # noqa: F401  before the group, as divattn.train.distributed explains

    torch.set_num_threads(1)
    try:
        if store is None:  # as torchrun leaves it: the function joins the group itself
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                              LOCAL_WORLD_SIZE=str(world))
        else:
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=collective_s))
    except BaseException as e:
        results.put((rank, -1, Failed(type(e).__name__, str(e), traceback.format_exc())))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        number, fn, args = task
        try:
            out = fn(rank, world, *args)
        except BaseException as e:  # reported to the test, not swallowed
            out = Failed(type(e).__name__, str(e), traceback.format_exc())
        results.put((rank, number, out))
    if dist.is_initialized():
        dist.destroy_process_group()


class Ranks:
    """``world`` processes in one gloo group, kept for several calls of :meth:`run`."""

    def __init__(self, world: int, *, collective_s: float = 30.0, env=None, group: bool = True):
        self.world = world
        ctx = multiprocessing.get_context("spawn")
        self.tmp = tempfile.mkdtemp()
        store = os.path.join(self.tmp, "store") if group else None
        self.results = ctx.Queue()
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.procs = [ctx.Process(target=_serve, args=(r, world, store, collective_s,
                                                       dict(env or {}), self.tasks[r], self.results), daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.number = 0
        self.broken = False

    def run(self, fn, *args, deadline_s: float = 120.0) -> list:
        if self.broken:
            pytest.fail("the process group broke in an earlier call")
        self.number += 1
        for q in self.tasks:
            q.put((self.number, fn, args))
        out, deadline, gone = {}, time.monotonic() + deadline_s, {}
        while len(out) < self.world:
            try:
                rank, number, value = self.results.get(timeout=0.5)
            except queue.Empty:
                now = time.monotonic()
                for r, p in enumerate(self.procs):
                    if r not in out and p.exitcode is not None:
                        gone.setdefault(r, now)
                for r, t in gone.items():
                    if r not in out and now - t > 5.0:  # its result would have come by now
                        out[r] = Failed("ProcessExited", f"rank {r} died (exit code {self.procs[r].exitcode})", "")
                if now >= deadline:
                    self.close(kill=True)
                    pytest.fail(f"ranks {sorted(set(range(self.world)) - set(out))} gave no result in {deadline_s} s; "
                                f"results so far: {out}")
                continue
            if number == -1:  # could not join the group
                self.close(kill=True)
                pytest.fail(f"rank {rank} could not join the group: {value.message}")
            if number == self.number:
                out[rank] = value
        if any(isinstance(v, Failed) for v in out.values()):
            self.broken = True  # a rank may have left a collective half done
        return [out[r] for r in range(self.world)]

    def close(self, kill: bool = False) -> None:
        if not kill:
            for q in self.tasks:
                q.put(None)
        for p in self.procs:
            if kill:
                p.kill()
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
        self.broken = True
        shutil.rmtree(self.tmp, ignore_errors=True)


def run(fn, world: int, *args, deadline_s: float = 120.0, collective_s: float = 30.0, env=None,
        group: bool = True) -> list:
    """:meth:`Ranks.run` on processes of their own, closed afterwards; without ``group`` the
    processes get torchrun's environment (``RANK``, ``WORLD_SIZE``, ...) and no group."""
    ranks = Ranks(world, collective_s=collective_s, env=env, group=group)
    try:
        return ranks.run(fn, *args, deadline_s=deadline_s)
    finally:
        ranks.close(kill=ranks.broken)


def ok(results: list) -> list:
    """The results, failing the test if any rank raised: every rank's error in a line, and the
    traceback of the first that is not a collective waiting for it."""
    failed = [(r, v) for r, v in enumerate(results) if isinstance(v, Failed)]
    if failed:
        lines = [f"rank {r}: {v.type}: {v.message[:300]}" for r, v in failed]
        cause = next(((r, v) for r, v in failed if "Timed out" not in v.message and "Connection" not in v.message),
                     failed[0])
        pytest.fail("\n".join(lines) + f"\n--- rank {cause[0]}:\n{cause[1].traceback}")
    return results
