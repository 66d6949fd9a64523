"""Every op, forward and all gradients, against the fp64 reference on every kernel backend.

The grid is generated from the backends' declared capabilities: a backend that cannot
run here is skipped with the dispatcher's reason. Without a GPU the cuda backend's kernels
run emulated on the CPU (tests/ops/conftest.py), and the Triton kernels in the interpreter.
"""

import pytest

from .cases import CASES, DTYPES, KERNEL_BACKENDS, assert_close_to_reference, skip_reason



@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_matches_reference(case, dtype, backend):
    why = skip_reason(backend, case.op, dtype, case.D)
    if why:
        pytest.skip(f"{backend}: {why}")
    assert_close_to_reference(case, backend, dtype)
