"""Padded batches: clips of different lengths (60% of the frames real on average) in one
call with per-sample frame counts, against the dense computation over the padding and
against one call per clip; temporal and spatial attention, forward and forward + backward
(see :mod:`divattn.bench.ragged`). Counted by the real pairs' FLOPs and the real tokens'
bytes for every provider."""


def test_ragged(benchmark, bench, ragged_case):
    bench.run(ragged_case, benchmark)
