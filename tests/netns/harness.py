"""Multi-host networks on one Linux machine, and real ``node start`` processes inside them.

What this module owns: Linux network namespaces (one per simulated host, switch or router),
the veth pairs and bridges joining them, addresses, routes and the iptables rules of NAT
routers, and the node processes started inside those namespaces. What it must never do: touch
the machine's own namespace (every link is created directly inside its namespaces, so no
interface ever appears in the root namespace), or leave anything behind: ``Topology.close``
stops every process it started, kills whatever still runs in its namespaces (``ip netns pids``)
and deletes every namespace, which removes their links and bridges with them.

Names: every namespace is ``isw<pid>t<n>-<role>``, so concurrent runs (other processes, other
topologies of one process) never collide, and namespaces left by a run that was SIGKILLed are
recognised by their dead pid and swept by the next topology. Interface names live inside their
namespace (``eth0``, ``p3``, ``br0``, ``lan``), so they stay far below Linux's 15 characters.

Nothing here imports pytest: benchmarks (``bench/``) build swarms with the same API.

    with Topology(workdir) as topo:
        lan = topo.switch("lan", "10.1.0.0/24")
        a, b = topo.host("a", lan), topo.host("b", lan)
        da = topo.daemon(a, "--escrow")           # node init + node start in a's namespace
        db = topo.daemon(b, "--bootstrap", da.dial_addr)
        db.cli_json("providers", "--json")        # ip netns exec b python -m cli.main ...
        db.api("GET", "/api/v1/status")           # HTTP from inside b's namespace, ~ms
        topo.link_down(a.ns, "eth0")              # partition, then topo.link_up(...)

Requirements: root, ``ip`` (iproute2) and ``iptables``; ``unavailable_reason()`` says why not.
"""

from __future__ import annotations

import ctypes
import dataclasses
import http.client
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence, TypeVar

from node import Home
from tests.e2e.daemons import ROOT, node_env
from wallet import read_public_identity

__all__ = [
    "NetnsUnavailable", "unavailable_reason", "Topology", "Switch", "Host", "Router", "NsDaemon", "ProcUsage",
    "proc_usage", "in_netns", "tcp_connect_outcome", "poll_until", "start_all", "make_daemons", "sweep_stale", "DEFAULT_LISTEN", "NODE_PORT", "VERBOSE_ENV",
]

#: the port every node listens on inside its own namespace (each namespace has its own ports)
NODE_PORT = 4001
DEFAULT_LISTEN = f"/ip4/0.0.0.0/tcp/{NODE_PORT}"
#: set (to anything) in the environment, every daemon starts with ``-v``: its log has the
#: node's progress lines (bootstrap redials, keep-alive verdicts …) and libp2p's
VERBOSE_ENV = "NETNS_VERBOSE"
_PREFIX = "isw"
_NAME_RE = re.compile(rf"^{_PREFIX}(\d+)t\d+-")
_CLONE_NEWNET = 0x40000000
_NETNS_DIR = Path("/run/netns")
_topologies = 0
_counter_lock = threading.Lock()
T = TypeVar("T")


class NetnsUnavailable(RuntimeError):
    """This machine cannot build namespaces (not root, no ``ip``/``iptables``, no netns support)."""


