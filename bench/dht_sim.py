"""Kademlia on paper: 100, 1,000 and 10,000 nodes running py-libp2p's own routing code in memory.

What it runs: every node holds the routing table our nodes run, ``libp2p.kad_dht.routing_table
.RoutingTable`` (k = ``BUCKET_SIZE`` = 20 per ``KBucket``, keys are sha256 of the peer id, XOR
distance, buckets split as py-libp2p splits them), and looks keys up with the iterative lookup of
``libp2p.kad_dht.peer_routing.PeerRouting.find_closest_peers_network`` (``ALPHA`` = 10 queries a
round, the closest ``count`` = 20 kept, ``BETA`` = 3, at most ``MAX_PEER_LOOKUP_ROUNDS`` = 20
rounds, the same termination rules), restated here step by step without trio. The network is a
function call: a query is the responder's FIND_NODE handler (``KadDHT._do_handle_stream``): it adds
the requester to its table, answers its table's 20 closest to the key, less the requester; the
requester adds every peer it queried and every peer it was told of, as py-libp2p does.

How the tables fill (as Kademlia joins): nodes join one at a time; each connects to a contact, a
node already in the swarm picked at random (both sides fold the connection into their tables, as
the market's routing loop does), then looks itself up (the first step of py-libp2p's
``refresh_routing_table``) and publishes its listing (one lookup of its listing key, as its first
``put_value`` does). Not simulated: the per-bucket refresh lookups py-libp2p runs every 10 min
(they only add entries, so the hop counts here are if anything high), churn (every node answers;
a full bucket's ping of its oldest peer always succeeds, so a newcomer to a full bucket is dropped,
as with live peers), latency and loss.

What is measured, per swarm size, over ``LOOKUPS`` lookups from random nodes of random providers'
listing keys (``node.net._market.listing_key``, what ``fetch_listing`` asks the DHT for), each
against the baseline of the same run, log2(n):
- rounds: sequential waves of queries, i.e. the lookup's latency in round trips ("hops"; the last
  round is the one that found nothing closer, as py-libp2p stops);
- queries: FIND_NODE messages sent;
- true closest: the share of lookups whose closest result is the closest node of the whole swarm
  (1st), and the mean share of the true 20 closest found (top-20: where put_value / get_value go);
- the routing tables' sizes against a classic table's k * log2(n / k) (py-libp2p splits any full
  bucket up to 256 buckets, not only the one holding its own id, so its tables grow larger), and
  how many newcomers a full, unsplittable bucket refused.

Speed (the table code is pure Python; 10,000 joins are ~560,000 queries): the simulation is one
thread that never yields, so each bucket's ``trio.Lock`` guards nothing and is a null lock, and
``add_peer`` runs to completion without a scheduler; each node is one ``SimID`` object (equality
by identity, its sha256 key computed once); a peer already in a table is not added again (that
only moves it within its bucket, which matters only to evictions, and none happen);
``RoutingTable.find_bucket`` (a linear scan of bucket ranges that are sorted and contiguous) is a
binary search, and ``find_local_closest_peers`` sorts only the smallest dyadic key range holding
the 20 closest (``_find_local_closest``). These two are checked against py-libp2p's own code on
a sample of tables after each size: the bench fails if they differ. Measured on one core: 100
nodes 0.2 s, 1,000 nodes 5 s, 10,000 nodes ~110 s.
"""

from __future__ import annotations

import argparse
import bisect
import copy
import hashlib
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import trio  # noqa: E402
from libp2p.kad_dht import routing_table as _rt  # noqa: E402
from libp2p.kad_dht.common import ALPHA, BETA, BUCKET_SIZE  # noqa: E402
from libp2p.kad_dht.peer_routing import MAX_PEER_LOOKUP_ROUNDS, MIN_PEERS_THRESHOLD, PeerRouting  # noqa: E402
from libp2p.kad_dht.routing_table import KBucket, RoutingTable  # noqa: E402
from libp2p.kad_dht.utils import sort_peer_ids_by_distance  # noqa: E402
from libp2p.peer.id import ID  # noqa: E402
from libp2p.peer.peerinfo import PeerInfo  # noqa: E402

