"""Benchmarks of divided versus joint attention, and of divattn versus what users would otherwise run.

Shared by the pytest-benchmark suites in ``benchmarks/`` and by ``divattn bench``, on the
named shapes of :mod:`divattn.shapes` (which the kernel report reads too):
:mod:`~divattn.bench.providers` (who computes the attention, as data),
:mod:`~divattn.bench.timing`, :mod:`~divattn.bench.roofline` (measured device limits),
:mod:`~divattn.bench.records` (the JSON records) and :mod:`~divattn.bench.suite` (one
case, from inputs to record).
"""
