"""A token-bucket rate limit per client key (a token name, or an address when unauthenticated).

Each key may send ``burst`` requests at once and then ``per_minute / 60`` per second. A request
over the limit is refused with the seconds until the next one would be admitted, which the
server sends as ``Retry-After``. Buckets live in memory on the event loop (no lock needed); at
most ``max_keys`` are kept, the least recently used dropped first, so a flood from many
addresses cannot grow memory without bound.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from bonefrac import InputError


class RateLimiter:
    def __init__(self, per_minute: float, burst: int, max_keys: int = 10_000):
        """``per_minute``: sustained requests per minute per key; ``burst``: at once (>= 1)."""
        if per_minute <= 0 or burst < 1:
            raise InputError("rate limit: per_minute must be > 0 and burst >= 1")
        self.rate = per_minute / 60.0  # requests per second
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (level, t)

    def take(self, key: str, now: float | None = None) -> float:
        """Spend one request of ``key``'s budget: 0.0 if admitted, else the seconds to wait."""
        now = time.monotonic() if now is None else now
        level, last = self._buckets.pop(key, (self.burst, now))
        level = min(self.burst, level + (now - last) * self.rate)
        admitted = level >= 1.0
        self._buckets[key] = (level - 1.0 if admitted else level, now)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return 0.0 if admitted else (1.0 - level) / self.rate

    @staticmethod
    def retry_after(wait_s: float) -> str:
        """``Retry-After`` header value: whole seconds, at least 1."""
        return str(max(1, math.ceil(wait_s)))


class ConcurrencyLimiter:
    """At most ``limit`` requests in flight at once per key (a token name or an address), so
    one client cannot hold every slow upload or queue place the server has. Counts live on the
    event loop (no lock); a key is dropped when its last request ends, so memory is bounded by
    the requests in flight."""

    def __init__(self, limit: int):
        if limit < 1:
            raise InputError("concurrency limit must be >= 1")
        self.limit = limit
        self._active: dict[str, int] = {}

    def acquire(self, key: str) -> bool:
        """Take one of ``key``'s places; False (nothing taken) when it has ``limit`` already."""
        n = self._active.get(key, 0)
        if n >= self.limit:
            return False
        self._active[key] = n + 1
        return True

    def release(self, key: str) -> None:
        """Give back a place taken by ``acquire``."""
        n = self._active.pop(key, 0) - 1
        if n > 0:
            self._active[key] = n
