"""The matcher's side of idempotency: every message may arrive twice, and counts once.

A node resends a token batch or a feedback message whenever it did not see the ack (the
matcher crashed after storing it, the reply was lost, the node crashed first): the matcher must
store it once and answer ``"duplicate"`` with a signed ack each time. The matcher resends an
alert batch whenever the county's ack did not arrive: it must send the same alert versions
again, so that the county's store keeps each once. Keys come from ``init_federation``; the
HTTP tests serve ``create_app`` with uvicorn on loopback, the rest call the :class:`Matcher`
directly with a county stand-in on an ``httpx.MockTransport``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI

from federation.keys import (
    init_federation,
    load_private_key,
    load_secret,
    matcher_key_path,
    node_key_path,
    registry_path,
    secret_path,
)
from federation.matcher.app import Matcher, create_app
from federation.matcher.index import alert_id_for
from federation.node.store import NodeStore
from federation.protocol import Ack, AlertBatch, FeedbackBody, TokenBatch, TokenSpecRef
from federation.settings import MatcherSettings
from federation.signing import MemoryNonceStore, sign, verify
from linkage.pipeline import ID_COLUMNS, prepare_county
from linkage.synthetic import generate_federation
from linkage.tokenise import TokenSpec

A, B = "coventry", "warwickshire"
ADMIN_TOKEN = "m4tCh-9Zq2Lp7XvB3rTn8sKd"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class Keys:
    directory: Path
    matcher: Ed25519PrivateKey
    nodes: dict[str, Ed25519PrivateKey]


@dataclass(frozen=True)
class Tokens:
    """Each county's token table, as its node would publish it."""

    spec: TokenSpec
    tables: dict[str, pd.DataFrame]

    def batch(
        self,
        county: str,
        rows: slice = slice(None),
        tombstones: tuple[str, ...] = (),
        frame: pd.DataFrame | None = None,
    ) -> TokenBatch:
        """A new batch of ``county``'s rows (or of ``frame``'s) and tombstones."""
        columns = [*ID_COLUMNS, *self.spec.token_columns()]
        frame = self.tables[county].iloc[rows] if frame is None else frame
        return TokenBatch.model_validate(
            {
                "batch_id": secrets.token_hex(16),
                "county": county,
                "token_spec": TokenSpecRef(
                    version=self.spec.version, fingerprint=self.spec.fingerprint, epoch=1
                ),
                "columns": columns,
                "rows": json.loads(frame.loc[:, columns].to_json(orient="values")),
                "tombstones": list(tombstones),
            }
        )


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    directory = tmp_path_factory.mktemp("keys")
    init_federation(
        directory,
        node_ids=[A, B],
        matcher_url="http://127.0.0.1:9",
        node_urls={A: "http://county-a.invalid", B: "http://county-b.invalid"},
    )
    return Keys(
        directory=directory,
        matcher=load_private_key(matcher_key_path(directory)),
        nodes={c: load_private_key(node_key_path(directory, c)) for c in (A, B)},
    )


@pytest.fixture(scope="module")
def tokens(keys: Keys) -> Tokens:
    spec = TokenSpec()
    tokeniser = spec.bind(load_secret(secret_path(keys.directory)))
    fed = generate_federation(counties=2, records=500, seed=31)
    tables = {}
    for i, (county, frame) in enumerate(zip((A, B), fed.counties.values(), strict=True)):
        raw = frame.assign(row_number=range(1, len(frame) + 1))
        tables[county] = prepare_county(county, raw, tokeniser, seed=7 + i).tokens
    return Tokens(spec=spec, tables=tables)


def _settings(keys: Keys, data_dir: Path, **overrides: Any) -> MatcherSettings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "registry": registry_path(keys.directory),
        "private_key": matcher_key_path(keys.directory),
        "admin_token": ADMIN_TOKEN,
        "auto_link": False,
        "retry_max_seconds": 0.05,
    }
    values.update(overrides)
    return MatcherSettings(**values)


def _signed(keys: Keys, county: str, kind: str, body: Any) -> dict[str, Any]:
    if hasattr(body, "model_dump"):
        body = body.model_dump(by_alias=True)
    return sign(body, kind=kind, sender=county, recipient="matcher", private_key=keys.nodes[county])


def _ack(keys: Keys, response: httpx.Response, county: str) -> Ack:
    assert response.status_code == 200, response.text
    message = verify(
        response.json(),
        expected_kind="ack",
        recipient=county,
        public_keys={"matcher": keys.matcher.public_key()},
        nonces=MemoryNonceStore(),
    )
    return Ack.model_validate(message.body)


