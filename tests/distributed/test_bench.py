"""The sequence-parallel case of ``divattn bench`` (divattn.bench.seqpar) on a tiny clip: each
rank's measurement, the records and the table, on the session's gloo group of 2."""

import pytest
import torch

from divattn.bench import seqpar

SHAPE = dict(B=1, T=3, N=4)


def _measure(rank, world):
    return {v: seqpar.measure(v, SHAPE, 1, torch.device("cpu"), torch.float32) for v in ("frames", "ulysses")}


def test_records_and_table(ranks):
    """The table's cells are the records' numbers: the busiest rank's MB sent, the formula's MB
    (frame-sharded block only) and the busiest rank's bytes against the frame-sharded block's
    at the same P (tests/distributed/test_costs.py checks the bytes themselves)."""
    got = ranks(2).run(_measure)
    records = [seqpar.record(v, 2, SHAPE, {r: g[v] for r, g in enumerate(got)}, 1, 1, torch.float32)
               for v in ("frames", "ulysses")]
    frames, ulysses = records
    assert frames["status"] == ulysses["status"] == "ok"
    header, *rows = seqpar.table(records)
    assert header.split() == ["variant", "P", "median", "s", "MB", "sent", "/", "rank", "formula", "MB", "vs",
                              "frames"]
    cells = {row.split()[0]: row.split()[1:] for row in rows}
    ratio = max(ulysses["bytes_per_rank"]) / max(frames["bytes_per_rank"])
    assert cells["frames"] == ["2", f"{frames['median_s']:.3f}", f"{max(frames['bytes_per_rank']) / 1e6:.2f}",
                               f"{max(frames['formula_bytes_per_rank']) / 1e6:.2f}", "1.00x"]
    assert cells["ulysses"] == ["2", f"{ulysses['median_s']:.3f}", f"{max(ulysses['bytes_per_rank']) / 1e6:.2f}",
                                "-", f"{ratio:.2f}x"]


@pytest.mark.parametrize("value", ["0", "a,b", ","])
def test_bench_refuses_bad_process_counts(value):
    from divattn.__main__ import main

    with pytest.raises(SystemExit, match="--sequence-parallel takes"):
        main(["bench", "--sequence-parallel", value])
