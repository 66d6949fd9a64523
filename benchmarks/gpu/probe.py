"""The machine and software a GPU acceptance run measured with, as one JSON object.

Device name, compute capability, memory and driver; Python, torch, triton and CUDA
versions; the tools the run uses (nvcc, compute-sanitizer, ninja) and the optional
packages (pytest, pytest-benchmark, transformers), each as a version or
``"unavailable: <reason>"``; the git commit and the date. Never fails on a missing piece:
it records why instead.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _out(cmd, timeout=30) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {type(e).__name__}: {e}"
    text = (r.stdout or r.stderr).strip()
    return text if r.returncode == 0 else f"unavailable: exit {r.returncode}: {text[-300:]}"


def _package(name: str) -> str:
    try:
        module = importlib.import_module(name)
    except Exception as e:  # absent or broken: both are worth recording
        return f"unavailable: {type(e).__name__}: {e}"
    return str(getattr(module, "__version__", "installed (version unknown)"))


def _tool(path, version_args=("--version",)) -> str:
    if not path:
        return "unavailable: not found"
    text = _out([path, *version_args])
    m = re.search(r"(?:release|Version)\s+([\d.]+)", text)
    return f"{m.group(1) if m else text.splitlines()[-1] if text else '?'} ({path})"


def probe(nvcc=None, sanitizer=None) -> dict:
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": _out(["git", "rev-parse", "HEAD"]),
        "dirty": bool(_out(["git", "status", "--porcelain", "--untracked-files=no"]).strip()),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": __import__("os").cpu_count(),
        "nvidia_smi": _out(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,compute_cap",
                            "--format=csv,noheader"]) if shutil.which("nvidia-smi") else "unavailable: not found",
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        info["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info["device"] = props.name
            info["capability"] = f"{props.major}.{props.minor}"
            info["device_memory_gib"] = round(props.total_memory / 2**30, 1)
            info["device_count"] = torch.cuda.device_count()
            info["cudnn"] = torch.backends.cudnn.version()
        else:
            info["device"] = "unavailable: torch.cuda.is_available() is False"
    except Exception as e:
        info["torch"] = f"unavailable: {type(e).__name__}: {e}"
    for name in ("triton", "divattn", "transformers", "pytest", "pytest_benchmark", "setuptools", "numpy"):
        info[name] = _package(name)
    info["ninja"] = _tool(shutil.which("ninja"))
    info["nvcc"] = _tool(nvcc)
    info["compute_sanitizer"] = _tool(sanitizer)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--nvcc", default=None)
    p.add_argument("--sanitizer", default=None)
    p.add_argument("--dry-run", action="store_true", help="validate the arguments and exit")
    args = p.parse_args(argv)
    if args.dry_run:
        return 0
    info = probe(args.nvcc, args.sanitizer)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
