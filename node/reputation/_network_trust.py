"""Network trust: what other consumers attest about a provider, weighted so that fake praise does not pay.

Every attestation this node takes in (``protocol.check_attestation`` passed) is kept, the newest
per (attester, provider), in ``HOME/reputation.db``. A provider's network trust aggregates them:

    weight(a)   = min(settled(a), ATTESTER_CAP)   if a's settlement is by an agent we trust, else 0
    fresh pool  : attesters we first saw less than MATURE_S ago together weigh at most FRESH_POOL_CAP
                  per provider (their weights are scaled down to fit)
    quality(a)  = 1 - 2 * failures / calls                       in [-1, 1]
    W = sum of weights,  Q = sum(weight * quality) / W
    network     = START + SPAN * Q * W / (W + HALF_WEIGHT)      in [0, 200], START (100) with no weight

So: an attestation without settled value has no weight at all (words cost nothing; a doubly
signed receipt alone costs nothing either, between a provider and a consumer it controls); only
value an agent *this node* trusts (its own agent and its ``accept_escrow`` agents: ``node escrow
accept PEER``) says was claimed counts — never merely an agent it was offered or paid through, since
a provider names the agents its consumers pay through, and an attester counts for at most ``ATTESTER_CAP`` µc however much it spent; an
attester with no history here (first seen backed less than ``MATURE_S`` ago) shares one small pool
with every other newcomer, so a swarm of fresh identities adds at most ``FRESH_POOL_CAP`` µc of
weight however many there are. Confidence grows with weight (``HALF_WEIGHT`` is where half of
``SPAN`` is reached), so a little praise moves a score a little.

Limits, stated: a Sybil who pays real value through a trusted agent to a provider it also
controls gets its money back as earnings; what it cannot escape is locking it, the cap per
identity and the wait (``MATURE_S``) before an identity leaves the fresh pool, so buying weight
takes many funded identities held for a week. Agents are trusted, not checked: an agent that
signs fake claims makes fake weight (trust only agents you would hold money at). The counts in
an attestation (calls, failures, latency) are the attester's word; only their weight is
proven. A provider can refuse to serve attesters it fears; absent attestations are not evidence.

Routing blends this with the node's own experience (``blend``): the less a node has seen of a
provider itself, the more the network's view moves its score; its own view wins once it has
``LOCAL_HALF`` calls. A provider caught or in violation here stays where local trust put it.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
from pathlib import Path
from typing import Callable, Iterable

import protocol

from .._clock import SYSTEM_WALL_CLOCK
from .._home import private_file

__all__ = ["NetworkTrust", "NetworkView", "blend", "ATTESTER_CAP", "FRESH_POOL_CAP", "MATURE_S", "HALF_WEIGHT",
           "LOCAL_HALF", "MAX_ATTESTATIONS", "MAX_PER_PROVIDER"]

START, SPAN, LOW, HIGH = 100.0, 100.0, 0.0, 200.0
ATTESTER_CAP = 1_000_000  # µc: one attester's weight on one provider is at most 1 credit paid
FRESH_POOL_CAP = ATTESTER_CAP // 2  # all attesters without history, together, per provider
MATURE_S = 7 * 86_400  # an attester first seen backed this long ago has history
HALF_WEIGHT = 2 * ATTESTER_CAP  # total weight at which a score has moved half of SPAN
LOCAL_HALF = 20  # calls of our own experience at which the network's view counts half
MAX_ATTESTATIONS = 50_000  # held in all (the unweighted, then the oldest, are dropped)
MAX_PER_PROVIDER = 512  # held per provider (the unweighted, then the lightest, are dropped)
CACHE_S = 60  # a view is recomputed when an attestation about its provider arrives, or after this


@dataclasses.dataclass(frozen=True, slots=True)
class NetworkView:
    """A provider's network trust and what it rests on."""

    score: float = START
    weight: int = 0  # µc of settled value that counted, after caps and the fresh pool
    attesters: int = 0  # attestations held (weighted or not)
    backed: int = 0  # of which backed by a trusted agent's settlement


