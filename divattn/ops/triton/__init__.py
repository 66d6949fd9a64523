"""The Triton backend: fused strided attention kernels and the host code that plans their launches.

- :mod:`~divattn.ops.triton.kernels`: the ``@triton.jit`` kernels; its docstring maps
  the three ops onto one problem (the ``(i0, i1, i2)`` table) and names every kernel
  argument.
- :mod:`~divattn.ops.triton.plan`: the tile table (``TILES``, data), the regimes, the
  tiling of a problem and the launches of each pass; :func:`forward` and
  :func:`backward` run them.
"""

from .plan import (LOG2E, TILES, Launch, Tiling, backward, forward, plan_backward, plan_forward, problem_candidates,
                   tile_candidates, tile_config)

__all__ = ["forward", "backward", "plan_forward", "plan_backward", "Launch", "Tiling", "LOG2E", "TILES",
           "tile_candidates", "problem_candidates", "tile_config"]