from node.net._market import listing_key  # noqa: E402

SIZES = (100, 1_000, 10_000)
LOOKUPS = 300  # sampled lookups per size (the joins' lookups are all run; these are measured)
CHECK_TABLES = 50  # tables whose bucket search and closest-k are checked against py-libp2p's code
CHECK_LOOKUPS = 30  # lookups replayed through py-libp2p's own coroutine, per size
SEED = 20261202
COUNT = BUCKET_SIZE  # find_closest_peers_network's default count


# ---- the in-memory stand-ins, and the speed-ups (each equivalent; two are checked at the end)

_original_peer_id_to_key = _rt.peer_id_to_key
_original_find_bucket = RoutingTable.find_bucket
_original_find_closest = RoutingTable.find_local_closest_peers


class SimID(ID):
    """A peer id that carries its routing key. Each node has exactly one SimID object, so equality
    and hashing by identity (in C) agree with ``ID``'s by bytes, at a fraction of the cost."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, peer_id_bytes: bytes) -> None:
        super().__init__(peer_id_bytes)
        self.key = _original_peer_id_to_key(self)
        self.key_int = int.from_bytes(self.key, "big")


def _key_int(peer_id: ID) -> int:
    return peer_id.key_int if isinstance(peer_id, SimID) else int.from_bytes(_original_peer_id_to_key(peer_id), "big")


def _peer_id_to_key(peer_id: ID) -> bytes:
    return peer_id.key if isinstance(peer_id, SimID) else _original_peer_id_to_key(peer_id)


def _find_bucket(self: RoutingTable, peer_id: ID) -> KBucket:
    """``RoutingTable.find_bucket`` by binary search: the buckets' ranges are sorted and contiguous."""
    key, buckets = _key_int(peer_id), self.buckets
    lo, hi = 0, len(buckets)
    while lo < hi:
        mid = (lo + hi) // 2
        if buckets[mid].max_range <= key:
            lo = mid + 1
        else:
            hi = mid
    if lo < len(buckets) and buckets[lo].min_range <= key:
        return buckets[lo]
    return buckets[0]


def _bucket_bounds(table: RoutingTable) -> list[int]:
    """The buckets' lower bounds, recomputed only after a split (splits only add buckets)."""
    cached = table.__dict__.get("_sim_bounds")
    if cached is None or len(cached) != len(table.buckets):
        cached = table._sim_bounds = [b.min_range for b in table.buckets]
    return cached


def _find_local_closest(self: RoutingTable, key: bytes, count: int = 20) -> list[ID]:
    """``find_local_closest_peers`` without sorting the whole table.

    Every bucket is a dyadic interval of the key space (py-libp2p splits [0, 2**256) at midpoints),
    and every key inside a dyadic interval that holds the target is XOR-closer to it than every key
    outside. So the peers of the smallest such interval holding ``count`` peers (or the whole space)
    contain the ``count`` closest, and sorting them alone gives py-libp2p's answer.
    """
    target = int.from_bytes(hashlib.sha256(key).digest(), "big")
    buckets, bounds = self.buckets, _bucket_bounds(self)
    home = bisect.bisect_right(bounds, target) - 1
    span = buckets[home].max_range - buckets[home].min_range
    while True:
        low = target - target % span
        lo = bisect.bisect_left(bounds, low)
        hi = bisect.bisect_left(bounds, low + span)
        if span >= 2**256 or sum(len(buckets[i].peers) for i in range(lo, hi)) >= count:
            break
        span *= 2
    peers = [p for i in range(lo, hi) for p in buckets[i].peers]
    peers.sort(key=lambda p: p.key_int ^ target)
    return peers[:count]


class _NullLock:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> bool:
        return False


_original_bucket_init = KBucket.__init__


def _bucket_init(self: KBucket, *args: object, **kwargs: object) -> None:
    _original_bucket_init(self, *args, **kwargs)
    self._lock = _NullLock()


