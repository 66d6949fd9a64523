"""Fixtures shared by the model tests."""

import pytest

import divattn.ops.functions


@pytest.fixture
def kernel_calls(monkeypatch):
    """The ops that reach a kernel backend (``functions.run``), in call order."""
    calls = []
    real = divattn.ops.functions.run

    def run(backend, op, *args, **kwargs):
        calls.append(op)
        return real(backend, op, *args, **kwargs)

    monkeypatch.setattr(divattn.ops.functions, "run", run)
    return calls
