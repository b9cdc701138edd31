"""Signed, fresh message envelopes (Ed25519) between nodes and the matcher.

Every message that crosses the network is wrapped in an envelope::

    {
      "version": 1,
      "sender": "warwickshire",          # registry id of the signer ("matcher" for the matcher)
      "recipient": "matcher",
      "kind": "token_batch",             # token_batch, ack, alert, withdrawal, feedback, ...
      "timestamp": 1767225600.25,        # seconds since the UTC epoch, as a float
      "nonce": "9f86d081884c7d659a2feaa0c55ad015",   # 128 random bits, 32 hex chars
      "body": {...},                     # the JSON object being sent
      "signature": "base64..."           # Ed25519 over canonical_bytes(every other field)
    }

:func:`verify` checks, in this order: shape, version, recipient, kind, known sender,
signature, timestamp within ``±max_skew``, and finally that the nonce was not seen before.
The nonce is remembered only after everything else has passed, so an attacker without a key
cannot "burn" nonces (or fill the store), and a stale message never enters the store.

Every refusal is an :class:`~federation.errors.AuthError` with the same message; the cause is
in ``AuthError.reason`` for local logs only.

Authorisation ("a node speaks only for itself") is the caller's job after :func:`verify`,
with :func:`require_sender_is`.
"""

from __future__ import annotations

import base64
import binascii
import heapq
import json
import math
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import duckdb
import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from federation.errors import AuthError, StoreError

__all__ = [
    "DEFAULT_MAX_SKEW_SECONDS",
    "ENVELOPE_VERSION",
    "DuckDBNonceStore",
    "MemoryNonceStore",
    "NonceStore",
    "SignedEnvelope",
    "VerifiedMessage",
    "canonical_bytes",
    "require_sender_is",
    "sign",
    "verify",
]

DEFAULT_MAX_SKEW_SECONDS = 300
"""How far (seconds) a message timestamp may be from the verifier's clock, either way."""

ENVELOPE_VERSION = 1

_FIELDS = frozenset(
    {"version", "sender", "recipient", "kind", "timestamp", "nonce", "body", "signature"}
)
_NONCE_RE = re.compile(r"[0-9a-f]{32}")
# Party ids and kinds are short machine identifiers; bounding them keeps junk out of logs.
_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")
_SIGNATURE_BYTES = 64
_MAX_TIMESTAMP = 1e12  # year ~33000; anything beyond is garbage, not a clock
_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


# --------------------------------------------------------------------------- canonical form


def canonical_bytes(obj: Any) -> bytes:
    """Encode a JSON value deterministically, for signing and hashing.

    JSON with sorted keys, no whitespace (separators ``","`` and ``":"``), non-ASCII kept as
    UTF-8. Two equal values always give the same bytes, whichever order their keys were
    inserted in.

    Args:
        obj: A JSON value: dict with str keys, list/tuple, str, int, finite float, bool, None.

    Returns:
        The UTF-8 encoded canonical JSON.

    Raises:
        ValueError: If ``obj`` contains NaN or infinity, a non-str dict key, or a value of a
            type JSON cannot represent. (Such a value has no canonical form: NaN is not JSON,
            and ``json`` would silently turn ``{1: x}`` into ``{"1": x}``.)
    """
    _check_keys(obj)
    return _dumps(obj)


def _dumps(obj: Any) -> bytes:
    """:func:`canonical_bytes` without the key check, for values already known to pass it."""
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
    except (TypeError, ValueError) as e:
        # json names the offending type ("Object of type set ...") or says "Out of range
        # float values are not JSON compliant": never a value.
        raise ValueError(f"no canonical JSON form: {e}") from None
    return text.encode("utf-8")


_CONTAINERS = (dict, list, tuple)


def _check_keys(obj: Any) -> None:
    """Refuse a dict key that is not a str, anywhere in ``obj``.

    The one thing ``json.dumps`` accepts but would change (``{1: x}`` becomes ``{"1": x}``);
    it refuses NaN, infinity and non-JSON types itself. Only containers are visited, in C
    type checks: a token batch holds a couple of hundred thousand scalars and is signed or
    verified on every hop. An explicit stack rather than recursion: bodies come from the
    network.
    """
    stack: list[Any] = [obj]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ValueError(f"dict keys must be str, got {type(key).__name__}")
                if isinstance(item, _CONTAINERS):
                    stack.append(item)
        elif isinstance(value, (list, tuple)):
            stack.extend(item for item in value if isinstance(item, _CONTAINERS))


