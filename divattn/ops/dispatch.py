"""Backends: what each can run, declared as data, and how each runs an op.

A :class:`Backend` is a value that runs the three ops itself
(:meth:`~Backend.temporal`, :meth:`~Backend.spatial`, :meth:`~Backend.joint`), each
returning the public op's output. Two kinds exist:

- :class:`KernelBackend` (``triton``, ``cuda``): kernel modules that write into buffers
  the custom op :mod:`divattn.ops.functions` allocates; they share the
  :class:`~divattn.ops.functions.KernelModule` contract;
- :class:`ComposedBackend` (``torch``, ``reference``): modules of PyTorch code that
  compute the outputs themselves (:class:`OpsModule`).

``backend=None`` takes the first of :data:`AUTO_ORDER` whose declared capabilities fit
the inputs; ``"reference"`` (the fp64-exact ground truth of the tests) is chosen only by
name. A forced backend that cannot run raises :class:`BackendError`, whose message lists
the inputs and every backend's reasons; nothing falls back silently. The
``DIVATTN_BACKEND`` environment variable sets the default.

Besides the op, a call may need *features* (:data:`FEATURES`) that only some backends
implement (:attr:`Backend.features`).

The choice depends on the op, dtype, device, requested backend, features and
environment, which :func:`select` memoises, and on the head dim, which it compares. Under
``torch.compile`` the memoised part is computed once at trace time (it imports modules
and queries devices, which dynamo cannot trace) and the graph holds the chosen backend's
calls: no graph break.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Optional, Protocol

import torch

from . import cuda_ext, functions, reference, torch_backend
from .layout import patch_view
from .masks import Padding

AUTO_ORDER = ("triton", "cuda", "torch")
OPS = ("temporal", "spatial", "spatial_cls", "joint")
FEATURES = {
    "causal": "causal attention (frame t attends to frames 0..t)",
    "fewer_queries": "attending from the last Tq of Tk frames only (Tq < Tk)",
    "counts": "a padded batch given as per-sample frame, patch or token counts",
    "mask": "a padded batch given as a token mask",
}


class BackendError(RuntimeError):
    """No backend (or not the requested one) can run these inputs."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def emulating_cuda() -> bool:
    """``DIVATTN_CUDA_EMULATE=1``: the cuda backend's kernels run emulated on CPU tensors."""
    return os.environ.get("DIVATTN_CUDA_EMULATE", "0") == "1"


class OpsModule(Protocol):
    """A module that computes the ops in PyTorch (:mod:`divattn.ops.torch_backend`,
    :mod:`divattn.ops.reference`): each function returns the public op's output."""

    def temporal(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                 causal: bool = False, padding: Optional[Padding] = None) -> torch.Tensor: ...

    def spatial(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                cls: Optional[tuple] = None, padding: Optional[Padding] = None) -> torch.Tensor: ...

    def joint(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              padding: Optional[Padding] = None) -> torch.Tensor: ...


