import pytest

from .ranks import Ranks

_GROUPS = {}


@pytest.fixture(scope="session")
def ranks():
    """``ranks(P)``: a gloo group of P processes, started once per session and kept (a group
    that broke in a failing test is started again)."""

    def get(world: int) -> Ranks:
        group = _GROUPS.get(world)
        if group is None or group.broken:
            if group is not None:
                group.close(kill=True)
            group = _GROUPS[world] = Ranks(world)
        return group

    yield get
    for group in _GROUPS.values():
        group.close(kill=group.broken)
    _GROUPS.clear()