def _signed_bytes(envelope: SignedEnvelope, body_bytes: bytes) -> bytes:
    """``canonical_bytes`` of the envelope's signed fields, given its body's canonical bytes.

    "body" sorts first among the field names, so the canonical envelope is the canonical body
    spliced in front of the other fields: a batch body is encoded once, not twice.
    """
    head = _dumps(envelope._head_fields())
    return b'{"body":' + body_bytes + b"," + head[1:]


# --------------------------------------------------------------------------- envelopes


@dataclass(frozen=True)
class SignedEnvelope:
    """A parsed, well-formed (but not yet verified) envelope.

    Use :meth:`parse` to read one from a decoded JSON object and :meth:`to_dict` to get
    the JSON-ready form. Well-formed says nothing about authenticity: only :func:`verify`
    does that.
    """

    version: int
    sender: str
    recipient: str
    kind: str
    timestamp: float
    nonce: str
    body: Mapping[str, Any]
    signature: str

    def to_dict(self) -> dict[str, Any]:
        """Return the envelope as a JSON-ready dict."""
        return {**self._signed_fields(), "signature": self.signature}

    def _head_fields(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "sender": self.sender,
            "recipient": self.recipient,
            "kind": self.kind,
            "timestamp": self.timestamp,
            "nonce": self.nonce,
        }

    def _signed_fields(self) -> dict[str, Any]:
        return {**self._head_fields(), "body": self.body}

    @classmethod
    def parse(cls, envelope: Any) -> SignedEnvelope:
        """Check the shape of a decoded envelope and return it as a ``SignedEnvelope``.

        Args:
            envelope: The decoded JSON object received.

        Returns:
            The envelope, with exactly the field values received (so that the signature
            is checked over exactly what was signed).

        Raises:
            AuthError: If it is not a well-formed version-1 envelope (reason names the field).
        """
        if not isinstance(envelope, Mapping):
            raise AuthError("malformed envelope: not a JSON object")
        keys = set(envelope)
        if keys != _FIELDS:
            # Only count the extra fields: their names are attacker-chosen text, and the
            # reason ends up in local logs.
            missing = sorted(_FIELDS - keys)
            raise AuthError(
                f"malformed envelope: missing fields {missing}, "
                f"{len(keys - _FIELDS)} unexpected fields"
            )
        version = envelope["version"]
        # bool is a subclass of int; ``true`` is not a version number.
        if type(version) is not int:
            raise AuthError("malformed envelope: version is not an integer")
        if version != ENVELOPE_VERSION:
            raise AuthError("unsupported envelope version")
        for name in ("sender", "recipient", "kind"):
            value = envelope[name]
            if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
                raise AuthError(f"malformed envelope: {name} is not a valid identifier")
        timestamp = envelope["timestamp"]
        if not _is_plausible_time(timestamp):
            raise AuthError("malformed envelope: timestamp is not a finite number")
        nonce = envelope["nonce"]
        if not isinstance(nonce, str) or not _NONCE_RE.fullmatch(nonce):
            raise AuthError("malformed envelope: nonce is not 32 lowercase hex characters")
        body = envelope["body"]
        if not isinstance(body, Mapping):
            raise AuthError("malformed envelope: body is not a JSON object")
        signature = envelope["signature"]
        if not isinstance(signature, str) or _decode_signature(signature) is None:
            raise AuthError("malformed envelope: signature is not base64 of 64 bytes")
        return cls(
            version=version,
            sender=envelope["sender"],
            recipient=envelope["recipient"],
            kind=envelope["kind"],
            timestamp=timestamp,
            nonce=nonce,
            body=body,
            signature=signature,
        )


def _is_plausible_time(value: Any) -> bool:
    # Exact type checks: bool is an int subclass, and math.isfinite overflows on huge ints.
    if type(value) is int:
        return abs(value) < _MAX_TIMESTAMP
    return type(value) is float and math.isfinite(value) and abs(value) < _MAX_TIMESTAMP


