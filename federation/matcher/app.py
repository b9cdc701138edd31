"""The central matcher as an HTTP service (FastAPI on uvicorn).

Routes stay thin: they verify, validate and hand over to :class:`MatcherStore` and
:class:`LinkIndex`. Two background threads do the work: the *scorer* links what arrived (a full
link when there is no model yet, then only new records against the index) and the *deliverer*
sends every queued alert, signed, to the county it concerns until that county acknowledges it.
"""

from __future__ import annotations

import hmac
import logging
import random
import secrets
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import ValidationError

from federation.errors import AuthError, FederationError
from federation.keys import load_private_key
from federation.matcher.epochs import KeyEpochs
from federation.matcher.index import LinkIndex
from federation.matcher.store import EpochRefused, MatcherStore
from federation.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from federation.metrics import Exposition, Histogram, may_scrape
from federation.protocol import MAX_ALERT_BATCH, Ack, FeedbackBody, TokenBatch
from federation.ratelimit import RateLimited, SenderRateLimiter
from federation.registry import MATCHER_ID, Registry
from federation.settings import MatcherSettings
from federation.signing import DuckDBNonceStore, require_sender_is, sign, verify
from linkage.model import LinkageModel
from linkage.tokenise import TokenSpec

__all__ = ["create_app", "run"]

logger = logging.getLogger("jigsaw.matcher")

REFUSED = {"detail": "request refused"}


@dataclass
class _Metrics:
    batches: int = 0
    duplicate_batches: int = 0
    records: int = 0
    feedback: int = 0
    duplicate_feedback: int = 0
    alerts_sent: int = 0
    delivery_failures: int = 0
    score_rounds: int = 0
    # Seconds: verify and store a token batch; one scoring round; an alert message from
    # queued to acknowledged by its county.
    batch_seconds: Histogram = field(default_factory=Histogram)
    score_seconds: Histogram = field(default_factory=Histogram)
    delivery_seconds: Histogram = field(default_factory=Histogram)


#: Up to this many undelivered alerts are read through the key index; more, by a scan.
_DUE_BY_INDEX = 5_000


