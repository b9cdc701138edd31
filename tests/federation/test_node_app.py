"""The node's HTTP API and its publisher, with real keys made by ``init_federation``.

Alerts are signed with the matcher's key exactly as the matcher would sign them; every forged,
tampered, replayed or misaddressed one must get the same 401 and leave nothing behind. The
publisher is tested against a small matcher stand-in served by uvicorn on loopback.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from federation.errors import ConfigError
from federation.keys import (
    init_federation,
    load_private_key,
    matcher_key_path,
    node_key_path,
    registry_path,
    secret_path,
)
from federation.node.app import create_app
from federation.node.ingest import ingest_file
from federation.node.publisher import FIRST_RETRY_SECONDS, Publisher, publish_pending
from federation.node.store import NodeStore, OutboxEntry
from federation.protocol import Ack, AlertBody, FeedbackBody, TokenBatch
from federation.registry import Registry
from federation.settings import NodeSettings, load_settings
from federation.signing import MemoryNonceStore, sign, verify
from linkage.synthetic import generate_federation
from linkage.tokenise import TokenSpec

NODE = "coventry"
OTHER = "warwickshire"
ADMIN_TOKEN = "k3Y-7hq9ZpWm2XvB8rTn4sLc"
REFUSED = {"detail": "request refused"}


# --------------------------------------------------------------------------- fixtures


@dataclasses.dataclass
class Federation:
    directory: Path
    registry: Registry
    matcher_key: Ed25519PrivateKey
    node_key: Ed25519PrivateKey
    other_key: Ed25519PrivateKey

    def settings(self, **overrides: Any) -> NodeSettings:
        values: dict[str, Any] = {
            "node_id": NODE,
            "data_dir": self.directory / "nodes" / NODE / "data",
            "registry": registry_path(self.directory),
            "private_key": node_key_path(self.directory, NODE),
            "secret": secret_path(self.directory),
            "admin_token": ADMIN_TOKEN,
            "tokenise_seed": 5,
            "publish_interval": 0.05,
            "retry_max_seconds": 0.5,
            "max_request_bytes": 256 * 1024,
        }
        values.update(overrides)
        return NodeSettings(**values)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    directory = tmp_path_factory.mktemp("federation")
    init_federation(
        directory,
        node_ids=[NODE, OTHER],
        matcher_url="http://127.0.0.1:9",
        node_urls={NODE: "http://127.0.0.1:9", OTHER: "http://127.0.0.1:9"},
    )
    return Federation(
        directory=directory,
        registry=Registry.load(registry_path(directory)),
        matcher_key=load_private_key(matcher_key_path(directory)),
        node_key=load_private_key(node_key_path(directory, NODE)),
        other_key=load_private_key(node_key_path(directory, OTHER)),
    )


@pytest.fixture(scope="module")
def export_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = next(iter(generate_federation(counties=2, records=120).counties.values()))
    path = tmp_path_factory.mktemp("exports") / f"{NODE}.csv"
    frame.to_csv(path, index=False)
    return path


def _unreachable_matcher(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503)


@contextlib.contextmanager
def _serve(app: Any) -> Iterator[str]:
    """Serve an ASGI app with uvicorn on a free loopback port; yield its base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class NodeClient(httpx.Client):
    """An HTTP client for a node served on loopback, with a handle on the app."""

    def __init__(self, app: FastAPI, base_url: str) -> None:
        super().__init__(base_url=base_url, timeout=30)
        self.app = app


@pytest.fixture
def client(federation: Federation, tmp_path: Path) -> Iterator[NodeClient]:
    settings = federation.settings(data_dir=tmp_path / "data")
    http = httpx.Client(transport=httpx.MockTransport(_unreachable_matcher))
    app = create_app(settings, client=http)
    with _serve(app) as url, NodeClient(app, url) as node_client:
        yield node_client
    http.close()


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _ingest(client: NodeClient, path: Path) -> dict[str, Any]:
    response = client.post("/v1/admin/ingest", json={"path": str(path)}, headers=ADMIN)
    assert response.status_code == 200, response.text
    return dict(response.json())


def _store(client: NodeClient) -> NodeStore:
    store: NodeStore = client.app.state.node.store
    return store


