"""Evidence bundles this node holds (``HOME/evidence.db``): its own failed checks and those
gossiped to it, each once (keyed by the bundle's hash), at most ``MAX_HELD`` (the oldest
unconfirmed go first: a flood of bundles cannot grow the file without bound)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import protocol

from .._home import private_file

__all__ = ["EvidenceBook", "MAX_HELD"]

MAX_HELD = 10_000


class EvidenceBook:
    """Durable evidence: ``add`` (idempotent), ``against`` (one provider's), ``counts``."""

    def __init__(self, path: Path, max_held: int = MAX_HELD) -> None:
        self.max_held = max_held
        self.db = sqlite3.connect(private_file(path), isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS evidence (id BLOB PRIMARY KEY, provider TEXT NOT NULL, "
                        "verifier TEXT NOT NULL, confirmed INTEGER NOT NULL, issued_at INTEGER NOT NULL, "
                        "data BLOB NOT NULL)")
        self.db.execute("CREATE INDEX IF NOT EXISTS evidence_provider ON evidence(provider)")
        self._lock = threading.Lock()

    def close(self) -> None:
        self.db.close()

    def add(self, evidence: protocol.Evidence, confirmed: bool) -> bool:
        """Hold ``evidence`` (already checked); ``confirmed``: this node re-ran it or ran it.
        Returns False when it was held already (a confirmation still upgrades it)."""
        key = protocol.body_hash(evidence)
        with self._lock:
            held = self.db.execute("SELECT confirmed FROM evidence WHERE id = ?", (key,)).fetchone()
            if held is not None:
                if confirmed and not held[0]:
                    self.db.execute("UPDATE evidence SET confirmed = 1 WHERE id = ?", (key,))
                return False
            self.db.execute("INSERT INTO evidence VALUES (?, ?, ?, ?, ?, ?)",
                            (key, evidence.receipt.provider, evidence.verifier, int(confirmed), evidence.issued_at,
                             protocol.encode(evidence, max_size=protocol.MAX_EVIDENCE_BYTES)))
            (n,) = self.db.execute("SELECT COUNT(*) FROM evidence").fetchone()
            if n > self.max_held:
                self.db.execute("DELETE FROM evidence WHERE id IN (SELECT id FROM evidence ORDER BY confirmed, "
                                "issued_at LIMIT ?)", (n - self.max_held,))
        return True

    def against(self, provider: str) -> list[tuple[protocol.Evidence, bool]]:
        """The bundles held against ``provider`` (newest first), each with whether it is confirmed."""
        with self._lock:
            rows = self.db.execute("SELECT data, confirmed FROM evidence WHERE provider = ? ORDER BY issued_at DESC",
                                   (provider,)).fetchall()
        return [(protocol.decode(data, max_size=protocol.MAX_EVIDENCE_BYTES, expect=(protocol.Evidence,)), bool(c))
                for data, c in rows]

    def counts(self) -> dict[str, tuple[int, int]]:
        """Per provider: (bundles held, of them confirmed)."""
        with self._lock:
            rows = self.db.execute("SELECT provider, COUNT(*), SUM(confirmed) FROM evidence GROUP BY provider").fetchall()
        return {p: (n, int(c or 0)) for p, n, c in rows}
