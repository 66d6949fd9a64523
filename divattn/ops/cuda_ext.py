"""The CUDA C++ backend (divattn/csrc/): where its extension comes from, its state, its launchers.

The extension is ``divattn._C`` when it was built ahead of time
(``DIVATTN_BUILD_CUDA=1 pip install --no-build-isolation -e .``). Otherwise the first
:func:`forward` or :func:`backward` builds it just in time from the sources installed
with the package (``divattn/csrc/``, package data, so a wheel has them too) with
``torch.utils.cpp_extension.load`` (ninja), cached in the torch extensions directory
(``TORCH_EXTENSIONS_DIR``), so later processes only load it. That needs a CUDA build
of torch, a visible GPU, nvcc and ninja; :func:`unavailable_reason` says in one sentence
which is missing, and never starts a build.

Environment of the just-in-time build: ``DIVATTN_CUDA_ARCHS`` (e.g. ``"80;90"``;
default: the architectures of the visible GPUs), ``MAX_JOBS`` (parallel compiles),
``DIVATTN_BUILD_VERBOSE=1`` (show the compiler output).

With ``DIVATTN_CUDA_EMULATE=1`` the backend runs the same binding and kernels compiled
as host C++ on CPU tensors instead (:mod:`divattn.ops.cuda_emulator`): how the test
suite checks the kernels without a GPU.

:func:`forward` and :func:`backward` have exactly the semantics and calling convention
of :mod:`divattn.ops.triton`; the binding (divattn/csrc/bindings.cpp) checks every
input and raises ``RuntimeError`` naming the tensor, what was expected and what came.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import shutil
import subprocess
import threading
from typing import Optional

from . import cuda_emulator

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
_JIT_NAME = "divattn_C"

_lock = threading.Lock()
_module = None  # the loaded extension, once forward/backward needed it
_mode: Optional[str] = None  # "ahead-of-time" or "just-in-time"
_build_error: Optional[str] = None  # why this process's just-in-time build failed


def _sources() -> list:
    """The extension's sources, as setup.py lists them."""
    if not os.path.isdir(_CSRC):
        return []
    return sorted(os.path.join(_CSRC, f) for f in os.listdir(_CSRC) if f.endswith((".cpp", ".cu")))


@functools.lru_cache(maxsize=None)
def _prebuilt():
    """(module, None) when ``divattn._C`` imports; (None, why it does not load) or (None, None)."""
    try:
        module = importlib.import_module("divattn._C")
    except ModuleNotFoundError as e:
        if e.name == "divattn._C":
            return None, None
        return None, f"divattn._C does not load ({type(e).__name__}: {e})"
    except ImportError as e:  # built, but against another torch or without its CUDA libraries
        return None, f"divattn._C does not load ({type(e).__name__}: {e})"
    return module, None


def parse_archs(text: str) -> list:
    """``"80;90"``, ``"8.0 9.0"``, ``"sm_90a,100"`` -> ``["80", "90"]`` ...; ValueError otherwise."""
    archs = []
    for token in re.split(r"[;,\s]+", text.strip()):
        if not token:
            continue
        arch = token.lower().removeprefix("sm_").removesuffix("+ptx").replace(".", "")
        if not re.fullmatch(r"\d{2,3}[af]?", arch):
            raise ValueError(f"DIVATTN_CUDA_ARCHS={text!r}: {token!r} is not a CUDA architecture like 80 or 9.0")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f"DIVATTN_CUDA_ARCHS={text!r} names no architecture")
    return archs