def _first_record(client: NodeClient) -> tuple[str, str, str]:
    snap = _store(client).records_snapshot().sort_values("record_id")
    row = snap[snap["household"].notna()].iloc[0]
    return str(row["record_id"]), str(row["pseudonym"]), str(row["household"])


def _alert_body(pseudonym: str | None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": "alert/1",
        "alert_id": "a1" * 16,
        "version": 1,
        "kind": "person",
        "county": NODE,
        "cluster_id": "cluster-7",
        "pseudonym": pseudonym,
        "other_counties": [
            {
                "county": OTHER,
                "display_name": "Warwickshire",
                "contact_name": "MASH duty desk",
                "contact_email": "mash@example.org",
                "contact_phone": "01632 960002",
            }
        ],
        "match_probability": 0.997,
        "explanation": [{"field": "date_of_birth", "level": "exact", "weight": 9.1}],
        "reviews": [],
        "created_at": time.time(),
    }
    body.update(overrides)
    return body


def _signed(
    federation: Federation,
    body: dict[str, Any],
    *,
    kind: str = "alert",
    sender: str = "matcher",
    recipient: str = NODE,
    key: Ed25519PrivateKey | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    return sign(
        body,
        kind=kind,
        sender=sender,
        recipient=recipient,
        private_key=key or federation.matcher_key,
        now=now,
    )


def _ack(federation: Federation, response: httpx.Response) -> Ack:
    message = verify(
        response.json(),
        expected_kind="ack",
        recipient="matcher",
        public_keys={NODE: federation.node_key.public_key()},
        nonces=MemoryNonceStore(),
    )
    assert message.sender == NODE
    return Ack.model_validate(message.body)


# --------------------------------------------------------------------------- alerts in


def test_an_alert_is_stored_acked_and_shown_reidentified(
    client: NodeClient, federation: Federation, export_path: Path
) -> None:
    report = _ingest(client, export_path)
    assert (
        report["accepted"] > 0
        and report["input_rows"] == report["accepted"] + report["quarantined"]
    )
    record_id, pseudonym, _ = _first_record(client)

    body = _alert_body(pseudonym)
    response = client.post("/v1/alerts", json=_signed(federation, body))
    assert response.status_code == 200
    ack = _ack(federation, response)
    assert (ack.ref, ack.status) == (body["alert_id"], "stored")

    # The matcher sending it again (a new envelope, as after a lost ack) is a duplicate.
    again = client.post("/v1/alerts", json=_signed(federation, body))
    assert _ack(federation, again).status == "duplicate"

    response = client.get("/v1/alerts", headers=ADMIN)
    assert response.status_code == 200
    [alert] = response.json()["alerts"]
    assert alert["alert_id"] == body["alert_id"]
    assert (alert["kind"], alert["status"], alert["version"]) == ("person", "open", 1)
    assert alert["cluster_id"] == "cluster-7"
    assert alert["local_record_id"] == record_id
    export = pd.read_csv(export_path, dtype=str, keep_default_na=False)
    [row] = export[export["record_id"] == record_id].to_dict("records")
    local = alert["local_record"]
    assert local["record_id"] == record_id
    assert local["given_name"] == row["given_name"].strip()
    assert local["family_name"] == row["family_name"].strip()
    assert [o["county"] for o in alert["other_counties"]] == [OTHER]
    assert alert["match_probability"] == 0.997
    assert alert["explanation"][0]["field"] == "date_of_birth"
    assert alert["reviews"] == []
    assert alert["received_at"].endswith("Z")
    assert "pseudonym" not in json.dumps(alert)  # the inbox speaks in the county's own ids


def test_family_alerts_show_the_household_and_filters_apply(
    client: NodeClient, federation: Federation, export_path: Path
) -> None:
    _ingest(client, export_path)
    _, pseudonym, household = _first_record(client)
    person = _alert_body(pseudonym)
    family = _alert_body(
        None, alert_id="b2" * 16, kind="family", household=household, cluster_id="family-3"
    )
    for body in (person, family):
        assert client.post("/v1/alerts", json=_signed(federation, body)).status_code == 200

    alerts = client.get("/v1/alerts", params={"kind": "family"}, headers=ADMIN).json()["alerts"]
    [alert] = alerts
    snap = _store(client).records_snapshot()
    members = snap[snap["household"] == household]
    assert alert["local_household_id"] == members["household_id"].iloc[0]
    assert sorted(r["record_id"] for r in alert["local_record"]) == sorted(members["record_id"])
    assert "local_record_id" not in alert

    everyone = client.get("/v1/alerts", params={"county": OTHER}, headers=ADMIN).json()
    assert len(everyone["alerts"]) == 2
    nobody = client.get("/v1/alerts", params={"county": "nowhere"}, headers=ADMIN).json()
    assert nobody["alerts"] == []

    withdrawal = {
        "schema": "withdrawal/1",
        "alert_id": person["alert_id"],
        "version": 2,
        "county": NODE,
        "reason": "record withdrawn",
    }
    response = client.post("/v1/alerts", json=_signed(federation, withdrawal, kind="withdrawal"))
    assert _ack(federation, response).status == "stored"
    open_alerts = client.get("/v1/alerts", params={"status": "open"}, headers=ADMIN).json()
    assert [a["alert_id"] for a in open_alerts["alerts"]] == [family["alert_id"]]
    withdrawn = client.get("/v1/alerts", params={"status": "withdrawn"}, headers=ADMIN).json()
    assert withdrawn["alerts"][0]["withdrawal_reason"] == "record withdrawn"
    status = client.get("/v1/status", headers=ADMIN).json()
    assert status["alerts"] == {"open": 1, "withdrawn": 1}


def _refusals(federation: Federation, pseudonym: str) -> dict[str, Any]:
    """Every way an alert must be refused, each as (JSON body, or raw bytes)."""
    body = _alert_body(pseudonym)
    good = _signed(federation, body)
    tampered = copy.deepcopy(good)
    tampered["body"]["match_probability"] = 0.5
    relabelled = copy.deepcopy(good)
    relabelled["kind"] = "withdrawal"
    return {
        "forged by another key": _signed(federation, body, key=federation.other_key),
        "sent by a node": _signed(federation, body, sender=OTHER, key=federation.other_key),
        "tampered": tampered,
        "wrong recipient": _signed(federation, body, recipient=OTHER),
        "another county's alert": _signed(federation, {**body, "county": OTHER}),
        "stale": _signed(federation, body, now=time.time() - 3600),
        "wrong kind": _signed(federation, body, kind="ack"),
        "relabelled kind": relabelled,
        "unsigned": {k: v for k, v in good.items() if k != "signature"},
        "not an envelope": [1, 2, 3],
        "not JSON": b"\xff{not json",
    }


def test_every_bad_alert_gets_the_same_401_and_nothing_is_stored(
    client: NodeClient, federation: Federation, export_path: Path
) -> None:
    _ingest(client, export_path)
    _, pseudonym, _ = _first_record(client)
    for name, envelope in _refusals(federation, pseudonym).items():
        if isinstance(envelope, bytes):
            response = client.post("/v1/alerts", content=envelope)
        else:
            response = client.post("/v1/alerts", json=envelope)
        assert (response.status_code, response.json()) == (401, REFUSED), name
    assert client.get("/v1/alerts", headers=ADMIN).json()["alerts"] == []

    # A replay of a good envelope: stored once, then refused.
    good = _signed(federation, _alert_body(pseudonym))
    assert client.post("/v1/alerts", json=good).status_code == 200
    replay = client.post("/v1/alerts", json=good)
    assert (replay.status_code, replay.json()) == (401, REFUSED)
    assert len(client.get("/v1/alerts", headers=ADMIN).json()["alerts"]) == 1


def test_an_invalid_alert_body_is_422_without_echoing_values(
    client: NodeClient, federation: Federation
) -> None:
    secret_looking = "Margaret Thornbury 1987-03-02"
    body = _alert_body("c3" * 16, match_probability=7, cluster_id=None, kind=secret_looking)
    response = client.post("/v1/alerts", json=_signed(federation, body))
    assert response.status_code == 422
    assert secret_looking not in response.text
    assert {tuple(p["loc"]) for p in response.json()["detail"]} >= {
        ("match_probability",),
        ("kind",),
    }
    assert client.get("/v1/alerts", headers=ADMIN).json()["alerts"] == []


# --------------------------------------------------------------------------- admin API


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token-wrong-token-wrong"},
        {"Authorization": ADMIN_TOKEN},
        {"Authorization": f"Basic {ADMIN_TOKEN}"},
    ],
)
def test_admin_routes_need_the_bearer_token(client: NodeClient, headers: dict[str, str]) -> None:
    calls = [
        client.get("/v1/alerts", headers=headers),
        client.get("/v1/alerts", params={"kind": "bogus"}, headers=headers),
        client.get("/v1/status", headers=headers),
        client.post("/v1/admin/ingest", content=b"{not json", headers=headers),
        client.post("/v1/alerts/" + "a1" * 16 + "/feedback", json={}, headers=headers),
    ]
    for response in calls:
        assert (response.status_code, response.json()) == (401, REFUSED)


