"""What the escrow agent remembers of the requests it refused, in memory and bounded, and how
often each party was refused (the rate limit on refusals).

Rules this module owns:
- A refused request is remembered (its id -> the digest of the signed request and the agent's
  signed answer, encoded) until ``expires_at``, the end of its freshness window: after that the
  agent refuses it as stale anyway, so forgetting it then is safe.
- The table is bounded (``max_entries`` in all, ``max_per_key`` per party) and never drops an
  entry before its expiry, which would make a refused request acceptable again: when it is
  full, ``remember`` says so and the caller keeps the refusal durably instead; a party holding
  ``max_per_key`` entries is ``limited`` before any work is done for it. The one exception:
  ``forget``, for a refusal whose answer was never given out (its transaction did not commit).
- Refusals are counted per key (a party, or the remote peer that carried the request) over a
  sliding window: a key with ``rate_limit`` refusals in the last ``rate_window_s`` seconds is
  ``limited``. Counters are soft: past ``max_keys`` keys the least recently refused is dropped
  (forgetting a count only lets that key be refused a little more), so memory stays bounded.
- It decides nothing about money and knows nothing of the ledger or the wire; thread-safe
  (one lock, held for dictionary work only). Time is a parameter (``now``, unix seconds).
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import threading
from typing import Iterable

__all__ = ["Remembered", "RefusalBook"]


@dataclasses.dataclass(frozen=True, slots=True)
class Remembered:
    """One refused request: the sha256 of the signed request, the encoded signed answer, the
    party it counts against and the time it may be forgotten."""

    digest: bytes
    answer: bytes
    key: str
    expires_at: int


class RefusalBook:
    """The refusals of the last freshness window, and the refusal counts of the last minute."""

    def __init__(self, max_entries: int = 8192, max_per_key: int = 64, rate_limit: int = 30,
                 rate_window_s: int = 60, max_keys: int = 16384) -> None:
        """Args:
            max_entries: refusals remembered at once, in all.
            max_per_key: refusals remembered at once for one party (past it: ``limited``).
            rate_limit: refusals in ``rate_window_s`` after which a key is ``limited``.
            rate_window_s: the window of the rate limit.
            max_keys: keys whose refusals are counted at once.
        """
        self.max_entries, self.max_per_key = max_entries, max_per_key
        self.rate_limit, self.rate_window_s, self.max_keys = rate_limit, rate_window_s, max_keys
        self._lock = threading.Lock()
        self._entries: dict[bytes, Remembered] = {}
        self._by_expiry: list[tuple[int, bytes]] = []  # heap; an id leaves it when its entry expires
        self._per_key: collections.Counter[str] = collections.Counter()
        self._recent: collections.OrderedDict[str, collections.deque[int]] = collections.OrderedDict()
        self.counts: collections.Counter[str] = collections.Counter()  # refused, remembered, overflowed, limited

    # ---- the table --------------------------------------------------------------------------

    def _expire(self, now: int) -> None:
        while self._by_expiry and self._by_expiry[0][0] < now:
            expires_at, request_id = heapq.heappop(self._by_expiry)
            entry = self._entries.get(request_id)
            if entry is not None and entry.expires_at == expires_at:  # not a later entry of a forgotten id
                del self._entries[request_id]
                self._per_key[entry.key] -= 1
                if self._per_key[entry.key] <= 0:
                    del self._per_key[entry.key]

    def recall(self, request_id: bytes, now: int) -> Remembered | None:
        """The refusal remembered under ``request_id``, or ``None``."""
        with self._lock:
            self._expire(now)
            return self._entries.get(request_id)

    def remember(self, request_id: bytes, entry: Remembered, now: int) -> bool:
        """Remember a refusal until ``entry.expires_at``.

        Returns:
            False when the table is full (nothing was dropped to make room): the caller must
            keep this refusal some other way.
        """
        with self._lock:
            self._expire(now)
            if request_id in self._entries:
                return True
            if len(self._entries) >= self.max_entries:
                self.counts["overflowed"] += 1
                return False
            self._entries[request_id] = entry
            heapq.heappush(self._by_expiry, (entry.expires_at, request_id))
            self._per_key[entry.key] += 1
            self.counts["remembered"] += 1
            return True

    def forget(self, request_id: bytes) -> None:
        """Drop a refusal whose answer was never given out (its transaction failed to commit)."""
        with self._lock:
            entry = self._entries.pop(request_id, None)
            if entry is not None:
                self._per_key[entry.key] -= 1
                if self._per_key[entry.key] <= 0:
                    del self._per_key[entry.key]

    def __len__(self) -> int:
        return len(self._entries)

    # ---- the rate limit ---------------------------------------------------------------------

    def note(self, keys: Iterable[str | None], now: int) -> None:
        """Count one refusal against each of ``keys`` (``None`` ones are skipped)."""
        with self._lock:
            self.counts["refused"] += 1
            for key in keys:
                if key is None:
                    continue
                times = self._recent.pop(key, None) or collections.deque(maxlen=self.rate_limit)
                times.append(now)
                self._recent[key] = times  # most recently refused last
                while len(self._recent) > self.max_keys:
                    self._recent.popitem(last=False)

    def limited(self, keys: Iterable[str | None], now: int) -> str | None:
        """Why one of ``keys`` may not be served now, or ``None``.

        Returns:
            A short reason when a key had ``rate_limit`` refusals in the last ``rate_window_s``
            seconds or holds ``max_per_key`` remembered refusals.
        """
        with self._lock:
            self._expire(now)
            for key in keys:
                if key is None:
                    continue
                times = self._recent.get(key)
                if times is not None and len(times) >= self.rate_limit and times[0] > now - self.rate_window_s:
                    self.counts["limited"] += 1
                    return f"{self.rate_limit} refused requests in {self.rate_window_s}s; try again later"
                if self._per_key.get(key, 0) >= self.max_per_key:
                    self.counts["limited"] += 1
                    return f"{self.max_per_key} refused requests still fresh; try again later"
            return None
