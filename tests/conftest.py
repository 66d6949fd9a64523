import os

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. This must be set before
# divattn imports its kernel module (it does so lazily, on the first kernel call).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def kernel_calls(monkeypatch):
    """The ops that reach a kernel backend (``divattn.ops.functions.attention``), in call order."""
    import divattn.ops.functions

    calls = []
    real = divattn.ops.functions.attention

    def attention(backend, op, *args):
        calls.append(op)
        return real(backend, op, *args)

    monkeypatch.setattr(divattn.ops.functions, "attention", attention)
    return calls