def test_feedback_is_queued_without_the_note(
    client: NodeClient, federation: Federation, export_path: Path
) -> None:
    _ingest(client, export_path)
    _, pseudonym, _ = _first_record(client)
    body = _alert_body(pseudonym)
    client.post("/v1/alerts", json=_signed(federation, body))
    store = _store(client)
    before = {e.message_id for e in store.pending()}

    note = "Spoke to Ms Okafor at Warwickshire MASH; same child, DOB 2014-05-03"
    url = f"/v1/alerts/{body['alert_id']}/feedback"
    response = client.post(url, json={"decision": "same", "note": note}, headers=ADMIN)
    assert response.status_code == 202
    feedback_id = response.json()["feedback_id"]

    [entry] = [e for e in store.pending() if e.message_id not in before]
    assert (entry.message_id, entry.kind) == (feedback_id, "feedback")
    text = store.message_body(entry.message_id)
    message = FeedbackBody.model_validate_json(text)
    assert (message.alert_id, message.county, message.decision) == (body["alert_id"], NODE, "same")
    assert "Okafor" not in text and "2014" not in text
    [alert] = client.get("/v1/alerts", headers=ADMIN).json()["alerts"]
    assert alert["feedback"][0]["note"] == note

    unknown = client.post(
        "/v1/alerts/" + "9" * 32 + "/feedback", json={"decision": "same"}, headers=ADMIN
    )
    assert unknown.status_code == 404
    bad = client.post(url, json={"decision": "maybe", "note": note}, headers=ADMIN)
    assert bad.status_code == 422 and "Okafor" not in bad.text


