"""Compile the planned launches ahead of time for sm_80 / sm_90 and read their resources.

No GPU is needed: Triton's own compiler builds the cubin for a
``GPUTarget("cuda", sm, 32)``, and the ``cuobjdump`` Triton ships reads it back.
A launch is compiled with exactly the specialisation the JIT launcher would give it
on that GPU: Triton's own argument binder is run on the launch's arguments (the same
``specialize_impl`` that decides ``i32``/``i64``, integers equal to 1, and
divisibility by 16 of integers and pointers; a tensor on the ``meta`` device has the
address of its offset, as an aligned allocation would), so what is compiled is what a
launch would compile.

Per build: registers per thread, stack bytes (spills and local arrays) and the local
load/store instructions in the SASS, static and dynamic shared memory, resident
blocks per SM (from registers x threads, shared memory and the arch's limits) and the
tensor-core instructions (``HMMA`` / ``HGMMA``) in the SASS.

The kernels must be compiled in a process that imported Triton without
``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit`` functions at import);
:func:`report` starts one when it has to.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from .problems import ARCHS, Problem, interpreting, launches


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM limits used for resident blocks (CUDA occupancy calculator values)."""

    regs: int
    smem: int
    smem_per_block: int
    blocks: int
    threads: int
    reg_unit: int = 256  # registers are allocated per warp in units of 256
    smem_unit: int = 128
    smem_reserved: int = 1024  # the driver reserves 1 KB of shared memory per block


LIMITS = {
    80: ArchLimits(regs=65536, smem=164 * 1024, smem_per_block=163 * 1024, blocks=32, threads=2048),
    90: ArchLimits(regs=65536, smem=228 * 1024, smem_per_block=227 * 1024, blocks=32, threads=2048),
}


