"""Sending the node's outbox to the matcher: signed, acknowledged, retried until it lands.

Each pending outbox message is wrapped in a signed envelope (sender: this node, recipient:
``"matcher"``) and POSTed: token batches to ``/v1/batches``, feedback to ``/v1/feedback``. The
matcher replies with a signed ``ack`` envelope; only a reply that verifies, comes from the
matcher, is addressed to this node and refers to the message sent marks the message acked.

Nothing is dropped (design invariant 4). On any failure (connection refused, timeout, 5xx,
429, an ack that does not verify) the message stays pending and is retried with exponential
backoff plus jitter, capped at ``settings.retry_max_seconds``. A 4xx other than 429 means the
matcher refuses the message as it is: that is logged and retried slowly (at the cap), never
dropped, because the cause is usually configuration that an operator will fix.

Messages of one kind are sent strictly in ``seq`` order (a later token batch may update a
record that an earlier one inserted), so a failing message holds back later ones of its kind;
token batches and feedback are independent lanes, so a stuck batch does not hold back a
safeguarding lead's decision.

Logs carry message ids, kinds, counts and status codes only, never bodies.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pydantic import ValidationError

from federation.errors import AuthError, ConfigError, TransportError
from federation.keys import load_private_key
from federation.node.store import NodeStore, OutboxEntry
from federation.protocol import Ack
from federation.registry import MATCHER_ID, Registry
from federation.settings import NodeSettings
from federation.signing import DuckDBNonceStore, NonceStore, require_sender_is, sign, verify

__all__ = ["ENDPOINTS", "Publisher", "load_identity", "publish_pending"]

logger = logging.getLogger(__name__)

#: Matcher path for each outbox message kind.
ENDPOINTS = {"token_batch": "/v1/batches", "feedback": "/v1/feedback"}
_JSON = {"content-type": "application/json"}
#: Delay before the first retry; doubled on each further failure up to the cap.
FIRST_RETRY_SECONDS = 0.5
ACK_NONCE_TABLE = "ack_nonces"


class _Failure(Exception):
    """Why a send failed (for the log and the outbox's last_error), and how to retry.

    Args:
        what: Short description: a status code or an error class, never a body.
        slow: Retry at the cap rather than backing off from the first delay.
        retry_after: The server's Retry-After, in seconds, if it gave one.
    """

    def __init__(self, what: str, *, slow: bool = False, retry_after: float | None = None):
        super().__init__(what)
        self.what = what
        self.slow = slow
        self.retry_after = retry_after


class Publisher:
    """Sends pending outbox messages to the matcher, in a background thread or on demand.

    Args:
        store: The node's store (outbox and the ack nonce table).
        settings: Node settings (``node_id``, ``publish_interval``, ``retry_max_seconds``).
        registry: The federation registry (matcher URL and public key).
        private_key: This node's signing key.
        client: HTTP client to send with (its timeouts apply).
        nonces: Where ack nonces are remembered; a table in the store by default.
        clock: Time source (seconds since the UTC epoch).
    """

    def __init__(
        self,
        store: NodeStore,
        settings: NodeSettings,
        registry: Registry,
        private_key: Ed25519PrivateKey,
        client: httpx.Client,
        *,
        nonces: NonceStore | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._node_id = settings.node_id
        self._interval = max(0.01, settings.publish_interval)
        self._cap = max(FIRST_RETRY_SECONDS, settings.retry_max_seconds)
        self._registry = registry
        self._key = private_key
        self._client = client
        self._clock = clock
        self._nonces = nonces or DuckDBNonceStore(
            store.conn, lock=store.lock, table=ACK_NONCE_TABLE
        )
        self._base = registry.matcher_url.rstrip("/")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._send_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the background thread (once)."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="jigsaw-publisher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the background thread, waiting up to ``timeout`` seconds for a send to end."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("publisher did not stop within %.1f s", timeout)
            self._thread = None

    def wake(self) -> None:
        """Send what is pending now rather than at the next poll."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            # Cleared before the pass, so a wake() during it is not lost.
            self._wake.clear()
            try:
                _, next_due = self._pass(force=False)
            except Exception:  # never let the thread die: nothing would be sent again
                logger.exception("publisher: pass failed; retrying later")
                next_due = self._clock() + self._cap
            if self._stop.is_set():
                break
            # Poll every publish_interval (a message may be queued without a wake()); wait
            # longer only while backing off.
            wait = self._interval if next_due is None else next_due - self._clock()
            self._wake.wait(timeout=max(self._interval, wait))

    # ------------------------------------------------------------------ sending

    def publish_pending(self, *, force: bool = True) -> int:
        """Send pending messages now, in order; return how many were acknowledged.

        Args:
            force: Send messages whose retry time has not come yet (what an operator asking
                for a publish wants); if False, respect it.
        """
        acked, _ = self._pass(force=force)
        return acked

    def _pass(self, *, force: bool) -> tuple[int, float | None]:
        """One pass over the outbox; returns (acked, earliest retry time of a held-back lane)."""
        with self._send_lock:
            acked = 0
            blocked: set[str] = set()
            next_due: float | None = None
            for entry in self._store.pending():
                if entry.kind in blocked:
                    continue
                if self._stop.is_set() and not force:
                    return acked, None
                if not force and entry.next_attempt_at > self._clock():
                    blocked.add(entry.kind)
                    next_due = _earliest(next_due, entry.next_attempt_at)
                    continue
                retry_at = self._send(entry)
                if retry_at is None:
                    acked += 1
                else:
                    blocked.add(entry.kind)
                    next_due = _earliest(next_due, retry_at)
            return acked, next_due

    def _send(self, entry: OutboxEntry) -> float | None:
        """Send one message; None if acked, else the time of the next attempt."""
        body = orjson.loads(self._store.message_body(entry.message_id))
        envelope = sign(
            body,
            kind=entry.kind,
            sender=self._node_id,
            recipient=MATCHER_ID,
            private_key=self._key,
        )
        try:
            self._post(entry, envelope)
        except _Failure as failure:
            delay = self._backoff(entry.attempts, failure)
            retry_at = self._clock() + delay
            attempts = self._store.defer(
                entry.message_id, next_attempt_at=retry_at, error=failure.what
            )
            log = logger.warning if failure.slow else logger.info
            log(
                "%s %s not delivered (%s); attempt %d, retrying in %.1f s",
                entry.kind,
                entry.message_id,
                failure.what,
                attempts,
                delay,
            )
            return retry_at
        if self._store.mark_acked(entry.message_id, now=self._clock()):
            logger.info("%s %s acknowledged by the matcher", entry.kind, entry.message_id)
        return None

    def _post(self, entry: OutboxEntry, envelope: dict[str, object]) -> None:
        """POST the envelope and check the signed ack; raise _Failure on anything else."""
        url = self._base + ENDPOINTS[entry.kind]
        try:
            # orjson: a token batch is a few MB of JSON, encoded on every attempt.
            response = self._client.post(url, content=orjson.dumps(envelope), headers=_JSON)
        except httpx.HTTPError as e:
            # The class name only: short, stable, and never anything from a body.
            raise _Failure(f"transport: {type(e).__name__}") from e
        status = response.status_code
        if status == 429 or status >= 500:
            raise _Failure(f"HTTP {status}", retry_after=_retry_after(response))
        if status >= 400:
            raise _Failure(f"HTTP {status} (refused: {_refusal(response)})", slow=True)
        try:
            ack = self._verify_ack(response)
        except (AuthError, TransportError) as e:
            reason = e.reason if isinstance(e, AuthError) else str(e)
            logger.debug("ack for %s refused: %s", entry.message_id, reason)
            raise _Failure("invalid ack") from e
        if ack.ref != entry.message_id:
            raise _Failure("ack for another message")

    def _verify_ack(self, response: httpx.Response) -> Ack:
        try:
            reply = response.json()
        except ValueError as e:
            raise TransportError("the matcher's reply is not JSON") from e
        message = verify(
            reply,
            expected_kind="ack",
            recipient=self._node_id,
            public_keys={MATCHER_ID: self._registry.matcher_public_key},
            nonces=self._nonces,
        )
        require_sender_is(message, MATCHER_ID, body_fields=())
        try:
            return Ack.model_validate(message.body)
        except ValidationError as e:
            raise TransportError("the matcher's ack body is invalid") from e

    def _backoff(self, attempts: int, failure: _Failure) -> float:
        """Seconds until the next attempt after ``attempts`` earlier failures."""
        if failure.slow:
            return self._cap
        ceiling = min(self._cap, FIRST_RETRY_SECONDS * 2.0**attempts)
        # "Equal jitter": at least half the exponential delay, so retries really back off,
        # and a random rest, so that many nodes do not retry in lockstep after an outage.
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        if failure.retry_after is not None:
            delay = max(delay, min(self._cap, failure.retry_after))
        return delay


#: Longest refusal reason kept in the log and the outbox (whose error column takes 200).
_REASON_CHARS = 160


def _refusal(response: httpx.Response) -> str:
    """The matcher's reason for refusing a message, shortened; it holds no values (the
    matcher never sees plaintext, and its 422s name fields and rules only)."""
    try:
        detail = response.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    if detail is None:
        return "no reason given"
    text = detail if isinstance(detail, str) else orjson.dumps(detail).decode()
    return text if len(text) <= _REASON_CHARS else text[: _REASON_CHARS - 1] + "…"


def load_identity(settings: NodeSettings) -> tuple[Registry, Ed25519PrivateKey]:
    """Load the registry and this node's signing key, and check that they belong together.

    Args:
        settings: Node settings (``registry``, ``private_key``, ``node_id``).

    Returns:
        The registry and the private key.

    Raises:
        ConfigError: Either file is missing or invalid, the node is not in the registry, or
            the key is not the one the registry holds for it.
    """
    registry = Registry.load(settings.registry)
    entry = registry.nodes.get(settings.node_id)
    if entry is None:
        raise ConfigError(
            f"node {settings.node_id!r} is not in the registry", source=str(settings.registry)
        )
    private_key = load_private_key(settings.private_key)
    if private_key.public_key().public_bytes_raw() != entry.public_key.public_bytes_raw():
        raise ConfigError(
            f"this key is not node {settings.node_id!r}'s key in the registry",
            source=str(settings.private_key),
        )
    return registry, private_key


def publish_pending(settings: NodeSettings, *, client: httpx.Client | None = None) -> int:
    """Send a stopped node's pending outbox once, now, in order (``jigsaw node publish``).

    Opens the node's store (DuckDB lets one process at a time have the file, so the node
    service must not be running), sends every pending message whatever its retry time, and
    closes it again. Messages that fail stay pending with their retry time updated; the node
    service sends them when it next runs. A running node publishes by itself; to push it,
    use :meth:`Publisher.publish_pending` in its process.

    Args:
        settings: Node settings.
        client: HTTP client; by default one is made and closed here.

    Returns:
        How many messages the matcher acknowledged.

    Raises:
        ConfigError: The registry or key is missing or invalid.
        StoreError: The store cannot be opened (e.g. the node is running).
    """
    registry, private_key = load_identity(settings)
    store = NodeStore(settings.database)
    http = client or httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0))
    try:
        publisher = Publisher(store, settings, registry, private_key, http)
        return publisher.publish_pending(force=True)
    finally:
        store.close()
        if client is None:
            http.close()


def _earliest(current: float | None, candidate: float) -> float:
    return candidate if current is None else min(current, candidate)


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date, or nonsense: exponential backoff is good enough
