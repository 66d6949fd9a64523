"""Broken copies of the kernels and of the shim fail the suite: a removed __syncthreads, a
wrong fragment index in a kernel, a sum over partials nobody wrote, a wrong fragment layout
in the emulator's mma.

Each test copies divattn/csrc/ to a temporary folder, changes one line, builds the kernel
library from the copy (only the changed source recompiles) and runs one op case of the
grid (or the shim's matmul check) through it: it must fail. Marked slow: about 5 s each
on a quiet 2-core machine (15 to 25 s when it is shared), most of it compiling the
changed file.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass

import pytest
import torch

from divattn.ops import cuda_emulator

from ..ops.cases import Case, Causal, assert_causal_close_to_reference, assert_close_to_reference, causal_case
from . import test_shim


@dataclass(frozen=True)
class Mutation:
    id: str
    name: str
    file: str
    old: str
    new: str
    case: object  # a Case or a Causal (tests/ops/cases.py)
    dtype: torch.dtype

    def check(self):
        if isinstance(self.case, Causal):
            assert_causal_close_to_reference(self.case, "cuda", self.dtype)
        else:
            assert_close_to_reference(self.case, "cuda", self.dtype)


SPATIAL = Case("spatial_cls", 1, 3, 196, 2, 64, "hwt")  # 197 keys: four 64-key tiles a frame
MUTATIONS = [
    Mutation("fwd-mma-barrier-after-wait", "no barrier between a key tile's cp.async wait and its use",
             "attn_fwd_mma.cu", "    __syncthreads();\n    if (active) {", "    if (active) {", SPATIAL, torch.float16),
    Mutation("fwd-mma-barrier-before-refill", "no barrier before the forward refills a key/value buffer",
             "attn_fwd_mma.cu", "    __syncthreads();  // the tile is consumed", "    // the tile is consumed",
             SPATIAL, torch.float16),
    Mutation("bwd-mma-barrier-before-dq", "no barrier between the backward's dS^T stores and its dQ",
             "attn_bwd_mma.cu", "    __syncthreads();\n    if (seq_ok) {", "    if (seq_ok) {", SPATIAL,
             torch.bfloat16),
    Mutation("fwd-mma-fragment-row", "the forward writes accumulator rows g and g + 8 swapped", "attn_fwd_mma.cu",
             "0.f : o[n][2 * h + e] * inv)", "0.f : o[n][2 * (1 - h) + e] * inv)",
             Case("temporal", 2, 8, 7, 2, 64, "thw"), torch.float16),
    Mutation("fwd-fp32-barrier-after-load", "no barrier between the fp32 forward's key tile and its scores",
             "attn_fwd.cu", "    __syncthreads();\n    const int key = start + lane;",
             "    const int key = start + lane;", Case("spatial", 1, 3, 49, 2, 64, "hwt"), torch.float32),
    Mutation("dq-sum-every-block", "causal dq summed over every key block, also those that skipped the query",
             "attn_bwd_mma.cu", "kb < blocks && static_cast<int64_t>(kb) * block_keys <= seen", "kb < blocks",
             causal_case(140, 140, 1, 1, 128, "hwt", B=1), torch.float16),
]


def mutated_csrc(tmp_path, file: str, old: str, new: str):
    csrc = tmp_path / "csrc"
    shutil.copytree(cuda_emulator.CSRC, csrc)
    path = csrc / file
    text = path.read_text()
    assert text.count(old) == 1, f"{file} no longer has exactly one {old!r}: update this mutation"
    path.write_text(text.replace(old, new))
    return csrc


@pytest.mark.slow
@pytest.mark.parametrize("m", MUTATIONS, ids=lambda m: m.id)
def test_a_broken_kernel_fails_the_op_grid(m, tmp_path):
    m.check()  # the kernels as they are pass
    csrc = mutated_csrc(tmp_path, m.file, m.old, m.new)
    library = cuda_emulator.KernelLibrary(cuda_emulator.kernel_library_path(csrc))
    with cuda_emulator.using(library):
        with pytest.raises((AssertionError, RuntimeError)):
            m.check()


@pytest.mark.slow
def test_a_wrong_fragment_layout_in_the_shim_fails_its_matmul_check(tmp_path):
    csrc = mutated_csrc(tmp_path, "emulator/runtime.cpp", "const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;",
                        "const int row = i < 4 ? g : g + 8;")
    shim = test_shim.load([test_shim.HERE / "shim_kernels.cu", csrc / "emulator" / "runtime.cpp"], csrc)
    with pytest.raises(AssertionError):
        test_shim.test_mma_fragments_in_registers_match_a_matmul(shim, torch.float16)