PINGS = [0]


async def _ping_alive(self: KBucket, peer_id: ID) -> bool:
    """Every simulated node is up: a full bucket's oldest peer answers its ping."""
    PINGS[0] += 1
    return True


def _patch() -> None:
    _rt.peer_id_to_key = _peer_id_to_key
    RoutingTable.find_bucket = _find_bucket  # type: ignore[method-assign]
    RoutingTable.find_local_closest_peers = _find_local_closest  # type: ignore[method-assign]
    KBucket.__init__ = _bucket_init  # type: ignore[method-assign]
    KBucket._ping_peer = _ping_alive  # type: ignore[method-assign]


def _now(coro: object) -> object:
    """Run a coroutine that never suspends (all of ``RoutingTable.add_peer`` here) to its result."""
    try:
        coro.send(None)  # type: ignore[attr-defined]
    except StopIteration as done:
        return done.value
    raise RuntimeError("add_peer suspended: the simulation has no scheduler")


class _Host:
    """The only part of a host the routing table touches here: its id (add_peer gets PeerInfo)."""

    def __init__(self, peer_id: ID) -> None:
        self._id = peer_id

    def get_id(self) -> ID:
        return self._id

    def get_connected_peers(self) -> list[ID]:  # PeerRouting's fallback for a table under 5 peers
        return []


# ---- the swarm


