"""The CUDA C++ fallback backend (csrc/): its state and launchers."""

from __future__ import annotations

import functools
import os
from typing import Optional

_CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "csrc")


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """Why ``backend="cuda"`` cannot run here, in one sentence, or None."""
    try:
        from divattn import _C  # noqa: F401
    except ImportError:
        pass
    else:
        return None
    if not os.path.isdir(_CSRC):
        return "the CUDA extension is not built and this install has no csrc/ sources to build it from"
    return "the CUDA extension is not built (install with DIVATTN_BUILD_CUDA=1)"
