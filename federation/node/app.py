"""The node's HTTP API: alerts in from the matcher, the county's inbox, loads and status.

Routes::

    POST /v1/alerts                   signed alert or withdrawal from the matcher -> signed ack
    GET  /v1/alerts                   admin: the inbox, re-identified to the county's records
    POST /v1/alerts/{id}/feedback     admin: a clerical decision (the note stays here)
    POST /v1/admin/ingest             admin: load an export, queue what changed
    GET  /v1/status                   admin: counts
    GET  /healthz, /readyz            liveness, readiness (no auth)
    GET  /metrics                     Prometheus metrics: counts and latencies only (bearer
                                      ``metrics_token`` when one is set)
    /inbox, POST /v1/admin/users      the safeguarding lead's web inbox (federation.node.inbox)

Two kinds of caller, two kinds of authentication. The matcher signs every message
(:mod:`federation.signing`); anything that does not verify as the matcher, addressed to this
node, fresh and not replayed, gets the same 401 ``{"detail": "request refused"}``. Local staff
use a bearer token (``settings.admin_token``), compared in constant time, refused with the same
401. Bodies are never logged, and validation errors never echo a value.

:func:`create_app` builds the app (the lifespan opens the store, loads keys and registry and
runs the publisher); :func:`run` serves it with uvicorn.
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import duckdb
import httpx
import orjson
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from federation.audit import AuditLog
from federation.errors import AUTH_REFUSED_MESSAGE, AuthError, ConfigError, StoreError
from federation.keys import load_secret
from federation.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from federation.metrics import LATENCY_BUCKETS, Exposition, may_scrape
from federation.node.inbox import mount_inbox, start_inbox, stop_inbox
from federation.node.ingest import ingest_file
from federation.node.publisher import Publisher, load_identity
from federation.node.rotate import rotate_if_needed
from federation.node.store import NodeStore
from federation.protocol import Ack, AlertBatch, AlertBody, FeedbackBody, WithdrawalBody
from federation.registry import MATCHER_ID, Registry
from federation.settings import NodeSettings
from federation.signing import DuckDBNonceStore, require_sender_is, sign, verify
from linkage.errors import LinkageError
from linkage.records import ColumnMapping
from linkage.tokenise import Tokeniser, TokenSpec

__all__ = ["NodeContext", "create_app", "open_node", "run"]

logger = logging.getLogger(__name__)

ALERT_NONCE_TABLE = "alert_nonces"
_BodyModel = TypeVar("_BodyModel", bound=BaseModel)


@dataclass
class NodeContext:
    """Everything a running node holds, built by the lifespan (``app.state.node``)."""

    settings: NodeSettings
    store: NodeStore
    registry: Registry
    private_key: Ed25519PrivateKey
    tokeniser: Tokeniser
    publisher: Publisher
    alert_nonces: DuckDBNonceStore
    audit: AuditLog


class _Refused(Exception):
    """Answer with a given status and a fixed message (never a value from the request)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(status)
        self.status = status
        self.detail = detail


class FeedbackRequest(BaseModel):
    """Body of ``POST /v1/alerts/{alert_id}/feedback``."""

    model_config = ConfigDict(extra="forbid")
    decision: Literal["same", "not_same", "need_info"]
    note: str = Field("", max_length=10_000)


