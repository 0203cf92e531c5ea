import pytest

from tests.e2e.daemons import Daemon


@pytest.fixture
def daemons(tmp_path):
    """``(tmp_path, started)``: append every Daemon started; each is stopped after the test."""
    started: list[Daemon] = []
    yield tmp_path, started
    for d in started:
        d.stop()
