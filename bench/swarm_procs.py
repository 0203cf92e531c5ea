"""50 separate ``node start`` processes across network namespaces: listing propagation, DHT lookup
latency, and each node's idle CPU and RSS.

Topology (``tests/netns/harness.py``): ``HOSTS`` (5) hosts, each a network namespace on one
switch (a Linux bridge in a namespace of its own), and ``PER_HOST`` (10) node processes on each
host, listening on ports 4001.. of its one address (nodes of one host reach each other on its own
interface, those of other hosts through the bridge). Two nodes on different hosts start first;
the other 48 then start all at once, each with both as its ``--bootstrap``. Each node's control
API is on loopback in its own namespace; the bench calls it from a thread inside that namespace.

Prints:
- start: how long the homes took (``init_home``, in this process), until all 50 were ready (``daemon.json``), and
  until each was connected to as many peers as there are bootstrap nodes;
- idle: each node's CPU (% of one core, over ``IDLE_S`` s, nothing asked of it) and RSS, median
  and max, measured before any offer exists;
- listing propagation: a provider adds an offer (its model loaded and benchmarked first); from
  the moment its API answers, the time until each of the 49 others lists it in
  ``GET /api/v1/providers`` (its market view: gossip or DHT), each asked every ``POLL_S`` until it
  does (the figures' resolution): per offer the time until all 49 did, and over all arrivals;
  a node that has not within ``PROPAGATION_TIMEOUT_S`` is listed as missed, with its peer count;
- DHT lookup: ``GET /api/v1/providers?model=M`` (the node asks the DHT for M's provider records,
  then fetches any listing it lacks) from ``LOOKUPS`` (node, model) pairs not asked before (a
  node keeps the provider records it found), from nodes that are not among the 20 closest to the
  record's key (those hold the record and answer from their own store), of every model but the
  last (whose records may still be being written); the answers lacking the provider are counted
  (an answer also holds what the node's view had);
each also as a ratio to the baseline measured in the same run: one ``GET /api/v1/providers``
round trip (no DHT) to the same nodes' APIs.

Needs root and ``ip netns`` (else it prints why it skipped and exits 0). Every process it starts is
stopped, and every namespace it made removed (the harness's ``Topology.close``), on any exit,
Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from libp2p.kad_dht.kad_dht import _encode_key  # noqa: E402
from libp2p.kad_dht.routing_table import peer_id_to_key  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402

from node._home import Home, init_home  # noqa: E402
from node.net._market import model_key  # noqa: E402
from tests.e2e.daemons import PASSPHRASE  # noqa: E402
from tests.netns.harness import NsDaemon, Topology, poll_until, unavailable_reason  # noqa: E402
from wallet import read_public_identity  # noqa: E402

HOSTS = 5
PER_HOST = 10
BOOTSTRAPS = 2
OFFERS = 5  # offers whose propagation is measured (after one that loads the provider's model)
LOOKUPS = 20
IDLE_S = 10.0
POLL_S = 0.1  # how often a node that does not list the offer yet is asked (the figures' resolution)
READY_TIMEOUT_S = 240.0
LOOKUP_BUDGET_S = 30.0  # lookups stop being started after this (their count is printed)
PROPAGATION_TIMEOUT_S = 10.0  # a node that has not listed an offer by then is counted as missed
SUBNET = "10.213.0.0/24"


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def node_name(d: NsDaemon) -> str:
    return d.home.name


class PreparedDaemon(NsDaemon):
    """An ``NsDaemon`` whose home this process made with ``init_home`` (0.2 s; ``node init`` and
    ``node id`` are two Python start-ups, ~1.4 s of CPU a node, a minute for 50 on two cores):
    ``node id`` is answered from the keystore's public header, as the command itself does."""

    def _node(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        if args[:1] == ("id",):
            peer_id, _ = read_public_identity(Home(self.home).keystore)
            return subprocess.CompletedProcess(list(args), 0, stdout=f"{peer_id}\n", stderr="")
        return super()._node(*args, check=check, timeout=timeout)


# ---- the measurements


def idle_usage(nodes: Sequence[NsDaemon], seconds: float) -> tuple[list[float], list[float]]:
    """Each node's CPU (% of one core) over ``seconds``, and its RSS (MiB) at the end."""
    before = [d.usage().cpu_s for d in nodes]
    t = time.monotonic()
    time.sleep(seconds)  # the measurement itself: nothing is asked of the nodes meanwhile
    elapsed = time.monotonic() - t
    after = [d.usage() for d in nodes]
    cpu = [100 * (u.cpu_s - b) / elapsed for u, b in zip(after, before)]
    return cpu, [u.rss_bytes / 2**20 for u in after]


def lists(d: NsDaemon, provider: str, model: str) -> bool:
    return any(r["peer_id"] == provider and r["model"] == model for r in d.api("GET", "/api/v1/providers"))


def watch(watched: Sequence[NsDaemon], provider: str, model: str, t0: float) -> dict[str, float]:
    """Ask each watched node every ``POLL_S`` until it lists ``model``: seconds from ``t0`` to the
    answer that first did, per node (those that never did within the timeout are missing)."""
    seen: dict[str, float] = {}
    deadline = t0 + PROPAGATION_TIMEOUT_S
    while len(seen) < len(watched) and time.perf_counter() < deadline:
        sweep = time.perf_counter()
        for d in watched:
            if node_name(d) not in seen and lists(d, provider, model):
                seen[node_name(d)] = time.perf_counter() - t0
        time.sleep(max(0.0, POLL_S - (time.perf_counter() - sweep)))
    return seen


def offer_body(model: str) -> dict[str, Any]:
    return {"model": model, "backend": "builtin", "input_price": 500_000, "output_price": 1_500_000,
            "max_context": 2048}


def propagate(provider: NsDaemon, others: Sequence[NsDaemon], model: str) -> tuple[list[float], list[NsDaemon]]:
    """Add ``model`` at ``provider``: each other node's delay until it listed it (seconds), and the
    nodes that did not within ``PROPAGATION_TIMEOUT_S``."""
    provider.api("POST", "/api/v1/offers", offer_body(model), timeout=120)
    t0 = time.perf_counter()
    groups: dict[str, list[NsDaemon]] = {}
    for d in others:
        groups.setdefault(d.host.name, []).append(d)
    with concurrent.futures.ThreadPoolExecutor(len(groups)) as pool:  # one watcher a host
        found = list(pool.map(lambda g: watch(g, provider.peer_id, model, t0), groups.values()))
    seen = {name: delay for part in found for name, delay in part.items()}
    return list(seen.values()), [d for d in others if node_name(d) not in seen]


def record_holders(nodes: Sequence[NsDaemon], model: str, k: int = 20) -> set[str]:
    """The ``k`` nodes XOR-closest to ``model``'s provider-record key: where ``provide`` stored the
    record, so where ``find_providers`` answers from its own store without a DHT walk."""
    target = int.from_bytes(hashlib.sha256(_encode_key(model_key(model))).digest(), "big")

    def distance(d: NsDaemon) -> int:
        return int.from_bytes(peer_id_to_key(ID.from_base58(d.peer_id)), "big") ^ target

    return {node_name(d) for d in sorted(nodes, key=distance)[:k]}


def timed(d: NsDaemon, path: str) -> tuple[float, Any]:
    """One GET and how long it took (from the calling thread: the namespace switch included)."""
    t = time.perf_counter()
    doc = d.api("GET", path, timeout=60)
    return time.perf_counter() - t, doc


# ---- the run


def measure(topo: Topology, hosts: int, per_host: int, offers: int, lookups: int, rng: random.Random) -> None:
    t = time.perf_counter()
    lan = topo.switch("lan", SUBNET)
    machines = [topo.host(f"h{i}", lan) for i in range(hosts)]
    nodes: list[NsDaemon] = []
    for h in machines:
        for j in range(per_host):
            home = topo.workdir / f"{h.name}-n{j}"
            init_home(home, PASSPHRASE)
            d = PreparedDaemon(topo, h, home, listen=f"/ip4/0.0.0.0/tcp/{4001 + j}")
            topo.daemons.append(d)  # the topology stops it
            nodes.append(d)
    init_s = time.perf_counter() - t
    total = len(nodes)
    boots = [nodes[i * per_host] for i in range(min(BOOTSTRAPS, hosts))]
    rest = [d for d in nodes if d not in boots]
    t = time.perf_counter()
    for d in boots:
        d.launch()
    for d in boots:
        d.wait_ready(READY_TIMEOUT_S)
    t_rest = time.perf_counter()
    for d in rest:
        d.extra = (*d.extra, *(arg for b in boots for arg in ("--bootstrap", b.dial_addr)))
        d.launch()
    deadline = time.monotonic() + READY_TIMEOUT_S
    for d in rest:
        d.wait_ready(max(1.0, deadline - time.monotonic()))
    ready_s, rest_s = time.perf_counter() - t, time.perf_counter() - t_rest

    lonely: list[str] = []

    def joined() -> bool:
        lonely[:] = [f"{node_name(d)} ({peers})" for d in nodes
                     if (peers := d.api("GET", "/api/v1/status")["connected_peers"]) < len(boots) - (d in boots)]
        return not lonely

    try:
        poll_until(joined, READY_TIMEOUT_S, "every node to connect to the bootstrap nodes", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; nodes (peers) short of {len(boots)} peers: {', '.join(lonely)}") from None
    joined_s = time.perf_counter() - t
    print(f"{total} node processes on {hosts} hosts ({per_host} each; a host is a network namespace) on one"
          f" bridge, bootstrapped through {len(boots)} on different hosts", flush=True)
    print(f"start: {total} homes made in {init_s:.1f} s; all ready in {ready_s:.1f} s ({len(rest)} started at once:"
          f" {rest_s:.1f} s); all connected to {len(boots)} peers at {joined_s:.1f} s", flush=True)

    cpu, rss = idle_usage(nodes, IDLE_S)
    busiest = max(range(total), key=cpu.__getitem__)
    boot_cpu = ", ".join(f"{cpu[nodes.index(b)]:.1f}%" for b in boots)
    print(f"idle over {IDLE_S:.0f} s (no offers yet): CPU median {statistics.median(cpu):.2f}%  p95 {pct(cpu, 95):.2f}%"
          f"  max {cpu[busiest]:.2f}% ({node_name(nodes[busiest])}) of a core; the bootstrap nodes {boot_cpu};"
          f" all {total}: {sum(cpu):.0f}% | RSS median {statistics.median(rss):.0f} MiB  max {max(rss):.0f} MiB"
          f" (all {total}: {sum(rss) / 1024:.2f} GiB)", flush=True)

    provider = next(d for d in nodes if d.host is machines[-1] and d not in boots)
    others = [d for d in nodes if d is not provider]
    propagate(provider, others, "bench-warm")  # loads the builtin model (torch) once: not measured
    models = ["bench-warm"]
    to_all: list[float] = []
    arrivals: list[float] = []
    missed: list[str] = []
    for r in range(offers):
        models.append(f"bench-{r + 1}")
        delays, missing = propagate(provider, others, models[-1])
        arrivals += delays
        if missing:
            for d in missing:
                status = d.api("GET", "/api/v1/status")
                missed.append(f"{node_name(d)} ({models[-1]}; {status['connected_peers']} peers)")
        else:
            to_all.append(max(delays))

    rtt = statistics.median(timed(d, "/api/v1/providers")[0] for d in others)  # the baseline: no DHT
    am, ap = statistics.median(arrivals), pct(arrivals, 95)
    spread = (f"median {statistics.median(to_all) * 1000:.0f} ms  p95 {pct(to_all, 95) * 1000:.0f} ms"
              f"  max {max(to_all) * 1000:.0f} ms ({statistics.median(to_all) / rtt:.0f}x api rtt)"
              if to_all else "never")
    print(f"listing propagation ({offers} offers; each node asked every {POLL_S * 1000:.0f} ms): to all {len(others)}"
          f" ({len(to_all)} of {offers} offers): {spread}; each node: median {am * 1000:.0f} ms  p95 {ap * 1000:.0f} ms"
          f" ({am / rtt:.0f}x / {ap / rtt:.0f}x api rtt) | baseline api rtt {rtt * 1000:.2f} ms", flush=True)
    if missed:
        print(f"  not listed within {PROPAGATION_TIMEOUT_S:.0f} s: {len(missed)} of {offers * len(others)}:"
              f" {', '.join(missed)}", flush=True)

    # lookups of every model but the last: their provider records were written (the market's DHT
    # loop provides every model of each new listing) while the later offers were added
    holders = {m: record_holders(nodes, m) for m in models[:-1]}
    pairs = [(d, m) for d in others for m in models[:-1] if node_name(d) not in holders[m]]
    lookup_s: list[float] = []
    not_found = 0
    stop_at = time.monotonic() + LOOKUP_BUDGET_S
    for d, model in rng.sample(pairs, min(lookups, len(pairs))):
        if time.monotonic() > stop_at:
            break
        elapsed, rows = timed(d, f"/api/v1/providers?model={model}")
        lookup_s.append(elapsed)
        not_found += not any(r["peer_id"] == provider.peer_id and r["model"] == model for r in rows)
    if not lookup_s:
        print(f"DHT provider lookup: none measured (every node of {len(nodes)} holds the records)", flush=True)
        return
    lm, lp = statistics.median(lookup_s), pct(lookup_s, 95)
    print(f"DHT provider lookup ({len(lookup_s)} node/model pairs, from nodes not holding the record;"
          f" GET /api/v1/providers?model=): median {lm * 1000:.1f} ms  p95 {lp * 1000:.1f} ms"
          f"  max {max(lookup_s) * 1000:.1f} ms ({lm / rtt:.1f}x / {lp / rtt:.1f}x api rtt);"
          f" answers without the provider: {not_found}", flush=True)


def run(hosts: int, per_host: int, offers: int, lookups: int, seed: int, keep: Path | None) -> None:
    """Build the topology, measure, and tear everything down whatever happens (SIGTERM as Ctrl-C)."""

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous: tuple[Callable[..., Any] | int | None, ...] = (signal.signal(signal.SIGTERM, on_term),
                                                             signal.getsignal(signal.SIGINT))
    interrupted = False
    with contextlib.ExitStack() as stack:
        if keep is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory(prefix="isw-swarm-"))
        else:
            workdir = str(keep)  # the nodes' homes and logs stay there
        topo = Topology(workdir, check=False)  # main() checked
        try:
            measure(topo, hosts, per_host, offers, lookups, random.Random(seed))
        except KeyboardInterrupt:
            interrupted = True
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the teardown is not cut short
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                topo.close()
            finally:
                signal.signal(signal.SIGTERM, previous[0])
                signal.signal(signal.SIGINT, previous[1])
    if interrupted:
        print("interrupted: every node stopped, the namespaces removed", file=sys.stderr)
        sys.exit(130)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=HOSTS)
    parser.add_argument("--per-host", type=int, default=PER_HOST)
    parser.add_argument("--offers", type=int, default=OFFERS)
    parser.add_argument("--lookups", type=int, default=LOOKUPS)
    parser.add_argument("--seed", type=int, default=20261202)
    parser.add_argument("--keep", type=Path, metavar="DIR", help="make the homes in DIR and keep them (the logs)")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason is not None:
        print(f"skipped: {reason}")
        return
    run(args.hosts, args.per_host, args.offers, args.lookups, args.seed, args.keep)


if __name__ == "__main__":
    main()