class Swarm:
    """n nodes, each a RoutingTable; ``lookup`` is py-libp2p's iterative lookup over function calls."""

    def __init__(self, n: int, rng: random.Random) -> None:
        # Ed25519 peer ids (identity multihash of a 32-byte key); random keys hash as real ones do
        self.ids = [SimID(b"\x00\x24\x08\x01\x12\x20" + rng.randbytes(32)) for _ in range(n)]
        self.info = {p: PeerInfo(p, []) for p in self.ids}  # no addrs: no subnet grouping (as max_peers_per_subnet=0)
        self.tables: dict[ID, RoutingTable] = {}
        self.members: dict[ID, set[ID]] = {}  # mirrors each table (peers are never removed here)
        self.queries = 0
        self._journal: dict[ID, tuple[RoutingTable, set[ID]]] | None = None
        self._keep = {id(p): p for p in self.ids} | {id(i): i for i in self.info.values()}

    def _add(self, owner: ID, peer: ID) -> None:
        """``routing_table.add_peer``; a peer already held is only moved to its bucket's end, which
        changes nothing here (no peer is ever evicted), so it is skipped."""
        members = self.members[owner]
        if peer in members or peer == owner:
            return
        if self._journal is not None and owner not in self._journal:  # check_lookup's undo log
            self._journal[owner] = copy.deepcopy((self.tables[owner], members), self._keep)
        if _now(self.tables[owner].add_peer(self.info[peer], skip_server_mode_check=True)):
            members.add(peer)

    def _handle_find_node(self, responder: ID, requester: ID, key: bytes) -> list[ID]:
        """The responder's FIND_NODE handler: add the requester, answer its 20 closest, less the requester."""
        self.queries += 1
        self._add(responder, requester)
        closest = self.tables[responder].find_local_closest_peers(key, BUCKET_SIZE)
        return [p for p in closest if p != requester]

    def lookup(self, origin: ID, key: bytes, connected: Sequence[ID] = ()) -> tuple[list[ID], int, int]:
        """``find_closest_peers_network(key)`` from ``origin``.

        Returns:
            (the closest peers found, rounds, queries sent).
        """
        table = self.tables[origin]
        closest = table.find_local_closest_peers(key, COUNT)
        if len(closest) < MIN_PEERS_THRESHOLD:  # the fallback to connected peers (the peerstore holds no more)
            closest.extend(connected)
            closest = sort_peer_ids_by_distance(key, list(dict.fromkeys(closest)))[:COUNT]
        queried: set[ID] = set()
        rounds = sent = 0
        while rounds < MAX_PEER_LOOKUP_ROUNDS and closest:
            rounds += 1
            batch = [p for p in closest if p not in queried and p != origin][:ALPHA]
            if not batch:
                break
            new_peers: list[ID] = []
            seen: set[ID] = set()
            for peer in batch:  # concurrent in py-libp2p: none sees another's answer within a round
                queried.add(peer)
                sent += 1
                self._add(origin, peer)  # _query_peer_for_closest adds the peer it asks
                answer = self._handle_find_node(peer, origin, key)
                for found in answer:
                    if found == origin:
                        continue
                    if found not in seen:
                        seen.add(found)
                        new_peers.append(found)
                    self._add(origin, found)  # and each peer it is told of
            if not new_peers:
                if any(p not in queried and p != origin for p in closest[:BUCKET_SIZE]):
                    continue
                break
            old = closest[:]
            closest = sort_peer_ids_by_distance(key, list(dict.fromkeys(closest + new_peers)))[:COUNT]
            if closest == old:
                break
            queried_in_closest = sum(1 for p in closest[:BUCKET_SIZE] if p in queried)
            if queried_in_closest < BETA and len(closest) >= BETA:
                if any(p not in queried and p != origin for p in closest[:BUCKET_SIZE]):
                    continue
        return closest, rounds, sent

    def join_all(self, rng: random.Random) -> None:
        """Nodes join one by one through a random contact, look themselves up, publish their listing."""
        for i, node in enumerate(self.ids):
            self.tables[node] = RoutingTable(node, _Host(node), max_peers_per_subnet=0)
            self.members[node] = set()
            if i == 0:
                continue
            contact = self.ids[rng.randrange(i)]
            self._add(node, contact)
            self._add(contact, node)
            self.lookup(node, node.to_bytes(), [contact])
            self.lookup(node, listing_key(node.to_base58()).encode(), [contact])

    def true_closest(self, key: bytes, exclude: ID, count: int) -> list[ID]:
        target = int.from_bytes(hashlib.sha256(key).digest(), "big")
        return sorted((p for p in self.ids if p != exclude), key=lambda p: p.key_int ^ target)[:count]

    def check_speedups(self, rng: random.Random) -> None:
        """The binary search and the cached sort give py-libp2p's own answers (else AssertionError)."""
        for owner in rng.sample(self.ids, min(CHECK_TABLES, len(self.ids))):
            table = self.tables[owner]
            for peer in rng.sample(self.ids, min(50, len(self.ids))):
                assert _find_bucket(table, peer) is _original_find_bucket(table, peer), "find_bucket differs"
            key = rng.randbytes(45)
            _rt.peer_id_to_key = _original_peer_id_to_key
            try:
                expected = _original_find_closest(table, key, COUNT)
            finally:
                _rt.peer_id_to_key = _peer_id_to_key
            assert _find_local_closest(table, key, COUNT) == expected, "find_local_closest_peers differs"


    def check_lookup(self, rng: random.Random, lookups: int) -> None:
        """``lookup`` gives what py-libp2p's own ``find_closest_peers_network`` gives from the same
        state: the same closest peers after the same number of queries (else AssertionError).

        py-libp2p's coroutine runs under trio with its ``_query_peer_for_closest`` (the stream
        I/O) replaced by this simulation's query step, from the tables as they were before
        ``lookup`` ran (each table ``lookup`` changed is copied first, and put back after).
        """
        for _ in range(lookups):
            origin, provider = rng.sample(self.ids, 2)
            key = listing_key(provider.to_base58()).encode()
            self._journal = {}
            try:
                ours, _, sent = self.lookup(origin, key)
                for owner, (table, members) in self._journal.items():
                    self.tables[owner], self.members[owner] = table, members
            finally:
                self._journal = None
            theirs, their_sent = trio.run(self._libp2p_lookup, origin, key)
            assert (ours, sent) == (theirs, their_sent), "the restated lookup differs from py-libp2p's"

    async def _libp2p_lookup(self, origin: ID, key: bytes) -> tuple[list[ID], int]:
        routing = PeerRouting(_Host(origin), self.tables[origin])  # type: ignore[arg-type]
        sent = 0

        async def query(peer: ID, target_key: bytes) -> list[ID]:
            nonlocal sent
            sent += 1
            self._add(origin, peer)
            answer = [p for p in self._handle_find_node(peer, origin, target_key) if p != origin]
            for found in answer:
                self._add(origin, found)
            return answer

        routing._query_peer_for_closest = query  # type: ignore[method-assign]
        return await routing.find_closest_peers_network(key, COUNT), sent


