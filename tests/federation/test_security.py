"""Hostile requests against real running services (issue 4).

One small federation (a matcher and two county nodes, each its own server process on
loopback) links a generated pair of counties and delivers its alerts. Then the tests play
attackers: forged, tampered, replayed, stale, oversized, malformed and cross-node messages to
the matcher's ``/v1/batches`` and ``/v1/feedback`` and to a node's ``/v1/alerts``, and
requests without the right admin token to every admin endpoint. Each must be refused with the
one uniform answer (same status, same body, same headers) and leave nothing behind: the
matcher's and both nodes' counts and inboxes are the same before and after. Positive controls
show that the same requests, properly signed, do get through. Last, the matcher's per-sender
rate limit answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.demo import LocalFederation
from federation.keys import load_private_key, matcher_key_path, node_key_path
from federation.ratelimit import RateLimited, SenderRateLimiter
from federation.signing import sign
from linkage.synthetic import generate_federation, write_federation
from linkage.tokenise import TokenSpec

pytestmark = pytest.mark.slow

#: Request-size limits of the services under test (small, so oversized requests are cheap).
MATCHER_MAX_BYTES = 2_000_000
NODE_MAX_BYTES = 1_000_000
#: The matcher's per-sender allowance in these tests.
REQUESTS_PER_MINUTE = 40
REFUSED_BODY = b'{"detail":"request refused"}'
#: Both services ask Prometheus for this bearer token on /metrics.
METRICS_TOKEN = secrets.token_urlsafe(32)


@dataclass
class Fed:
    """The running federation and what an attacker with various keys can do to it."""

    local: LocalFederation
    a: str
    b: str
    keys: dict[str, Ed25519PrivateKey]  # node ids and "matcher"
    alerts: dict[str, list[dict[str, Any]]]
    http: httpx.Client

    @property
    def matcher_url(self) -> str:
        return self.local.matcher.url

    def node_url(self, county: str) -> str:
        return self.local.nodes[county].url

    def admin(self, party: str) -> dict[str, str]:
        token = (
            self.local.matcher.admin_token
            if party == "matcher"
            else self.local.nodes[party].admin_token
        )
        return {"Authorization": f"Bearer {token}"}

    def snapshot(self) -> dict[str, Any]:
        """Everything a refused request must leave as it was."""
        status = self.local.status()
        status.pop("model", None)
        metrics = status.pop("metrics", {})
        labels = self.http.get(
            f"{self.matcher_url}/v1/admin/labels", headers=self.admin("matcher")
        ).json()
        nodes = {}
        for county in self.local.nodes:
            node = self.local.node_status(county)
            node["outbox"].pop("oldest_pending_at", None)
            inbox = sorted(
                (a["alert_id"], a["version"], a["status"], json.dumps(a["feedback"]))
                for a in self.local.alerts(county)
            )
            nodes[county] = {"status": node, "inbox": inbox}
        return {
            "matcher": status,
            "batches": metrics.get("batches"),
            "labels": labels,
            "nodes": nodes,
        }


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fed]:
    tmp = tmp_path_factory.mktemp("security")
    generated = generate_federation(counties=2, records=600, seed=5)
    files = sorted(write_federation(generated, tmp / "counties"))
    out = tmp / "fed"
    local = LocalFederation(
        out,
        [f.stem for f in files],
        matcher_settings={
            "max_request_bytes": MATCHER_MAX_BYTES,
            "requests_per_minute": REQUESTS_PER_MINUTE,
            "metrics_token": METRICS_TOKEN,
        },
    )
    # The nodes read settings their TOML leaves unset from the environment: only while they
    # start, so that no other test sees it.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("JIGSAW_NODE_MAX_REQUEST_BYTES", str(NODE_MAX_BYTES))
        env.setenv("JIGSAW_NODE_METRICS_TOKEN", METRICS_TOKEN)
        local.__enter__()
    try:
        reports = local.ingest_all(files)
        local.wait_for_tokens(sum(r["accepted"] for r in reports.values()), timeout=120)
        local.relink(retrain=True)
        local.wait_until_delivered(timeout=120)
        a, b = (f.stem for f in files)
        keys = {c: load_private_key(node_key_path(out, c)) for c in (a, b)}
        keys["matcher"] = load_private_key(matcher_key_path(out))
        alerts = {c: local.alerts(c) for c in (a, b)}
        assert alerts[a] and alerts[b], "the federation produced no alerts to attack"
        with httpx.Client(timeout=30) as http:
            yield Fed(local, a, b, keys, alerts, http)
    finally:
        local.close()


# --------------------------------------------------------------------------- helpers


#: The first refusal each service gave: every later one must carry the same headers.
_FIRST_REFUSAL: dict[str, httpx.Headers] = {}


def assert_refused(response: httpx.Response) -> None:
    """The one uniform refusal: 401, the same body, the same headers as every other refusal
    of that service (only the date may differ)."""
    assert response.status_code == 401, (response.status_code, response.text)
    assert response.content == REFUSED_BODY
    assert response.headers["content-type"] == "application/json"
    service = response.url.netloc.decode()
    headers = {k: v for k, v in response.headers.items() if k != "date"}
    first = _FIRST_REFUSAL.setdefault(service, httpx.Headers(headers))
    assert headers == dict(first.items()), (headers, dict(first.items()))


def batch_body(county: str, **changes: Any) -> dict[str, Any]:
    """A valid, empty token batch of ``county`` under the federation's (default) spec."""
    spec = TokenSpec()
    body: dict[str, Any] = {
        "schema": "token_batch/1",
        "batch_id": secrets.token_hex(16),
        "county": county,
        "token_spec": {"version": spec.version, "fingerprint": spec.fingerprint, "epoch": 1},
        "columns": ["pseudonym", "household", "role", *spec.token_columns()],
        "rows": [],
        "tombstones": [],
    }
    body.update(changes)
    return body