def unavailable_reason() -> str | None:
    """Why network-namespace topologies cannot be built here, or None when they can (it creates
    and deletes one probe namespace)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, not {sys.platform}"
    if os.geteuid() != 0:
        return "network namespaces need root (run the suite as root, as CI does)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (apt-get install iproute2 iptables)"
    probe = f"{_PREFIX}{os.getpid()}t0-probe"
    out = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if out.returncode != 0:
        return f"`ip netns add` fails here: {out.stderr.strip()}"
    try:
        nat = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-t", "nat", "-L", "-n"],
                             capture_output=True, text=True, timeout=30)
        if nat.returncode != 0:
            return f"iptables' nat table is unavailable in a namespace: {nat.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): {out.stderr.strip()}")
    return out


# ---- code running inside a namespace, from this process -------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a fresh thread that has entered namespace ``ns`` (``setns(2)`` changes only the
    calling thread's namespace), and return what it returns or raise what it raised. Sockets keep
    the namespace they were created in, so a socket made by ``fn`` can be used from any thread."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            fd = os.open(_NETNS_DIR / ns, os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def tcp_connect_outcome(ns: str, host: str, port: int, timeout: float = 3.0) -> str:
    """Open (and close) a plain TCP connection from inside ``ns``: ``"connected"``, ``"refused"``,
    ``"timeout"`` or ``"unreachable: <reason>"``."""

    def attempt() -> str:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                return "connected"
        except ConnectionRefusedError:
            return "refused"
        except (socket.timeout, TimeoutError):
            return "timeout"
        except OSError as exc:
            return f"unreachable: {exc.strerror or exc}"

    return in_netns(ns, attempt)


def poll_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Call ``predicate`` until it returns something truthy, and return that; AssertionError after
    ``timeout`` seconds (naming ``what`` and the last error the predicate raised, if any)."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except AssertionError:
            raise
        except Exception as exc:  # a daemon not answering yet: try again until the deadline
            last = exc
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}"
                                 + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


# ---- process accounting ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ProcUsage:
    """What a process holds and has used: resident memory and CPU time (user + system)."""

    pid: int
    rss_bytes: int
    cpu_s: float
    threads: int


def proc_usage(pid: int) -> ProcUsage:
    """Read ``/proc/PID`` (the pid namespace is shared with every network namespace).

    Raises:
        ProcessLookupError: no such process (it exited).
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError as exc:
        raise ProcessLookupError(pid) from exc
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields.get("VmRSS", "0 kB").split()[0])
    after_comm = stat.rsplit(")", 1)[1].split()  # comm may hold spaces and parentheses
    ticks = os.sysconf("SC_CLK_TCK")
    utime, stime = int(after_comm[11]), int(after_comm[12])
    return ProcUsage(pid=pid, rss_bytes=rss_kb * 1024, cpu_s=(utime + stime) / ticks,
                     threads=int(fields.get("Threads", "1").strip()))


# ---- the network --------------------------------------------------------------------------------

@dataclasses.dataclass
class Switch:
    """A Linux bridge ``br0`` alone in its own namespace; hosts and routers plug veths into it."""

    name: str
    ns: str
    subnet: ipaddress.IPv4Network
    _next_host: int = 10  # .1 .. .9 are left for routers and gateways
    _ports: int = 0

    def allocate(self) -> str:
        """The next free host address of the subnet."""
        hosts = self.subnet.num_addresses - 2
        if self._next_host > hosts:
            raise ValueError(f"switch {self.name} ({self.subnet}) has no free address left")
        addr = str(self.subnet.network_address + self._next_host)
        self._next_host += 1
        return addr

    def gateway(self, index: int = 1) -> str:
        return str(self.subnet.network_address + index)


@dataclasses.dataclass
class Host:
    """A simulated machine: a namespace with loopback up and one interface per switch it is on."""

    name: str
    ns: str
    ip: str  # the address on its first switch
    ifaces: dict[str, str] = dataclasses.field(default_factory=dict)  # ifname -> address
    _nifs: int = 0


@dataclasses.dataclass
class Router:
    """A NAT router: its namespace, the interfaces and addresses on both sides."""

    name: str
    ns: str
    public_if: str
    public_ip: str
    private_if: str
    private_ip: str


