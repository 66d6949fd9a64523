"""Compile the planned launches ahead of time for sm_80 / sm_90 and read their resources.

No GPU is needed: Triton's own compiler builds the cubin for a
``GPUTarget("cuda", sm, 32)``, and the ``cuobjdump`` Triton ships reads it back.
A launch is compiled with exactly the specialisation the JIT launcher would give it
on that GPU: Triton's own argument binder is run on the launch's arguments (the same
``specialize_impl`` that decides ``i32``/``i64``, integers equal to 1, and
divisibility by 16 of integers and pointers; a tensor on the ``meta`` device has the
address of its offset, as an aligned allocation would), so what is compiled is what a
launch would compile.

Per build: registers per thread and stack bytes (spills and local arrays) from
``cuobjdump -res-usage``, static and dynamic shared memory, resident blocks per SM
(from registers x threads, shared memory and the arch's limits) and the tensor-core
instructions: the PTX's ``mma.sync`` (``HMMA`` in the SASS) and ``wgmma.mma_async``
(``HGMMA``), one SASS instruction each. Only a build with stack bytes is disassembled
(``cuobjdump -sass``, about half a second a build), to count its local loads/stores.

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

from .problems import ARCHS, Problem, interpreting, plans


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
    block; ``tensor_core_insts``: ``HMMA``/``HGMMA`` instructions, ``mma`` their kinds;
    ``key``: the build's group (one binary, or one code path when collected without ``exact``);
    ``binary``: the key of the binary compiled for it (the cache's and the record's key);
    ``tiles``: the tile-table rows its launches' tiles came from (several where rows of
    different head-dim buckets give one binary; empty for the epilogues);
    ``max_registers``: the register cap per thread the row gives ptxas (``None``: ptxas picks);
    ``cached``: where the resources were read instead of compiled in this run ("record" or
    "cache"; ``None``: compiled).
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
    max_registers: Optional[int] = None
    binary: Optional[str] = None
    tiles: list = field(default_factory=list)
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
    cached: Optional[str] = None

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


def _portable(opts: dict) -> dict:
    """The compile options without where this Triton is installed: ``extern_libs`` names each
    library (libdevice) by file name, not by its path in one environment, so that a binary
    key is the same in every checkout and virtual environment (the record is read in CI)."""
    libs = opts.get("extern_libs")
    if not libs:
        return opts
    return {**opts, "extern_libs": tuple((name, os.path.basename(path)) for name, path in libs)}


class _Specialiser:
    """What the JIT launcher would compile for a launch on one arch: (signature, constexprs, attrs, options)."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.target = GPUTarget("cuda", arch, 32)
        self.backend = make_backend(self.target)
        self._binders: dict = {}
        self._keys: dict = {}

    def _bind(self, launch) -> tuple:
        """(kernel's specialisation of the launch: a hashable tuple, what ``_pack_args`` takes)."""
        from triton.runtime.jit import create_function_from_signature

        kernel = launch.kernel
        _check_compilable(kernel)
        binder = self._binders.get(id(kernel))
        if binder is None:
            binder = self._binders[id(kernel)] = create_function_from_signature(
                kernel.signature, kernel.params, self.backend)
        kw = launch.options
        bound, spec, opts = binder(**launch.args, **launch.constexprs, **kw)
        # the argument types, divisibility hints and constexpr values, and the options: all
        # that _pack_args reads of the launch
        return (id(kernel), tuple(sorted(kw.items())), tuple(spec)), (kw, bound, spec, opts)

    def __call__(self, launch):
        _, (kw, bound, spec, opts) = self._bind(launch)
        return launch.kernel._pack_args(self.backend, kw, bound, spec, opts)

    def keys(self, launch) -> tuple:
        """(path key, exact key, signature, attrs): launches with one exact key compile to one
        binary (the key of the on-disk cache); with one path key they differ at most in the
        divisibility hints of their integer and pointer arguments. Memoised on the launch's
        specialisation (most launches of a sweep share one with another)."""
        import triton

        memo, (kw, bound, spec, opts) = self._bind(launch)
        known = self._keys.get(memo)
        if known is not None:
            return known
        options, signature, constexprs, attrs = launch.kernel._pack_args(self.backend, kw, bound, spec, opts)
        fn = _fn(launch.kernel)
        opts = _portable(options.__dict__ if hasattr(options, "__dict__") else dict(options))
        # the kernel's source (with the jit functions it calls), the compiler and its options: what
        # decides the binary besides the arguments
        parts = [f"{fn.__module__}.{fn.__qualname__}", launch.kernel.cache_key, triton.__version__,
                 sorted(map(repr, opts.items())), signature, sorted(map(repr, constexprs.items())),
                 launch.num_warps, launch.num_stages, self.target.arch]
        exact = parts + [sorted(map(repr, attrs.items()))]
        path_key, exact_key = (hashlib.sha1(json.dumps(p, sort_keys=True, default=repr).encode()).hexdigest()[:16]
                               for p in (parts, exact))
        known = self._keys[memo] = (path_key, exact_key, signature, attrs)
        return known


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
# PTX tensor-core instructions and the SASS instruction each becomes
_MMA = {"mma.sync": "HMMA", "wgmma.mma_async": "HGMMA"}
_PTX_MMA = re.compile(r"^\s*(?:@!?%p\d+\s+)?(mma\.sync|wgmma\.mma_async)\b", re.M)
_LOCAL = re.compile(r"\b(LDL|STL)(\.[A-Z0-9.]+)?\b")