def _decode_signature(signature: str) -> bytes | None:
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        return None
    # Require the canonical encoding, so that one signature has exactly one text form.
    if len(raw) != _SIGNATURE_BYTES or base64.b64encode(raw).decode("ascii") != signature:
        return None
    return raw


def sign(
    body: Mapping[str, Any],
    *,
    kind: str,
    sender: str,
    recipient: str,
    private_key: Ed25519PrivateKey,
    now: float | None = None,
) -> dict[str, Any]:
    """Wrap ``body`` in a signed, timestamped envelope with a fresh random nonce.

    Args:
        body: The JSON object to send. It must contain ids and tokens only, never
            plaintext identifiers.
        kind: Message kind, e.g. ``"token_batch"``, ``"ack"``, ``"alert"``, ``"withdrawal"``,
            ``"feedback"``. The verifier states which kind it expects.
        sender: The signer's registry id (``"matcher"`` for the matcher).
        recipient: The registry id of the party the message is for.
        private_key: The sender's Ed25519 private key.
        now: Timestamp to use (seconds since the UTC epoch); defaults to ``time.time()``.

    Returns:
        The envelope as a JSON-ready dict (see the module docstring).

    Raises:
        ValueError: If a field is not a valid identifier or ``body`` is not canonical JSON
            (NaN, infinity, non-str keys, non-JSON types). These are programming errors.
    """
    for name, value in (("sender", sender), ("recipient", recipient), ("kind", kind)):
        if not _NAME_RE.fullmatch(value):
            raise ValueError(f"{name} must match [a-z0-9_-]{{1,64}}")
    if not isinstance(body, Mapping):
        raise ValueError("body must be a JSON object")
    timestamp = float(time.time() if now is None else now)
    unsigned = SignedEnvelope(
        version=ENVELOPE_VERSION,
        sender=sender,
        recipient=recipient,
        kind=kind,
        timestamp=timestamp,
        nonce=secrets.token_hex(16),
        # A plain dict copy, so later changes to the caller's mapping cannot
        # make the envelope disagree with its signature.
        body=orjson.loads(body_bytes := canonical_bytes(body)),
        signature="",
    )
    signature = private_key.sign(_signed_bytes(unsigned, body_bytes))
    return {
        **unsigned._signed_fields(),
        "signature": base64.b64encode(signature).decode("ascii"),
    }


# --------------------------------------------------------------------------- nonce stores


class NonceStore(Protocol):
    """Remembers (sender, nonce) pairs so that a replayed message is refused.

    A store must remember a nonce for at least ``2 * max_skew`` seconds after its timestamp,
    where ``max_skew`` is the one :func:`verify` uses; both stores below take ``max_skew``
    for that reason.
    """

    def check_and_remember(self, sender: str, nonce: str, timestamp: float) -> bool:
        """Remember the nonce; return ``False`` if it was already seen (a replay)."""
        ...


class MemoryNonceStore:
    """An in-memory nonce store, for tests and single-process tools.

    Forgets nonces more than ``2 * max_skew`` seconds older than the newest timestamp it has
    seen. Time is taken from message timestamps rather than a clock, so that tests using
    ``now=`` behave like production. A message whose timestamp is older than what the store
    still remembers is refused (``False``): the store can no longer vouch that it is fresh.
    Thread-safe.

    Args:
        max_skew: The ``max_skew`` that :func:`verify` is called with.
    """

    def __init__(self, *, max_skew: float = DEFAULT_MAX_SKEW_SECONDS) -> None:
        self._retention = 2.0 * max_skew
        self._seen: set[tuple[str, str]] = set()
        self._by_time: list[tuple[float, str, str]] = []  # min-heap, for pruning
        self._horizon = -math.inf  # newest timestamp seen
        self._lock = threading.Lock()

    def check_and_remember(self, sender: str, nonce: str, timestamp: float) -> bool:
        """Remember ``(sender, nonce)``; return ``False`` if seen, or too old to judge."""
        with self._lock:
            self._horizon = max(self._horizon, timestamp)
            cutoff = self._horizon - self._retention
            while self._by_time and self._by_time[0][0] < cutoff:
                _, old_sender, old_nonce = heapq.heappop(self._by_time)
                self._seen.discard((old_sender, old_nonce))
            if timestamp < cutoff or (sender, nonce) in self._seen:
                return False
            self._seen.add((sender, nonce))
            heapq.heappush(self._by_time, (timestamp, sender, nonce))
            return True

    def __len__(self) -> int:
        return len(self._seen)