class Topology:
    """A set of namespaces, links and processes, all removed by ``close`` (or leaving the
    ``with`` block), whatever state a failure left them in.

    Raises (constructor):
        NetnsUnavailable: with the reason, when this machine cannot build namespaces.
    """

    def __init__(self, workdir: Path | str, *, check: bool = True, models_dir: Path | str | None = None) -> None:
        global _topologies
        if check:
            reason = unavailable_reason()
            if reason:
                raise NetnsUnavailable(reason)
        with _counter_lock:
            _topologies += 1
            index = _topologies
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        # one folder for the builtin model of every node (see NsDaemon): built once, not once a provider
        self.models_dir = Path(models_dir) if models_dir is not None else None
        self.prefix = f"{_PREFIX}{os.getpid()}t{index}-"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self.switches: dict[str, Switch] = {}
        self.routers: dict[str, Router] = {}
        self.daemons: list[NsDaemon] = []
        self.processes: list[subprocess.Popen] = []
        self._routes: dict[str, dict[str, str]] = {}  # ns -> dest -> via, put back by link_up
        self._closed = False
        sweep_stale()

    def __enter__(self) -> "Topology":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ------------------------------------------------------------------------------

    def namespace(self, role: str) -> str:
        """Create an empty namespace (loopback up) and return its name."""
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,30}", role):
            raise ValueError(f"role names are short lowercase words, not {role!r}")
        ns = self.prefix + role
        _sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        return ns

    def switch(self, name: str, subnet: str) -> Switch:
        """A bridge in its own namespace serving ``subnet`` (e.g. ``10.1.0.0/24``)."""
        ns = self.namespace(f"sw-{name}")
        _sh("ip", "-n", ns, "link", "add", "br0", "type", "bridge")
        _sh("ip", "-n", ns, "link", "set", "br0", "up")
        sw = Switch(name=name, ns=ns, subnet=ipaddress.IPv4Network(subnet))
        self.switches[name] = sw
        return sw

    def plug(self, ns: str, switch: Switch, ifname: str, addr: str) -> str:
        """A veth from ``ns`` (named ``ifname``, holding ``addr``) to a new port of ``switch``'s
        bridge; returns the bridge port's name (in the switch's namespace)."""
        port = f"p{switch._ports}"
        switch._ports += 1
        _sh("ip", "link", "add", ifname, "netns", ns, "type", "veth", "peer", "name", port, "netns", switch.ns)
        _sh("ip", "-n", switch.ns, "link", "set", port, "master", "br0")
        _sh("ip", "-n", switch.ns, "link", "set", port, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{addr}/{switch.subnet.prefixlen}", "dev", ifname)
        _sh("ip", "-n", ns, "link", "set", ifname, "up")
        return port

    def host(self, name: str, switch: Switch, addr: str | None = None, gateway: str | None = None) -> Host:
        """A host on ``switch`` as ``eth0`` (the next free address unless ``addr``), with a default
        route through ``gateway`` when given."""
        ns = self.namespace(name)
        ip = addr or switch.allocate()
        self.plug(ns, switch, "eth0", ip)
        h = Host(name=name, ns=ns, ip=ip, ifaces={"eth0": ip}, _nifs=1)
        if gateway:
            self.route(ns, "default", gateway)
        self.hosts[name] = h
        return h

    def attach(self, host: Host, switch: Switch, addr: str | None = None) -> str:
        """Put ``host`` on one more switch (``eth1``, ``eth2`` …); returns the interface name."""
        ifname = f"eth{host._nifs}"
        host._nifs += 1
        ip = addr or switch.allocate()
        self.plug(host.ns, switch, ifname, ip)
        host.ifaces[ifname] = ip
        return ifname

    def route(self, ns: str, dest: str, via: str) -> None:
        """``ip route replace DEST via VIA`` in ``ns`` (``dest`` a CIDR or ``default``)."""
        _sh("ip", "-n", ns, "route", "replace", dest, "via", via)
        self._routes.setdefault(ns, {})[dest] = via

    def core(self, name: str, switches: Sequence[Switch]) -> Host:
        """A plain router (no NAT) on every switch at its gateway address (.1), forwarding between
        them; hosts reach the other subnets with ``gateway=switch.gateway()``. Its interface on the
        i-th switch is ``eth<i>`` (``link_down(core.ns, "eth1")`` cuts the second subnet off)."""
        ns = self.namespace(name)
        host = Host(name=name, ns=ns, ip=switches[0].gateway())
        for sw in switches:
            self.attach(host, sw, sw.gateway())
        self._forwarding(ns)
        self.hosts[name] = host
        return host

    def router(self, name: str, public: Switch, private: Switch, *, public_ip: str | None = None,
               upstream: str | None = None) -> Router:
        """A NAT router between ``private`` (it is the LAN's gateway, ``.1``) and ``public``: IPv4
        forwarding on, MASQUERADE of the LAN's traffic out of its public interface, and every
        connection opened from the public side towards the LAN dropped (only replies to what the
        LAN opened come back: ``conntrack ESTABLISHED,RELATED``). Hosts on the LAN need
        ``gateway=private.gateway()``. ``upstream``: a default route on the public side.

        Interfaces: ``pub`` (public) and ``lan`` (private)."""
        ns = self.namespace(name)
        pub_ip = public_ip or public.allocate()
        lan_ip = private.gateway()
        self.plug(ns, public, "pub", pub_ip)
        self.plug(ns, private, "lan", lan_ip)
        if upstream:
            self.route(ns, "default", upstream)
        self._forwarding(ns)
        lan = str(private.subnet)
        rules = [
            ["-t", "nat", "-A", "POSTROUTING", "-s", lan, "-o", "pub", "-j", "MASQUERADE"],
            ["-P", "FORWARD", "DROP"],
            ["-A", "FORWARD", "-i", "lan", "-o", "pub", "-j", "ACCEPT"],
            ["-A", "FORWARD", "-i", "pub", "-o", "lan", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
             "-j", "ACCEPT"],
            # the router itself answers nothing from the public side but replies
            ["-A", "INPUT", "-i", "pub", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-A", "INPUT", "-i", "pub", "-j", "DROP"],
        ]
        for rule in rules:
            _sh("ip", "netns", "exec", ns, "iptables", "-w", *rule)
        r = Router(name=name, ns=ns, public_if="pub", public_ip=pub_ip, private_if="lan", private_ip=lan_ip)
        self.routers[name] = r
        return r

    def _forwarding(self, ns: str) -> None:
        _sh("ip", "netns", "exec", ns, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")

    def link_down(self, ns: str, ifname: str) -> None:
        """Take an interface down (its routes go with it): a partition until ``link_up``."""
        _sh("ip", "-n", ns, "link", "set", ifname, "down")

    def link_up(self, ns: str, ifname: str) -> None:
        """Bring an interface back up, with the routes ``route`` gave its namespace (Linux drops
        the gateway routes of an interface taken down, so they are put back; a route whose gateway
        is still unreachable is left out)."""
        _sh("ip", "-n", ns, "link", "set", ifname, "up")
        for dest, via in self._routes.get(ns, {}).items():
            _sh("ip", "-n", ns, "route", "replace", dest, "via", via, check=False)

    def exec(self, ns: str, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command inside ``ns`` (``ip netns exec``) and wait for it."""
        return _sh("ip", "netns", "exec", ns, *argv, check=check, timeout=timeout)

    def popen(self, ns: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen:
        """Start a command inside ``ns``; ``close`` kills it if it still runs."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kwargs)
        self.processes.append(proc)
        return proc

    # -- nodes ---------------------------------------------------------------------------------

    def daemon(self, host: Host, *extra: str, name: str | None = None, listen: str | None = DEFAULT_LISTEN,
               start: bool = True) -> "NsDaemon":
        """``node init`` a home under the workdir and (unless ``start=False``) ``node start`` it in
        ``host``'s namespace, waiting until it is ready. ``listen=None`` keeps the config's default
        (``/ip4/0.0.0.0/tcp/0``)."""
        d = NsDaemon(self, host, self.workdir / (name or host.name), *extra, listen=listen,
                     models_dir=self.models_dir)
        self.daemons.append(d)
        if start:
            d.start()
        return d

    def logs(self, tail_lines: int = 80) -> str:
        """The last lines of every daemon's log, one section each (for a failure report)."""
        parts = []
        for d in self.daemons:
            text = d.log_text()
            lines = text.splitlines()[-tail_lines:]
            parts.append(f"===== {d.host.name} ({d.host.ns}, {d.home}) =====\n" + "\n".join(lines))
        return "\n".join(parts)

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every daemon (SIGINT, then SIGKILL after 10 s) and process, kill what still runs in
        the namespaces, delete them. Never raises for what is already gone; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for d in self.daemons:
            d.interrupt()
        for d in self.daemons:
            d.stop(timeout=10)
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.namespaces):
            _remove_namespace(ns)
        self.namespaces.clear()


def _ns_pids(ns: str) -> list[int]:
    out = _sh("ip", "netns", "pids", ns, check=False)
    return [int(p) for p in out.stdout.split() if p.isdigit()]


def _remove_namespace(ns: str) -> None:
    """Kill every process left in ``ns`` (``ip netns pids``), then delete it."""
    deadline = time.monotonic() + 10
    while pids := _ns_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    _sh("ip", "netns", "del", ns, check=False)


def sweep_stale() -> list[str]:
    """Delete namespaces of this harness whose creating process is dead (a run killed with
    SIGKILL never reached its teardown); returns their names."""
    gone = []
    try:
        names = [p.name for p in _NETNS_DIR.iterdir()]
    except FileNotFoundError:
        return gone
    for name in names:
        m = _NAME_RE.match(name)
        if m is None or Path(f"/proc/{m.group(1)}").exists():
            continue
        _remove_namespace(name)
        gone.append(name)
    return gone


# ---- a node inside a namespace --------------------------------------------------------------------

class NsDaemon:
    """One ``node start`` process in ``host``'s namespace, with its own home; its log is
    ``HOME/daemon.log``. CLI calls (``cli``) and HTTP calls (``api``) run in the same namespace,
    where its loopback-only API lives."""

    def __init__(self, topo: Topology | None, host: Host, home: Path, *extra: str,
                 listen: str | None = DEFAULT_LISTEN, models_dir: Path | None = None) -> None:
        """``node init`` the home unless it exists; with ``models_dir``, ``HOME/models`` (where the
        ``builtin`` backend builds its model) is a link to it, so nodes share one build (the build
        is atomic under a lock: concurrent first uses end with one good folder)."""
        self.topo = topo
        self.host = host
        self.home = Path(home)
        self.extra = tuple(extra)
        self.listen = listen
        self.proc: subprocess.Popen | None = None
        self._interrupted = False
        self.info: dict[str, Any] = {}
        self._log = None
        if not (self.home / "config.toml").exists():
            self._node("init", "--home", str(self.home))
        if models_dir is not None and not (self.home / "models").exists():
            Path(models_dir).mkdir(parents=True, exist_ok=True)
            (self.home / "models").symlink_to(Path(models_dir).resolve(), target_is_directory=True)
        # what `node id` prints, read from the keystore's public header (no Python start-up)
        self.peer_id = read_public_identity(Home(self.home).keystore)[0]

    # -- commands --------------------------------------------------------------------------------

    def _argv(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.host.ns, sys.executable, "-m", "cli.main", *args]

    def _node(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        out = subprocess.run(self._argv(*args), capture_output=True, text=True, cwd=ROOT, env=node_env(),
                             timeout=timeout, stdin=subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise AssertionError(f"[{self.host.name}] node {' '.join(args)} failed ({out.returncode}): "
                                 f"{out.stderr.strip()}")
        return out

    def cli(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``node ARGS --home HOME`` inside the namespace."""
        return self._node(*args, "--home", str(self.home), check=check, timeout=timeout)

    def cli_json(self, *args: str, timeout: float = 60) -> Any:
        """``cli(*args, "--json")``, parsed."""
        return json.loads(self.cli(*args, "--json", timeout=timeout).stdout)

    def popen_cli(self, *args: str, **kwargs: Any) -> subprocess.Popen:
        """Start ``node ARGS --home HOME`` inside the namespace without waiting (stdout and stderr
        are pipes unless given); the topology kills it at close if it still runs."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(self._argv(*args, "--home", str(self.home)), cwd=ROOT, env=node_env(), **kwargs)
        if self.topo is not None:
            self.topo.processes.append(proc)
        return proc

    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 30) -> Any:
        """One call to the control API from inside the namespace (milliseconds, where a CLI call
        costs a Python start-up); returns the parsed JSON body.

        Raises:
            AssertionError: an HTTP status of 400 or more (with the body).
        """
        port = int(self.info["api_url"].rsplit(":", 1)[1])
        token = (self.home / "api.token").read_text().strip()
        payload = None if body is None else json.dumps(body).encode()

        def call() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
            try:
                headers = {"Authorization": f"Bearer {token}"}
                if payload is not None:
                    headers["Content-Type"] = "application/json"
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                return response.status, response.read()
            finally:
                conn.close()

        status, raw = in_netns(self.host.ns, call)
        if status >= 400:
            raise AssertionError(f"[{self.host.name}] {method} {path}: HTTP {status}: {raw[:500]!r}")
        return json.loads(raw) if raw else None

    # -- lifecycle -------------------------------------------------------------------------------

    def launch(self) -> None:
        """Start ``node start`` without waiting for it to be ready (``wait_ready`` waits)."""
        listen = ("--listen", self.listen) if self.listen else ()
        verbose = ("-v",) if os.environ.get(VERBOSE_ENV) else ()
        self._log = open(self.home / "daemon.log", "a")
        self._interrupted = False
        self.proc = subprocess.Popen(
            self._argv("start", "--home", str(self.home), *listen, *verbose, *self.extra),
            cwd=ROOT, env=node_env(), stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 90) -> dict[str, Any]:
        """Wait until the daemon wrote its ``daemon.json`` (the pid is its own: ``ip netns exec``
        execs the command) and return that info.

        Raises:
            AssertionError: it exited first (with its log) or was not ready in time.
        """
        assert self.proc is not None, "launch() first"

        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"[{self.host.name}] node start exited with {self.proc.returncode}:\n"
                                     f"{self.log_text()}")
            try:
                info = json.loads((self.home / "daemon.json").read_text())
            except (FileNotFoundError, ValueError):
                return None
            return info if info.get("pid") == self.proc.pid else None

        self.info = poll_until(ready, timeout, f"{self.host.name}'s daemon to be ready", interval=0.05)
        return self.info

    def start(self, timeout: float = 90) -> dict[str, Any]:
        """``launch`` and ``wait_ready``."""
        self.launch()
        return self.wait_ready(timeout)

    @property
    def port(self) -> int:
        """The libp2p TCP port it listens on (the fixed one, else the one it reports)."""
        if self.listen and not self.listen.endswith("/tcp/0"):
            return int(self.listen.rsplit("/", 1)[1])
        for addr in self.info.get("addrs", ()):
            m = re.search(r"/tcp/(\d+)", addr)
            if m:
                return int(m.group(1))
        raise AssertionError(f"[{self.host.name}] reports no TCP address: {self.info}")

    @property
    def dial_addr(self) -> str:
        """Its address on its host's first interface, as another host dials it."""
        return f"/ip4/{self.host.ip}/tcp/{self.port}/p2p/{self.peer_id}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def usage(self) -> ProcUsage:
        """Its RSS and CPU time (``proc_usage``)."""
        assert self.proc is not None
        return proc_usage(self.proc.pid)

    def log_text(self) -> str:
        try:
            return (self.home / "daemon.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def interrupt(self) -> None:
        """Send SIGINT (the way Ctrl-C stops ``node start``) without waiting."""
        if self.proc is not None and self.proc.poll() is None and not self._interrupted:
            self._interrupted = True  # once: a second Ctrl-C aborts the orderly shutdown ("Aborted!")
            self.proc.send_signal(signal.SIGINT)

    def stop(self, timeout: float = 30) -> int | None:
        """SIGINT (unless ``interrupt`` sent it), wait up to ``timeout`` s, then SIGKILL; returns
        the exit status (0 for an orderly stop)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None and not self._log.closed:
            self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL (a crash: nothing is cleaned up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def make_daemons(topo: Topology, specs: Sequence[tuple[Host, Sequence[str]]], *,
                 listen: str | None | Callable[[Host], str | None] = DEFAULT_LISTEN,
                 workers: int = 8) -> list[NsDaemon]:
    """Create (``node init``) one daemon per ``(host, extra_args)`` on ``workers``
    threads, without starting them (``start_all`` does); homes are named after the hosts, so each
    host appears once. ``listen``: an address, None (the config's default), or a function of the
    host (``lambda h: f"/ip4/{h.ip}/tcp/4001"``). Returns them in the order of ``specs``."""
    from concurrent.futures import ThreadPoolExecutor

    def one(spec: tuple[Host, Sequence[str]]) -> NsDaemon:
        host, extra = spec
        return topo.daemon(host, *extra, listen=listen(host) if callable(listen) else listen, start=False)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, specs))


def start_all(daemons: Iterable[NsDaemon], timeout: float = 120) -> None:
    """Launch every daemon at once, then wait for each to be ready (start-up runs in parallel)."""
    daemons = list(daemons)
    for d in daemons:
        if d.proc is None or d.proc.poll() is not None:
            d.launch()
    deadline = time.monotonic() + timeout
    for d in daemons:
        d.wait_ready(max(1.0, deadline - time.monotonic()))
