"""The CUDA backend on CPU tensors under the emulator (divattn.ops.cuda_emulator).

Every test here runs with ``DIVATTN_CUDA_EMULATE=1``; the first one builds the emulated
binding and kernel library (under a minute on 2 cores, then cached). Fresh memory is
filled with NaN as in the op tests.
"""

import pytest

from divattn.ops import cuda_emulator

from ..ops.conftest import poison_empty  # noqa: F401  (autouse: NaN in fresh memory)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: builds changed copies of the kernels (about 5 s each on 2 cores)")


@pytest.fixture(autouse=True)
def emulated(monkeypatch):
    why = cuda_emulator.unavailable_reason()
    if why is not None:
        pytest.skip(why)
    monkeypatch.setenv(cuda_emulator.ENV, "1")
    yield