def resident_blocks(arch: int, regs: int, threads: int, smem: int) -> int:
    """Blocks of ``threads`` threads using ``regs`` registers each and ``smem`` bytes that fit on one SM."""
    lim = LIMITS[arch]
    warps = -(-threads // 32)
    if smem > lim.smem_per_block or warps * 32 > 1024:
        return 0
    by_threads = lim.threads // (warps * 32)
    regs_per_warp = -(-max(regs, 1) * 32 // lim.reg_unit) * lim.reg_unit
    by_regs = (lim.regs // regs_per_warp) // warps
    per_block = -(-(smem + lim.smem_reserved) // lim.smem_unit) * lim.smem_unit
    by_smem = lim.smem // per_block
    return max(0, min(lim.blocks, by_threads, by_regs, by_smem))


@dataclass
class Build:
    """One compiled code path and what it uses; ``problems`` lists the problems that launch it.

    ``stack_bytes``: the cubin's stack frame plus local memory (spills, in Triton code);
    ``local_insts``: ``LDL``/``STL`` instructions in the SASS; ``shared_*``: bytes per
    block; ``tensor_core_insts``: ``HMMA``/``HGMMA`` instructions, ``mma`` their kinds.
    """

    kernel: str
    arch: int
    dtype: str
    constexprs: dict
    signature: str
    num_warps: int
    num_stages: int
    regime: str
    key: str
    problems: list = field(default_factory=list)
    head_dims: list = field(default_factory=list)
    specialisations: int = 1
    error: Optional[str] = None
    registers: Optional[int] = None
    stack_bytes: Optional[int] = None
    local_insts: Optional[int] = None
    shared_static: Optional[int] = None
    shared_dynamic: Optional[int] = None
    blocks_per_sm: Optional[int] = None
    tensor_core_insts: Optional[int] = None
    mma: Optional[str] = None
    seconds: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def _tool(name: str) -> str:
    import triton

    try:
        from triton import knobs

        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # older Triton: no knobs; look next to the package below
        pass
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(path):
        return path
    raise FileNotFoundError(f"{name} is not shipped with this Triton ({triton.__version__}) under {path}")


def _fn(kernel):
    return getattr(kernel, "fn", kernel)


def _check_compilable(kernel) -> None:
    from triton.runtime.jit import JITFunction

    if not isinstance(kernel, JITFunction):
        raise RuntimeError(
            f"{_fn(kernel).__name__} is a {type(kernel).__name__}, not a JITFunction: the kernels were imported "
            "with TRITON_INTERPRET=1; compile in a process without it (report() does)")


class _Specialiser:
    """What the JIT launcher would compile for a launch on one arch: (signature, constexprs, attrs, options)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self._binders: dict = {}

    def __call__(self, launch):
        from triton.runtime.jit import create_function_from_signature

        kernel = launch.kernel
        _check_compilable(kernel)
        binder = self._binders.get(id(kernel))
        if binder is None:
            binder = self._binders[id(kernel)] = create_function_from_signature(
                kernel.signature, kernel.params, self.backend)
        kw = {"num_warps": launch.num_warps, "num_stages": launch.num_stages}
        bound, spec, opts = binder(**launch.args, **launch.constexprs, **kw)
        return kernel._pack_args(self.backend, kw, bound, spec, opts)

    def keys(self, launch) -> tuple:
        """(path key, exact key, signature, attrs): launches with one exact key compile to one
        binary; with one path key they differ at most in the divisibility hints of their
        integer and pointer arguments."""
        options, signature, constexprs, attrs = self(launch)
        fn = _fn(launch.kernel)
        parts = [f"{fn.__module__}.{fn.__qualname__}", signature, sorted(map(repr, constexprs.items())),
                 launch.num_warps, launch.num_stages, self.target.arch]
        exact = parts + [sorted(map(repr, attrs.items()))]
        path_key, exact_key = (hashlib.sha1(json.dumps(p, sort_keys=True, default=repr).encode()).hexdigest()[:16]
                               for p in (parts, exact))
        return path_key, exact_key, signature, attrs


def _signature_text(signature: dict, attrs: dict) -> str:
    names = list(signature)
    out = []
    for i, (name, ty) in enumerate(signature.items()):
        if ty == "constexpr":
            continue
        tag = "/16" if any(a[0] == "tt.divisibility" for a in attrs.get((i,), [])) else ""
        out.append(f"{name}:{ty}{tag}")
    return ",".join(out) if names else ""


_REG = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_MMA = re.compile(r"\b(HGMMA|HMMA)(\.[A-Za-z0-9.]+)?")
_LOCAL = re.compile(r"\b(LDL|STL)(\.[A-Z0-9.]+)?\b")


def _resources(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True)
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    m = _REG.search(res.stdout)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{res.stdout}")
    regs, stack, shared, local = map(int, m.groups())
    mma = _MMA.findall(sass)
    kinds = sorted({a for a, _ in mma})
    return {"registers": regs, "stack_bytes": stack + local, "shared_static": shared,
            "local_insts": len(_LOCAL.findall(sass)), "tensor_core_insts": len(mma), "mma": "+".join(kinds) or None}


def compile_launch(launch, arch: int, spec: Optional[_Specialiser] = None) -> dict:
    """Compile one launch for ``sm_<arch>``; returns the :class:`Build` resource fields."""
    import triton
    from triton.compiler import ASTSource

    spec = spec or _Specialiser(arch)
    options, signature, constexprs, attrs = spec(launch)
    start = time.perf_counter()
    opts = options.__dict__ if hasattr(options, "__dict__") else dict(options)
    compiled = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=spec.target,
                              options=opts)
    out = _resources(compiled.asm["cubin"])
    out["shared_dynamic"] = int(compiled.metadata.shared)
    threads = launch.num_warps * 32
    out["blocks_per_sm"] = resident_blocks(arch, out["registers"], threads,
                                           out["shared_dynamic"] + out["shared_static"])
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def _hints(attrs: dict) -> int:
    return sum(1 for a in attrs.values() for x in a if x and x[0] == "tt.divisibility")


def collect(problems: Sequence[Problem], archs: Sequence[int] = ARCHS, exact: bool = False) -> tuple:
    """Plan every problem on every arch and group the launches by what they compile.

    Launches group by kernel, argument types, constexprs, warps, stages and arch; with
    ``exact`` also by the divisibility hints (one group per binary the JIT would build).
    Without it each group is compiled once, for the member with the fewest hints: the
    most general code of that path. ``Build.specialisations`` counts the exact ones.

    Returns ``(builds, jobs)``: the :class:`Build` records (not compiled yet) and, per
    key, the ``(problem, arch, index)`` that re-creates the launch to compile.
    """
    builds: dict = {}
    jobs: dict = {}
    exacts: dict = {}
    for arch in archs:
        spec = _Specialiser(arch)
        for problem in problems:
            try:
                planned = launches(problem, target=arch)
            except Exception as e:  # a plan that cannot be made is a failed build of that problem
                key = f"plan-{arch}-{problem.id}"
                builds[key] = Build(kernel="(plan)", arch=arch, dtype=problem.dtype, constexprs={}, signature="",
                                    num_warps=0, num_stages=0, regime="", key=key, problems=[problem.id],
                                    head_dims=[problem.shape.D], error=f"planning failed: {type(e).__name__}: {e}")
                continue
            for i, launch in enumerate(planned):
                path_key, exact_key, signature, attrs = spec.keys(launch)
                key = exact_key if exact else path_key
                exacts.setdefault(key, set()).add(exact_key)
                b = builds.get(key)
                if b is None or _hints(attrs) < b._hints:
                    first = b is None
                    b = builds[key] = Build(
                        kernel=launch.name, arch=arch, dtype=problem.dtype,
                        constexprs={k: v if isinstance(v, (bool, int, float, str)) else repr(v)
                                    for k, v in launch.constexprs.items()},
                        signature=_signature_text(signature, attrs), num_warps=launch.num_warps,
                        num_stages=launch.num_stages, regime=launch.regime, key=key,
                        problems=[] if first else b.problems, head_dims=[] if first else b.head_dims)
                    b._hints = _hints(attrs)
                    jobs[key] = (problem, arch, i)
                b.problems.append(problem.id)
                if problem.shape.D not in b.head_dims:
                    b.head_dims.append(problem.shape.D)
    for key, b in builds.items():
        b.specialisations = len(exacts.get(key, ()))
    return list(builds.values()), jobs


def _compile_job(job) -> dict:
    problem, arch, index = job
    try:
        launch = launches(problem, target=arch)[index]
        return compile_launch(launch, arch)
    except Exception as e:  # a compile error is a result: reported per build, asserted by the tests
        msg = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: " + (msg[-1] if msg else "")[:2000]}


def _child_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _in_children(payloads: Sequence[dict]) -> list:
    """Run ``python -m divattn.kernels_report.build`` once per payload, concurrently; their JSON answers."""
    import threading

    procs = [subprocess.Popen([sys.executable, "-m", "divattn.kernels_report.build"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
             for _ in payloads]
    outs: list = [None] * len(procs)

    def talk(i):
        outs[i] = procs[i].communicate(json.dumps(payloads[i]))

    threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(procs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    answers = []
    for proc, (stdout, stderr) in zip(procs, outs):
        if proc.returncode != 0:
            raise RuntimeError(f"the compile process failed (exit {proc.returncode}):\n{stderr[-4000:]}")
        answers.append(json.loads(stdout))
    return answers


def compile_all(problems: Sequence[Problem], archs: Sequence[int] = ARCHS, workers: int = 1,
                exact: bool = False) -> list:
    """Every distinct build of ``problems`` on ``archs``, compiled once each (this process must not
    interpret); ``workers`` > 1 compiles in that many child processes."""
    builds, jobs = collect(problems, archs, exact=exact)
    failed = [b for b in builds if b.key not in jobs]
    builds = [b for b in builds if b.key in jobs]
    todo = [jobs[b.key] for b in builds]
    if workers > 1 and len(todo) > 1:
        chunks = [list(range(i, len(todo), workers)) for i in range(min(workers, len(todo)))]
        answers = _in_children([{"jobs": [[todo[j][0].to_dict(), todo[j][1], todo[j][2]] for j in chunk]}
                                for chunk in chunks])
        results: list = [None] * len(todo)
        for chunk, answer in zip(chunks, answers):
            for j, r in zip(chunk, answer):
                results[j] = r
    else:
        results = [_compile_job(j) for j in todo]
    for b, r in zip(builds, results):
        for k, v in r.items():
            setattr(b, k, v)
    return failed + builds


def report(*, shapes: Optional[Sequence[str]] = None, head_dims=None, orders=None, dtypes=None, passes=None,
           archs: Sequence[int] = ARCHS, workers: int = 1, exact: bool = False) -> list:
    """:func:`compile_all` over the named GPU shapes (or those named), as dicts.

    Runs in a child process without ``TRITON_INTERPRET`` when this one interprets.
    """
    spec = {"shapes": shapes, "head_dims": head_dims, "orders": orders, "dtypes": dtypes, "passes": passes,
            "archs": list(archs), "workers": workers, "exact": exact}
    if os.environ.get("TRITON_INTERPRET") == "1" or interpreting():
        return _in_children([spec])[0]
    return [b.as_dict() for b in _run(spec)]


def _run(spec: dict) -> list:
    from ..shapes import GPU_SHAPES
    from .problems import DTYPES, HEAD_DIMS, ORDERS, PASSES, problems, variants

    names = spec.get("shapes") or list(GPU_SHAPES)
    unknown = [n for n in names if n not in GPU_SHAPES]
    if unknown:
        raise ValueError(f"unknown GPU shape(s) {', '.join(unknown)}; named shapes: {', '.join(GPU_SHAPES)}")
    shapes = [v for n in names for v in variants(GPU_SHAPES[n], spec.get("head_dims") or HEAD_DIMS,
                                                 spec.get("orders") or ORDERS)]
    probs = list(problems(shapes, passes=spec.get("passes") or PASSES, dtypes=spec.get("dtypes") or tuple(DTYPES)))
    return compile_all(probs, spec.get("archs") or ARCHS, workers=int(spec.get("workers") or 1),
                       exact=bool(spec.get("exact")))


def _main() -> None:
    spec = json.loads(sys.stdin.read())
    if "jobs" in spec:
        out = [_compile_job((Problem.from_dict(p), arch, i)) for p, arch, i in spec["jobs"]]
    else:
        out = [b.as_dict() for b in _run(spec)]
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    _main()
