"""Per-sender request rate limits: one token bucket for each authenticated party.

The matcher checks the bucket of a message's sender *after* the message has verified
(:func:`federation.signing.verify`), so a party is only ever limited for requests it really
signed: an attacker who forges a node's id cannot use up that node's allowance. Requests that
fail verification are refused before any work is done, and are bounded by the request-size
limit instead.

A bucket holds up to ``burst`` requests (a minute's allowance by default) and refills at
``per_minute / 60`` requests a second. An empty bucket refuses with the time until the next
request is allowed, which the service sends as ``Retry-After``; the node's publisher honours it
and retries, so a refused batch is delayed, never lost (design invariant 4).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from federation.errors import FederationError

__all__ = ["RateLimited", "SenderRateLimiter"]


class RateLimited(FederationError):
    """A sender has used up its allowance; retry after :attr:`retry_after` seconds.

    Attributes:
        retry_after: Seconds until the next request from this sender would be allowed.
    """

    def __init__(self, retry_after: float) -> None:
        super().__init__("too many requests")
        self.retry_after = retry_after

    @property
    def retry_after_header(self) -> str:
        """``Retry-After`` as HTTP wants it: whole seconds, at least 1."""
        return str(max(1, math.ceil(self.retry_after)))


class SenderRateLimiter:
    """Token buckets keyed by authenticated sender id. Thread-safe.

    Args:
        per_minute: Sustained requests a minute per sender; 0 or less turns the limit off.
        burst: Requests a sender may make at once after being idle; ``per_minute`` by default.
        clock: Monotonic time source in seconds (tests may pass a fake one).
        max_senders: Buckets kept at most. Senders are registry ids, so this is only a guard;
            when it is reached the longest-idle (hence fullest) bucket is forgotten.
    """

    def __init__(
        self,
        *,
        per_minute: int,
        burst: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_senders: int = 10_000,
    ) -> None:
        self.per_minute = per_minute
        self.capacity = float(max(1, burst if burst is not None else per_minute))
        self._rate = per_minute / 60.0
        self._clock = clock
        self._max = max_senders
        self._buckets: dict[str, tuple[float, float]] = {}  # sender -> (tokens, last refill)
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        """False when the limit is switched off (``per_minute <= 0``)."""
        return self.per_minute > 0

    def check(self, sender: str) -> None:
        """Take one request from ``sender``'s bucket.

        Raises:
            RateLimited: The bucket is empty; nothing was taken.
        """
        if not self.enabled:
            return
        with self._lock:
            now = self._clock()
            tokens, last = self._buckets.pop(sender, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self._rate)
            if tokens >= 1.0:
                self._buckets[sender] = (tokens - 1.0, now)
                self._forget_oldest()
                return
            self._buckets[sender] = (tokens, now)
            raise RateLimited((1.0 - tokens) / self._rate)

    def _forget_oldest(self) -> None:
        # Dicts keep insertion order and check() re-inserts on every use: the first key is
        # the sender idle longest, whose bucket has refilled the most.
        while len(self._buckets) > self._max:
            del self._buckets[next(iter(self._buckets))]