class DuckDBNonceStore:
    """A nonce store in a DuckDB table, so that replays are refused across restarts.

    Creates its table if needed. Entries more than ``2 * max_skew`` seconds older than the
    newest stored timestamp are pruned from time to time; as with :class:`MemoryNonceStore`,
    a message older than that horizon is refused.

    If the verifier's clock is set back by more than ``max_skew`` after messages were stored,
    messages will be refused until the clock passes the stored horizon again: that errs on
    the side of refusing replays.

    Args:
        conn: An open DuckDB connection (the service's database file).
        lock: The lock that serialises every use of ``conn`` across threads. DuckDB
            connections are not safe to share between threads without one. If omitted,
            the store uses its own lock, which is only safe if nothing else uses ``conn``.
        table: Table name (a plain SQL identifier).
        max_skew: The ``max_skew`` that :func:`verify` is called with.

    Raises:
        ValueError: If ``table`` is not a plain SQL identifier.
        StoreError: If the table cannot be created or read.
    """

    _PRUNE_EVERY = 256

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        *,
        lock: threading.Lock | threading.RLock | None = None,
        table: str = "seen_nonces",
        max_skew: float = DEFAULT_MAX_SKEW_SECONDS,
    ) -> None:
        if not _IDENTIFIER_RE.fullmatch(table):
            raise ValueError("table must be a plain SQL identifier")
        self._conn = conn
        self._lock = lock if lock is not None else threading.Lock()
        self._table = f'"{table}"'
        self._retention = 2.0 * max_skew
        self._inserts = 0
        with self._lock:
            try:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._table} ("
                    "sender VARCHAR NOT NULL, nonce VARCHAR NOT NULL, ts DOUBLE NOT NULL, "
                    "PRIMARY KEY (sender, nonce))"
                )
                row = conn.execute(f"SELECT max(ts) FROM {self._table}").fetchone()
            except duckdb.Error as e:
                raise StoreError(f"cannot open nonce table {table}") from e
        self._horizon = -math.inf if row is None or row[0] is None else float(row[0])

    def check_and_remember(self, sender: str, nonce: str, timestamp: float) -> bool:
        """Remember ``(sender, nonce)``; return ``False`` if seen, or too old to judge.

        Raises:
            StoreError: If DuckDB fails.
        """
        with self._lock:
            horizon = max(self._horizon, timestamp)
            cutoff = horizon - self._retention
            if timestamp < cutoff:
                return False
            try:
                # The primary key makes "check" and "remember" one atomic statement.
                row = self._conn.execute(
                    f"INSERT OR IGNORE INTO {self._table} VALUES (?, ?, ?)",
                    [sender, nonce, timestamp],
                ).fetchone()
                inserted = row is not None and row[0] == 1
                self._horizon = horizon
                if inserted:
                    self._inserts += 1
                    if self._inserts % self._PRUNE_EVERY == 0:
                        self._conn.execute(f"DELETE FROM {self._table} WHERE ts < ?", [cutoff])
            except duckdb.Error as e:
                raise StoreError("cannot record nonce") from e
            return inserted

    def prune(self) -> int:
        """Delete entries too old to matter now; return how many were deleted.

        Raises:
            StoreError: If DuckDB fails.
        """
        with self._lock:
            try:
                row = self._conn.execute(
                    f"DELETE FROM {self._table} WHERE ts < ?", [self._horizon - self._retention]
                ).fetchone()
            except duckdb.Error as e:
                raise StoreError("cannot prune nonces") from e
        return 0 if row is None else int(row[0])


# --------------------------------------------------------------------------- verification


