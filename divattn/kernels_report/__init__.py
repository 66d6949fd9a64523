"""Proof of the GPU path without a GPU: static kernel report and memory-traffic model.

- :mod:`~divattn.kernels_report.problems`: the problems covered (the caller's shapes and
  layers that reach every code path, at every head-dim bucket) and the launches GPU
  dispatch plans for them (from ``plan_forward`` / ``plan_backward``, never a hand-kept
  list).
- :mod:`~divattn.kernels_report.build`: compile each distinct binary ahead of time for
  sm_80 / sm_90 with Triton's compiler (in parallel, cached on disk by binary key) and
  read registers, stack (spill) bytes, shared memory, resident blocks per SM and
  tensor-core instructions from the cubin.
- :mod:`~divattn.kernels_report.traffic`: run the launches under the Triton interpreter
  and count the 32-byte sectors each program loads and stores, against the least a
  pass can move; the modelled H100 time.

``python -m divattn kernels`` prints the report; ``divattn bench --modelled`` writes the
traffic as modelled records. Nothing here imports :mod:`divattn.bench`: shapes come in as
:class:`~divattn.shapes.AttnShape`.
"""