def feedback_body(county: str, alert_id: str, decision: str = "not_same") -> dict[str, Any]:
    return {
        "schema": "feedback/1",
        "feedback_id": secrets.token_hex(16),
        "alert_id": alert_id,
        "county": county,
        "decision": decision,
    }


def alert_batch_body(county: str, alerts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "schema": "alert_batch/1",
        "batch_id": secrets.token_hex(16),
        "county": county,
        "alerts": alerts or [],
        "withdrawals": [],
    }


def a_new_alert(county: str, other: str) -> dict[str, Any]:
    """An alert body a forger would like a node to show."""
    return {
        "schema": "alert/1",
        "alert_id": secrets.token_hex(16),
        "version": 1,
        "kind": "person",
        "county": county,
        "cluster_id": "forged-cluster",
        "pseudonym": secrets.token_hex(16),
        "other_counties": [
            {
                "county": other,
                "display_name": "Forged",
                "contact_name": "Mallory",
                "contact_email": "mallory@example.org",
                "contact_phone": "+44 20 7946 0000",
            }
        ],
        "match_probability": 0.999,
        "explanation": [],
        "created_at": time.time(),
    }


def signed(
    body: dict[str, Any],
    *,
    kind: str,
    sender: str,
    recipient: str,
    key: Ed25519PrivateKey,
    now: float | None = None,
) -> dict[str, Any]:
    return sign(body, kind=kind, sender=sender, recipient=recipient, private_key=key, now=now)


