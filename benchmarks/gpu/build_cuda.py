"""Build divattn's CUDA C++ extension for the visible GPU and check that it loads.

Ahead of time first (``DIVATTN_BUILD_CUDA=1 pip install --no-deps --no-build-isolation
-e .``, the documented way, which needs no network); when that does not produce a
loadable ``divattn._C`` and a just-in-time build is possible (ninja present), the
just-in-time build (``torch.utils.cpp_extension.load``, cached for later processes).
Architectures: ``DIVATTN_CUDA_ARCHS`` if set, else the visible GPU's.

Exit status: 0 the extension loads (how it was built is printed), 1 the build failed,
3 it cannot be built here (no nvcc, no GPU, CPU torch): the reason is printed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOADS = ("import divattn.ops.cuda_ext as c, divattn._C as m; "
         "print('divattn._C loads:', c._describe_module(m))")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nvcc", default=None, help="nvcc to build with (default: CUDA_HOME's, then PATH's)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (MAX_JOBS)")
    p.add_argument("--dry-run", action="store_true", help="print the build command and exit")
    return p.parse_args(argv)


def _pip_command() -> list:
    return [sys.executable, "-m", "pip", "install", "-v", "--no-index", "--no-deps", "--no-build-isolation",
            "--disable-pip-version-check", "-e", str(ROOT)]


def _run(cmd, env) -> int:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, cwd=ROOT).returncode


def main(argv=None) -> int:
    args = parse_args(argv)
    env = dict(os.environ, DIVATTN_BUILD_CUDA="1", MAX_JOBS=str(args.jobs))
    if args.nvcc:
        home = str(Path(args.nvcc).resolve().parent.parent)
        env["CUDA_HOME"] = home
        env["PATH"] = str(Path(args.nvcc).parent) + os.pathsep + env.get("PATH", "")
    if args.dry_run:
        print("DIVATTN_BUILD_CUDA=1 MAX_JOBS={} {}".format(args.jobs, " ".join(_pip_command())))
        return 0
    if not args.nvcc:
        print("UNAVAILABLE: nvcc not found (looked at CUDA_HOME, /usr/local/cuda*, PATH): "
              "the CUDA extension cannot be built here", flush=True)
        return 3
    import torch

    if torch.version.cuda is None or not torch.cuda.is_available():
        print(f"UNAVAILABLE: torch {torch.__version__} has CUDA {torch.version.cuda}, GPU visible: "
              f"{torch.cuda.is_available()}", flush=True)
        return 3
    if "DIVATTN_CUDA_ARCHS" not in env:
        major, minor = torch.cuda.get_device_capability(0)
        env["DIVATTN_CUDA_ARCHS"] = f"{major}{minor}"
    print(f"building for sm_{env['DIVATTN_CUDA_ARCHS']} with {args.nvcc}, {args.jobs} jobs", flush=True)
    start = time.perf_counter()
    rc = _run(_pip_command(), env)
    print(f"ahead-of-time build: exit {rc} after {time.perf_counter() - start:.0f} s", flush=True)
    if rc == 0 and _run([sys.executable, "-c", LOADS], env) == 0:
        return 0
    print("the ahead-of-time build gave no loadable divattn._C; trying the just-in-time build", flush=True)
    jit = ("import torch, divattn.ops.cuda_ext as c; why = c.unavailable_reason(); "
           "print('just-in-time build blocked:', why) if why else None; "
           "m = None if why else c._lib(); print('built just in time:', c._describe_module(m)) if m else None; "
           "raise SystemExit(0 if m else 1)")
    env["DIVATTN_BUILD_VERBOSE"] = "1"
    return 0 if _run([sys.executable, "-c", jit], env) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
