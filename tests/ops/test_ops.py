"""Every op, forward and all gradients, against the fp64 reference on every kernel backend.

The grid is generated from the backends' declared capabilities: a backend that cannot
run here (the CUDA extension on a CPU machine) is skipped with the dispatcher's reason.
"""

import pytest
import torch

from .cases import DTYPES, KERNEL_BACKENDS, Case, assert_close_to_reference, skip_reason

C = Case
CASES = [
    # temporal: T over {1, 3, 8, 13}, both orders, packed views of one qkv
    C("temporal", 2, 8, 49, 3, 64, "hwt"),
    C("temporal", 1, 13, 49, 2, 72, "thw"),
    C("temporal", 2, 3, 196, 1, 40, "hwt"),
    C("temporal", 1, 1, 49, 2, 64, "thw"),
    C("temporal", 2, 13, 1, 3, 40, "hwt"),
    C("temporal", 2, 8, 49, 2, 72, "thw", "separate"),
    C("temporal", 1, 3, 49, 3, 40, "hwt", "transposed"),
    C("temporal", 2, 8, 49, 1, 64, "hwt", "sliced"),
    C("temporal", 2, 3, 49, 2, 40, "hwt", "expanded"),
    # spatial without cls
    C("spatial", 1, 3, 196, 2, 64, "hwt"),
    C("spatial", 2, 8, 49, 1, 72, "thw"),
    C("spatial", 2, 1, 1, 3, 40, "hwt"),
    C("spatial", 1, 13, 49, 2, 40, "thw", "transposed"),
    C("spatial", 2, 3, 49, 2, 64, "hwt", "expanded"),
    # spatial with the cls token
    C("spatial_cls", 1, 8, 196, 1, 64, "hwt"),
    C("spatial_cls", 2, 3, 49, 3, 72, "thw"),
    C("spatial_cls", 2, 13, 1, 2, 40, "hwt"),
    C("spatial_cls", 1, 1, 49, 2, 64, "hwt"),
    C("spatial_cls", 2, 3, 49, 2, 40, "thw", "separate"),
    C("spatial_cls", 2, 8, 49, 1, 64, "hwt", "transposed"),
    C("spatial_cls", 2, 3, 49, 2, 72, "hwt", "sliced"),
    C("spatial_cls", 2, 3, 49, 2, 40, "thw", "expanded"),
    # joint attention over all tokens
    C("joint", 2, 3, 49, 2, 64, "hwt"),
    C("joint", 1, 1, 1, 3, 40, "hwt"),
    C("joint", 1, 8, 13, 1, 72, "hwt", "separate"),
]


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_matches_reference(case, dtype, backend):
    why = skip_reason(backend, case.op, dtype, case.D)
    if why:
        pytest.skip(f"{backend}: {why}")
    assert_close_to_reference(case, backend, dtype)
