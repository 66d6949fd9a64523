"""Activation memory a training forward saves, per block and per model, for each
implementation at TimeSformer-B geometry (a count, not a timing: ``divattn bench --memory``
counts the HR and L geometries too). The counts go into each case's ``extra_info``."""

import pytest

from divattn.bench import memory


@pytest.mark.parametrize("implementation", memory.IMPLEMENTATIONS)
def test_saved_for_backward(benchmark, implementation):
    if implementation.startswith("transformers"):
        pytest.importorskip("transformers")
    row = benchmark.pedantic(memory.count, args=(implementation, "timesformer_b"), rounds=1, iterations=1)
    benchmark.extra_info.update({k: row[k] for k in ("block", "fixed", "model", "params")})
    print(f"\n{implementation}: {row['block'] / 2**20:.0f} MiB per block, {row['model'] / 2**20:.0f} MiB per model "
          f"at batch 1 (TimeSformer-B geometry)")