@dataclass(frozen=True)
class VerifiedMessage:
    """A message whose signature, freshness and nonce have been checked.

    Attributes:
        sender: Registry id of the authenticated sender.
        kind: The message kind (equal to the kind the verifier expected).
        timestamp: The sender's timestamp, seconds since the UTC epoch.
        nonce: The message nonce (useful as an idempotency key).
        body: The message body.
    """

    sender: str
    kind: str
    timestamp: float
    nonce: str
    body: Mapping[str, Any]


def verify(
    envelope: Mapping[str, Any],
    *,
    expected_kind: str,
    recipient: str,
    public_keys: Mapping[str, Ed25519PublicKey],
    nonces: NonceStore,
    now: float | None = None,
    max_skew: float = DEFAULT_MAX_SKEW_SECONDS,
) -> VerifiedMessage:
    """Authenticate a received envelope and check that it is fresh and not a replay.

    Args:
        envelope: The decoded JSON object received.
        expected_kind: The only kind this endpoint accepts.
        recipient: The verifier's own registry id; envelopes for anyone else are refused
            (so a message to one node cannot be replayed to another).
        public_keys: Registry id to public key, e.g. ``Registry.public_keys()``.
        nonces: Where seen nonces are remembered.
        now: The verifier's clock (seconds since the UTC epoch); defaults to ``time.time()``.
        max_skew: Largest accepted distance between ``now`` and the message timestamp.

    Returns:
        The verified message.

    Raises:
        AuthError: For every refusal (malformed, unknown sender, wrong recipient, wrong kind,
            bad signature, stale or future timestamp, replayed nonce). ``str()`` is always
            "request refused"; the cause is in ``reason``.
        StoreError: If the nonce store fails (the message must then be refused too).
    """
    env = SignedEnvelope.parse(envelope)
    if env.recipient != recipient:
        raise AuthError(f"wrong recipient {env.recipient!r}")
    if env.kind != expected_kind:
        raise AuthError(f"wrong kind {env.kind!r}, expected {expected_kind!r}")
    key = public_keys.get(env.sender)
    if key is None:
        raise AuthError(f"unknown sender {env.sender!r}")
    try:
        message = _signed_bytes(env, canonical_bytes(env.body))
    except (ValueError, RecursionError) as e:  # NaN (json.loads accepts it), absurd nesting
        raise AuthError("malformed envelope: body is not canonical JSON") from e
    try:
        key.verify(_decode_signature(env.signature) or b"", message)
    except InvalidSignature as e:
        raise AuthError(f"bad signature from {env.sender!r}") from e
    current = time.time() if now is None else now
    if env.timestamp < current - max_skew:
        raise AuthError(f"stale message: {current - env.timestamp:.0f}s old")
    if env.timestamp > current + max_skew:
        raise AuthError(f"message from the future: {env.timestamp - current:.0f}s ahead")
    # Only now, with a valid signature and a fresh timestamp, may the nonce be spent.
    if not nonces.check_and_remember(env.sender, env.nonce, float(env.timestamp)):
        raise AuthError(f"replayed nonce from {env.sender!r}")
    return VerifiedMessage(
        sender=env.sender,
        kind=env.kind,
        timestamp=float(env.timestamp),
        nonce=env.nonce,
        body=dict(env.body),
    )


def require_sender_is(
    message: VerifiedMessage,
    node_id: str,
    *,
    body_fields: Sequence[str] = ("node_id", "county"),
) -> None:
    """Refuse unless ``message`` was sent by ``node_id`` and its body speaks only for it.

    Call this after :func:`verify` wherever a message acts on behalf of a party, e.g. with the
    county in the URL path: ``require_sender_is(msg, county)``. Besides the sender, every field
    of ``body_fields`` present in the body must also equal ``node_id``, so that a node cannot
    sign a batch that claims to be another county's. For messages whose body names someone
    other than the sender (an alert from the matcher names the recipient county), pass
    ``body_fields=()``.

    Args:
        message: A verified message.
        node_id: The party the message must come from.
        body_fields: Body fields that, when present, must equal ``node_id``.

    Raises:
        AuthError: If the sender or a body field is someone else.
    """
    if message.sender != node_id:
        raise AuthError(f"sender {message.sender!r} may not speak for {node_id!r}")
    for name in body_fields:
        if name in message.body and message.body[name] != node_id:
            raise AuthError(f"sender {message.sender!r} sent a body with another {name}")