class MatcherClient(httpx.Client):
    """An HTTP client for a matcher served on loopback, with a handle on its state."""

    def __init__(self, app: FastAPI, base_url: str) -> None:
        super().__init__(base_url=base_url, timeout=30)
        self.app = app

    @property
    def matcher(self) -> Matcher:
        matcher: Matcher = self.app.state.matcher
        return matcher


@contextlib.contextmanager
def _serve(app: FastAPI) -> Iterator[str]:
    """Serve an app with uvicorn on a free loopback port (lifespan included); yield its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture
def client(keys: Keys, tmp_path: Path) -> Iterator[MatcherClient]:
    app = create_app(_settings(keys, tmp_path / "matcher"))
    with _serve(app) as url, MatcherClient(app, url) as matcher_client:
        yield matcher_client


def _status(client: MatcherClient) -> dict[str, Any]:
    response = client.get("/v1/admin/status", headers=ADMIN)
    assert response.status_code == 200
    return dict(response.json())


def _metrics(client: MatcherClient) -> dict[str, float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    values = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


# --------------------------------------------------------------------------- token batches


def test_the_same_batch_twice_is_stored_once_and_acknowledged_as_duplicate(
    client: MatcherClient, keys: Keys, tokens: Tokens
) -> None:
    batch = tokens.batch(A, slice(0, 40))
    first = _ack(keys, client.post("/v1/batches", json=_signed(keys, A, "token_batch", batch)), A)
    assert (first.ref, first.status, first.count) == (batch.batch_id, "stored", 40)
    # The node resends it (it never saw the ack): a new envelope, the same batch.
    again = _ack(keys, client.post("/v1/batches", json=_signed(keys, A, "token_batch", batch)), A)
    assert (again.ref, again.status, again.count) == (batch.batch_id, "duplicate", 40)
    status = _status(client)
    assert (status["tokens"], status["batches"], status["pending"]) == (40, 1, 40)
    metrics = _metrics(client)
    assert metrics["jigsaw_matcher_batches_total"] == 1
    assert metrics["jigsaw_matcher_duplicate_batches_total"] == 1
    assert metrics["jigsaw_matcher_records_total"] == 40
    assert metrics["jigsaw_matcher_batch_seconds_count"] == 2


def test_a_replayed_envelope_is_refused_and_changes_nothing(
    client: MatcherClient, keys: Keys, tokens: Tokens
) -> None:
    envelope = _signed(keys, A, "token_batch", tokens.batch(A, slice(0, 5)))
    assert _ack(keys, client.post("/v1/batches", json=envelope), A).status == "stored"
    replay = client.post("/v1/batches", json=envelope)
    assert replay.status_code == 401 and replay.json() == {"detail": "request refused"}
    assert _status(client)["tokens"] == 5


def test_a_batch_sent_many_times_at_once_is_stored_once(
    client: MatcherClient, keys: Keys, tokens: Tokens
) -> None:
    batch = tokens.batch(B, slice(0, 60))
    envelopes = [_signed(keys, B, "token_batch", batch) for _ in range(6)]
    statuses: list[str] = []
    lock = threading.Lock()

    def send(envelope: dict[str, Any]) -> None:
        ack = _ack(keys, client.post("/v1/batches", json=envelope), B)
        with lock:
            statuses.append(ack.status)

    threads = [threading.Thread(target=send, args=(e,)) for e in envelopes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(statuses) == ["duplicate"] * 5 + ["stored"]
    status = _status(client)
    assert (status["tokens"], status["batches"], status["pending"]) == (60, 1, 60)


def test_tombstones_twice_remove_once(client: MatcherClient, keys: Keys, tokens: Tokens) -> None:
    _ack(
        keys,
        client.post(
            "/v1/batches", json=_signed(keys, A, "token_batch", tokens.batch(A, slice(0, 10)))
        ),
        A,
    )
    gone = tuple(tokens.tables[A]["pseudonym"].iloc[:3])
    batch = tokens.batch(A, slice(0, 0), tombstones=gone)
    for expected in ("stored", "duplicate"):
        ack = _ack(keys, client.post("/v1/batches", json=_signed(keys, A, "token_batch", batch)), A)
        assert (ack.status, ack.count) == (expected, 3)
        assert _status(client)["tokens"] == 7
    # A later batch bringing one back is a new batch, and stored.
    back = tokens.batch(A, slice(0, 1))
    assert (
        _ack(keys, client.post("/v1/batches", json=_signed(keys, A, "token_batch", back)), A).status
        == "stored"
    )
    assert _status(client)["tokens"] == 8


# --------------------------------------------------------------------------- feedback


def _insert_alert(matcher: Matcher, county: str) -> str:
    """A delivered alert about one of ``county``'s records, straight into the store."""
    alert_id = alert_id_for("person", county, secrets.token_hex(16))
    body = {"alert_id": alert_id, "version": 1, "county": county, "cluster_id": "c-01234567"}
    with matcher.store.transaction() as conn:
        conn.execute(
            "INSERT INTO alerts (alert_id, county, kind, subject, version, state, digest, body, "
            "delivered_version, attempts, next_attempt_at, updated_at) "
            "VALUES (?, ?, 'person', 's', 1, 'active', '', ?, 1, 0, 0, ?)",
            [alert_id, county, json.dumps(body), time.time()],
        )
    return alert_id


