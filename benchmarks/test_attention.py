"""Attention core, forward and forward + backward: every op of every shape, every provider.

Each provider starts from the packed qkv projection output and ends with the tokens the
output projection reads (see :mod:`divattn.bench.providers`).
"""


def test_attention(benchmark, bench, attn_case):
    bench.run(attn_case, benchmark)