class IngestRequest(BaseModel):
    """Body of ``POST /v1/admin/ingest``: paths on the node's machine."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(min_length=1)
    mapping: str | None = None
    #: The file holds only new and changed records; records it omits are kept.
    delta: bool = False


# --------------------------------------------------------------------------- app


def open_node(settings: NodeSettings, client: httpx.Client) -> NodeContext:
    """Open the store and load the registry, keys and secret; fail fast on any problem.

    Args:
        settings: Node settings.
        client: HTTP client for the publisher.

    Returns:
        The node's context (the publisher is not started).

    Raises:
        ConfigError: The registry, key, secret or token spec is missing or invalid, this
            node is not in the registry, its key is not the one the registry holds, or the
            secret's key epoch cannot follow the store's (see :mod:`federation.node.rotate`).
        StoreError: The store cannot be opened.
    """
    registry, private_key = load_identity(settings)
    try:
        spec = TokenSpec.from_toml(settings.token_spec) if settings.token_spec else TokenSpec()
        # The secret is only held long enough to derive the token keys.
        tokeniser = spec.bind(load_secret(settings.secret), epoch=settings.key_epoch)
    except LinkageError as e:
        raise ConfigError(str(e)) from e
    store = NodeStore(settings.database)
    try:
        nonces = DuckDBNonceStore(store.conn, lock=store.lock, table=ALERT_NONCE_TABLE)
        audit = AuditLog(store.conn, lock=store.lock)
        # A new key epoch: re-tokenise every record under it before serving (node/rotate.py).
        rotate_if_needed(
            store,
            tokeniser,
            county=settings.node_id,
            batch_size=settings.batch_size,
            seed=settings.tokenise_seed,
            audit=audit,
        )
        publisher = Publisher(store, settings, registry, private_key, client)
    except BaseException:
        store.close()
        raise
    return NodeContext(settings, store, registry, private_key, tokeniser, publisher, nonces, audit)


def create_app(settings: NodeSettings, *, client: httpx.Client | None = None) -> FastAPI:
    """Build a county node's FastAPI app.

    The lifespan opens the store, loads the registry, keys and federation secret (see
    :func:`open_node`), starts the publisher, and on shutdown stops it and closes the store.

    Args:
        settings: Node settings.
        client: HTTP client the publisher sends with; by default one is made (and closed)
            by the app.

    Returns:
        The app.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        own_client = client is None
        http = client or httpx.Client(timeout=httpx.Timeout(60.0, connect=5.0))
        try:
            node = open_node(settings, http)
        except BaseException:
            if own_client:
                http.close()
            raise
        app.state.node = node
        node.publisher.start()
        node.publisher.wake()  # anything left pending by the last run
        logger.info("node %s ready", settings.node_id)
        try:
            start_inbox(app, node)  # inbox accounts and e-mail notices (federation.node.inbox)
            yield
        finally:
            app.state.node = None
            stop_inbox(app)
            node.publisher.stop()
            node.store.close()
            if own_client:
                http.close()

    app = FastAPI(
        title="Jigsaw county node",
        lifespan=lifespan,
        docs_url=None,  # the interactive docs load scripts from a CDN that county networks block
        redoc_url=None,
    )
    app.state.node = None
    app.add_middleware(_BodyLimit, limit=settings.max_request_bytes)

    @app.exception_handler(_Refused)
    async def refused(request: Request, exc: _Refused) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(AuthError)
    async def auth_refused(request: Request, exc: AuthError) -> JSONResponse:
        logger.info("refused %s %s", request.method, request.url.path)
        logger.debug("refused because: %s", exc.reason)
        return JSONResponse({"detail": AUTH_REFUSED_MESSAGE}, status_code=401)

    @app.exception_handler(StoreError)
    async def store_failed(request: Request, exc: StoreError) -> JSONResponse:
        logger.error("store error on %s %s: %s", request.method, request.url.path, exc)
        return JSONResponse({"detail": "the node's store is unavailable"}, status_code=503)

    _routes(app)
    mount_inbox(app, admin=_admin)  # the safeguarding lead's web inbox and POST /v1/admin/users
    return app


# --------------------------------------------------------------------------- auth and parsing


def _node(request: Request) -> NodeContext:
    node: NodeContext | None = request.app.state.node
    if node is None:
        raise _Refused(503, "the node is not ready")
    return node


def _admin(request: Request) -> NodeContext:
    """The node, if the request carries the admin bearer token; else a uniform 401."""
    node = _node(request)
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    expected = node.settings.admin_token.encode()
    # compare_digest on every path, so the time taken does not tell a wrong scheme from a
    # wrong token.
    ok = hmac.compare_digest(token.strip().encode(), expected)
    if not (ok and scheme.lower() == "bearer"):
        raise AuthError("missing or wrong admin token")
    return node


# A dependency rather than a call in the route: FastAPI solves dependencies before it
# validates query parameters, so a caller without the token learns nothing from a 422.
Admin = Annotated[NodeContext, Depends(_admin)]


def _parse(model: type[_BodyModel], data: bytes | Mapping[str, Any]) -> _BodyModel:
    """Validate a body (JSON bytes or decoded); a 422 lists where and why, never the values."""
    try:
        if isinstance(data, bytes):
            return model.model_validate_json(data)
        return model.model_validate(data)
    except ValidationError as e:
        raise _Refused(422, _problems(e)) from None


def _problems(error: ValidationError) -> list[dict[str, Any]]:
    # pydantic's default error carries the offending input; a body may hold personal data.
    return [
        {"loc": list(item["loc"]), "type": item["type"], "msg": item["msg"]}
        for item in error.errors(include_url=False, include_input=False, include_context=False)
    ]