def _cuobjdump(flag: str, cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([_tool("cuobjdump"), flag, path], capture_output=True, text=True, check=True).stdout


def _resources(cubin: bytes, ptx: str) -> dict:
    res = _cuobjdump("-res-usage", cubin)
    m = _REG.search(res)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{res}")
    regs, stack, shared, local = map(int, m.groups())
    # without stack or local memory there is nothing to load from or store to
    local_insts = len(_LOCAL.findall(_cuobjdump("-sass", cubin))) if stack or local else 0
    mma = _PTX_MMA.findall(ptx)
    kinds = sorted({_MMA[m] for m in mma})
    return {"registers": regs, "stack_bytes": stack + local, "shared_static": shared, "local_insts": local_insts,
            "tensor_core_insts": len(mma), "mma": "+".join(kinds) or None}


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
    out = _resources(compiled.asm["cubin"], compiled.asm["ptx"])
    out["shared_dynamic"] = int(compiled.metadata.shared)
    threads = launch.num_warps * 32
    out["blocks_per_sm"] = resident_blocks(arch, out["registers"], threads,
                                           out["shared_dynamic"] + out["shared_static"])
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def _hints(attrs: dict) -> int:
    return sum(1 for a in attrs.values() for x in a if x and x[0] == "tt.divisibility")


def collect(problems: Sequence[Problem], archs: Sequence[int] = ARCHS, exact: bool = True) -> tuple:
    """Plan every problem on every arch, with every tile candidate, and group the launches by
    what they compile.

    Launches group by kernel, argument types, constexprs, warps, stages and arch and, with
    ``exact``, the divisibility hints: one group per binary the JIT would build. Without
    it each group is compiled once, for the member with the fewest hints: the most
    general code of that path. ``Build.specialisations`` counts the binaries of a group.

    Returns ``(builds, jobs)``: the :class:`Build` records (not compiled yet) and, per
    key, the ``(problem, arch, candidate, index, binary key)`` that re-creates the launch.
    """
    jobs: dict = {}
    exacts: dict = {}
    specs = {arch: _Specialiser(arch) for arch in archs}
    by_arch: dict = {arch: {} for arch in archs}  # a key names its arch: the records come out arch by arch
    # problem by problem, its archs one after the other: what planning caches of the inputs
    # (functions._packing) serves both
    for problem in problems:
        for arch in archs:
            spec, builds = specs[arch], by_arch[arch]
            try:
                planned = plans(problem, target=arch)
            except Exception as e:  # a plan that cannot be made is a failed build of that problem
                key = f"plan-{arch}-{problem.id}"
                builds[key] = Build(kernel="(plan)", arch=arch, dtype=problem.dtype, constexprs={}, signature="",
                                    num_warps=0, num_stages=0, regime="", key=key, problems=[problem.id],
                                    head_dims=[problem.shape.D], error=f"planning failed: {type(e).__name__}: {e}")
                continue
            for c, plan in enumerate(planned):
                for i, launch in enumerate(plan):
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
                            num_stages=launch.num_stages, regime=launch.regime, key=key, max_registers=launch.max_registers,
                            tiles=[] if first else b.tiles, problems=[] if first else b.problems,
                            head_dims=[] if first else b.head_dims)
                        b._hints = _hints(attrs)
                        b.binary = exact_key
                        jobs[key] = (problem, arch, c, i, exact_key)
                    if launch.tile and launch.tile not in b.tiles:
                        b.tiles.append(launch.tile)
                    if problem.id not in b.problems[-1:]:
                        b.problems.append(problem.id)
                    if problem.shape.D not in b.head_dims:
                        b.head_dims.append(problem.shape.D)
    builds = [b for arch in archs for b in by_arch[arch].values()]
    for b in builds:
        b.specialisations = len(exacts.get(b.key, ()))
    return builds, jobs