def blend(local_score: float, local_calls: int, network: NetworkView, held_back: bool) -> float:
    """The score routing uses: local trust moved by the network's view in proportion to how little
    this node has seen itself; a provider ``held_back`` (caught, in violation) keeps its local score."""
    if held_back or network.weight == 0:
        return local_score
    share = LOCAL_HALF / (LOCAL_HALF + max(0, local_calls))
    return min(HIGH, max(LOW, local_score + (network.score - START) * share))


class NetworkTrust:
    """Attestations held by this node (sqlite) and the network trust they make."""

    def __init__(self, path: Path, trusted_agents: Callable[[], Iterable[str]],
                 clock: Callable[[], float] = SYSTEM_WALL_CLOCK, me: str = "") -> None:
        self.clock = clock
        self.me = me  # this node's own attestations are its local trust already: they carry no network weight
        self.trusted_agents = trusted_agents
        self.db = sqlite3.connect(private_file(path), isolation_level=None, check_same_thread=False)  # 0600
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS attestations (attester TEXT NOT NULL, provider TEXT NOT NULL, "
            "issued_at INTEGER NOT NULL, received_at INTEGER NOT NULL, quality REAL NOT NULL, "
            "agent TEXT NOT NULL, settled INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (attester, provider))")
        self.db.execute("CREATE INDEX IF NOT EXISTS attestations_provider ON attestations(provider)")
        self.db.execute("CREATE TABLE IF NOT EXISTS attesters (peer_id TEXT PRIMARY KEY, first_backed INTEGER NOT NULL)")
        self._lock = threading.Lock()
        self._closed = False  # gossip may still arrive while the node stops: refused once closed
        self._cache: dict[str, tuple[int, NetworkView]] = {}  # provider: (computed at, view)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.db.close()

    def add(self, attestation: protocol.Attestation, backing: protocol.Backing, data: bytes) -> bool:
        """Hold a checked attestation (``backing``: what ``check_attestation`` returned, ``data``:
        its canonical bytes). False: an attestation as new from this attester on this provider is held."""
        now = int(self.clock())
        a = attestation
        trusted = set(self.trusted_agents())
        starts_history = backing.settled > 0 and backing.agent in trusted
        with self._lock:
            if self._closed:
                return False
            row = self.db.execute("SELECT issued_at FROM attestations WHERE attester = ? AND provider = ?",
                                  (a.attester, a.provider)).fetchone()
            if row is not None and row[0] >= a.issued_at:
                return False
            self.db.execute("INSERT OR REPLACE INTO attestations VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                            (a.attester, a.provider, a.issued_at, now, protocol.attestation_quality(a),
                             backing.agent, backing.settled, data))
            if starts_history:  # the attester's first settled business through an agent we trust
                self.db.execute("INSERT OR IGNORE INTO attesters VALUES (?, ?)", (a.attester, now))
            self._trim(a.provider, trusted)
            self._cache.pop(a.provider, None)
        return True

    def _trim(self, provider: str, trusted: set[str]) -> None:
        """Drop what counts least first: unweighted rows (no settlement, or not by a trusted agent),
        then the lightest and oldest; so a flood of unbacked or self-settled praise never evicts
        the attestations that carry weight here."""
        agents = sorted(trusted)
        counts = f"(settled > 0 AND agent IN ({', '.join('?' * len(agents))}))"
        (n,) = self.db.execute("SELECT COUNT(*) FROM attestations WHERE provider = ?", (provider,)).fetchone()
        if n > MAX_PER_PROVIDER:
            self.db.execute(f"DELETE FROM attestations WHERE rowid IN (SELECT rowid FROM attestations WHERE "
                            f"provider = ? ORDER BY {counts}, MIN(settled, ?), issued_at LIMIT ?)",
                            (provider, *agents, ATTESTER_CAP, n - MAX_PER_PROVIDER))
        (total,) = self.db.execute("SELECT COUNT(*) FROM attestations").fetchone()
        if total > MAX_ATTESTATIONS:
            self.db.execute(f"DELETE FROM attestations WHERE rowid IN (SELECT rowid FROM attestations "
                            f"ORDER BY {counts}, received_at LIMIT ?)", (*agents, total - MAX_ATTESTATIONS))
            self._cache.clear()

    def view(self, provider: str) -> NetworkView:
        """``provider``'s network trust now (the module's model)."""
        if self._closed:
            return NetworkView()
        now = int(self.clock())
        cached = self._cache.get(provider)
        if cached is not None and now - cached[0] < CACHE_S:
            return cached[1]
        trusted = set(self.trusted_agents())
        with self._lock:
            if self._closed:
                return NetworkView()
            rows = self.db.execute(
                "SELECT a.attester, a.quality, a.agent, a.settled, t.first_backed FROM attestations a "
                "LEFT JOIN attesters t ON t.peer_id = a.attester WHERE a.provider = ?", (provider,)).fetchall()
        mature: list[tuple[int, float]] = []
        fresh: list[tuple[int, float]] = []
        backed = 0
        for attester, quality, agent, settled, first in rows:
            if attester == self.me or settled <= 0 or agent not in trusted:
                continue
            backed += 1
            weight = min(settled, ATTESTER_CAP)
            (mature if first is not None and now - first >= MATURE_S else fresh).append((weight, quality))
        fresh_total = sum(w for w, _ in fresh)
        scale = min(1.0, FRESH_POOL_CAP / fresh_total) if fresh_total else 1.0
        weighted = [(float(w), q) for w, q in mature] + [(w * scale, q) for w, q in fresh]
        total = sum(w for w, _ in weighted)
        if total <= 0:
            result = NetworkView(attesters=len(rows), backed=backed)
        else:
            quality = sum(w * q for w, q in weighted) / total
            score = START + SPAN * quality * total / (total + HALF_WEIGHT)
            result = NetworkView(min(HIGH, max(LOW, score)), int(total), len(rows), backed)
        if len(self._cache) > 4096:
            self._cache.clear()
        self._cache[provider] = (now, result)
        return result

    def has_history(self, attester: str) -> bool:
        """Whether ``attester`` is out of the fresh pool: its first attestation backed through a trusted
        agent was taken in here at least ``MATURE_S`` ago."""
        with self._lock:
            if self._closed:
                return False
            row = self.db.execute("SELECT first_backed FROM attesters WHERE peer_id = ?", (attester,)).fetchone()
        return row is not None and int(self.clock()) - row[0] >= MATURE_S

    def is_newer(self, attestation: protocol.Attestation) -> bool:
        """Whether ``attestation`` is newer than the one held from its attester on its provider."""
        with self._lock:
            if self._closed:
                return False
            row = self.db.execute("SELECT issued_at FROM attestations WHERE attester = ? AND provider = ?",
                                  (attestation.attester, attestation.provider)).fetchone()
        return row is None or row[0] < attestation.issued_at

    def attestations(self, provider: str | None = None, limit: int = 200) -> list[protocol.Attestation]:
        """Attestations held (about ``provider``), newest first."""
        with self._lock:
            if self._closed:
                return []
            if provider is None:
                rows = self.db.execute("SELECT data FROM attestations ORDER BY issued_at DESC LIMIT ?",
                                       (limit,)).fetchall()
            else:
                rows = self.db.execute("SELECT data FROM attestations WHERE provider = ? ORDER BY issued_at DESC "
                                       "LIMIT ?", (provider, limit)).fetchall()
        return [protocol.decode(bytes(d), max_size=protocol.MAX_ATTESTATION_BYTES, expect=(protocol.Attestation,))
                for (d,) in rows]

    def own(self, limit: int = 64) -> list[bytes]:
        """This node's own attestations (canonical bytes), newest first: what it republishes."""
        with self._lock:
            if self._closed:
                return []
            rows = self.db.execute("SELECT data FROM attestations WHERE attester = ? ORDER BY issued_at DESC "
                                   "LIMIT ?", (self.me, limit)).fetchall()
        return [bytes(d) for (d,) in rows]