def test_ingest_errors_name_the_file_and_status_counts(
    client: NodeClient, export_path: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing-export.csv"
    response = client.post("/v1/admin/ingest", json={"path": str(missing)}, headers=ADMIN)
    assert response.status_code == 400
    assert "missing-export.csv" in response.json()["detail"]
    response = client.post(
        "/v1/admin/ingest",
        json={"path": str(export_path), "mapping": str(tmp_path / "no-mapping.toml")},
        headers=ADMIN,
    )
    assert response.status_code == 400 and "no-mapping.toml" in response.json()["detail"]

    report = _ingest(client, export_path)
    status = client.get("/v1/status", headers=ADMIN).json()
    assert status["node_id"] == NODE
    assert status["records"]["active"] == report["accepted"]
    assert status["outbox"]["pending"] == report["batches"] >= 1
    assert status["last_load"]["load_id"] == report["load_id"]


def test_health_readiness_and_body_limit(client: NodeClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    big = b"{" + b" " * (300 * 1024) + b"}"
    assert client.post("/v1/alerts", content=big).status_code == 413

    def chunks() -> Iterator[bytes]:
        for _ in range(300):
            yield b" " * 1024

    assert client.post("/v1/alerts", content=chunks()).status_code == 413


def test_readyz_fails_without_a_running_node(federation: Federation, tmp_path: Path) -> None:
    app = create_app(federation.settings(data_dir=tmp_path / "data"))
    with _serve(app) as url:
        app.state.node.store.close()
        assert httpx.get(url + "/readyz").status_code == 503


# --------------------------------------------------------------------------- publisher


def _ack_envelope(ref: str, key: Ed25519PrivateKey) -> dict[str, Any]:
    """A signed ack from "the matcher" (really whoever holds ``key``) to this node."""
    ack = Ack.model_validate({"ref": ref, "status": "stored"})
    return sign(
        ack.model_dump(by_alias=True), kind="ack", sender="matcher", recipient=NODE, private_key=key
    )


class FakeMatcher:
    """A matcher endpoint: refuses the first ``failures`` posts with 503, then verifies and acks."""

    def __init__(self, federation: Federation, *, failures: int) -> None:
        self.federation = federation
        self.failures = failures
        self.posts = 0
        self.acked: list[str] = []
        self.nonces = MemoryNonceStore()
        self.app = FastAPI()
        self.app.post("/v1/batches")(self.receive)
        self.app.post("/v1/feedback")(self.receive)

    async def receive(self, request: Request) -> JSONResponse:
        self.posts += 1
        if self.posts <= self.failures:
            return JSONResponse({"detail": "busy"}, status_code=503)
        envelope = await request.json()
        kind = envelope.get("kind")
        message = verify(
            envelope,
            expected_kind=kind,
            recipient="matcher",
            public_keys={NODE: self.federation.node_key.public_key()},
            nonces=self.nonces,
        )
        if kind == "token_batch":
            ref = TokenBatch.model_validate(message.body).batch_id
        else:
            ref = FeedbackBody.model_validate(message.body).feedback_id
        self.acked.append(ref)
        return JSONResponse(_ack_envelope(ref, self.federation.matcher_key))


@pytest.fixture
def fake_matcher(federation: Federation) -> Iterator[tuple[FakeMatcher, str]]:
    matcher = FakeMatcher(federation, failures=2)
    with _serve(matcher.app) as url:
        yield matcher, url


def _queued_node(federation: Federation, tmp_path: Path, export_path: Path) -> NodeSettings:
    """Settings of a stopped node whose outbox holds one token batch."""
    settings = federation.settings(data_dir=tmp_path / "node")
    with _opened(settings) as store:
        tokeniser = TokenSpec().bind(b"\x01\x02\x03\x04\x05\x06\x07\x08" * 4)
        ingest_file(store, export_path, tokeniser, county=NODE, seed=1)
    return settings


@contextlib.contextmanager
def _opened(settings: NodeSettings) -> Iterator[NodeStore]:
    store = NodeStore(settings.database)
    try:
        yield store
    finally:
        store.close()


def _pending(settings: NodeSettings) -> list[OutboxEntry]:
    with _opened(settings) as store:
        return store.pending()


def test_publisher_retries_through_503s_and_acks_exactly_once(
    federation: Federation,
    export_path: Path,
    tmp_path: Path,
    fake_matcher: tuple[FakeMatcher, str],
) -> None:
    matcher, url = fake_matcher
    settings = _queued_node(federation, tmp_path, export_path)
    [entry] = _pending(settings)
    registry = dataclasses.replace(federation.registry, matcher_url=url)
    with _opened(settings) as store, httpx.Client(timeout=5) as http:
        publisher = Publisher(store, settings, registry, federation.node_key, http)
        publisher.start()
        publisher.wake()
        deadline = time.monotonic() + 15
        while store.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
        publisher.stop()
        assert store.pending() == []
        assert matcher.posts == 3  # two 503s, then the ack
        assert matcher.acked == [entry.message_id]
        assert store.status()["outbox"] == {"pending": 0, "acked": 1, "oldest_pending_at": None}
        # Nothing is left to send: publishing again sends nothing.
        assert publisher.publish_pending() == 0
        assert matcher.posts == 3


def test_publish_pending_sends_a_stopped_nodes_outbox(
    federation: Federation,
    export_path: Path,
    tmp_path: Path,
    fake_matcher: tuple[FakeMatcher, str],
) -> None:
    matcher, url = fake_matcher
    registry_file = tmp_path / "registry.toml"
    dataclasses.replace(federation.registry, matcher_url=url).save(registry_file)
    settings = _queued_node(federation, tmp_path, export_path)
    settings = settings.model_copy(update={"registry": registry_file})
    # As `jigsaw node publish` would, run by an operator: each run sends once, now.
    assert [publish_pending(settings) for _ in range(3)] == [0, 0, 1]
    assert _pending(settings) == []
    assert len(matcher.acked) == 1


def _publish_once(settings: NodeSettings, handler: Any) -> int:
    with httpx.Client(transport=httpx.MockTransport(handler)) as http:
        return publish_pending(settings, client=http)


def test_refusals_and_bad_acks_keep_messages_pending(
    federation: Federation, export_path: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _queued_node(federation, tmp_path, export_path)
    [entry] = _pending(settings)

    def refused(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"detail": "token spec mismatch"})

    def forged_ack(request: httpx.Request) -> httpx.Response:
        ref = json.loads(request.content)["body"]["batch_id"]
        return httpx.Response(200, json=_ack_envelope(ref, federation.other_key))

    def wrong_ref(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=_ack_envelope("0" * 32, federation.matcher_key))

    def unreachable(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    for attempt, handler in enumerate([refused, forged_ack, wrong_ref, unreachable], start=1):
        sent = time.time()
        assert _publish_once(settings, handler) == 0
        [pending] = _pending(settings)
        assert (pending.message_id, pending.attempts) == (entry.message_id, attempt)
        # Put off by at least the first backoff's lower bound (equal jitter), not due at once.
        assert pending.next_attempt_at >= sent + FIRST_RETRY_SECONDS / 2
        if handler is refused:
            # The operator sees why the matcher refused, not just the status.
            assert "HTTP 400 (refused: token spec mismatch)" in caplog.text


def test_the_example_settings_load() -> None:
    path = Path(__file__).resolve().parents[2] / "configs" / "node.example.toml"
    settings = load_settings(NodeSettings, path, admin_token=ADMIN_TOKEN)
    assert settings.node_id == "northshire"
    assert settings.registry.is_absolute()
    assert settings.token_spec is not None
    assert TokenSpec.from_toml(settings.token_spec).version  # the file it names exists
    assert settings.metrics_token is None  # /metrics open unless a token is set


@pytest.mark.parametrize("token", ["changeme-changeme-changeme", "x" * 30, "short-but-random-1"])
def test_a_placeholder_or_short_metrics_token_is_refused(token: str) -> None:
    path = Path(__file__).resolve().parents[2] / "configs" / "node.example.toml"
    with pytest.raises(ConfigError, match="metrics_token"):
        load_settings(NodeSettings, path, admin_token=ADMIN_TOKEN, metrics_token=token)


def test_the_metrics_token_may_not_be_the_admin_token() -> None:
    path = Path(__file__).resolve().parents[2] / "configs" / "node.example.toml"
    with pytest.raises(ConfigError, match="metrics_token must differ from admin_token") as e:
        load_settings(NodeSettings, path, admin_token=ADMIN_TOKEN, metrics_token=ADMIN_TOKEN)
    assert ADMIN_TOKEN not in str(e.value)


def _matcher_ack(federation: Federation, request: httpx.Request) -> httpx.Response:
    body = json.loads(request.content)["body"]
    ref = body.get("batch_id") or body.get("feedback_id")
    return httpx.Response(200, json=_ack_envelope(ref, federation.matcher_key))


def test_a_stuck_batch_does_not_hold_back_feedback(
    federation: Federation, export_path: Path, tmp_path: Path
) -> None:
    settings = _queued_node(federation, tmp_path, export_path)
    alert_id = "d4" * 16
    with _opened(settings) as store:
        pseudonym = store.records_snapshot()["pseudonym"][0]
        store.store_alert(AlertBody.model_validate(_alert_body(pseudonym, alert_id=alert_id)))
        feedback = {"feedback_id": "e5" * 16, "alert_id": alert_id}
        message = FeedbackBody.model_validate({**feedback, "county": NODE, "decision": "same"})
        store.add_feedback(
            **feedback, decision="same", note="n", body=message.model_dump_json(by_alias=True)
        )
    paths: list[str] = []

    def matcher(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        if request.url.path == "/v1/batches":
            return httpx.Response(429, headers={"Retry-After": "0.4"})
        return _matcher_ack(federation, request)

    before = time.time()
    assert _publish_once(settings, matcher) == 1
    assert paths == ["/v1/batches", "/v1/feedback"]
    [stuck] = _pending(settings)
    assert stuck.kind == "token_batch" and stuck.attempts == 1
    # Retry-After is honoured (within retry_max_seconds = 0.5).
    assert stuck.next_attempt_at >= before + 0.4
    assert _publish_once(settings, lambda r: _matcher_ack(federation, r)) == 1
    assert _pending(settings) == []
