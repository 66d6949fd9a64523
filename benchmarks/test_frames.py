"""Latency versus frames T (1 ... 96) on one shape: divided (temporal + spatial with cls)
against joint attention over all ``1 + N*T`` tokens."""


def test_frames(benchmark, bench, sweep_case):
    bench.run(sweep_case, benchmark)