def gencode_flags(archs: list) -> list:
    """nvcc flags: machine code for every arch, plus PTX of the newest for later GPUs."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def _jit_archs() -> list:
    text = os.environ.get("DIVATTN_CUDA_ARCHS", "").strip()
    if text:
        return parse_archs(text)
    import torch

    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return [f"{major}{minor}" for major, minor in caps]


def _nvcc_path() -> Optional[str]:
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    return shutil.which("nvcc")


def _jit_blocker() -> Optional[str]:
    """Why the just-in-time build cannot run here, or None; starts no compiler."""
    import torch

    if getattr(torch.version, "hip", None):
        return "torch is a ROCm build (the extension is CUDA C++)"
    if torch.version.cuda is None:
        return "torch is a CPU build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    if not _sources():
        return "this install has no csrc/ sources to build from"
    from torch.utils import cpp_extension

    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")):
        return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    if not cpp_extension.is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    try:
        _jit_archs()
    except ValueError as e:
        return str(e)
    return None


def unavailable_reason() -> Optional[str]:
    """Why ``backend="cuda"`` cannot run here, in one sentence, or None.

    Cheap (the dispatcher asks on every op call): under ``DIVATTN_CUDA_EMULATE=1``, why
    the emulator cannot be built; otherwise :func:`extension_reason`. Never builds.
    """
    if cuda_emulator.enabled():
        return cuda_emulator.unavailable_reason()
    return extension_reason()


@functools.lru_cache(maxsize=None)
def extension_reason() -> Optional[str]:
    """Why the CUDA extension cannot be loaded or built just in time, or None (cached).

    It imports ``divattn._C`` or checks that a just-in-time build could run, but never builds.
    """
    module, load_error = _prebuilt()
    if module is not None:
        return None
    if _build_error is not None:
        return f"the just-in-time build of the CUDA extension failed ({_build_error})"
    blocker = _jit_blocker()
    if blocker is None:
        return None
    if load_error is not None:
        return f"{load_error} and it cannot be rebuilt just in time: {blocker}"
    return f"the CUDA extension is not built (DIVATTN_BUILD_CUDA=1) and cannot be built just in time: {blocker}"


def arch_reason(capability: tuple, archs: list) -> Optional[str]:
    """Why code built for ``archs`` (``["80", "90"]``, PTX of the newest included) cannot run
    on a GPU of compute ``capability`` ``(major, minor)``, or None."""
    major, minor = capability
    device = major * 10 + minor
    numbers = []
    for arch in archs:
        number = int(re.match(r"\d+", arch).group())
        if arch.isdigit() and number // 10 == major and number <= device:
            return None  # machine code runs on later minor versions of its major version
        if number == device:
            return None  # arch-specific machine code (e.g. 90a) on exactly its GPU
        numbers.append(number)
    if numbers and max(numbers) <= device and archs[numbers.index(max(numbers))].isdigit():
        return None  # the newest arch's PTX is compiled for this GPU by the driver
    return (f"the CUDA extension was built for {', '.join(f'sm_{a}' for a in archs)} and has no code for "
            f"sm_{device} (rebuild with DIVATTN_CUDA_ARCHS={device})")


@functools.lru_cache(maxsize=None)
def _capability_reason(capability: tuple) -> Optional[str]:
    module = _module if _module is not None else _prebuilt()[0]
    archs = [a.removeprefix("sm_") for a in module.archs().split("+") if a] if module is not None else []
    return arch_reason(capability, archs) if archs else None


def device_reason(device) -> Optional[str]:
    """Why the built extension has no code for this CUDA device, in one sentence, or None.

    None as well when nothing is built yet (a just-in-time build targets the visible GPUs)
    or the build did not record its architectures. Cached per compute capability.
    """
    import torch

    if cuda_emulator.enabled():
        if device.type == "cuda":
            return f"{cuda_emulator.ENV}=1 runs the cuda backend's kernels emulated on CPU tensors only"
        return None
    if device.type != "cuda":
        return None
    return _capability_reason(tuple(torch.cuda.get_device_capability(device)))


def _build():
    global _build_error
    from torch.utils.cpp_extension import load

    archs = _jit_archs()
    try:
        return load(
            name=_JIT_NAME,
            sources=_sources(),
            extra_cflags=["-O3", "-DDIVATTN_ARCHS=" + "+".join(f"sm_{a}" for a in archs)],
            extra_cuda_cflags=["-O3", "--use_fast_math", "-lineinfo", *gencode_flags(archs)],
            verbose=os.environ.get("DIVATTN_BUILD_VERBOSE") == "1",
        )
    except Exception as e:  # a compiler error, a missing tool, a broken cache: all say why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        _build_error = f"{type(e).__name__}: {first}"
        extension_reason.cache_clear()
        raise RuntimeError(
            f"divattn: building the CUDA extension just in time failed ({_build_error}); "
            "set DIVATTN_BUILD_VERBOSE=1 to see the compiler output"
        ) from e


def _lib():
    """The extension module: ``divattn._C``, or the one built just in time (once); under
    ``DIVATTN_CUDA_EMULATE=1`` the emulated one."""
    global _module, _mode
    if cuda_emulator.enabled():
        return cuda_emulator.binding()
    if _module is not None:
        return _module
    with _lock:
        if _module is not None:
            return _module
        module, _ = _prebuilt()
        if module is not None:
            _module, _mode = module, "ahead-of-time"
            return _module
        why = extension_reason()
        if why is not None:
            raise RuntimeError(f"divattn: backend='cuda' cannot run: {why}")
        _module, _mode = _build(), "just-in-time"
        return _module


def forward(op, q, k, v, o, lse, scale, *, causal=False, cls=None, o_cls=None, cls_frames=None, lse_cls=None,
            counts=None, mask=None, cls_weights=None):
    """Write attention outputs into ``o`` (and ``o_cls``) and row log-sum-exps into ``lse``.

    Same contract as :func:`divattn.ops.triton.forward`: ``op`` is
    ``"temporal"``, ``"spatial"`` or ``"joint"``; ``q, k, v, o`` are views in the op's
    layout (any strides, head dim contiguous, D <= 128); ``lse`` a contiguous fp32
    ``(S*L,)`` in base 2 with the scale included, one row per query; with
    ``cls = (q_cls, k_cls, v_cls)`` (each ``(B, H, D)``), ``o_cls`` is ``(B, H, D)``,
    ``cls_frames`` a contiguous fp32 ``(B, H, T, D)`` and ``lse_cls`` a contiguous fp32
    ``(B, H, T)``. Temporal ``q`` and ``o`` may have fewer frames (Tq) than ``k`` and
    ``v`` (Tk): query frame i is frame ``Tk - Tq + i``, and with ``causal=True`` it
    attends to key frames ``0 .. Tk - Tq + i`` (temporal attention only). A padded batch:
    ``counts``, the ``(rows, groups)`` of :meth:`divattn.ops.masks.Padding.kernel_counts`,
    and ``mask`` with ``cls_weights``, of :meth:`~divattn.ops.masks.Padding.kernel_mask`.
    """
    rows, groups = counts if counts is not None else (None, None)
    if cls is None:
        _lib().forward(op, q, k, v, o, lse, float(scale), bool(causal), rows=rows, groups=groups, mask=mask)
    else:
        _lib().forward(op, q, k, v, o, lse, float(scale), bool(causal), *cls, o_cls, cls_frames, lse_cls, rows, groups,
                       mask, cls_weights)


def backward(op, q, k, v, o, do, lse, dq, dk, dv, scale, *,
             causal=False, cls=None, d_cls=None, do_cls=None, cls_frames=None, lse_cls=None, counts=None, mask=None,
             cls_weights=None):
    """Write dq, dk, dv (and the cls grads ``d_cls``) for :func:`forward`.

    ``q, o, do, dq`` have the query frames (Tq), ``k, v, dk, dv`` the key frames (Tk).
    Every element is written, nothing accumulated, no atomics: the result is
    deterministic. Same contract as :func:`divattn.ops.triton.backward`.
    """
    rows, groups = counts if counts is not None else (None, None)
    lib = _lib()
    if cls is None:
        lib.backward(op, q, k, v, o, do, lse, dq, dk, dv, float(scale), bool(causal), rows=rows, groups=groups,
                     mask=mask)
    else:
        lib.backward(op, q, k, v, o, do, lse, dq, dk, dv, float(scale), bool(causal), *cls, *d_cls, do_cls,
                     cls_frames, lse_cls, rows, groups, mask, cls_weights)


def _nvcc_version(nvcc: str) -> str:
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"version unknown ({type(e).__name__})"
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "version unknown"


def _describe_module(module) -> str:
    archs = module.archs().replace("+", ", ") if hasattr(module, "archs") else ""
    cuda = getattr(module, "cuda_version", 0)
    headers = f"CUDA {cuda // 1000}.{cuda % 1000 // 10}" if cuda else "CUDA unknown"
    return f"compiled for {archs or 'unrecorded architectures'} with {headers}"


def build_info() -> list:
    """Lines for ``python -m divattn info``: how the extension was or would be built.

    Never builds anything.
    """
    import torch
    from torch.utils import cpp_extension

    lines = []
    module, load_error = _prebuilt()
    if module is not None:
        lines.append(f"extension: built ahead of time (divattn._C), {_describe_module(module)}")
    elif _module is not None:
        lines.append(f"extension: built just in time ({_JIT_NAME}), {_describe_module(_module)}")
    else:
        if load_error is not None:
            lines.append(f"extension: {load_error}")
        else:
            lines.append("extension: not built ahead of time (install with DIVATTN_BUILD_CUDA=1 to do so)")
        if extension_reason() is None:
            root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
            archs = ", ".join(f"sm_{a}" for a in _jit_archs())
            lines.append(f"extension: built just in time on first use for {archs}, cached under {root}")
    nvcc = _nvcc_path()
    lines.append(f"nvcc: {_nvcc_version(nvcc)} ({nvcc})" if nvcc else "nvcc: not found")
    lines.append(f"torch: {torch.__version__}, built with CUDA {torch.version.cuda}")
    return lines


__all__ = ["forward", "backward", "unavailable_reason", "extension_reason", "device_reason", "build_info",
           "arch_reason",
           "parse_archs", "gencode_flags"]
