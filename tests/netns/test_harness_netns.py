"""The harness itself: links carry traffic and ``link_down`` really cuts them; ``close`` stops its
daemons in order (exit 0) and leaves no namespace and no process behind, even one the topology
did not start; namespaces of a dead run
are swept; ``proc_usage`` reads a live process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from tests.netns.harness import Topology, in_netns, proc_usage, sweep_stale, tcp_connect_outcome

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def _namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def _listen(ns: str, port: int) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket()
        s.bind(("0.0.0.0", port))
        s.listen(4)
        return s

    return in_netns(ns, make)


def test_links_carry_and_link_down_cuts(topology):
    lan = topology.switch("lan", "10.9.0.0/24")
    a, b = topology.host("a", lan), topology.host("b", lan)
    with _listen(b.ns, 7000):
        assert tcp_connect_outcome(a.ns, b.ip, 7000) == "connected"
        assert tcp_connect_outcome(a.ns, b.ip, 7001) == "refused"  # b answers: nothing there
        assert tcp_connect_outcome(topology.namespace("alone"), b.ip, 7000).startswith("unreachable")
        topology.link_down(a.ns, "eth0")
        assert tcp_connect_outcome(a.ns, b.ip, 7000, timeout=1) != "connected"
        topology.link_up(a.ns, "eth0")
        assert tcp_connect_outcome(a.ns, b.ip, 7000) == "connected"


def test_routes_come_back_after_link_up(topology):
    left, right = topology.switch("left", "10.9.1.0/24"), topology.switch("right", "10.9.2.0/24")
    topology.core("core", [left, right])
    a = topology.host("a", left, gateway=left.gateway())
    b = topology.host("b", right, gateway=right.gateway())
    with _listen(b.ns, 7000):
        assert tcp_connect_outcome(a.ns, b.ip, 7000) == "connected"
        topology.link_down(a.ns, "eth0")  # Linux drops a's default route with it
        topology.link_up(a.ns, "eth0")
        assert tcp_connect_outcome(a.ns, b.ip, 7000) == "connected"


def test_close_removes_every_namespace_and_process(tmp_path, netns_available):
    topo = Topology(tmp_path)
    try:
        lan = topo.switch("lan", "10.9.3.0/24")
        host = topo.host("a", lan)
        daemon = topo.daemon(host)
        tracked = topo.popen(host.ns, ["sleep", "600"])
        # a process the topology never heard of, still inside one of its namespaces
        stray = subprocess.Popen(["ip", "netns", "exec", host.ns, sys.executable, "-c", "import time; time.sleep(600)"])
        usage = proc_usage(stray.pid)
        assert usage.rss_bytes > 0 and usage.cpu_s >= 0 and usage.threads >= 1
        assert topo.prefix.startswith(f"isw{os.getpid()}t")
        assert {n for n in _namespaces() if n.startswith(topo.prefix)} == {host.ns, lan.ns}
    finally:
        topo.close()
    assert stray.wait(10) is not None and tracked.wait(10) is not None
    assert daemon.proc.returncode == 0, daemon.log_text()  # stopped in order by its SIGINT, not killed
    assert {n for n in _namespaces() if n.startswith(topo.prefix)} == set()
    with pytest.raises(ProcessLookupError):
        proc_usage(stray.pid)


def test_namespaces_of_a_dead_run_are_swept(netns_available):
    dead = subprocess.Popen(["true"])
    dead.wait()
    name = f"isw{dead.pid}t1-left-behind"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert name in sweep_stale()
        assert name not in _namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