class Matcher:
    """The matcher's moving parts, shared by the routes and the background threads."""

    def __init__(self, settings: MatcherSettings, *, client: httpx.Client | None = None) -> None:
        self.settings = settings
        self.registry = Registry.load(settings.registry)
        self.key: Ed25519PrivateKey = load_private_key(settings.private_key)
        self.spec = TokenSpec.from_toml(settings.token_spec) if settings.token_spec else TokenSpec()
        model = LinkageModel.load(settings.model) if settings.model else None
        mw = [
            f"mw_{c['output_column_name']}"
            for c in (model or LinkageModel.untrained(self.spec.bloom)).settings["comparisons"]
        ]
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.store = MatcherStore(settings.database, self.spec, mw_columns=mw)
        self.nonces = DuckDBNonceStore(self.store.conn, lock=self.store.lock)
        self.index = LinkIndex(
            self.store,
            self.registry,
            model=model,
            threshold=settings.threshold,
            engine=settings.engine,  # the full link's engine (issue 8)
            spark_master=settings.spark_master,
        )
        # Key rotation: which epoch is linked on, and the switch to the next (epochs.py).
        self.epochs = KeyEpochs(self.store, self.registry)
        self.client = client or httpx.Client(timeout=httpx.Timeout(10.0, connect=2.0))
        self.metrics = _Metrics()
        # Per authenticated sender, checked right after a message verifies (issue 4).
        self.limiter = SenderRateLimiter(per_minute=settings.requests_per_minute)
        self.work_lock = threading.Lock()
        self._stop = threading.Event()
        self._wake_scorer = threading.Event()
        self._wake_deliverer = threading.Event()
        self._last_batch_at = 0.0
        self._threads: list[threading.Thread] = []

    # -------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Start the scorer and deliverer threads."""
        for target, name in ((self._score_loop, "scorer"), (self._deliver_loop, "deliverer")):
            thread = threading.Thread(target=target, name=f"matcher-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the current round of work, then stop the threads and close the store."""
        self._stop.set()
        self._wake_scorer.set()
        self._wake_deliverer.set()
        for thread in self._threads:
            thread.join(timeout)
        self.index.close()  # stops the full link's Spark session, if any (issue 8)
        self.store.close()

    # -------------------------------------------------------------- scorer
    def _score_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_scorer.wait(self.settings.score_interval)
            self._wake_scorer.clear()
            try:
                self.score_once()
            except Exception:  # keep serving; the pending rows stay queued for the next round
                logger.exception("scoring round failed")
                time.sleep(1.0)

    def score_once(self) -> dict[str, Any]:
        """One scoring round: a first full link when no model exists, else new records only."""
        with self.work_lock:
            switched = self.epochs.switch_if_due(self.index)
            if switched is not None:
                self._wake_deliverer.set()
                return switched
            if self.index.model is None:
                if not self.settings.auto_link:
                    return {"status": "waiting"}
                counts = self.store.counts()
                quiet = time.time() - self._last_batch_at > 2.0
                enough = counts["tokens"] >= self.settings.train_min_records
                if counts["pending"] and quiet and enough and len(counts["counties"]) >= 2:
                    summary = self.index.relink(retrain=True)
                    logger.info("first link: %s", {k: v for k, v in summary.items()})
                    self._wake_deliverer.set()
                    return summary
                return {"status": "waiting"}
            report = self.index.score_pending()
            if report.records:
                self.metrics.score_rounds += 1
                self.metrics.score_seconds.observe(report.seconds)
                logger.info(
                    "scored %d records: %d pairs, %d alert messages, %.3f s (%s)",
                    report.records,
                    report.pairs,
                    report.alerts_queued,
                    report.seconds,
                    " ".join(f"{k} {v:.3f}" for k, v in report.stages.items()),
                )
            if report.alerts_queued:
                self._wake_deliverer.set()
            return {"status": "scored", "records": report.records}

    def relink(self, *, retrain: bool) -> dict[str, Any]:
        """Link everything again (and retrain if asked), queueing any alert changes."""
        logger.info("relink asked for (retrain=%s)", retrain)
        with self.work_lock:
            summary = self.index.relink(retrain=retrain)
        self._wake_deliverer.set()
        return summary

    # -------------------------------------------------------------- deliverer
    def _deliver_loop(self) -> None:
        while not self._stop.is_set():
            self._wake_deliverer.wait(self.settings.deliver_interval)
            self._wake_deliverer.clear()
            try:
                while self.deliver_once() and not self._stop.is_set():
                    pass
            except Exception:
                logger.exception("delivery round failed")
                time.sleep(1.0)

    def deliver_once(self, *, limit: int = MAX_ALERT_BATCH) -> int:
        """Send each county its due alert messages as one signed batch, counties in parallel.

        Returns:
            How many alert messages were acknowledged.
        """
        now = time.time()
        conn = self.store.conn
        with self.store.lock:
            # alerts_due names the alerts with a version not yet delivered: usually none, and
            # this runs several times a second, so it must not touch the alerts table then.
            waiting = [row[0] for row in conn.execute("SELECT alert_id FROM alerts_due").fetchall()]
            if not waiting:
                return 0
            if len(waiting) > _DUE_BY_INDEX:
                # A backlog (after a full link): choose each county's oldest on the small
                # columns, then read just those bodies.
                waiting = [
                    row[0]
                    for row in conn.execute(
                        "SELECT alert_id FROM (SELECT alert_id, row_number() OVER "
                        "(PARTITION BY county ORDER BY updated_at) AS n FROM alerts "
                        "WHERE (delivered_version IS NULL OR delivered_version < version) "
                        "AND next_attempt_at <= ?) WHERE n <= ?",
                        [now, limit],
                    ).fetchall()
                ]
            # By the key index (a bare IN list; see store.keyed).
            rows = conn.execute(
                "SELECT county, alert_id, version, state, body, attempts, updated_at, "
                "delivered_version, next_attempt_at FROM alerts "
                "WHERE alert_id IN (SELECT unnest(?))",
                [waiting],
            ).fetchall()
        due = sorted(
            (row[:7] for row in rows if (row[7] is None or row[7] < row[2]) and row[8] <= now),
            key=lambda row: (row[0], row[6]),  # each county's oldest first
        )
        by_county: dict[str, list[tuple[str, int, str, str, int, float]]] = {}
        for county, alert_id, version, state, body, attempts, queued_at in due:
            batch = by_county.setdefault(county, [])
            if len(batch) < limit:
                batch.append((alert_id, version, state, body, attempts, queued_at))
        if not by_county:
            return 0
        with ThreadPoolExecutor(max_workers=min(8, len(by_county))) as pool:
            results = list(pool.map(lambda item: self._deliver(*item), by_county.items()))
        return sum(results)

    def _deliver(self, county: str, rows: list[tuple[str, int, str, str, int, float]]) -> int:
        alerts = [orjson.loads(row[3]) for row in rows if row[2] != "withdrawn"]
        withdrawals = [orjson.loads(row[3]) for row in rows if row[2] == "withdrawn"]
        batch = {
            "schema": "alert_batch/1",
            "batch_id": secrets.token_hex(16),
            "county": county,
            "alerts": alerts,
            "withdrawals": withdrawals,
        }
        ok = self._send_batch(county, batch)
        # One retry time for the whole batch: jittered per alert, a county's queue would come
        # back due a few alerts at a time and go out in many small batches.
        attempts = max(row[4] for row in rows)
        delay = min(self.settings.retry_max_seconds, 0.25 * 2 ** min(attempts, 10))
        retry_at = time.time() + delay * random.uniform(0.8, 1.2)
        ids = [row[0] for row in rows]
        # One statement per batch: a statement per alert made delivery scan the alerts table
        # a thousand times a batch.
        with self.store.transaction() as conn:
            if ok:
                # Only the version sent counts as delivered; a newer one stays due.
                conn.execute(
                    "UPDATE alerts SET delivered_version = version, attempts = 0 "
                    "WHERE rowid IN (WITH s AS MATERIALIZED ("
                    "  SELECT rowid AS row_id, alert_id, version FROM alerts"
                    "  WHERE alert_id IN (SELECT unnest(?))) "
                    "SELECT row_id FROM s JOIN (SELECT unnest(?) AS alert_id, unnest(?) AS version)"
                    "  AS sent USING (alert_id, version))",
                    [ids, ids, [row[1] for row in rows]],
                )
                conn.execute(
                    "DELETE FROM alerts_due WHERE alert_id IN (WITH s AS MATERIALIZED ("
                    "  SELECT alert_id, version, delivered_version FROM alerts"
                    "  WHERE alert_id IN (SELECT unnest(?))) "
                    "SELECT alert_id FROM s WHERE delivered_version >= version)",
                    [ids],
                )
            else:
                conn.execute(
                    "UPDATE alerts SET attempts = attempts + 1, next_attempt_at = ? "
                    "WHERE alert_id IN (SELECT unnest(?))",
                    [retry_at, ids],
                )
        if ok:
            self.metrics.alerts_sent += len(rows)
            acked_at = time.time()
            for *_, queued_at in rows:
                self.metrics.delivery_seconds.observe(acked_at - queued_at)
            return len(rows)
        self.metrics.delivery_failures += 1
        return 0

    def _send_batch(self, county: str, batch: dict[str, Any]) -> bool:
        entry = self.registry.nodes.get(county)
        if entry is None:
            return False
        envelope = sign(
            batch, kind="alert_batch", sender=MATCHER_ID, recipient=county, private_key=self.key
        )
        n = len(batch["alerts"]) + len(batch["withdrawals"])
        try:
            response = self.client.post(
                f"{entry.url.rstrip('/')}/v1/alerts",
                content=orjson.dumps(envelope),
                headers={"content-type": "application/json"},
            )
        except httpx.HTTPError:
            logger.warning("%d alert messages to %s: node unreachable", n, county)
            return False
        if response.status_code != 200:
            logger.warning("%d alert messages to %s: HTTP %d", n, county, response.status_code)
            return False
        try:
            message = verify(
                response.json(),
                expected_kind="ack",
                recipient=MATCHER_ID,
                public_keys=self.registry.public_keys(),
                nonces=self.nonces,
            )
            require_sender_is(message, county, body_fields=())
            ack = Ack.model_validate(message.body)
        except (AuthError, ValidationError, ValueError):
            logger.warning("alerts to %s: invalid acknowledgement", county)
            return False
        if ack.ref != batch["batch_id"]:
            return False
        logger.info("delivered %d alert messages to %s", n, county)
        return True

    # -------------------------------------------------------------- receiving
    def ack(self, recipient: str, ref: str, stored: bool, count: int) -> dict[str, Any]:
        """A signed acknowledgement for ``recipient``."""
        body = Ack.model_validate(
            {"ref": ref, "status": "stored" if stored else "duplicate", "count": count}
        )
        return sign(
            body.model_dump(by_alias=True),
            kind="ack",
            sender=MATCHER_ID,
            recipient=recipient,
            private_key=self.key,
        )

    def receive_batch(self, envelope: Any) -> dict[str, Any]:
        """Verify, validate and store a token batch; returns the signed ack."""
        started = time.perf_counter()
        message = verify(
            envelope,
            expected_kind="token_batch",
            recipient=MATCHER_ID,
            public_keys=self.registry.public_keys(),
            nonces=self.nonces,
        )
        self.limiter.check(message.sender)  # issue 4: raises RateLimited (429)
        if message.sender == MATCHER_ID:
            raise AuthError("the matcher does not publish tokens")
        require_sender_is(message, message.sender)
        batch = TokenBatch.model_validate(message.body)
        if batch.token_spec.fingerprint != self.spec.fingerprint:
            raise _Unprocessable("token spec mismatch: re-tokenise with the federation's spec")
        expected = ["pseudonym", "household", "role", *self.spec.token_columns()]
        if batch.columns != expected:
            raise _Unprocessable("token columns do not match the federation's token spec")
        if any(len(row) != len(expected) for row in batch.rows):
            raise _Unprocessable("a row has the wrong number of columns")
        try:
            stored, count = self.store.store_batch(batch, epoch=batch.token_spec.epoch)
        except EpochRefused as e:
            raise _Unprocessable(str(e)) from None
        if stored and batch.epoch_complete:
            self.epochs.completed()
        self._last_batch_at = time.time()
        if stored:
            self.metrics.batches += 1
            self.metrics.records += count
            self._wake_scorer.set()
        else:
            self.metrics.duplicate_batches += 1
        self.metrics.batch_seconds.observe(time.perf_counter() - started)
        return self.ack(message.sender, batch.batch_id, stored, count)

    def receive_feedback(self, envelope: Any) -> dict[str, Any]:
        """Verify a clerical decision and store it as a label; returns the signed ack."""
        message = verify(
            envelope,
            expected_kind="feedback",
            recipient=MATCHER_ID,
            public_keys=self.registry.public_keys(),
            nonces=self.nonces,
        )
        self.limiter.check(message.sender)  # issue 4: raises RateLimited (429)
        require_sender_is(message, message.sender)
        feedback = FeedbackBody.model_validate(message.body)
        alert = self.store.alert_body(feedback.alert_id)
        if alert is None or alert.get("county") != message.sender:
            raise AuthError("feedback on an alert that is not the sender's")
        stored = self.store.record_label(
            feedback.feedback_id, feedback.alert_id, feedback.county, feedback.decision
        )
        if stored:
            self.metrics.feedback += 1
        else:
            self.metrics.duplicate_feedback += 1
        # A duplicate refreshes too (a no-op when nothing changed): the label and the alert
        # updates it implies are committed apart, and a sender resends exactly when a crash
        # came between them and its ack.
        # A withdrawn alert's body is its withdrawal, which names no cluster.
        if self.index.model is not None and alert.get("cluster_id") is not None:
            with self.work_lock:
                cluster = self.store.query(
                    "SELECT county, pseudonym FROM clusters WHERE cluster_id = ?",
                    [alert["cluster_id"]],
                )
                keys = set(zip(cluster["county"], cluster["pseudonym"], strict=True))
                self.index.refresh_alerts(keys, [])
            self._wake_deliverer.set()
        return self.ack(message.sender, feedback.feedback_id, stored, 1)


class _Unprocessable(FederationError):
    """An authenticated message that cannot be accepted (reported to its sender as 422)."""


def create_app(settings: MatcherSettings, *, client: httpx.Client | None = None) -> FastAPI:
    """Build the matcher's FastAPI application (state is opened by its lifespan)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        matcher = Matcher(settings, client=client)
        app.state.matcher = matcher
        matcher.start()
        logger.info("matcher ready on %s://%s:%d", settings.scheme, settings.host, settings.port)
        try:
            yield
        finally:
            matcher.stop()

    app = FastAPI(title="Jigsaw matcher", version="1", lifespan=lifespan)

    def matcher_of(request: Request) -> Matcher:
        matcher: Matcher = request.app.state.matcher
        return matcher

    async def signed_json(request: Request) -> Any:
        length = int(request.headers.get("content-length") or 0)
        if length > settings.max_request_bytes:
            raise _TooLarge()
        # Counted as it arrives (issue 4): a chunked body has no Content-Length to check, and
        # buffering all of it first would let one request fill the memory.
        chunks: list[bytes] = []
        received = 0
        async for chunk in request.stream():
            received += len(chunk)
            if received > settings.max_request_bytes:
                raise _TooLarge()
            chunks.append(chunk)
        try:
            return orjson.loads(b"".join(chunks))  # refuses NaN, as canonical JSON must
        except (ValueError, RecursionError) as e:  # RecursionError: absurdly nested JSON
            raise AuthError("body is not JSON") from e

    def require_admin(request: Request) -> None:
        supplied = request.headers.get("authorization", "")
        expected = f"Bearer {settings.admin_token}"
        if not hmac.compare_digest(supplied.encode(), expected.encode()):
            raise AuthError("bad admin token")

    @app.exception_handler(AuthError)
    async def _auth(_: Request, exc: AuthError) -> JSONResponse:
        logger.info("refused a request: %s", exc.reason)
        return JSONResponse(REFUSED, status_code=401)

    @app.exception_handler(RateLimited)
    async def _limited(_: Request, exc: RateLimited) -> JSONResponse:
        # Only ever sent to an authenticated sender (issue 4); the publisher honours it.
        return JSONResponse(
            {"detail": "too many requests"},
            status_code=429,
            headers={"Retry-After": exc.retry_after_header},
        )

    @app.exception_handler(_TooLarge)
    async def _large(_: Request, __: _TooLarge) -> JSONResponse:
        return JSONResponse({"detail": "request too large"}, status_code=413)

    @app.exception_handler(_Unprocessable)
    async def _bad(_: Request, exc: _Unprocessable) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(ValidationError)
    async def _invalid(_: Request, exc: ValidationError) -> JSONResponse:
        # Name the fields only: the values may be tokens, which are not echoed.
        fields = sorted({".".join(str(p) for p in e["loc"][:2]) for e in exc.errors()})
        return JSONResponse({"detail": "invalid message", "fields": fields[:20]}, status_code=422)

    @app.post("/v1/batches")
    async def batches(request: Request) -> JSONResponse:
        envelope = await signed_json(request)
        matcher = matcher_of(request)
        import anyio

        ack = await anyio.to_thread.run_sync(matcher.receive_batch, envelope)
        return JSONResponse(ack)

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> JSONResponse:
        envelope = await signed_json(request)
        matcher = matcher_of(request)
        import anyio

        ack = await anyio.to_thread.run_sync(matcher.receive_feedback, envelope)
        return JSONResponse(ack)

    # Admin routes check the token as a dependency (issue 4): FastAPI resolves it before it
    # validates query parameters, so a caller without the token gets 401, never a 422.
    admin_only = [Depends(require_admin)]

    @app.post("/v1/admin/relink", dependencies=admin_only)
    async def relink(request: Request, retrain: bool = False) -> JSONResponse:
        import anyio

        matcher = matcher_of(request)
        summary = await anyio.to_thread.run_sync(lambda: matcher.relink(retrain=retrain))
        return JSONResponse(summary)

    @app.get("/v1/admin/status", dependencies=admin_only)
    async def status(request: Request) -> JSONResponse:
        matcher = matcher_of(request)
        counts = matcher.store.counts()
        counts["key_epoch"] = matcher.epochs.progress()
        model = matcher.index.model
        counts["model"] = (
            {"threshold": model.threshold, "prior": model.prior, **model.metadata}
            if model
            else None
        )
        counts["metrics"] = {
            "batches": matcher.metrics.batches,
            "records": matcher.metrics.records,
            "alerts_sent": matcher.metrics.alerts_sent,
            "delivery_failures": matcher.metrics.delivery_failures,
        }
        return JSONResponse(counts)

    @app.get("/v1/admin/labels", dependencies=admin_only)
    async def labels(request: Request) -> JSONResponse:
        frame = matcher_of(request).store.query(
            "SELECT county, decision, count(*) AS n FROM labels GROUP BY 1, 2 ORDER BY 1, 2"
        )
        return JSONResponse({"labels": frame.to_dict(orient="records")})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(request: Request) -> JSONResponse:
        ready = getattr(request.app.state, "matcher", None) is not None
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> PlainTextResponse:
        import anyio

        if not may_scrape(request.headers.get("authorization", ""), settings.metrics_token):
            raise AuthError("missing or wrong metrics token")
        text = await anyio.to_thread.run_sync(_metrics_text, matcher_of(request))
        return PlainTextResponse(text, media_type=METRICS_CONTENT_TYPE)

    return app


class _TooLarge(FederationError):
    """A request body over the configured limit."""


def _metrics_text(matcher: Matcher) -> str:
    """The matcher's Prometheus metrics: queues, totals since start, latencies."""
    counts = matcher.store.counts()
    with matcher.store.lock:
        waiting = matcher.store.conn.execute(
            "SELECT county, count(*), min(updated_at), max(attempts) FROM alerts "
            "WHERE delivered_version IS NULL OR delivered_version < version GROUP BY 1"
        ).fetchall()
        oldest_record = matcher.store.conn.execute("SELECT min(queued_at) FROM pending").fetchone()
    now = time.time()
    m = matcher.metrics
    out = Exposition()
    out.gauge("jigsaw_matcher_tokens", "Records indexed (tokens held).", counts["tokens"])
    out.gauge(
        "jigsaw_matcher_county_tokens",
        "Records indexed, by county.",
        [({"county": c}, n) for c, n in counts["counties"].items()],
    )
    out.gauge("jigsaw_matcher_pending_records", "Records waiting to be scored.", counts["pending"])
    out.gauge(
        "jigsaw_matcher_pending_oldest_seconds",
        "Age of the oldest record waiting to be scored.",
        now - oldest_record[0] if oldest_record and oldest_record[0] is not None else 0.0,
    )
    out.gauge("jigsaw_matcher_pairs", "Linked pairs above the alert threshold.", counts["pairs"])
    out.gauge(
        "jigsaw_matcher_alerts_pending",
        "Alert messages queued for delivery.",
        counts["alerts_pending"],
    )
    out.gauge(
        "jigsaw_matcher_county_alerts_pending",
        "Alert messages queued for delivery, by county.",
        [({"county": c}, n) for c, n, _, _ in waiting],
    )
    out.gauge(
        "jigsaw_matcher_county_alerts_oldest_seconds",
        "Age of the oldest alert message queued for a county.",
        [({"county": c}, now - oldest) for c, _, oldest, _ in waiting],
    )
    out.gauge(
        "jigsaw_matcher_county_delivery_attempts",
        "Failed delivery attempts of the most-retried alert queued for a county.",
        [({"county": c}, attempts) for c, _, _, attempts in waiting],
    )
    out.gauge(
        "jigsaw_matcher_alerts_delivered",
        "Alert messages delivered.",
        counts["alerts_delivered"],
    )
    out.gauge(
        "jigsaw_matcher_model_loaded", "1 once a model is trained.", int(bool(matcher.index.model))
    )
    out.counter("jigsaw_matcher_batches_total", "Token batches stored.", m.batches)
    out.counter(
        "jigsaw_matcher_duplicate_batches_total",
        "Token batches received again and acknowledged as duplicates.",
        m.duplicate_batches,
    )
    out.counter("jigsaw_matcher_records_total", "Upserts and tombstones stored.", m.records)
    out.counter("jigsaw_matcher_feedback_total", "Feedback messages stored.", m.feedback)
    out.counter(
        "jigsaw_matcher_duplicate_feedback_total",
        "Feedback messages received again and acknowledged as duplicates.",
        m.duplicate_feedback,
    )
    out.counter("jigsaw_matcher_alerts_sent_total", "Alert messages acknowledged.", m.alerts_sent)
    out.counter(
        "jigsaw_matcher_delivery_failures_total",
        "Alert batches not acknowledged (retried later).",
        m.delivery_failures,
    )
    out.counter(
        "jigsaw_matcher_score_rounds_total", "Scoring rounds that scored records.", m.score_rounds
    )
    out.observed(
        "jigsaw_matcher_batch_seconds", "Time to verify and store a token batch.", m.batch_seconds
    )
    out.observed("jigsaw_matcher_score_round_seconds", "Time of a scoring round.", m.score_seconds)
    out.observed(
        "jigsaw_matcher_alert_delivery_seconds",
        "Time from an alert message being queued to its county acknowledging it.",
        m.delivery_seconds,
    )
    return out.render()


def run(settings: MatcherSettings) -> None:
    """Serve the matcher with uvicorn until interrupted."""
    import uvicorn

    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
    )