def pct(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def run(n: int, lookups: int) -> None:
    rng = random.Random(SEED + n)
    t0 = time.perf_counter()
    refused_before = PINGS[0]
    swarm = Swarm(n, rng)
    join_queries_before = swarm.queries
    swarm.join_all(rng)
    join_s = time.perf_counter() - t0
    join_queries = (swarm.queries - join_queries_before) / max(1, 2 * (n - 1))
    sizes = sorted(len(m) for m in swarm.members.values())
    rounds, sent, first, share = [], [], 0, []
    for _ in range(lookups):
        origin, provider = rng.sample(swarm.ids, 2)
        key = listing_key(provider.to_base58()).encode()
        found, r, s = swarm.lookup(origin, key)
        truth = swarm.true_closest(key, origin, COUNT)
        rounds.append(r)
        sent.append(s)
        first += bool(found) and found[0] == truth[0]
        share.append(len(set(found) & set(truth)) / len(truth))
    refused = PINGS[0] - refused_before
    swarm.check_speedups(rng)
    swarm.check_lookup(rng, CHECK_LOOKUPS)
    log_n = math.log2(n)
    classic = BUCKET_SIZE * max(1.0, math.log2(n / BUCKET_SIZE))  # a classic table's size, k * log2(n / k)
    rm, rp, rx = statistics.median(rounds), pct(rounds, 95), max(rounds)
    sm, sp, sx = statistics.median(sent), pct(sent, 95), max(sent)
    print(
        f"{n:6d} | {log_n:5.2f} | {rm:4.1f} {rp:3.0f} {rx:3d} {rm / log_n:5.2f}x"
        f" | {sm:5.1f} {sp:4.0f} {sx:4d} {sm / log_n:5.2f}x"
        f" | {100 * first / lookups:6.1f}% {100 * statistics.mean(share):6.1f}%"
        f" | {statistics.median(sizes):5.0f} {sizes[-1]:5d} {classic:6.0f} {refused:7d}"
        f" | {join_queries:6.1f} {join_s:6.1f}",
        flush=True,
    )


HEADER = "\n".join((
    f"{'':6} | {'':5} | {'rounds (hops)':^20} | {'queries sent':^22} | {'true closest':^15}"
    f" | {'routing tables':^26} | {'joins':^13}".rstrip(),
    f"{'nodes':>6} | {'log2n':>5} | {'med':>4} {'p95':>3} {'max':>3} {'/log2n':>6} | {'med':>5} {'p95':>4}"
    f" {'max':>4} {'/log2n':>6} | {'1st':>7} {'top-20':>7} | {'med':>5} {'max':>5} {'k.lg':>6} {'refused':>7}"
    f" | {'q/lkp':>6} {'s':>6}",
))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sizes", nargs="*", type=int, default=list(SIZES))
    parser.add_argument("--lookups", type=int, default=LOOKUPS)
    args = parser.parse_args()
    _patch()
    print(f"py-libp2p Kademlia in memory: k={BUCKET_SIZE} alpha={ALPHA} beta={BETA}, {args.lookups} lookups"
          " of listing keys a size, from random nodes; baseline log2(n);\n"
          "k.lg: a classic table's k*log2(n/k); refused: newcomers a full bucket turned away;"
          " q/lkp: queries per join lookup", flush=True)
    print(HEADER, flush=True)
    for n in args.sizes:
        run(n, args.lookups)


if __name__ == "__main__":
    main()
