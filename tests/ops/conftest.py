import math

import pytest
import torch


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