def _constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without its import of ``torch._dynamo``
    (about a second of every process that imports divattn): the mark dynamo reads, set as
    ``torch._dynamo.decorators`` sets it (tests/test_compile.py checks that they agree)."""
    fn._dynamo_marked_constant = True
    return fn


_TRITON_IMPORT: list = []


@_constant_result
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


@_constant_result
def _cuda_runtime_reason() -> Optional[str]:
    return cuda_ext.unavailable_reason()


@dataclass(frozen=True)
class Backend:
    """What one backend can run, as data; subclasses say how it runs.

    ``device_types``: tensor device types served; ``cpu_needs_interpreter``: CPU
    tensors are served only under ``TRITON_INTERPRET=1``; ``cpu_needs_emulator``: CPU
    tensors are served only under ``DIVATTN_CUDA_EMULATE=1``; ``interpreter_dtypes``: the
    dtypes trusted under the interpreter; ``max_head_dim``: largest D;
    ``min_capability``: the oldest CUDA compute capability served;
    ``runtime_reason``: why the backend cannot run at all, or None (a process
    constant, except that a failed just-in-time build makes ``cuda`` unavailable);
    ``device_reason``: why it cannot run on a given CUDA device, or None;
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

    def temporal(self, q, k, v, scale: float, causal: bool, padding: Optional[Padding] = None) -> torch.Tensor:
        """The output of :func:`divattn.temporal_attention`, ``(B, Tq, N, H, D)``; ``padding``
        (only where the backend declares ``"mask"``, or ``"counts"`` for a padding without a
        mask) says which tokens are real."""
        raise NotImplementedError

    def spatial(self, q, k, v, scale: float, cls: Optional[tuple], padding: Optional[Padding] = None) -> torch.Tensor:
        """The ``(B, T, N, H, D)`` output of :func:`divattn.spatial_attention`; with ``cls``, the
        ``(B, 1 + T*N, H, D)`` token buffer with the mean cls output as token 0."""
        raise NotImplementedError

    def joint(self, q, k, v, scale: float, padding: Optional[Padding] = None) -> torch.Tensor:
        """The ``(B, L, H, D)`` output of :func:`divattn.joint_attention`."""
        raise NotImplementedError


@dataclass(frozen=True)
class KernelBackend(Backend):
    """Kernels behind the custom op ``divattn::attn_fwd`` (:mod:`divattn.ops.functions`),
    which allocates the outputs and calls this backend's kernel module."""

    def kernels(self) -> functions.KernelModule:
        return functions.KERNELS[self.name]()

    def temporal(self, q, k, v, scale, causal, padding=None):
        out = functions.attention(self.name, "temporal", (q, k, v), scale, causal, **_padded(padding, "temporal"))
        return patch_view(out, q, has_cls=False)

    def spatial(self, q, k, v, scale, cls, padding=None):
        kw = _padded(padding, "spatial", cls is not None)
        if cls is None:
            return patch_view(functions.attention(self.name, "spatial", (q, k, v), scale, False, **kw), q,
                              has_cls=False)
        return functions.attention(self.name, "spatial", (q, k, v, *cls), scale, False, **kw)

    def joint(self, q, k, v, scale, padding=None):
        return functions.attention(self.name, "joint", (q, k, v), scale, False, **_padded(padding, "joint"))


def _padded(padding: Optional[Padding], op: str, cls: bool = False) -> dict:
    """What a kernel backend gets of a padding, as :func:`divattn.ops.functions.attention`'s
    keywords: the ``(rows, groups)`` counts and the mask with its cls frame weights (each
    only where the backend declares it: the dispatcher chose it for them)."""
    if padding is None:
        return {}
    mask, cls_weights = padding.kernel_mask(cls)
    return dict(counts=padding.kernel_counts(op), mask=mask, cls_weights=cls_weights)


@dataclass(frozen=True)
class ComposedBackend(Backend):
    """Ops composed from PyTorch code in ``impl`` (an :class:`OpsModule`)."""

    impl: Optional[ModuleType] = None

    def __post_init__(self):
        # the module's functions themselves, so that a call goes straight to them
        for op in ("temporal", "spatial", "joint"):
            object.__setattr__(self, op, getattr(self.impl, op))


_CHOICES: dict = {}


class _Registry(dict):
    """The backends by name; replacing one (tests do) forgets the memoised choices."""

    def __setitem__(self, name, backend):
        _CHOICES.clear()
        super().__setitem__(name, backend)

    def __delitem__(self, name):
        _CHOICES.clear()
        super().__delitem__(name)


_ANY_DEVICE = ("cpu", "cuda", "mps", "xpu")
_ALL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