def _routes(app: FastAPI) -> None:
    """Attach the routes (kept apart from create_app so each stays readable)."""

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz(request: Request) -> JSONResponse:
        node: NodeContext | None = request.app.state.node
        if node is None or not node.store.is_open:
            return JSONResponse({"status": "not ready"}, status_code=503)
        return JSONResponse({"status": "ready", "node_id": node.settings.node_id})

    @app.get("/metrics")
    def metrics(request: Request) -> PlainTextResponse:
        node = _node(request)
        if not may_scrape(request.headers.get("authorization", ""), node.settings.metrics_token):
            raise AuthError("missing or wrong metrics token")
        return PlainTextResponse(_metrics_text(node), media_type=METRICS_CONTENT_TYPE)

    @app.post("/v1/alerts")
    async def receive_alert(request: Request) -> JSONResponse:
        node = _node(request)
        raw = await request.body()
        return await run_in_threadpool(_receive_alert, node, raw)

    @app.get("/v1/alerts")
    def list_alerts(
        node: Admin,
        kind: Literal["person", "family"] | None = None,
        status: Literal["open", "withdrawn"] | None = None,
        county: str | None = None,
        since: float | None = None,
    ) -> dict[str, Any]:
        alerts = [
            _inbox_item(row)
            for row in node.store.inbox(kind=kind, status=status, since=since)
            if county is None or county in {o["county"] for o in row["body"]["other_counties"]}
        ]
        return {"alerts": alerts}

    @app.post("/v1/alerts/{alert_id}/feedback", status_code=202)
    async def feedback(node: Admin, request: Request, alert_id: str) -> dict[str, Any]:
        body = _parse(FeedbackRequest, await request.body())
        return await run_in_threadpool(_feedback, node, alert_id, body)

    @app.post("/v1/admin/ingest")
    async def admin_ingest(node: Admin, request: Request) -> dict[str, Any]:
        body = _parse(IngestRequest, await request.body())
        return await run_in_threadpool(_ingest, node, body)

    @app.get("/v1/status")
    def status(node: Admin) -> dict[str, Any]:
        counts = node.store.status()
        oldest = counts["outbox"]["oldest_pending_at"]
        counts["outbox"]["oldest_pending_at"] = None if oldest is None else _iso(oldest)
        if counts["last_load"] is not None:
            for key in ("started_at", "finished_at"):
                counts["last_load"][key] = _iso(counts["last_load"][key])
        return {"node_id": node.settings.node_id, **counts}


# --------------------------------------------------------------------------- handlers


def _receive_alert(node: NodeContext, raw: bytes) -> JSONResponse:
    """Verify, validate and store an alert or withdrawal; answer with a signed ack."""
    node_id = node.settings.node_id
    try:
        envelope = orjson.loads(raw)
    except (ValueError, RecursionError):
        raise AuthError("body is not a JSON envelope") from None
    kind = envelope.get("kind") if isinstance(envelope, dict) else None
    if kind not in ("alert", "withdrawal", "alert_batch"):
        raise AuthError("not an alert or withdrawal envelope")
    message = verify(
        envelope,
        expected_kind=kind,
        recipient=node_id,
        # Only the matcher sends alerts: other nodes' keys are not accepted here at all.
        public_keys={MATCHER_ID: node.registry.matcher_public_key},
        nonces=node.alert_nonces,
    )
    require_sender_is(message, MATCHER_ID, body_fields=())
    if kind == "alert_batch":
        return _receive_alert_batch(node, _parse(AlertBatch, message.body))
    body: AlertBody | WithdrawalBody
    if kind == "alert":
        body = _parse(AlertBody, message.body)
    else:
        body = _parse(WithdrawalBody, message.body)
    if body.county != node_id:
        # Signed by the matcher, but about another county's records: not ours to see.
        raise AuthError("alert about another county")
    if isinstance(body, AlertBody):
        outcome = node.store.store_alert(body)
        event = f"alert.{outcome}"
    else:
        outcome = node.store.withdraw_alert(body)
        event = "alert.withdrawn" if outcome == "stored" else "alert.duplicate"
    node.audit.append(event, MATCHER_ID, {"alert_id": body.alert_id, "version": body.version})
    logger.info("%s %s version %d: %s", kind, body.alert_id, body.version, outcome)
    return _signed_ack(node, {"ref": body.alert_id, "status": outcome})


def _receive_alert_batch(node: NodeContext, batch: AlertBatch) -> JSONResponse:
    """Store a batch of alerts and withdrawals in one transaction; one signed ack for all."""
    node_id = node.settings.node_id
    counties = {a.county for a in batch.alerts} | {w.county for w in batch.withdrawals}
    if batch.county != node_id or counties - {node_id}:
        raise AuthError("alert about another county")
    stored, duplicates = node.store.store_alert_batch(list(batch.alerts), list(batch.withdrawals))
    node.audit.append(
        "alerts.received",
        MATCHER_ID,
        {"batch_id": batch.batch_id, "stored": stored, "duplicates": duplicates},
    )
    logger.info("alert batch %s: %d stored, %d duplicates", batch.batch_id, stored, duplicates)
    return _signed_ack(
        node,
        {"ref": batch.batch_id, "status": "stored" if stored else "duplicate", "count": stored},
    )


