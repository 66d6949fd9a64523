"""Attention core, forward and forward + backward: every op of every shape, every provider.

Each provider starts from the packed qkv projection output and ends with the tokens the
output projection reads (see :mod:`divattn.bench.providers`). The causal shapes
(``st_causal_16x256`` on a GPU, ``cpu_st_causal_16x64`` on a CPU) are the causal temporal
attention of an ST transformer: divattn's ``causal=True`` against the copy-based eager
code with a causal mask and ``F.scaled_dot_product_attention(..., is_causal=True)`` after
a permute; ``--bench-shapes cpu_st_causal_16x64`` runs only those.
"""


def test_attention(benchmark, bench, attn_case):
    bench.run(attn_case, benchmark)
