"""Prometheus text exposition for the services' ``/metrics`` (no client library needed).

:class:`Exposition` collects samples and renders the text format (version 0.0.4) with ``# HELP``
and ``# TYPE`` lines; :class:`Histogram` is a thread-safe latency histogram kept in memory.
Metrics carry counts, ages and durations only: never a token, pseudonym or record value.
"""

from __future__ import annotations

import hmac
import math
import threading
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["CONTENT_TYPE", "LATENCY_BUCKETS", "Exposition", "Histogram", "may_scrape"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def may_scrape(authorization: str, token: str | None) -> bool:
    """Whether a request with this ``Authorization`` header may read ``/metrics``.

    Without a configured ``metrics_token`` everyone may (the endpoint is then for a
    monitoring network only); with one, the header must be ``Bearer <token>``, compared in
    constant time.
    """
    if token is None:
        return True
    scheme, _, supplied = authorization.partition(" ")
    ok = hmac.compare_digest(supplied.strip().encode(), token.encode())
    return ok and scheme.lower() == "bearer"


#: Upper bounds (seconds) of latency histogram buckets: 5 ms to 5 minutes.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


class Histogram:
    """Cumulative histogram of observed values (seconds), safe to share between threads.

    Args:
        buckets: Increasing upper bounds; ``+Inf`` is implied.
    """

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.buckets = tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        """Count one value (negative or NaN values count as 0)."""
        value = 0.0 if not value > 0 else value
        with self._lock:
            for i, bound in enumerate(self.buckets):
                if value <= bound:
                    self._counts[i] += 1
                    break
            else:
                self._counts[-1] += 1
            self._sum += value

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """``([(upper bound, cumulative count), ...], sum, count)``, ``+Inf`` last."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
            running += n
            cumulative.append((bound, running))
        return cumulative, total, running


class Exposition:
    """Samples for one scrape, rendered in the Prometheus text format."""

    def __init__(self) -> None:
        self._lines: list[str] = []

    def _header(self, name: str, kind: str, help_text: str) -> None:
        self._lines.append(f"# HELP {name} {help_text}")
        self._lines.append(f"# TYPE {name} {kind}")

    def gauge(
        self,
        name: str,
        help_text: str,
        value: float | Iterable[tuple[Mapping[str, str], float]],
        *,
        kind: str = "gauge",
    ) -> None:
        """A gauge (or, with ``kind="counter"``, a counter): one value or labelled values."""
        self._header(name, kind, help_text)
        if isinstance(value, (int, float)):
            self._lines.append(f"{name} {_number(value)}")
            return
        for labels, v in value:
            self._lines.append(f"{name}{_labels(labels)} {_number(v)}")

    def counter(
        self,
        name: str,
        help_text: str,
        value: float | Iterable[tuple[Mapping[str, str], float]],
    ) -> None:
        """A counter (monotonic within one run of the service)."""
        self.gauge(name, help_text, value, kind="counter")

    def histogram(
        self, name: str, help_text: str, buckets: Sequence[tuple[float, int]], total: float
    ) -> None:
        """A histogram from cumulative ``(upper bound, count)`` pairs ending with ``+Inf``."""
        self._header(name, "histogram", help_text)
        for bound, n in buckets:
            le = "+Inf" if math.isinf(bound) else _number(bound)
            self._lines.append(f'{name}_bucket{{le="{le}"}} {n}')
        self._lines.append(f"{name}_sum {_number(total)}")
        self._lines.append(f"{name}_count {buckets[-1][1] if buckets else 0}")

    def observed(self, name: str, help_text: str, histogram: Histogram) -> None:
        """A :class:`Histogram`'s current state."""
        buckets, total, _ = histogram.snapshot()
        self.histogram(name, help_text, buckets, total)

    def render(self) -> str:
        """The exposition text."""
        return "\n".join(self._lines) + "\n"


def _number(value: float) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    parts = []
    for key, value in labels.items():
        escaped = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        parts.append(f'{key}="{escaped}"')
    return "{" + ",".join(parts) + "}"
