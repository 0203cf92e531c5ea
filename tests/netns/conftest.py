"""Fixtures of the multi-host tests: ``topology`` builds namespaces under the test's tmp_path and
removes them (and every process in them) after the test; a failing test's report carries the
last lines of every daemon's log. Every test module here marks its tests ``netns`` (registered in pyproject.toml) (``pytest -m netns`` runs
only them, ``-m "not netns"`` all but them); they run by default, and skip with the reason where
the machine cannot build namespaces (not root, no ``ip`` or ``iptables``)."""

from __future__ import annotations

import pytest

from tests.netns.harness import Topology, unavailable_reason

_reason: list[str | None] = []


def _unavailable() -> str | None:
    if not _reason:
        _reason.append(unavailable_reason())
    return _reason[0]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    topo = getattr(item, "_netns_topology", None)
    if topo is not None and report.when == "call" and report.failed:
        report.sections.append(("netns daemon logs (last lines each)", topo.logs()))


@pytest.fixture
def netns_available():
    """Skips the test, with the reason, where namespaces cannot be built."""
    reason = _unavailable()
    if reason:
        pytest.skip(f"multi-host netns tests need root, ip and iptables: {reason}")


@pytest.fixture(scope="session")
def builtin_models(tmp_path_factory):
    """One folder for the builtin model of every node of the session (built by the first offer)."""
    return tmp_path_factory.mktemp("netns-models")


@pytest.fixture
def topology(request, tmp_path, netns_available, builtin_models):
    """A ``Topology`` in ``tmp_path``, closed after the test whatever happened; its nodes share
    ``builtin_models``."""
    topo = Topology(tmp_path, check=False, models_dir=builtin_models)
    request.node._netns_topology = topo
    try:
        yield topo
    finally:
        topo.close()
