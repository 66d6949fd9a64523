"""What each block saves for the backward, counted in values of width C per token, against
the formula for each memory setting; and "min" changes no gradient.

Counted with ``torch.autograd.graph.saved_tensors_hooks``: the distinct storages saved
during one training forward of a block, parameters left out. A change that saves one
more tensor of the tokens' size adds 1 to a count and fails here.
"""

import pytest
import torch

from divattn.layers.blocks import Block, DividedBlock, FactorisedDotProductBlock, FactorisedSelfAttentionBlock
from divattn.layers.st import STBlock

C, H, T, N, B = 96, 2, 4, 16, 1

# Per token, with "fast": every LayerNorm's input (one per norm) and output, each qkv (3),
# each attention output the projection reads (1), temporal_fc's input, fc1's and GELU's
# outputs (4 each). "min" saves no LayerNorm output and no GELU output, nor temporal_fc's
# input in the divided block (recomputed from the temporal output).
BLOCKS = {
    # norms: 3 in + 3 out; 2 qkv; 2 o; temporal_fc in; MLP 8
    "divided": (lambda be: DividedBlock(C, H, T, backend=be), (B, 1 + N * T, C), 23, 15),
    # norms 2 + 2; qkv 3; o 1; MLP 8
    "joint": (lambda be: Block(C, H, backend=be), (B, 1 + N * T, C), 16, 10),
    # norms 3 + 3; 2 qkv; 2 o; MLP 8
    "factorised_self_attention": (lambda be: FactorisedSelfAttentionBlock(C, H, T, backend=be), (B, N * T, C), 22, 15),
    # norms 2 + 2; one qkv; the two halves' outputs (C/2 each); MLP 8
    "factorised_dot_product": (lambda be: FactorisedDotProductBlock(C, H, T, backend=be), (B, N * T, C), 16, 10),
    # as factorised self-attention, causal temporal
    "st": (lambda be: STBlock(C, H, backend=be), (B, T, N, C), 22, 15),
}


def saved_per_token(block, x) -> float:
    """Bytes of the distinct storages saved for backward (not parameters), in units of C fp32 values per token."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params) / (x.numel() * x.element_size())


def _block(name, backend, memory):
    build, shape, _, _ = BLOCKS[name]
    torch.manual_seed(0)
    block = build(backend).train()
    for m in block.modules():
        if hasattr(m, "memory"):
            m.memory = memory
    return block, torch.randn(shape, requires_grad=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("memory", ["fast", "min"])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_saved_values_per_token_match_the_formula(name, memory, backend):
    block, x = _block(name, backend, memory)
    want = BLOCKS[name][2 if memory == "fast" else 3]
    if name == "divided":
        # the cls query's output in every frame (one row of C per frame) is kept
        want += T / (1 + N * T)
        if backend == "torch":
            # the torch backend saves its [cls] + N sequences per frame (3 values), one cls
            # row per frame more than the qkv has
            want += 3 * (T * (1 + N) - (1 + N * T)) / (1 + N * T)
    got = saved_per_token(block, x)
    # per-token statistics (each LayerNorm's mean and 1/std, each attention's H log-sum-exps:
    # at most 10 values here) stay under 0.15 C
    assert want <= got < want + 0.15, f"{name} {memory} {backend}: {got:.3f} C per token, formula {want:.3f}"


@pytest.mark.parametrize("name", list(BLOCKS))
def test_min_memory_changes_no_gradient(name):
    """In training, with stochastic depth drawing the same samples in both settings."""
    grads = []
    for memory in ("fast", "min"):
        block, x = _block(name, "torch", memory)
        block.double()
        block.drop_path.p = 0.5
        x = x.detach().double().expand(3, *x.shape[1:]).contiguous().requires_grad_(True)
        torch.manual_seed(1)
        out = block(x)
        out.square().sum().backward()
        grads.append([out.detach(), x.grad] + [p.grad for p in block.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
