"""Install divattn.

A plain ``pip install .`` is pure Python and works on any machine. The CUDA C++
fallback in ``divattn/csrc/`` is compiled ahead of time only when ``DIVATTN_BUILD_CUDA=1`` is
set and both a CUDA build of torch and ``nvcc`` are present; otherwise setup says why
it skipped it, and ``backend="cuda"`` can still build it just in time on first use.
"""

import os
import sys

from setuptools import find_packages, setup


def _cuda_extension():
    """Return (ext_modules, cmdclass) for divattn/csrc/, or ([], {}) with a printed reason."""
    if os.environ.get("DIVATTN_BUILD_CUDA", "0") != "1":
        return [], {}
    here = os.path.dirname(os.path.abspath(__file__))
    sources = []
    csrc = os.path.join(here, "divattn", "csrc")
    if os.path.isdir(csrc):
        sources = sorted(
            os.path.join("divattn", "csrc", f) for f in os.listdir(csrc) if f.endswith((".cpp", ".cu"))
        )
    if not sources:
        print("divattn: DIVATTN_BUILD_CUDA=1 but divattn/csrc/ has no sources; skipping", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        print(f"divattn: skipping the CUDA extension: torch is not importable ({e})", file=sys.stderr)
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


ext_modules, cmdclass = _cuda_extension()

setup(
    name="divattn",
    version="0.1.0",
    description="Fused divided space-time attention (TimeSformer, ViViT) for PyTorch",
    long_description=open("README.md", encoding="utf-8").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["divattn", "divattn.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "numpy",
        "triton>=3.0; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
        "av>=11",
        "pyyaml>=6",
        "tqdm>=4.60",
        "tensorboard>=2.10",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark>=4", "transformers>=5.0", "matplotlib>=3.5"],
        "bench": ["pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5"],
    },
    entry_points={"console_scripts": ["divattn=divattn.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    license="BSD-3-Clause",
)