def _signed_ack(node: NodeContext, fields: dict[str, Any]) -> JSONResponse:
    """The node's signed acknowledgement to the matcher."""
    # model_validate rather than the constructor: mypy cannot see the aliased defaults.
    ack = Ack.model_validate(fields)
    reply = sign(
        ack.model_dump(by_alias=True),
        kind="ack",
        sender=node.settings.node_id,
        recipient=MATCHER_ID,
        private_key=node.private_key,
    )
    return JSONResponse(reply)


def _feedback(node: NodeContext, alert_id: str, request: FeedbackRequest) -> dict[str, Any]:
    if not _is_hex(alert_id):
        raise _Refused(404, "no such alert")
    body = FeedbackBody.model_validate(
        {
            "feedback_id": secrets.token_hex(16),
            "alert_id": alert_id,
            "county": node.settings.node_id,
            "decision": request.decision,
        }
    )
    stored = node.store.add_feedback(
        feedback_id=body.feedback_id,
        alert_id=alert_id,
        decision=request.decision,
        note=request.note,
        body=body.model_dump_json(by_alias=True),
    )
    if not stored:
        raise _Refused(404, "no such alert")
    node.audit.append(
        "feedback.queued",
        "admin",
        {"feedback_id": body.feedback_id, "alert_id": alert_id, "decision": request.decision},
    )
    node.publisher.wake()
    return {
        "feedback_id": body.feedback_id,
        "alert_id": alert_id,
        "decision": request.decision,
        "status": "queued",
    }


def _ingest(node: NodeContext, request: IngestRequest) -> dict[str, Any]:
    settings = node.settings
    try:
        mapping = ColumnMapping.from_toml(Path(request.mapping)) if request.mapping else None
        report = ingest_file(
            node.store,
            Path(request.path),
            node.tokeniser,
            county=settings.node_id,
            mapping=mapping,
            batch_size=settings.batch_size,
            seed=settings.tokenise_seed,
            delta=request.delta,
        )
    except LinkageError as e:
        # Linkage errors name the file and the problem, never the file's data.
        raise _Refused(400, str(e)) from None
    counts = {k: v for k, v in report.to_dict().items() if k not in ("load_id", "seconds")}
    node.audit.append("load.finished", "admin", {"load_id": report.load_id, **counts})
    node.publisher.wake()
    return report.to_dict()


def _inbox_item(row: dict[str, Any]) -> dict[str, Any]:
    """One inbox entry as the API shows it (see ``GET /v1/alerts``)."""
    body = row["body"]
    records = row["records"]
    item: dict[str, Any] = {
        "alert_id": row["alert_id"],
        "kind": row["kind"],
        "cluster_id": row["cluster_id"],
        "version": row["version"],
        "status": row["status"],
    }
    if row["kind"] == "person":
        item["local_record_id"] = records[0]["record_id"] if records else None
        item["local_record"] = records[0] if records else None
    else:
        item["local_household_id"] = records[0]["household_id"] if records else None
        item["local_record"] = records
    item.update(
        other_counties=body["other_counties"],
        match_probability=body["match_probability"],
        explanation=body["explanation"],
        reviews=body["reviews"],
        received_at=_iso(row["received_at"]),
        updated_at=_iso(row["updated_at"]),
        withdrawal_reason=row["reason"],
        feedback=row["feedback"],
    )
    return item


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _is_hex(text: str) -> bool:
    return 8 <= len(text) <= 64 and all(c in "0123456789abcdef" for c in text)


# --------------------------------------------------------------------------- metrics