def _feedback(county: str, alert_id: str, decision: str = "same") -> FeedbackBody:
    return FeedbackBody.model_validate(
        {
            "feedback_id": secrets.token_hex(16),
            "alert_id": alert_id,
            "county": county,
            "decision": decision,
        }
    )


def test_the_same_feedback_twice_is_one_label(client: MatcherClient, keys: Keys) -> None:
    matcher = client.matcher
    feedback = _feedback(A, _insert_alert(matcher, A))
    for expected in ("stored", "duplicate"):
        response = client.post("/v1/feedback", json=_signed(keys, A, "feedback", feedback))
        ack = _ack(keys, response, A)
        assert (ack.ref, ack.status) == (feedback.feedback_id, expected)
    labels = client.get("/v1/admin/labels", headers=ADMIN).json()["labels"]
    assert labels == [{"county": A, "decision": "same", "n": 1}]
    metrics = _metrics(client)
    assert metrics["jigsaw_matcher_feedback_total"] == 1
    assert metrics["jigsaw_matcher_duplicate_feedback_total"] == 1


def test_feedback_on_another_countys_alert_is_refused(client: MatcherClient, keys: Keys) -> None:
    matcher = client.matcher
    feedback = _feedback(B, _insert_alert(matcher, A))
    response = client.post("/v1/feedback", json=_signed(keys, B, "feedback", feedback))
    assert response.status_code == 401
    assert client.get("/v1/admin/labels", headers=ADMIN).json()["labels"] == []


# --------------------------------------------------------------------------- alert batches


class CountyStandIn:
    """Counties behind an ``httpx.MockTransport``: verify, keep in a real NodeStore, ack.

    ``lose_acks`` makes the next answers 502 *after* storing, as when the ack is lost.
    """

    def __init__(self, keys: Keys, directory: Path) -> None:
        self.keys = keys
        self.stores = {c: NodeStore(directory / c / "node.duckdb") for c in (A, B)}
        self.received: list[AlertBatch] = []
        self.lose_acks = 0
        self.down: set[str] = set()
        self._nonces = MemoryNonceStore()

    def __call__(self, request: httpx.Request) -> httpx.Response:
        county = {"county-a.invalid": A, "county-b.invalid": B}[request.url.host]
        if county in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        message = verify(
            json.loads(request.content),
            expected_kind="alert_batch",
            recipient=county,
            public_keys={"matcher": self.keys.matcher.public_key()},
            nonces=self._nonces,
        )
        batch = AlertBatch.model_validate(message.body)
        self.received.append(batch)
        stored, _ = self.stores[county].store_alert_batch(
            list(batch.alerts), list(batch.withdrawals)
        )
        if self.lose_acks:
            self.lose_acks -= 1
            return httpx.Response(502)
        ack = Ack.model_validate(
            {"ref": batch.batch_id, "status": "stored" if stored else "duplicate", "count": stored}
        )
        envelope = sign(
            ack.model_dump(by_alias=True),
            kind="ack",
            sender=county,
            recipient="matcher",
            private_key=self.keys.nodes[county],
        )
        return httpx.Response(200, json=envelope)

    def inbox(self, county: str) -> dict[str, tuple[int, str]]:
        return {a["alert_id"]: (a["version"], a["status"]) for a in self.stores[county].inbox()}

    def close(self) -> None:
        for store in self.stores.values():
            store.close()


