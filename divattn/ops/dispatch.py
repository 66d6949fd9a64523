"""Backends declare what they support as data; the dispatcher picks the first that fits.

``backend=None`` takes the first of :data:`AUTO_ORDER` whose declared capabilities fit
the inputs. A forced backend that cannot run raises :class:`BackendError`, whose
message lists the inputs and every backend's reasons; nothing falls back silently.
The default can be set with the ``DIVATTN_BACKEND`` environment variable.

Besides the op, a call may need *features* (:data:`FEATURES`) that only some backends
implement: ``"causal"`` (temporal attention where frame t attends to frames 0..t) and
``"fewer_queries"`` (queries for the last Tq of Tk key frames, Tq < Tk). A backend
declares the ones it implements in :attr:`Backend.features`.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

AUTO_ORDER = ("triton", "cuda", "torch")
OPS = ("temporal", "spatial", "spatial_cls", "joint")
FEATURES = {
    "causal": "causal attention (frame t attends to frames 0..t)",
    "fewer_queries": "attending from the last Tq of Tk frames only (Tq < Tk)",
}


class BackendError(RuntimeError):
    """No backend (or not the requested one) can run these inputs."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def emulating_cuda() -> bool:
    """``DIVATTN_CUDA_EMULATE=1``: the cuda backend's kernels run emulated on CPU tensors."""
    return os.environ.get("DIVATTN_CUDA_EMULATE", "0") == "1"


_TRITON_IMPORT: list = []


def _triton_runtime_reason() -> Optional[str]:
    """Why triton cannot be used at all (checked once), or None."""
    if not _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # an ImportError, or a broken install raising anything
            _TRITON_IMPORT.append(f"triton is not importable ({type(e).__name__}: {e})")
        else:
            _TRITON_IMPORT.append(None)
    return _TRITON_IMPORT[0]


def _cuda_runtime_reason() -> Optional[str]:
    from . import cuda_ext

    return cuda_ext.unavailable_reason()


def _cuda_device_reason(device: torch.device) -> Optional[str]:
    from . import cuda_ext

    return cuda_ext.device_reason(device)


@dataclass(frozen=True)
class Backend:
    """What one backend can run, as data, plus where its kernels live.

    ``device_types``: tensor device types served; ``cpu_needs_interpreter``: CPU
    tensors are served only under ``TRITON_INTERPRET=1``; ``cpu_needs_emulator``: CPU
    tensors are served only under ``DIVATTN_CUDA_EMULATE=1``; ``interpreter_dtypes``: the
    dtypes trusted under the interpreter; ``max_head_dim``: largest D;
    ``min_capability``: the oldest CUDA compute capability served;
    ``runtime_reason``: a callable returning why the backend cannot run at all, or None;
    ``device_reason``: a callable returning why it cannot run on a given device, or None;
    ``features``: the :data:`FEATURES` it implements.
    """

    name: str
    dtypes: tuple
    device_types: tuple
    max_head_dim: int
    ops: tuple = OPS
    features: tuple = tuple(FEATURES)
    cpu_needs_interpreter: bool = False
    cpu_needs_emulator: bool = False
    interpreter_dtypes: tuple = ()
    min_capability: tuple = (0, 0)
    runtime_reason: Callable[[], Optional[str]] = field(default=lambda: None)
    device_reason: Callable[[torch.device], Optional[str]] = field(default=lambda device: None)
    module: Optional[str] = None

    def unavailable_reason(self) -> Optional[str]:
        return self.runtime_reason()

    def not_supported_reasons(self, op: str, dtype: torch.dtype, device: torch.device, head_dim: int,
                              features: tuple = ()) -> list:
        reasons = []
        why = self.unavailable_reason()
        if why:
            reasons.append(why)
        if op not in self.ops:
            reasons.append(f"op {op!r} is not implemented")
        for feature in features:
            if feature not in FEATURES:
                raise ValueError(f"unknown feature {feature!r}; features are {', '.join(FEATURES)}")
            if feature not in self.features:
                reasons.append(f"{FEATURES[feature]} is not implemented")
        if dtype not in self.dtypes:
            reasons.append(f"dtype {dtype} is not supported (supported: {', '.join(map(str, self.dtypes))})")
        kind = device.type
        if kind == "cpu" and self.cpu_needs_emulator and emulating_cuda():
            pass  # the kernels run emulated on the host (divattn.ops.cuda_emulator)
        elif kind not in self.device_types:
            reasons.append(f"device type {kind!r} is not supported (supported: {', '.join(self.device_types)})")
        elif kind == "cuda" and not torch.cuda.is_available():
            reasons.append("no CUDA device is available (torch.cuda.is_available() is False)")
        elif kind == "cuda" and not why:
            cap = tuple(torch.cuda.get_device_capability(device))
            if cap < self.min_capability:
                reasons.append(f"GPU compute capability {cap[0]}.{cap[1]} is older than the "
                               f"{self.min_capability[0]}.{self.min_capability[1]} it needs")
            elif self.device_reason(device):
                reasons.append(self.device_reason(device))
        elif kind == "cpu" and self.cpu_needs_interpreter:
            if not interpreting():
                reasons.append("CPU tensors run only under TRITON_INTERPRET=1")
            elif dtype not in self.interpreter_dtypes:
                reasons.append(f"the Triton interpreter computes tl.dot wrongly for {dtype}; use a GPU")
        if head_dim > self.max_head_dim:
            reasons.append(f"head dim {head_dim} is larger than {self.max_head_dim}")
        return reasons

    def kernels(self):
        """The module with this backend's ``forward`` / ``backward`` launchers."""
        return importlib.import_module(self.module, __package__)