def _metrics_text(node: NodeContext) -> str:
    """The node's Prometheus metrics, all read from its store (so they survive restarts)."""
    status = node.store.status()
    buckets = ", ".join(
        f"count(*) FILTER (WHERE acked_at - created_at <= {b!r})" for b in LATENCY_BUCKETS
    )
    with node.store.lock:
        if not node.store.is_open:
            raise StoreError("cannot read metrics: the node store is closed")
        conn = node.store.conn
        try:
            lanes = conn.execute(
                "SELECT kind, count(*) FILTER (WHERE status = 'pending'), "
                "count(*) FILTER (WHERE status = 'acked'), coalesce(sum(attempts), 0) "
                "FROM outbox GROUP BY kind ORDER BY kind"
            ).fetchall()
            latency = conn.execute(
                f"SELECT {buckets}, count(*), coalesce(sum(acked_at - created_at), 0) "
                "FROM outbox WHERE status = 'acked'"
            ).fetchone()
            received = conn.execute(
                "SELECT count(*) FILTER (WHERE event IN ('alert.stored', 'alert.withdrawn')) "
                "+ coalesce(sum(CAST(json_extract(details, '$.stored') AS BIGINT)) "
                "FILTER (WHERE event = 'alerts.received'), 0), "
                "count(*) FILTER (WHERE event = 'alert.duplicate') "
                "+ coalesce(sum(CAST(json_extract(details, '$.duplicates') AS BIGINT)) "
                "FILTER (WHERE event = 'alerts.received'), 0) FROM audit_log"
            ).fetchone()
            quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()
        except duckdb.Error as e:
            raise StoreError("cannot read metrics") from e
    assert latency is not None and received is not None and quarantined is not None
    by_kind = {kind: (0, 0, 0) for kind in ("feedback", "token_batch")}
    by_kind.update({kind: (int(p), int(a), int(f)) for kind, p, a, f in lanes})
    oldest = status["outbox"]["oldest_pending_at"]
    out = Exposition()
    out.gauge(
        "jigsaw_node_records",
        "Records held, active or withdrawn from the county's export.",
        [({"state": k}, v) for k, v in status["records"].items()],
    )
    out.gauge(
        "jigsaw_node_outbox_pending",
        "Messages waiting for the matcher's acknowledgement.",
        [({"kind": kind}, pending) for kind, (pending, _, _) in by_kind.items()],
    )
    out.gauge(
        "jigsaw_node_outbox_oldest_pending_seconds",
        "Age of the oldest message waiting for the matcher.",
        0.0 if oldest is None else max(0.0, time.time() - oldest),
    )
    out.counter(
        "jigsaw_node_published_total",
        "Messages the matcher acknowledged.",
        [({"kind": kind}, acked) for kind, (_, acked, _) in by_kind.items()],
    )
    out.counter(
        "jigsaw_node_publish_failures_total",
        "Failed attempts to send a message (each retried later).",
        [({"kind": kind}, failures) for kind, (_, _, failures) in by_kind.items()],
    )
    out.histogram(
        "jigsaw_node_publish_latency_seconds",
        "Time from a message being queued to the matcher acknowledging it.",
        [
            *zip(LATENCY_BUCKETS, latency[: len(LATENCY_BUCKETS)], strict=True),
            (math.inf, latency[-2]),
        ],
        float(latency[-1]),
    )
    out.counter(
        "jigsaw_node_alert_messages_total",
        "Alert and withdrawal messages received from the matcher, new or already held.",
        [({"outcome": "stored"}, received[0]), ({"outcome": "duplicate"}, received[1])],
    )
    out.gauge(
        "jigsaw_node_alerts",
        "Alerts in the inbox.",
        [({"status": k}, v) for k, v in status["alerts"].items()],
    )
    out.counter("jigsaw_node_quarantined_rows_total", "Export rows quarantined.", quarantined[0])
    last = status["last_load"]
    out.gauge(
        "jigsaw_node_last_load_timestamp_seconds",
        "When the last export load finished (0: never).",
        0.0 if last is None else float(last["finished_at"]),
    )
    return out.render()


# --------------------------------------------------------------------------- body limit


class _BodyLimit:
    """Refuse a request body larger than ``limit`` bytes with 413, before any route sees it.

    A declared Content-Length over the limit is refused at once; a chunked body is counted
    as it arrives. The body is then handed to the app from memory.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._too_large(send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.limit:
                await self._too_large(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    @staticmethod
    async def _too_large(send: Send) -> None:
        response = JSONResponse({"detail": "request body too large"}, status_code=413)
        await response({"type": "http"}, _never, send)


def _replay(body: bytes, receive: Receive) -> Callable[[], Awaitable[Message]]:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as usual

    return replay


async def _never() -> Message:  # pragma: no cover - a plain response never reads
    return {"type": "http.disconnect"}


# --------------------------------------------------------------------------- serving


def run(settings: NodeSettings) -> None:
    """Serve a node with uvicorn until interrupted (HTTPS if a certificate is configured).

    Args:
        settings: Node settings (``host``, ``port``, ``tls_certfile``/``tls_keyfile``,
            ``log_level`` and everything :func:`create_app` needs).
    """
    # uvicorn configures only its own loggers; the node's (ids and counts only) go beside them.
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
        log_level=settings.log_level.lower(),
    )