def cache_dir() -> Optional[str]:
    """Where compiled builds' resources are kept, by binary key: ``DIVATTN_KERNEL_CACHE`` (a
    directory, or ``off``), else ``$XDG_CACHE_HOME/divattn/kernels`` (``~/.cache/...``)."""
    path = os.environ.get("DIVATTN_KERNEL_CACHE")
    if path is not None:
        return None if path.strip().lower() in ("", "0", "off", "none") else path
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "divattn", "kernels")


# Bumped when what is read from a binary changes: older cache entries are then not read.
RESOURCES_VERSION = 1


def _entry(cache: str, key: str) -> str:
    return os.path.join(cache, f"{key}-r{RESOURCES_VERSION}.json")


def _cached(cache: Optional[str], key: str) -> Optional[dict]:
    if cache is None:
        return None
    try:
        with open(_entry(cache, key), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _store(cache: Optional[str], key: str, result: dict) -> None:
    """Keep a successful compile's resources (written whole, then renamed: readers never see half)."""
    if cache is None or result.get("error"):
        return
    os.makedirs(cache, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(result, f)
    os.replace(tmp, _entry(cache, key))


def _compile_job(job, cache: Optional[str] = None) -> dict:
    problem, arch, candidate, index, key = job
    try:
        launch = plans(problem, target=arch)[candidate][index]
        result = compile_launch(launch, arch)
    except Exception as e:  # a compile error is a result: reported per build, asserted by the tests
        msg = str(e).strip().splitlines()
        return {"error": f"{type(e).__name__}: " + (msg[-1] if msg else "")[:2000]}
    _store(cache, key, result)
    return result


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


def _progress(done: int, total: int) -> None:
    if done == total or done % max(1, total // 20) == 0:
        print(f"divattn kernels: compiled {done} of {total}", file=sys.stderr, flush=True)


def _compile_in_workers(jobs: Sequence[tuple], workers: int, cache: Optional[str], progress=None) -> list:
    """Compile ``jobs`` in ``workers`` child processes, each taking the next job when it is done
    with one (``python -m divattn.kernels_report.build --serve``: a JSON line in, one out)."""
    import threading

    results: list = [None] * len(jobs)
    pending = iter(range(len(jobs)))
    lock = threading.Lock()
    errors: list = []
    count = [0]

    def serve():
        log = tempfile.TemporaryFile("w+")  # the child's stderr: a pipe nobody reads could fill and block it
        proc = subprocess.Popen([sys.executable, "-m", "divattn.kernels_report.build", "--serve"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=_child_env())
        try:
            while True:
                with lock:
                    j = next(pending, None)
                if j is None:
                    break
                problem, *rest = jobs[j]
                proc.stdin.write(json.dumps({"job": [problem.to_dict(), *rest], "cache": cache}) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                if not line:
                    proc.wait()
                    log.seek(0)
                    raise RuntimeError(f"a compile process failed (exit {proc.returncode}):\n{log.read()[-4000:]}")
                results[j] = json.loads(line)
                if progress is not None:
                    with lock:
                        count[0] += 1
                        progress(count[0], len(jobs))
        except Exception as e:  # re-raised in the caller's thread
            errors.append(e)
        finally:
            proc.stdin.close()
            proc.wait()
            log.close()

    threads = [threading.Thread(target=serve) for _ in range(min(workers, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# The checkout's record of every build the default report covers (`python -m divattn kernels
# --update-record` writes it): read instead of compiling, verified by recompiling a sample in CI.
RECORD = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                      "results", "kernels", "builds.json")
RECORD_FIELDS = ("registers", "stack_bytes", "shared_static", "shared_dynamic", "local_insts", "tensor_core_insts",
                 "mma", "blocks_per_sm")


def load_record(path: Optional[str]) -> dict:
    """The builds of a record written by :func:`write_record`, ``{binary key: resources}`` (empty
    when ``path`` is None or absent)."""
    if path is None or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    fields = data["fields"]
    return {key: dict(zip(fields, values)) for key, values in data["builds"].items()}


def record_meta(argv: Sequence[str], problems: int, archs: Sequence[int]) -> dict:
    """What a record says about how it was made: the command, Triton, the commit, the date."""
    import datetime
    import platform

    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except OSError:
        commit = None
    return {"command": "python -m divattn " + " ".join(argv), "triton": triton.__version__,
            "python": platform.python_version(), "commit": commit, "date": datetime.date.today().isoformat(),
            "archs": list(archs), "problems": problems}


def write_record(path: str, builds: Sequence[dict], meta: dict) -> None:
    """Keep every compiled build's resources by binary key, one line each, with ``meta`` (what
    made it). Builds that failed or were not compiled are left out."""
    rows = sorted((b["binary"], [b[f] for f in RECORD_FIELDS]) for b in builds
                  if not b.get("error") and b.get("registers") is not None)
    head = json.dumps({**meta, "fields": list(RECORD_FIELDS)}, indent=1)[:-2]
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head},\n \"builds\": {{\n{body}\n }}\n}}\n")


def compile_all(problems: Sequence[Problem], archs: Sequence[int] = ARCHS, workers: int = 1,
                exact: bool = True, cache: Optional[str] = None, record: Optional[str] = None,
                compile_missing: bool = True, only: Optional[Sequence[str]] = None, progress: bool = False) -> list:
    """Every distinct build of ``problems`` on ``archs``, compiled once each (this process must not
    interpret) unless ``record`` (a file of :func:`write_record`) or ``cache`` (a directory)
    holds its binary's resources (``Build.cached``: "record" or "cache"); ``workers`` > 1
    compiles in that many child processes, the backward kernels (the slow ones) first.
    ``compile_missing=False`` compiles nothing (a build found nowhere keeps ``registers=None``);
    ``only``: just the builds with these keys. ``progress``: say on stderr how far the compiles are."""
    builds, jobs = collect(problems, archs, exact=exact)
    if only is not None:
        builds = [b for b in builds if b.key in set(only)]
    recorded = load_record(record)
    todo = []
    for b in builds:
        if b.key not in jobs:  # its plan failed
            continue
        binary = b.binary
        hit, where = recorded.get(binary), "record"
        if hit is None:
            hit, where = _cached(cache, binary), "cache"
        if hit is None:
            todo.append(b)
        else:
            for k, v in hit.items():
                setattr(b, k, v)
            b.cached = where
    todo.sort(key=lambda b: ("bwd" not in b.kernel, b.kernel, b.arch))
    if not compile_missing:
        todo = []
    report_progress = _progress if progress else None
    if progress:
        print(f"divattn kernels: {len(problems)} problems on sm_{', sm_'.join(map(str, archs))}: {len(builds)} "
              f"builds, {len(builds) - len(todo)} from the record or the cache", file=sys.stderr, flush=True)
    if workers > 1 and len(todo) > 1:
        results = _compile_in_workers([jobs[b.key] for b in todo], workers, cache, report_progress)
    else:
        results = []
        for b in todo:
            results.append(_compile_job(jobs[b.key], cache))
            if report_progress is not None:
                report_progress(len(results), len(todo))
    for b, r in zip(todo, results):
        for k, v in r.items():
            setattr(b, k, v)
    return builds


def report(problems: Sequence[Problem], *, archs: Sequence[int] = ARCHS, workers: int = 1, exact: bool = True,
           cache: Optional[str] = "default", record: Optional[str] = None, compile_missing: bool = True,
           only: Optional[Sequence[str]] = None, progress: bool = False) -> list:
    """:func:`compile_all` over ``problems``, as dicts; ``cache="default"`` is :func:`cache_dir`.

    Runs in a child process without ``TRITON_INTERPRET`` when this one interprets.
    """
    spec = {"problems": [p.to_dict() for p in problems], "archs": list(archs), "workers": workers, "exact": exact,
            "cache": cache_dir() if cache == "default" else cache, "record": record,
            "compile_missing": compile_missing, "only": None if only is None else list(only), "progress": progress}
    if os.environ.get("TRITON_INTERPRET") == "1" or interpreting():
        return _in_children([spec])[0]
    return _run(spec)


def _run(spec: dict) -> list:
    probs = [Problem.from_dict(p) for p in spec["problems"]]
    return [b.as_dict() for b in compile_all(probs, spec["archs"], workers=int(spec["workers"]),
                                             exact=bool(spec["exact"]), cache=spec["cache"], record=spec["record"],
                                             compile_missing=bool(spec["compile_missing"]), only=spec["only"],
                                             progress=bool(spec.get("progress")))]


def _main() -> None:
    if sys.argv[1:] == ["--serve"]:
        answers, sys.stdout = sys.stdout, sys.stderr  # only answers on stdout
        for line in sys.stdin:
            msg = json.loads(line)
            problem, *rest = msg["job"]
            answers.write(json.dumps(_compile_job((Problem.from_dict(problem), *rest), msg["cache"])) + "\n")
            answers.flush()
        return
    json.dump(_run(json.loads(sys.stdin.read())), sys.stdout)


if __name__ == "__main__":
    _main()