@pytest.fixture(scope="module")
def model_path(keys: Keys, tokens: Tokens, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model trained once on both counties (so that the tests below only predict)."""
    directory = tmp_path_factory.mktemp("trained")
    matcher = Matcher(_settings(keys, directory), client=httpx.Client())
    try:
        for county in (A, B):
            matcher.receive_batch(_signed(keys, county, "token_batch", tokens.batch(county)))
        assert matcher.relink(retrain=True)["status"] == "linked"
        assert matcher.index.model is not None
        path = directory / "model.json"
        matcher.index.model.save(path)
    finally:
        matcher.stop()
    return path


@pytest.fixture
def linked(
    keys: Keys, tokens: Tokens, model_path: Path, tmp_path: Path
) -> Iterator[tuple[Matcher, CountyStandIn]]:
    """A matcher (no background threads) that has linked both counties, and the counties."""
    counties = CountyStandIn(keys, tmp_path / "nodes")
    http = httpx.Client(transport=httpx.MockTransport(counties))
    matcher = Matcher(_settings(keys, tmp_path / "matcher", model=model_path), client=http)
    try:
        for county in (A, B):
            matcher.receive_batch(_signed(keys, county, "token_batch", tokens.batch(county)))
        summary = matcher.relink(retrain=False)
        assert summary["status"] == "linked" and summary["alerts_queued"] > 20
        yield matcher, counties
    finally:
        matcher.stop()
        http.close()
        counties.close()


def _deliver_all(matcher: Matcher, until: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not until():
        assert time.monotonic() < deadline, "alerts not delivered"
        matcher.deliver_once()
        time.sleep(0.01)


def _due(matcher: Matcher) -> int:
    return int(matcher.store.counts()["alerts_pending"])


def _due_by_county(matcher: Matcher) -> dict[str, int]:
    rows = matcher.store.query(
        "SELECT county, count(*) AS n FROM alerts "
        "WHERE delivered_version IS NULL OR delivered_version < version GROUP BY 1"
    )
    return dict(zip(rows["county"], rows["n"].astype(int), strict=True))


def _ack_of(keys: Keys, envelope: dict[str, Any], county: str) -> Ack:
    message = verify(
        envelope,
        expected_kind="ack",
        recipient=county,
        public_keys={"matcher": keys.matcher.public_key()},
        nonces=MemoryNonceStore(),
    )
    return Ack.model_validate(message.body)


def test_an_alert_batch_whose_ack_is_lost_is_sent_again_and_kept_once(
    linked: tuple[Matcher, CountyStandIn],
) -> None:
    matcher, counties = linked
    queued = _due(matcher)
    counties.lose_acks = 2  # both counties store their first batch but the acks are lost
    assert matcher.deliver_once() == 0
    assert _due(matcher) == queued  # nothing counts as delivered without an ack
    assert matcher.metrics.delivery_failures == 2
    first = {b.county: b for b in counties.received}
    _deliver_all(matcher, lambda: _due(matcher) == 0)
    for county in (A, B):
        # The same alert messages (ids and versions) again, in one new batch; kept once.
        (again,) = [b for b in counties.received[2:] if b.county == county]
        assert again.batch_id != first[county].batch_id
        assert {(a.alert_id, a.version) for a in again.alerts} == {
            (a.alert_id, a.version) for a in first[county].alerts
        }
        inbox = counties.inbox(county)
        assert len(inbox) == len(first[county].alerts)
        assert set(inbox.values()) == {(1, "open")}
    assert matcher.store.counts()["alerts_delivered"] == queued
    # Delivered means delivered: nothing goes out again.
    sent = len(counties.received)
    assert matcher.deliver_once() == 0 and len(counties.received) == sent


def test_alerts_wait_for_a_county_that_is_down_and_arrive_once(
    linked: tuple[Matcher, CountyStandIn],
) -> None:
    matcher, counties = linked
    counties.down.add(B)
    _deliver_all(matcher, lambda: A not in _due_by_county(matcher))
    for _ in range(3):
        time.sleep(0.1)
        matcher.deliver_once()
    waiting = _due(matcher)
    assert waiting == _due_by_county(matcher)[B] > 0
    assert matcher.metrics.delivery_failures >= 3
    assert all(b.county == A for b in counties.received)
    counties.down.clear()
    _deliver_all(matcher, lambda: _due(matcher) == 0)
    assert len(counties.inbox(B)) == waiting
    assert len([b for b in counties.received if b.county == B]) == 1


def test_feedback_on_a_withdrawn_alert_is_acknowledged(
    linked: tuple[Matcher, CountyStandIn], keys: Keys, tokens: Tokens
) -> None:
    matcher, counties = linked
    _deliver_all(matcher, lambda: _due(matcher) == 0)
    # County A removes a linked record: its alert is withdrawn.
    person = next(
        a for a in counties.stores[A].inbox() if a["kind"] == "person" and a["status"] == "open"
    )
    pseudonym = person["body"]["pseudonym"]
    gone = tokens.batch(A, slice(0, 0), tombstones=(pseudonym,))
    matcher.receive_batch(_signed(keys, A, "token_batch", gone))
    matcher.score_once()
    _deliver_all(matcher, lambda: _due(matcher) == 0)
    assert counties.inbox(A)[person["alert_id"]][1] == "withdrawn"
    # A lead had the alert open and records a decision on it; then another on a live alert.
    late = _feedback(A, person["alert_id"], "not_same")
    ack = _ack_of(keys, matcher.receive_feedback(_signed(keys, A, "feedback", late)), A)
    assert (ack.ref, ack.status) == (late.feedback_id, "stored")
    live = next(a for a, (_, status) in counties.inbox(A).items() if status == "open")
    matcher.receive_feedback(_signed(keys, A, "feedback", _feedback(A, live)))
    assert matcher.store.counts()["labels"] == 2


def test_a_crash_after_a_label_is_stored_is_repaired_by_the_resend(
    linked: tuple[Matcher, CountyStandIn], keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    matcher, counties = linked
    _deliver_all(matcher, lambda: _due(matcher) == 0)
    alert_id = next(
        a["alert_id"]
        for a in counties.stores[A].inbox()
        if a["kind"] == "person" and a["status"] == "open"
    )
    feedback = _feedback(A, alert_id, "same")

    def crash(*args: object, **kwargs: object) -> int:
        raise RuntimeError("the matcher dies here")

    with monkeypatch.context() as patch:
        patch.setattr(matcher.index, "refresh_alerts", crash)
        with pytest.raises(RuntimeError):
            matcher.receive_feedback(_signed(keys, A, "feedback", feedback))
    assert matcher.store.counts()["labels"] == 1 and _due(matcher) == 0
    # No ack went out, so the county sends the feedback again: a duplicate, and now the
    # review reaches every county of the cluster.
    matcher.receive_feedback(_signed(keys, A, "feedback", feedback))
    assert matcher.store.counts()["labels"] == 1 and _due(matcher) >= 2
    _deliver_all(matcher, lambda: _due(matcher) == 0)
    reviewed = {
        c: [a["body"]["reviews"] for a in counties.stores[c].inbox() if a["body"]["reviews"]]
        for c in (A, B)
    }
    assert reviewed[A] and reviewed[B]  # both counties of the cluster see the review
    assert all(r == [{"county": A, "decision": "same"}] for c in (A, B) for r in reviewed[c])


# --------------------------------------------------------------------------- crash in scoring


def test_a_crash_while_scoring_loses_no_alert(
    linked: tuple[Matcher, CountyStandIn],
    keys: Keys,
    tokens: Tokens,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The scoring round's pairs, clusters and alerts are one transaction: a crash (here an
    error) before its end leaves the records pending, and the next round queues the alerts."""
    matcher, counties = linked
    _deliver_all(matcher, lambda: _due(matcher) == 0)
    # A record of B that links to nobody arrives at A as a new record: the two link.
    clustered = set(matcher.store.query("SELECT pseudonym FROM clusters")["pseudonym"])
    table = tokens.tables[B]
    lonely = table[~table["pseudonym"].isin(clustered)].iloc[[0]]
    source = lonely.assign(pseudonym=secrets.token_hex(16), household=None)
    newcomer = tokens.batch(A, frame=source)
    matcher.receive_batch(_signed(keys, A, "token_batch", newcomer))

    def crash(*args: object, **kwargs: object) -> int:
        raise RuntimeError("the matcher dies here")

    with monkeypatch.context() as patch:
        # Dies after clustering, as it works out which alerts the new clusters imply.
        patch.setattr(matcher.index, "_desired_alerts", crash)
        with pytest.raises(RuntimeError):
            matcher.index.score_pending()
    assert matcher.store.counts()["pending"] == 1 and _due(matcher) == 0
    report = matcher.index.score_pending()
    assert report.records == 1 and report.alerts_queued >= 2
    _deliver_all(matcher, lambda: _due(matcher) == 0)
    pseudonym = source["pseudonym"].iloc[0]
    assert alert_id_for("person", A, pseudonym) in counties.inbox(A)


# --------------------------------------------------------------------------- operations


def test_health_readiness_and_metrics(client: MatcherClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    text = client.get("/metrics").text
    for name in (
        "jigsaw_matcher_tokens",
        "jigsaw_matcher_pending_records",
        "jigsaw_matcher_alerts_pending",
        "jigsaw_matcher_delivery_failures_total",
        "jigsaw_matcher_batch_seconds_bucket",
        "jigsaw_matcher_alert_delivery_seconds_count",
    ):
        assert name in text
    assert "# TYPE jigsaw_matcher_batches_total counter" in text