def resign_with(envelope: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The envelope with fields changed after signing (the signature no longer covers them)."""
    out = copy.deepcopy(envelope)
    out.update(changes)
    return out


def refused_without_trace(fed: Fed, send: Callable[[], httpx.Response]) -> None:
    before = fed.snapshot()
    assert_refused(send())
    assert fed.snapshot() == before


# --------------------------------------------------------------------------- the matcher


def test_positive_control_a_signed_batch_is_stored_and_its_replay_refused(fed: Fed) -> None:
    envelope = signed(
        batch_body(fed.a),
        kind="token_batch",
        sender=fed.a,
        recipient="matcher",
        key=fed.keys[fed.a],
    )
    before = fed.snapshot()
    first = fed.http.post(f"{fed.matcher_url}/v1/batches", json=envelope)
    assert first.status_code == 200, first.text
    after = fed.snapshot()
    assert after["batches"] == before["batches"] + 1
    # The same bytes again: refused, and nothing more is stored.
    refused_without_trace(
        fed, lambda: fed.http.post(f"{fed.matcher_url}/v1/batches", json=envelope)
    )


def _forged_batches(fed: Fed) -> dict[str, dict[str, Any] | bytes]:
    a, b = fed.a, fed.b
    mallory = Ed25519PrivateKey.generate()
    good = signed(batch_body(a), kind="token_batch", sender=a, recipient="matcher", key=fed.keys[a])
    other_signature = signed(
        batch_body(a), kind="token_batch", sender=a, recipient="matcher", key=fed.keys[a]
    )["signature"]
    raw_sig = bytearray(base64.b64decode(good["signature"]))
    raw_sig[0] ^= 1
    tampered_rows = copy.deepcopy(good)
    tampered_rows["body"]["tombstones"] = [secrets.token_hex(16)]
    return {
        "unknown key claiming a node": signed(
            batch_body(a), kind="token_batch", sender=a, recipient="matcher", key=mallory
        ),
        "unknown sender": signed(
            batch_body("mallory"),
            kind="token_batch",
            sender="mallory",
            recipient="matcher",
            key=mallory,
        ),
        "another node's key": signed(
            batch_body(a), kind="token_batch", sender=a, recipient="matcher", key=fed.keys[b]
        ),
        "the matcher's own key": signed(
            batch_body(a),
            kind="token_batch",
            sender="matcher",
            recipient="matcher",
            key=fed.keys["matcher"],
        ),
        "tampered body": tampered_rows,
        "tampered county": resign_with(good, body={**good["body"], "county": b}),
        "tampered sender": resign_with(good, sender=b),
        "tampered timestamp": resign_with(good, timestamp=good["timestamp"] + 1),
        "tampered nonce": resign_with(good, nonce=secrets.token_hex(16)),
        "flipped signature bit": resign_with(
            good, signature=base64.b64encode(bytes(raw_sig)).decode()
        ),
        "signature of another message": resign_with(good, signature=other_signature),
        "stale": signed(
            batch_body(a),
            kind="token_batch",
            sender=a,
            recipient="matcher",
            key=fed.keys[a],
            now=time.time() - 3600,
        ),
        "from the future": signed(
            batch_body(a),
            kind="token_batch",
            sender=a,
            recipient="matcher",
            key=fed.keys[a],
            now=time.time() + 3600,
        ),
        "addressed to a node": signed(
            batch_body(a), kind="token_batch", sender=a, recipient=b, key=fed.keys[a]
        ),
        "wrong kind": signed(
            batch_body(a), kind="feedback", sender=a, recipient="matcher", key=fed.keys[a]
        ),
        "speaks for another county": signed(
            batch_body(b), kind="token_batch", sender=a, recipient="matcher", key=fed.keys[a]
        ),
        "not JSON": b"this is not json",
        "a JSON array": b"[1, 2, 3]",
        "missing signature": json.dumps(
            {k: v for k, v in good.items() if k != "signature"}
        ).encode(),
        "extra field": json.dumps({**good, "admin": True}).encode(),
        "deeply nested": b"[" * 100_000 + b"]" * 100_000,
        "NaN in the body": json.dumps(good)
        .replace('"tombstones": []', '"tombstones": NaN')
        .encode(),
    }


def test_forged_tampered_stale_and_cross_node_batches_are_refused(fed: Fed) -> None:
    before = fed.snapshot()
    for case, payload in _forged_batches(fed).items():
        if isinstance(payload, bytes):
            response = fed.http.post(
                f"{fed.matcher_url}/v1/batches",
                content=payload,
                headers={"content-type": "application/json"},
            )
        else:
            response = fed.http.post(f"{fed.matcher_url}/v1/batches", json=payload)
        try:
            assert_refused(response)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from None
    assert fed.snapshot() == before


def test_a_node_sends_feedback_on_its_own_alerts_only(fed: Fed) -> None:
    a, b = fed.a, fed.b
    theirs = fed.alerts[b][0]["alert_id"]
    mine = fed.alerts[a][0]["alert_id"]
    url = f"{fed.matcher_url}/v1/feedback"
    cases = {
        "on another county's alert": signed(
            feedback_body(a, theirs),
            kind="feedback",
            sender=a,
            recipient="matcher",
            key=fed.keys[a],
        ),
        "claiming to be the other county": signed(
            feedback_body(b, theirs),
            kind="feedback",
            sender=a,
            recipient="matcher",
            key=fed.keys[a],
        ),
        "on an alert that does not exist": signed(
            feedback_body(a, secrets.token_hex(16)),
            kind="feedback",
            sender=a,
            recipient="matcher",
            key=fed.keys[a],
        ),
        "forged as the other county": signed(
            feedback_body(b, theirs),
            kind="feedback",
            sender=b,
            recipient="matcher",
            key=Ed25519PrivateKey.generate(),
        ),
        "stale": signed(
            feedback_body(a, mine),
            kind="feedback",
            sender=a,
            recipient="matcher",
            key=fed.keys[a],
            now=time.time() - 3600,
        ),
        "a token batch on the feedback endpoint": signed(
            batch_body(a), kind="token_batch", sender=a, recipient="matcher", key=fed.keys[a]
        ),
    }
    before = fed.snapshot()
    for case, envelope in cases.items():
        try:
            assert_refused(fed.http.post(url, json=envelope))
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from None
    assert fed.snapshot() == before

    # Positive control: the county's own feedback on its own alert is stored, once.
    envelope = signed(
        feedback_body(a, mine), kind="feedback", sender=a, recipient="matcher", key=fed.keys[a]
    )
    response = fed.http.post(url, json=envelope)
    assert response.status_code == 200, response.text
    labels = fed.snapshot()["labels"]["labels"]
    assert any(row["county"] == a and row["n"] >= 1 for row in labels)
    refused_without_trace(fed, lambda: fed.http.post(url, json=envelope))


def test_oversized_requests_are_refused_with_413(fed: Fed) -> None:
    before = fed.snapshot()
    big = b'{"pad": "' + b"x" * (MATCHER_MAX_BYTES + 10) + b'"}'
    for path in ("/v1/batches", "/v1/feedback"):
        response = fed.http.post(
            f"{fed.matcher_url}{path}", content=big, headers={"content-type": "application/json"}
        )
        assert response.status_code == 413, (path, response.status_code)

    # Without a Content-Length (chunked), the body is counted as it arrives.
    def chunks() -> Iterator[bytes]:
        for _ in range(MATCHER_MAX_BYTES // 65536 + 2):
            yield b"x" * 65536

    response = fed.http.post(f"{fed.matcher_url}/v1/batches", content=chunks())
    assert response.status_code == 413
    node_big = b'{"pad": "' + b"x" * (NODE_MAX_BYTES + 10) + b'"}'
    response = fed.http.post(
        f"{fed.node_url(fed.a)}/v1/alerts",
        content=node_big,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 413
    assert fed.snapshot() == before


# --------------------------------------------------------------------------- a node's inbox


def test_positive_control_a_signed_alert_batch_is_taken_and_its_replay_refused(fed: Fed) -> None:
    url = f"{fed.node_url(fed.a)}/v1/alerts"
    envelope = signed(
        alert_batch_body(fed.a),
        kind="alert_batch",
        sender="matcher",
        recipient=fed.a,
        key=fed.keys["matcher"],
    )
    first = fed.http.post(url, json=envelope)
    assert first.status_code == 200, first.text
    refused_without_trace(fed, lambda: fed.http.post(url, json=envelope))


def test_forged_tampered_stale_and_cross_node_alerts_are_refused(fed: Fed) -> None:
    a, b = fed.a, fed.b
    mallory = Ed25519PrivateKey.generate()
    forged = alert_batch_body(a, [a_new_alert(a, b)])
    good = signed(
        alert_batch_body(a),
        kind="alert_batch",
        sender="matcher",
        recipient=a,
        key=fed.keys["matcher"],
    )
    cases: dict[str, dict[str, Any] | bytes] = {
        "unknown key claiming the matcher": signed(
            forged, kind="alert_batch", sender="matcher", recipient=a, key=mallory
        ),
        "another node's real key": signed(
            forged, kind="alert_batch", sender=b, recipient=a, key=fed.keys[b]
        ),
        "another node's key claiming the matcher": signed(
            forged, kind="alert_batch", sender="matcher", recipient=a, key=fed.keys[b]
        ),
        "the node's own key": signed(
            forged, kind="alert_batch", sender=a, recipient=a, key=fed.keys[a]
        ),
        "tampered body": resign_with(good, body=forged),
        "tampered recipient": resign_with(good, recipient=b),
        "stale": signed(
            forged,
            kind="alert_batch",
            sender="matcher",
            recipient=a,
            key=fed.keys["matcher"],
            now=time.time() - 3600,
        ),
        "from the future": signed(
            forged,
            kind="alert_batch",
            sender="matcher",
            recipient=a,
            key=fed.keys["matcher"],
            now=time.time() + 3600,
        ),
        "a single alert with a forged key": signed(
            a_new_alert(a, b), kind="alert", sender="matcher", recipient=a, key=mallory
        ),
        "a token batch": signed(
            batch_body(a),
            kind="token_batch",
            sender="matcher",
            recipient=a,
            key=fed.keys["matcher"],
        ),
        "not JSON": b"{{{{",
        "deeply nested": b"[" * 100_000 + b"]" * 100_000,
    }
    before = fed.snapshot()
    url = f"{fed.node_url(a)}/v1/alerts"
    for case, payload in cases.items():
        if isinstance(payload, bytes):
            response = fed.http.post(
                url, content=payload, headers={"content-type": "application/json"}
            )
        else:
            response = fed.http.post(url, json=payload)
        try:
            assert_refused(response)
        except AssertionError as e:
            raise AssertionError(f"{case}: {e}") from None
    assert fed.snapshot() == before


def test_a_node_never_takes_alerts_meant_for_another_county(fed: Fed) -> None:
    a, b = fed.a, fed.b
    matcher = fed.keys["matcher"]
    # A genuine message to county a, captured and replayed to county b.
    to_a = signed(
        alert_batch_body(a, [a_new_alert(a, b)]),
        kind="alert_batch",
        sender="matcher",
        recipient=a,
        key=matcher,
    )
    # Signed by the matcher for b, with an alert about a's records inside (a buggy matcher).
    about_a = signed(
        alert_batch_body(b, [a_new_alert(a, b)]),
        kind="alert_batch",
        sender="matcher",
        recipient=b,
        key=matcher,
    )
    # Addressed to b, but the batch itself says it is for county a.
    batch_for_a = signed(
        alert_batch_body(a, [a_new_alert(a, b)]),
        kind="alert_batch",
        sender="matcher",
        recipient=b,
        key=matcher,
    )
    url = f"{fed.node_url(b)}/v1/alerts"
    for envelope in (to_a, about_a, batch_for_a):
        refused_without_trace(fed, functools.partial(fed.http.post, url, json=envelope))


# --------------------------------------------------------------------------- admin endpoints


def _bad_credentials(fed: Fed, party: str) -> dict[str, dict[str, str]]:
    other = fed.b if party != fed.b else fed.a
    right = fed.admin(party)["Authorization"].removeprefix("Bearer ")
    return {
        "none": {},
        "scheme without a token": {"Authorization": "Bearer"},
        "wrong token": {"Authorization": f"Bearer {secrets.token_urlsafe(24)}"},
        "another party's token": fed.admin(other if party != "matcher" else fed.a),
        "right token, wrong scheme": {"Authorization": f"Token {right}"},
        "right token as basic auth": {
            "Authorization": "Basic " + base64.b64encode(f"admin:{right}".encode()).decode()
        },
        "a prefix of the right token": {"Authorization": f"Bearer {right[:-1]}"},
    }


def test_admin_endpoints_refuse_without_the_right_token(fed: Fed) -> None:
    endpoints: list[tuple[str, str, str, dict[str, Any]]] = [
        ("matcher", "GET", "/v1/admin/status", {}),
        ("matcher", "GET", "/v1/admin/labels", {}),
        ("matcher", "POST", "/v1/admin/relink", {}),
        ("matcher", "POST", "/v1/admin/relink?retrain=not-a-boolean", {}),
        (fed.a, "GET", "/v1/status", {}),
        (fed.a, "GET", "/v1/alerts", {}),
        (fed.a, "GET", "/v1/alerts?kind=not-a-kind&since=yesterday", {}),
        (fed.a, "POST", "/v1/admin/ingest", {"json": {"path": "/etc/passwd"}}),
        (fed.a, "POST", "/v1/admin/ingest", {"content": b"not json"}),
        (
            fed.a,
            "POST",
            f"/v1/alerts/{fed.alerts[fed.a][0]['alert_id']}/feedback",
            {"json": {"decision": "same"}},
        ),
        (fed.a, "POST", "/v1/alerts/not-an-alert/feedback", {"json": {"decision": "nonsense"}}),
        (
            fed.a,
            "POST",
            "/v1/admin/users",
            {"json": {"username": "mallory", "password": secrets.token_urlsafe(16)}},
        ),
    ]
    before = fed.snapshot()
    for party, method, path, kwargs in endpoints:
        base = fed.matcher_url if party == "matcher" else fed.node_url(party)
        for case, headers in _bad_credentials(fed, party).items():
            response = fed.http.request(method, f"{base}{path}", headers=headers, **kwargs)
            try:
                assert_refused(response)
            except AssertionError as e:
                raise AssertionError(f"{party} {method} {path} with {case}: {e}") from None
    assert fed.snapshot() == before


def test_metrics_ask_for_their_own_token_when_one_is_set(fed: Fed) -> None:
    for party in ("matcher", fed.a):
        url = f"{fed.matcher_url if party == 'matcher' else fed.node_url(party)}/metrics"
        wrong = {
            "none": {},
            "wrong token": {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"},
            # The admin token is another credential: a scraper never needs it.
            "the admin token": fed.admin(party),
            "right token, wrong scheme": {"Authorization": f"Token {METRICS_TOKEN}"},
            "a prefix of the right token": {"Authorization": f"Bearer {METRICS_TOKEN[:-1]}"},
        }
        for case, headers in wrong.items():
            try:
                assert_refused(fed.http.get(url, headers=headers))
            except AssertionError as e:
                raise AssertionError(f"{party} /metrics with {case}: {e}") from None
        scraped = fed.http.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert scraped.status_code == 200
        assert "# TYPE jigsaw_" in scraped.text


# --------------------------------------------------------------------------- rate limit


def test_forging_a_nodes_id_does_not_use_up_its_allowance(fed: Fed) -> None:
    mallory = Ed25519PrivateKey.generate()
    url = f"{fed.matcher_url}/v1/batches"
    for _ in range(2 * REQUESTS_PER_MINUTE):
        envelope = signed(
            batch_body(fed.b), kind="token_batch", sender=fed.b, recipient="matcher", key=mallory
        )
        assert_refused(fed.http.post(url, json=envelope))
    genuine = signed(
        batch_body(fed.b),
        kind="token_batch",
        sender=fed.b,
        recipient="matcher",
        key=fed.keys[fed.b],
    )
    assert fed.http.post(url, json=genuine).status_code == 200


def test_a_sender_over_its_allowance_gets_429_with_retry_after(fed: Fed) -> None:
    url = f"{fed.matcher_url}/v1/batches"
    before = fed.snapshot()["batches"]

    def send(county: str) -> httpx.Response:
        envelope = signed(
            batch_body(county),
            kind="token_batch",
            sender=county,
            recipient="matcher",
            key=fed.keys[county],
        )
        return fed.http.post(url, json=envelope)

    statuses = []
    limited: httpx.Response | None = None
    # The bucket refills while the loop runs, so a slow machine needs more than its size.
    for _ in range(4 * REQUESTS_PER_MINUTE):
        response = send(fed.b)
        statuses.append(response.status_code)
        if response.status_code == 429:
            limited = response
            break
    assert limited is not None, f"never limited: {statuses}"
    assert set(statuses[:-1]) == {200}
    assert limited.json() == {"detail": "too many requests"}
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 60 / REQUESTS_PER_MINUTE + 1
    # Only the accepted batches were stored.
    assert fed.snapshot()["batches"] == before + len(statuses) - 1
    # Another county has its own allowance.
    assert send(fed.a).status_code == 200
    # And the limited county gets through again once the bucket has refilled.
    time.sleep(retry_after)
    assert send(fed.b).status_code == 200


def test_token_bucket_allows_a_burst_then_the_configured_rate() -> None:
    now = [100.0]
    limiter = SenderRateLimiter(per_minute=60, burst=3, clock=lambda: now[0])
    for _ in range(3):
        limiter.check("a")
    with pytest.raises(RateLimited) as caught:
        limiter.check("a")
    assert caught.value.retry_after == pytest.approx(1.0)
    assert caught.value.retry_after_header == "1"
    limiter.check("b")  # every sender has its own bucket
    now[0] += 0.5
    with pytest.raises(RateLimited) as caught:
        limiter.check("a")  # a refused request takes nothing
    assert caught.value.retry_after == pytest.approx(0.5)
    now[0] += 0.5
    limiter.check("a")
    now[0] += 3600
    for _ in range(3):  # refills up to the burst, not beyond
        limiter.check("a")
    with pytest.raises(RateLimited):
        limiter.check("a")


def test_rate_limit_can_be_switched_off_and_keeps_few_buckets() -> None:
    off = SenderRateLimiter(per_minute=0)
    for _ in range(1000):
        off.check("a")
    small = SenderRateLimiter(per_minute=60, max_senders=2)
    for sender in ("a", "b", "c", "d"):
        small.check(sender)
    assert len(small._buckets) == 2
