"""``python -m divattn info``: versions, devices, and each backend's state."""

from __future__ import annotations

import platform


def add_arguments(parser) -> None:
    pass


def lines() -> list:
    import torch

    from .. import __version__
    from ..ops import dispatch

    out = [
        f"divattn {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})",
    ]
    try:
        import triton

        out.append(f"triton {triton.__version__}" + (" (TRITON_INTERPRET=1)" if dispatch.interpreting() else ""))
    except Exception as e:  # a broken triton install can raise anything on import
        out.append(f"triton: not importable ({type(e).__name__}: {e})")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            out.append(f"cuda:{i} {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        out.append("no CUDA device")
    out.append("backends:")
    for name, be in dispatch.BACKENDS.items():
        why = be.unavailable_reason()
        where = []
        if "cuda" in be.device_types and torch.cuda.is_available():
            where.append("cuda")
        if "cpu" in be.device_types and (not be.cpu_needs_interpreter or dispatch.interpreting()):
            where.append("cpu")
        elif "cpu" in be.device_types:
            where.append("cpu with TRITON_INTERPRET=1")
        state = f"not available: {why}" if why else "available on " + ", ".join(where or ["no device here"])
        out.append(f"  {name:<9} {state}")
        if isinstance(be, dispatch.KernelBackend):
            try:
                build_info = getattr(be.kernels(), "build_info", None)
            except Exception:  # the module needs what the reason above says is missing
                build_info = None
            if build_info is not None:
                out.extend(f"            {line}" for line in build_info())
    return out


def main(args) -> int:
    print("\n".join(lines()))
    return 0
