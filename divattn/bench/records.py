"""Benchmark records: one JSON object per (provider, op, pass, shape, dtype), in a JSON list.

Every record carries the machine and versions it was measured with. A provider that
cannot run is recorded with ``status`` ``"unavailable"`` and its reason; one that
failed with ``"error"`` and the exception. Their measurements are ``null``, never NaN.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable, Optional

import torch

FIELDS = (
    "device", "device_type", "provider", "op", "pass", "shape", "dtype", "status", "error",
    "median_ms", "min_ms", "max_ms", "rounds", "inner", "spread", "probe_ms", "attempts", "flops", "tflops", "bytes", "gbps", "floor_ms",
    "roofline_fraction", "peak_copy_gbps", "peak_matmul_tflops", "attention_flops", "peak_mem_mb", "peak_mem_method",
    "torch", "triton", "commit", "dirty", "date",
)
STATUSES = ("ok", "unavailable", "error")
OPS = ("temporal", "spatial", "spatial_cls", "joint", "model")
PASSES = ("fwd", "fwd+bwd", "train_step")


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """``"NVIDIA H100 80GB HBM3"``, or ``"CPU: <model> (<n> threads)"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU: {_cpu_name()} ({torch.get_num_threads()} threads)"


def git_state(root: Optional[Path] = None) -> tuple:
    """(short commit, dirty) of the checkout ``root`` (default: this package's), or (None, None)."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def environment(device: torch.device) -> dict:
    """The fields every record of a run shares."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # a broken triton install can raise anything on import
        triton_version = None
    commit, dirty = git_state()
    try:
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        load = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "commit": commit,
        "dirty": dirty,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # Other work on the machine when the run started: CPU timings under load are noisy.
        "load_avg_1m": load,
    }


def make(env: dict, *, provider: str, op: str, pass_: str, shape: dict, dtype, status: str = "ok",
         error: Optional[str] = None, **measured) -> dict:
    """A record with every field of :data:`FIELDS` (``None`` where not measured)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    if pass_ not in PASSES:
        raise ValueError(f"pass must be one of {PASSES}, got {pass_!r}")
    if status not in STATUSES:
        raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    if status != "ok" and not error:
        raise ValueError(f"a record with status {status!r} needs the error or reason")
    rec = {f: None for f in FIELDS}
    rec.update(env)
    rec.update(provider=provider, op=op, shape=shape, dtype=str(dtype).replace("torch.", ""), status=status,
               error=error)
    rec["pass"] = pass_
    for key, value in measured.items():
        if key not in FIELDS:
            raise ValueError(f"unknown record field {key!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"record field {key} is {value}: a measurement that failed is an error, not NaN")
        rec[key] = value
    return rec


def write(path, records: Iterable[dict]) -> Path:
    """Write ``records`` as a JSON list to ``path`` (atomically); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = [dict(r) for r in records]
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(out, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def load(paths) -> list:
    """Records from JSON files (or folders of them), in order."""
    out = []
    for p in map(Path, paths):
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        for f in files:
            data = json.loads(f.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise ValueError(f"{f}: expected a JSON list of records")
            out.extend(data)
    return out


def default_path(root, device: torch.device) -> Path:
    """``<root>/cpu.json`` or ``<root>/<gpu-name>.json`` (lower case, dashes)."""
    if device.type == "cpu":
        name = "cpu"
    else:
        name = "".join(ch if ch.isalnum() else "-" for ch in device_name(device).lower())
        name = "-".join(filter(None, name.split("-")))
    return Path(root) / f"{name}.json"