BACKENDS = _Registry(
    triton=KernelBackend(
        name="triton",
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        device_types=("cuda", "cpu"),
        max_head_dim=256,
        features=("causal", "fewer_queries", "counts", "mask"),
        cpu_needs_interpreter=True,
        interpreter_dtypes=(torch.float16, torch.float32),
        min_capability=(8, 0),
        runtime_reason=_triton_runtime_reason,
    ),
    cuda=KernelBackend(
        name="cuda",
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        device_types=("cuda",),
        max_head_dim=128,
        features=("causal", "fewer_queries", "counts", "mask"),
        cpu_needs_emulator=True,
        min_capability=(8, 0),
        runtime_reason=_cuda_runtime_reason,
        device_reason=cuda_ext.device_reason,
    ),
    torch=ComposedBackend(name="torch", dtypes=_ALL_DTYPES, device_types=_ANY_DEVICE, max_head_dim=1 << 30,
                          impl=torch_backend),
    reference=ComposedBackend(name="reference", dtypes=_ALL_DTYPES, device_types=_ANY_DEVICE,
                              max_head_dim=1 << 30, impl=reference),
)


def default_backend() -> Optional[str]:
    name = os.environ.get("DIVATTN_BACKEND") or None
    if name is not None and name not in BACKENDS:
        raise BackendError(f"DIVATTN_BACKEND={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


@_constant_result
def _fitting(op: str, dtype: torch.dtype, device: torch.device, backend: Optional[str], features: tuple) -> tuple:
    """The names of the backends, in the order tried, that fit everything but the head
    dim and a change of availability (memoised; a constant under ``torch.compile``)."""
    # the environment, read only where it can matter (an os.environ read costs a microsecond):
    # the default backend, and on a CPU whether the Triton or CUDA kernels run emulated there
    default = os.environ.get("DIVATTN_BACKEND") if backend is None else None
    named = backend or default
    emulated = None
    if (named is None or named not in BACKENDS or BACKENDS[named].cpu_needs_interpreter
            or BACKENDS[named].cpu_needs_emulator) and device.type == "cpu":
        emulated = (os.environ.get("TRITON_INTERPRET"), os.environ.get("DIVATTN_CUDA_EMULATE"))
    key = (op, dtype, device, backend, features, default, emulated)
    names = _CHOICES.get(key)
    if names is None:
        if backend is None:
            backend = default_backend()
        if backend is not None and backend not in BACKENDS:
            raise BackendError(f"backend={backend!r} is not a backend; choose one of None, "
                               f"{', '.join(map(repr, BACKENDS))}")
        tried = (backend,) if backend is not None else AUTO_ORDER
        names = _CHOICES[key] = tuple(n for n in tried
                                      if not BACKENDS[n].not_supported_reasons(op, dtype, device, 0, features))
    return names


def select(op: str, dtype: torch.dtype, device: torch.device, head_dim: int, backend: Optional[str] = None,
           features: tuple = ()) -> Backend:
    """The backend that runs ``op`` (with ``features``) on these inputs, or BackendError with every reason."""
    for name in _fitting(op, dtype, device, backend, features):
        be = BACKENDS[name]
        if head_dim <= be.max_head_dim and be.runtime_reason() is None:
            return be
    raise BackendError(_refusal(op, dtype, device, head_dim, backend, features))


def _refusal(op, dtype, device, head_dim, backend, features) -> str:
    lines = [
        f"  {n}: " + "; ".join(BACKENDS[n].not_supported_reasons(op, dtype, device, head_dim, features)
                               or ["available"])
        for n in BACKENDS
    ]
    if backend is None:
        backend = default_backend()
    wanted = f"backend={backend!r}" if backend is not None else "any backend"
    what = f"{op} attention" + (f" ({', '.join(features)})" if features else "")
    return (f"{wanted} cannot run {what} on inputs of dtype {dtype}, device {device}, "
            f"head dim {head_dim}:\n" + "\n".join(lines))


def report() -> dict:
    """{backend: reason it cannot run at all, or None} for ``python -m divattn info``."""
    return {name: be.unavailable_reason() for name, be in BACKENDS.items()}
