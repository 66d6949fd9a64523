"""The device's measured limits, and the roofline floor of a benchmark case.

Measured once per run and dtype, as the fastest of several rounds: the copy bandwidth
(``dst.copy_(src)`` of a buffer far larger than the caches, counting the read and the
write) and the matmul peak (a large square ``torch.mm`` in the dtype). A case's floor is
``max(bytes / copy_bandwidth, flops / matmul_peak)``; ``roofline_fraction`` is the floor
over the achieved time: 1.0 means the case ran at the floor, 0.25 four times slower.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch

from .timing import Budget, measure


@dataclass(frozen=True)
class Peaks:
    device: str
    dtype: str
    copy_gbps: float
    matmul_tflops: float
    copy_bytes: int
    matmul_n: int

    def as_dict(self) -> dict:
        return asdict(self)

    def floor_ms(self, flops: int, nbytes: int) -> float:
        return max(nbytes / (self.copy_gbps * 1e9), flops / (self.matmul_tflops * 1e12)) * 1e3


def _seconds(fn, shapes, dtype, device, budget) -> float:
    """Best seconds of ``fn`` on fresh tensors of ``shapes`` (freed on return): a peak is
    what the device reaches, so the fastest round counts, not the median."""
    args = [torch.ones(s, device=device, dtype=dtype) for s in shapes]
    return measure(lambda: fn(*args), device, budget).min_ms / 1e3


def measure_peaks(device: torch.device, dtype: torch.dtype) -> Peaks:
    """Copy bandwidth and matmul peak of ``device`` for ``dtype``.

    GPU: a 1 GiB copy and an 8192^3 matmul. CPU: a 256 MiB copy (far larger than the
    caches) and a 1024^3 matmul. Each is timed for a fraction of a second.
    """
    gpu = device.type != "cpu"
    copy_bytes = 2**30 if gpu else 2**28
    n = 8192 if gpu else 1024
    budget = Budget(target_s=0.5, min_rounds=10, max_rounds=50, warmup=2)
    t_copy = _seconds(torch.Tensor.copy_, [(copy_bytes // 4,)] * 2, torch.float32, device, budget)
    t_mm = _seconds(torch.mm, [(n, n)] * 2, dtype, device, budget)
    return Peaks(
        device=str(device), dtype=str(dtype).replace("torch.", ""),
        copy_gbps=2 * copy_bytes / t_copy / 1e9, matmul_tflops=2 * n ** 3 / t_mm / 1e12,
        copy_bytes=copy_bytes, matmul_n=n,
    )


def roofline(peaks: Optional[Peaks], flops: int, nbytes: Optional[int], median_ms: float) -> dict:
    """``floor_ms``, ``roofline_fraction`` (floor / achieved) and the achieved rates."""
    out = {
        "tflops": flops / (median_ms * 1e-3) / 1e12,
        "gbps": None if nbytes is None else nbytes / (median_ms * 1e-3) / 1e9,
        "floor_ms": None,
        "roofline_fraction": None,
    }
    if peaks is not None:
        floor = peaks.floor_ms(flops, nbytes or 0)
        out["floor_ms"] = floor
        out["roofline_fraction"] = floor / median_ms
    return out
