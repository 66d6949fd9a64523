"""The sequence-parallel case of ``divattn bench`` (divattn.bench.seqpar) on a tiny clip: each
rank's measurement, the records and the table, on the session's gloo group of 2."""

import pytest
import torch

from divattn.bench import seqpar

SHAPE = dict(B=1, T=3, N=4)


def _measure(rank, world):
    return {v: seqpar.measure(v, SHAPE, 1, torch.device("cpu"), torch.float32) for v in ("frames", "ulysses")}


def test_records_and_table(ranks):
    got = ranks(2).run(_measure)
    records = [seqpar.record(v, 2, SHAPE, {r: g[v] for r, g in enumerate(got)}, 1, 1, torch.float32)
               for v in ("frames", "ulysses")]
    frames, ulysses = records
    assert frames["status"] == ulysses["status"] == "ok"
    assert frames["bytes_per_rank"] == frames["formula_bytes_per_rank"]
    assert max(ulysses["bytes_per_rank"]) > 3 * max(frames["bytes_per_rank"])
    lines = seqpar.table(records)
    assert lines[0].split() == ["variant", "P", "median", "s", "MB", "sent", "/", "rank", "formula", "MB", "vs",
                                "frames"]
    assert lines[1].split()[:2] == ["frames", "2"] and lines[2].split()[-1].endswith("x")


@pytest.mark.parametrize("value", ["0", "a,b", ","])
def test_bench_refuses_bad_process_counts(value):
    from divattn.__main__ import main

    with pytest.raises(SystemExit, match="--sequence-parallel takes"):
        main(["bench", "--sequence-parallel", value])
