"""The optional CUDA C++ extension; the package metadata is in pyproject.toml.

A plain ``pip install .`` (or of the sdist or wheel) is pure Python and works on any
machine. The CUDA C++ fallback in ``divattn/csrc/`` (installed with the package either
way) is compiled ahead of time only when ``DIVATTN_BUILD_CUDA=1`` is set and both a
CUDA build of torch and ``nvcc`` are present, which needs the installed torch in the
build, so ``--no-build-isolation``; otherwise setup says why it skipped it, and
``backend="cuda"`` can still build it just in time on first use.

Env: ``DIVATTN_BUILD_CUDA=1`` (build it), ``DIVATTN_CUDA_ARCHS`` (default ``"80;90"``),
``MAX_JOBS`` (parallel compiles).
"""

import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("divattn", "csrc")


def csrc_sources():
    """The files the extension compiles, relative to this directory (sorted)."""
    folder = os.path.join(HERE, CSRC)
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(CSRC, f) for f in os.listdir(folder) if f.endswith((".cpp", ".cu")))


def _cuda_extension():
    """Return (ext_modules, cmdclass) for divattn/csrc/, or ([], {}) with a printed reason."""
    if os.environ.get("DIVATTN_BUILD_CUDA", "0") != "1":
        return [], {}
    sources = csrc_sources()
    if not sources:
        print(f"divattn: DIVATTN_BUILD_CUDA=1 but {CSRC}/ has no sources; skipping", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        print(f"divattn: skipping the CUDA extension: torch is not importable ({e}); "
              "install torch first and build with pip install --no-build-isolation", file=sys.stderr)
        return [], {}
    if torch.version.cuda is None or CUDA_HOME is None:
        print("divattn: skipping the CUDA extension: needs a CUDA build of torch and nvcc", file=sys.stderr)
        return [], {}
    archs = []
    for arch in os.environ.get("DIVATTN_CUDA_ARCHS", "80;90").replace(",", ";").replace(" ", ";").split(";"):
        arch = arch.strip().lower().removeprefix("sm_").replace(".", "")
        if arch and arch not in archs:
            archs.append(arch)
    if not archs:
        print("divattn: skipping the CUDA extension: DIVATTN_CUDA_ARCHS names no architecture", file=sys.stderr)
        return [], {}
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int("".join(c for c in a if c.isdigit())))
    gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")  # PTX for newer GPUs
    os.environ.setdefault("MAX_JOBS", str(max(1, min(4, os.cpu_count() or 1))))
    # No -std flag: torch adds the standard its headers need (C++20 for recent torch, C++17 for older).
    ext = CUDAExtension(
        name="divattn._C",
        sources=sources,
        extra_compile_args={
            "cxx": ["-O3", "-DDIVATTN_ARCHS=" + "+".join(f"sm_{a}" for a in archs)],
            "nvcc": ["-O3", "--use_fast_math", "-lineinfo", *gencode],
        },
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":
    ext_modules, cmdclass = _cuda_extension()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
