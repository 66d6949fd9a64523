import math

import pytest
import torch
import torch._dynamo

# dynamo builds its table of torch's functions once, from the torch namespace as it finds
# it: build it now, before poison_empty replaces torch.empty, so that a compile under the
# wrapper sees the wrapper as user code (and inlines it) and later compiles see torch's own.
torch._dynamo.trace_rules.get_torch_obj_rule_map()


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Fill fresh floating-point memory with NaN so an unwritten element fails loudly."""
    empty, empty_like, empty_strided = torch.empty, torch.empty_like, torch.empty_strided

    def poison(t):
        if t.is_floating_point() and t.numel() and not isinstance(t, torch._subclasses.FakeTensor):
            t.fill_(math.nan)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
    monkeypatch.setattr(torch, "empty_strided", lambda *a, **k: poison(empty_strided(*a, **k)))
    yield


@pytest.fixture(autouse=True)
def cuda_kernels_emulated(request, monkeypatch):
    """Without a GPU, a test of ``backend="cuda"`` runs the CUDA kernels emulated on the CPU
    (:mod:`divattn.ops.cuda_emulator`); where the emulator cannot be built it skips with
    the dispatcher's reason, as it would without it."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is None or callspec.params.get("backend") != "cuda" or torch.cuda.is_available():
        yield
        return
    from divattn.ops import cuda_emulator

    if cuda_emulator.unavailable_reason() is None:
        monkeypatch.setenv(cuda_emulator.ENV, "1")
    yield
