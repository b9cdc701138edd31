"""Exceptions raised by the federation package.

Hierarchy::

    FederationError
    ├── AuthError        authentication or authorisation refused (str is always "request refused")
    ├── ConfigError      bad settings, registry or key files; the message lists every problem
    ├── TransportError   a peer is unreachable, timed out or answered nonsense
    └── StoreError       a DuckDB store (nonces, audit log, batches, inbox) failed

Foreign errors (``cryptography``'s ``InvalidSignature``, ``OSError`` on key files, ``tomllib``
and DuckDB errors) are translated where they happen with ``raise ... from e`` so that callers
only ever need to catch ``FederationError``.

Messages never contain personal data, tokens, keys or secrets. ``AuthError`` goes further: its
message is identical whatever the cause, so that a caller learns nothing about *why* it was
refused (which sender ids exist, whether its clock is off, whether its signature was close).
The cause is kept in ``AuthError.reason`` for local debug logging and for tests only; it must
never be sent back to the peer.
"""

from __future__ import annotations

from collections.abc import Iterable

AUTH_REFUSED_MESSAGE = "request refused"
"""The one message every ``AuthError`` carries, whatever its cause."""


class FederationError(Exception):
    """Base class of every error the federation package raises on purpose."""


class AuthError(FederationError):
    """A message or request failed authentication or authorisation.

    ``str(error)`` is always :data:`AUTH_REFUSED_MESSAGE`. The specific cause is in
    :attr:`reason`, for local debug logs and tests; never return it to a peer.

    Attributes:
        reason: Why the request was refused (e.g. ``"bad signature"``). Local use only.
    """

    def __init__(self, reason: str) -> None:
        # The uniform text goes into args, so that default logging/tracebacks and
        # ``repr`` also reveal nothing beyond "request refused".
        super().__init__(AUTH_REFUSED_MESSAGE)
        self.reason = reason

    def __str__(self) -> str:
        return AUTH_REFUSED_MESSAGE

    def __reduce__(self) -> tuple[type[AuthError], tuple[str]]:
        # Keep ``reason`` across pickling (e.g. between demo processes); the default
        # would rebuild the error from args, i.e. with reason "request refused".
        return (type(self), (self.reason,))


class ConfigError(FederationError):
    """Settings, a registry or a key file is invalid; the message lists every problem.

    Attributes:
        problems: Every problem found, one short sentence each.
        source: What was being read (usually a file path), if known.
    """

    def __init__(self, problems: str | Iterable[str], *, source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        super().__init__(self._render())

    def _render(self) -> str:
        where = f"{self.source}: " if self.source else ""
        if len(self.problems) == 1:
            return f"{where}{self.problems[0]}"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{where}{len(self.problems)} problems:\n{lines}"

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_config_error, (type(self), self.problems, self.source))


def _rebuild_config_error(
    cls: type[ConfigError], problems: list[str], source: str | None
) -> ConfigError:
    return cls(problems, source=source)


class TransportError(FederationError):
    """A peer could not be reached, timed out, or sent a response that cannot be used."""


class StoreError(FederationError):
    """A persistent store (DuckDB) could not be read or written."""
