"""divattn: fused divided space-time attention for video transformers.

``temporal_attention``, ``spatial_attention`` and ``joint_attention`` read q/k/v as
strided views of the qkv projection (either token order) and run on the Triton
kernels, the CUDA extension or the pure-PyTorch reference (``backend=``).

The public names load on first use (PEP 562), so that ``divattn --version`` and the
other small commands run without importing torch. The ops' FlopCounterMode formulas
(:mod:`divattn.flops`) are registered as soon as both divattn and
``torch.utils.flop_counter`` are imported, in either order, and whenever ``divattn.ops``
is: a FlopCounterMode made after ``import divattn`` counts the ops.
"""

import importlib
import importlib.abc
import importlib.machinery
import sys

__version__ = "0.1.0"

_WHERE = {
    "temporal_attention": "ops",
    "spatial_attention": "ops",
    "joint_attention": "ops",
    "split_qkv": "ops",
    "tokens_major": "ops",
    "BackendError": "ops",
    "swap_attention": "swap",
}

__all__ = [
    "temporal_attention",
    "spatial_attention",
    "joint_attention",
    "split_qkv",
    "tokens_major",
    "swap_attention",
    "BackendError",
    "__version__",
]


def _lazy_names(package: str, where: dict, namespace: dict):
    """PEP 562 ``(__getattr__, __dir__)`` for ``package``: name ``n`` is imported from its
    submodule ``where[n]`` on first use and kept in ``namespace``."""

    def __getattr__(name):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__():
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__


__getattr__, __dir__ = _lazy_names(__name__, _WHERE, globals())


_THEN_FLOPS = (f"{__name__}.ops", "torch.utils.flop_counter")


class _FlopsAfter(importlib.abc.MetaPathFinder):
    """Finds the modules of :data:`_THEN_FLOPS` as the path finder would, and has their
    loader import ``divattn.flops`` right after them (the FlopCounterMode registration)."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _THEN_FLOPS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenFlops(spec.loader)
        return spec


class _ThenFlops(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        importlib.import_module(f"{__name__}.flops")


if any(name in sys.modules for name in _THEN_FLOPS):
    importlib.import_module(f"{__name__}.flops")
else:
    sys.meta_path.insert(0, _FlopsAfter())
