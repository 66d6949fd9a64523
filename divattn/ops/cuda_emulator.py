"""The CUDA backend's kernels compiled as host C++ and run on the CPU, for testing.

With ``DIVATTN_CUDA_EMULATE=1``, ``backend="cuda"`` runs on CPU tensors: the binding
(``divattn/csrc/bindings.cpp``, every input check) and the kernels (``divattn/csrc/*.cu``)
are compiled with the host compiler against ``divattn/csrc/emulator/``, a shim of the
CUDA built-ins the kernels use. Every CUDA thread of a block runs as a fiber; threads hand
over only at ``__syncthreads`` and the warp collectives (shuffles, ``ldmatrix``,
``mma.sync``), in alternating order, so a missing barrier shows; shared memory starts
as NaN; ``cp.async`` data lands only when its group is waited for; every global access is
checked against the tensors of the launch and can be counted (:func:`counting`). It is
a test of the kernels' logic, not of their speed or of the compiler: nothing here runs
on a GPU.

Two libraries are built (with ``$CXX``, default ``c++``; ``MAX_JOBS`` parallel compiles)
and cached under ``$DIVATTN_EMULATOR_CACHE`` (default ``~/.cache/divattn/emulator``),
keyed by the sources, flags, compiler and torch: the binding, a Python extension against
torch's headers (the slowest part, 20 to 40 s), and the kernel library, a plain shared library
(one cached object per source) loaded with ctypes, whose table of launchers the binding
calls through (:func:`kernel_library_path` builds one from any copy of ``csrc/``, so a
test can run changed kernels without rebuilding the binding).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

ENV = "DIVATTN_CUDA_EMULATE"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
# The kernels' flags: the code the emulator runs is the code nvcc compiles, built at -O2.
KERNEL_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-DDIVATTN_EMULATE", "-Wall", "-Wextra",
                "-Wno-unknown-pragmas", "-Wno-unused-parameter")

_lock = threading.Lock()


def enabled() -> bool:
    """True when ``DIVATTN_CUDA_EMULATE=1``: the cuda backend runs emulated on CPU tensors."""
    return os.environ.get(ENV, "0") == "1"


def compiler() -> Optional[str]:
    """The host C++ compiler: ``$CXX``, else ``c++``, ``g++`` or ``clang++`` on PATH."""
    cxx = os.environ.get("CXX")
    if cxx:
        return shutil.which(cxx) or (cxx if os.path.exists(cxx) else None)
    return next((p for p in map(shutil.which, ("c++", "g++", "clang++")) if p), None)


def unavailable_reason() -> Optional[str]:
    """Why the emulator cannot be built here, in one sentence, or None (never builds)."""
    if sys.platform != "linux":
        return f"the CUDA emulator runs on Linux only (this is {sys.platform})"
    if compiler() is None:
        return "no C++ compiler found for the CUDA emulator (set CXX)"
    if not (CSRC / "emulator" / "runtime.cpp").exists():
        return "this install has no csrc/emulator/ sources"
    return None


def cache_root() -> Path:
    root = os.environ.get("DIVATTN_EMULATOR_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "divattn" / "emulator"


@functools.lru_cache(maxsize=None)
def _compiler_id(cxx: str) -> str:
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0] if out else cxx


def _digest(parts: Sequence, files: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _headers(csrc: Path) -> list:
    return sorted([*csrc.glob("*.h"), *csrc.glob("*.cuh"), *(csrc / "emulator").glob("*.h")])


def _run(cmd: list, what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"divattn emulator: compiling {what} failed:\n{' '.join(cmd)}\n{proc.stderr[-6000:]}")


def _jobs() -> int:
    try:
        return max(1, int(os.environ.get("MAX_JOBS", "")))
    except ValueError:
        return max(1, os.cpu_count() or 1)


def _produce(out: Path, make) -> Path:
    """``make(tmp)`` writes a file at ``tmp``, which becomes ``out`` in one rename (a
    concurrent builder of the same file just wins or loses the race)."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", dir=out.parent)
    os.close(fd)
    try:
        make(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def library_path(sources: Sequence[Path], include: Path = CSRC, *, defines: Sequence[str] = (),
                 name: str = "divattn_emu") -> Path:
    """Build (or find in the cache) a shared library of ``sources`` compiled as C++ for the
    emulator against the headers of ``include`` (a ``csrc/`` folder). Each object file is
    cached by its source, every header of ``include``, the flags and the compiler, so
    changing one source recompiles only that one."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError(unavailable_reason())
    include = Path(include).resolve()
    flags = [*KERNEL_FLAGS, *(f"-D{d}" for d in defines), f"-I{include}"]
    common = _digest(["object", _compiler_id(cxx), flags], _headers(include))

    def obj(src: Path) -> Path:
        src = Path(src).resolve()
        out = cache_root() / "objects" / f"{src.stem}-{_digest([common], [src])}.o"
        return _produce(out, lambda tmp: _run([cxx, "-c", "-x", "c++", str(src), "-o", tmp, *flags], src.name))

    with ThreadPoolExecutor(max_workers=_jobs()) as pool:
        objects = list(pool.map(obj, sources))
    key = hashlib.sha256(" ".join(o.name for o in objects).encode()).hexdigest()[:16]
    out = cache_root() / "libs" / f"lib{name}-{key}.so"
    return _produce(out, lambda tmp: _run([cxx, "-shared", "-o", tmp, *map(str, objects)], out.name))


def kernel_library_path(csrc: Path = CSRC, *, defines: Sequence[str] = ()) -> Path:
    """The kernel library of ``csrc`` (any copy of ``divattn/csrc/``): every ``*.cu`` there,
    compiled as C++, with the emulator's runtime and table. ``defines``: extra ``-D`` flags."""
    csrc = Path(csrc).resolve()
    sources = sorted(csrc.glob("*.cu")) + [csrc / "emulator" / "runtime.cpp", csrc / "emulator" / "table.cpp"]
    return library_path(sources, csrc, defines=defines)


def _binding_path(csrc: Path = CSRC) -> tuple:
    """Build (or find) the emulated binding; returns (path, module name)."""
    import torch
    from torch.utils import cpp_extension as ce

    csrc = Path(csrc).resolve()
    cxx = compiler()
    includes = [*ce.include_paths(), sysconfig.get_paths()["include"], str(csrc)]
    std = "-std=c++20" if _needs_cxx20() else "-std=c++17"  # what torch builds extensions with
    flags = [std, "-O1", "-fPIC", "-DDIVATTN_EMULATE", "-DDIVATTN_ARCHS=emulated", "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-Wno-unknown-pragmas",
             *(f"-I{p}" for p in includes)]
    headers = [csrc / "divattn.h", *(csrc / "emulator" / h for h in ("binding.h", "table.h", "runtime_api.h"))]
    key = _digest(["binding", _compiler_id(cxx), torch.__version__, sys.version_info[:2], flags],
                  [csrc / "bindings.cpp", *headers])
    name = f"divattn_emu_C_{key}"
    lib = Path(ce.library_paths()[0])
    out = cache_root() / "bindings" / (name + importlib.machinery.EXTENSION_SUFFIXES[0])

    def make(tmp):
        obj = tmp + ".o"
        try:
            _run([cxx, "-c", str(csrc / "bindings.cpp"), "-o", obj, f"-DTORCH_EXTENSION_NAME={name}", *flags],
                 "bindings.cpp")
            _run([cxx, "-shared", "-o", tmp, obj, f"-L{lib}", "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python",
                  f"-Wl,-rpath,{lib}"], out.name)
        finally:
            if os.path.exists(obj):
                os.unlink(obj)

    return _produce(out, make), name


def _needs_cxx20() -> bool:
    import inspect

    from torch.utils import cpp_extension as ce

    return "-std=c++20" in inspect.getsource(ce)


class KernelLibrary:
    """A loaded kernel library: its table for the binding, and the emulator's counters."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path), mode=os.RTLD_LOCAL)
        self.lib.divattn_emu_kernels.restype = ctypes.c_void_p
        self.lib.divattn_emu_records.restype = ctypes.c_char_p
        self.lib.divattn_emu_counting.argtypes = [ctypes.c_int]
        self.lib.divattn_emu_context_switch.restype = ctypes.c_char_p
        self.table = self.lib.divattn_emu_kernels()

    def set_counting(self, on: bool) -> None:
        self.lib.divattn_emu_counting(int(on))

    def records(self) -> list:
        """The launches since counting was switched on (or since the last call)."""
        return json.loads(self.lib.divattn_emu_records().decode())

    @property
    def context_switch(self) -> str:
        return self.lib.divattn_emu_context_switch().decode()


_state: dict = {}


def binding():
    """The emulated binding module, launching through the default kernel library."""
    with _lock:
        if "binding" not in _state:
            why = unavailable_reason()
            if why is not None:
                raise RuntimeError(f"divattn: {why}")
            path, name = _binding_path()
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            kernels = KernelLibrary(kernel_library_path())
            module.set_kernels(kernels.table)
            _state.update(binding=module, kernels=kernels, default=kernels)
        return _state["binding"]


def kernels() -> KernelLibrary:
    """The kernel library the binding launches through now."""
    binding()
    return _state["kernels"]


@contextlib.contextmanager
def using(library: KernelLibrary):
    """Launch through ``library`` (e.g. built from changed sources) inside the block."""
    module = binding()
    old = _state["kernels"]
    module.set_kernels(library.table)
    _state["kernels"] = library
    try:
        yield library
    finally:
        module.set_kernels(old.table)
        _state["kernels"] = old


@contextlib.contextmanager
def counting():
    """Record every launch inside the block; yields a list filled with the records on exit.

    Each record: ``kernel``, ``grid``, ``block``, ``smem``, ``blocks``; ``load_sectors`` /
    ``store_sectors``: the distinct 32-byte sectors each block read / wrote, summed over
    blocks (``unique_*``: distinct over the launch); ``ldmatrix`` (8x8 matrices loaded) and
    ``ldmatrix_wavefronts`` (shared-memory wavefronts they took: equal when there is no
    bank conflict), ``mma``, ``cp_async`` and ``barriers`` (per launch, all blocks).
    """
    lib = kernels()
    out: list = []
    lib.set_counting(True)
    try:
        yield out
    finally:
        out.extend(lib.records())
        lib.set_counting(False)


__all__ = ["ENV", "CSRC", "enabled", "compiler", "unavailable_reason", "cache_root", "library_path",
           "kernel_library_path",
           "KernelLibrary", "binding", "kernels", "using", "counting"]