BACKENDS = {
    "triton": Backend(
        name="triton",
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        device_types=("cuda", "cpu"),
        max_head_dim=256,
        cpu_needs_interpreter=True,
        interpreter_dtypes=(torch.float16, torch.float32),
        min_capability=(8, 0),
        runtime_reason=_triton_runtime_reason,
        module=".triton_kernels",
    ),
    "cuda": Backend(
        name="cuda",
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        device_types=("cuda",),
        max_head_dim=128,
        features=("causal", "fewer_queries"),
        cpu_needs_emulator=True,
        min_capability=(8, 0),
        runtime_reason=_cuda_runtime_reason,
        device_reason=_cuda_device_reason,
        module=".cuda_ext",
    ),
    "torch": Backend(
        name="torch",
        dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        device_types=("cpu", "cuda", "mps", "xpu"),
        max_head_dim=1 << 30,
    ),
}


def default_backend() -> Optional[str]:
    name = os.environ.get("DIVATTN_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise BackendError(f"DIVATTN_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


def select(op: str, dtype: torch.dtype, device: torch.device, head_dim: int, backend: Optional[str] = None,
           features: tuple = ()) -> Backend:
    """The backend that runs ``op`` (with ``features``) on these inputs, or BackendError with every reason."""
    if backend is None:
        backend = default_backend()
    if backend is not None and backend not in BACKENDS:
        raise BackendError(f"backend={backend!r} is not a backend; choose one of None, {', '.join(map(repr, BACKENDS))}")
    names = (backend,) if backend is not None else AUTO_ORDER
    for name in names:
        if not BACKENDS[name].not_supported_reasons(op, dtype, device, head_dim, features):
            return BACKENDS[name]
    lines = [
        f"  {n}: " + "; ".join(BACKENDS[n].not_supported_reasons(op, dtype, device, head_dim, features)
                               or ["available"])
        for n in BACKENDS
    ]
    wanted = f"backend={backend!r}" if backend is not None else "any backend"
    what = f"{op} attention" + (f" ({', '.join(features)})" if features else "")
    raise BackendError(
        f"{wanted} cannot run {what} on inputs of dtype {dtype}, device {device}, "
        f"head dim {head_dim}:\n" + "\n".join(lines)
    )


def report(device: Optional[torch.device] = None) -> dict:
    """{backend: reason it cannot run at all, or None} for ``python -m divattn info``."""
    return {name: be.unavailable_reason() for name, be in BACKENDS.items()}
