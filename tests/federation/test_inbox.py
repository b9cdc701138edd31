"""The safeguarding lead's inbox: accounts, sessions, CSRF, pages, decisions and notices.

A node app with real keys (``init_federation``) is served by uvicorn on loopback; alerts are
signed with the matcher's key exactly as the matcher signs them. The matcher itself is a
stand-in that refuses everything, so decisions stay queued in the outbox. E-mail notices go to
a real SMTP server (aiosmtpd) on loopback.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email import message_from_bytes
from html import unescape
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
import uvicorn
from aiosmtpd.controller import Controller
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import FastAPI
from typer.testing import CliRunner

from federation.audit import AuditLog
from federation.cli import app as cli_app
from federation.errors import AuthError
from federation.keys import (
    init_federation,
    load_private_key,
    matcher_key_path,
    node_key_path,
    registry_path,
    secret_path,
)
from federation.node.accounts import (
    AccountError,
    AccountPolicy,
    Accounts,
    Argon2Params,
    add_user_to_database,
    sign_session_id,
    unsign_session_id,
)
from federation.node.app import create_app
from federation.node.notify import Notifier, inbox_url
from federation.node.store import NodeStore
from federation.settings import NodeSettings
from federation.signing import sign
from linkage.synthetic import generate_federation

NODE = "coventry"
OTHER = "warwickshire"
THIRD = "solihull"
ADMIN_TOKEN = "Zq8-mT3vLp6XwR2nKc9bHs4J"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
USER, PASSWORD = "lead", "correct horse battery staple"
FAST_HASH = Argon2Params(time_cost=1, memory_kib=8192, parallelism=1)


# --------------------------------------------------------------------------- fixtures


@dataclass
class Federation:
    directory: Path
    matcher_key: Ed25519PrivateKey

    def settings(self, data_dir: Path, **overrides: Any) -> NodeSettings:
        values: dict[str, Any] = {
            "node_id": NODE,
            "data_dir": data_dir,
            "registry": registry_path(self.directory),
            "private_key": node_key_path(self.directory, NODE),
            "secret": secret_path(self.directory),
            "admin_token": ADMIN_TOKEN,
            "tokenise_seed": 5,
            "publish_interval": 0.05,
            "retry_max_seconds": 60,
        }
        values.update(overrides)
        return NodeSettings(**values)


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    directory = tmp_path_factory.mktemp("inbox_federation")
    init_federation(
        directory,
        node_ids=[NODE, OTHER, THIRD],
        matcher_url="http://127.0.0.1:9",
        node_urls={n: "http://127.0.0.1:9" for n in (NODE, OTHER, THIRD)},
    )
    return Federation(directory, load_private_key(matcher_key_path(directory)))


@pytest.fixture(scope="module")
def export_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = next(iter(generate_federation(counties=2, records=120, seed=4).counties.values()))
    path = tmp_path_factory.mktemp("inbox_exports") / f"{NODE}.csv"
    frame.to_csv(path, index=False)
    return path


@dataclass
class Node:
    app: FastAPI
    client: httpx.Client
    federation: Federation
    export: pd.DataFrame

    @property
    def store(self) -> NodeStore:
        store: NodeStore = self.app.state.node.store
        return store

    def get_with_cookie(self, path: str, cookie: str) -> httpx.Response:
        """GET as another browser would, with no cookie but this one."""
        with httpx.Client(base_url=self.client.base_url, timeout=30) as other:
            return other.get(path, headers={"cookie": cookie})

    def records(self) -> pd.DataFrame:
        return self.store.records_snapshot().sort_values("record_id").reset_index(drop=True)

    def deliver(self, body: dict[str, Any], kind: str = "alert") -> None:
        envelope = sign(
            body,
            kind=kind,
            sender="matcher",
            recipient=NODE,
            private_key=self.federation.matcher_key,
        )
        response = self.client.post("/v1/alerts", json=envelope)
        assert response.status_code == 200, response.text

    def audit_events(self) -> list[tuple[str, str, dict[str, Any]]]:
        store = self.store
        with store.lock:
            rows = store.conn.execute(
                "SELECT event, actor, details FROM audit_log ORDER BY seq"
            ).fetchall()
        return [(e, a, json.loads(d)) for e, a, d in rows]


def _refuse_everything(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503)


@contextlib.contextmanager
def _serve(app: FastAPI) -> Iterator[str]:
    """Serve an app with uvicorn on a free loopback port; yield its base URL."""
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


@pytest.fixture
def node(
    federation: Federation, export_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Node]:
    # A cheaper hash for speed; the default's cost is exercised by the CLI test.
    monkeypatch.setattr("federation.node.inbox.PASSWORD_HASH", FAST_HASH)
    settings = federation.settings(tmp_path / "data")
    http = httpx.Client(transport=httpx.MockTransport(_refuse_everything))
    app = create_app(settings, client=http)
    with _serve(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        r = client.post("/v1/admin/ingest", json={"path": str(export_path)}, headers=ADMIN)
        assert r.status_code == 200, r.text
        r = client.post(
            "/v1/admin/users", json={"username": USER, "password": PASSWORD}, headers=ADMIN
        )
        assert r.status_code == 201, r.text
        export = pd.read_csv(export_path, dtype=str, keep_default_na=False)
        yield Node(app, client, federation, export)
    http.close()


def _alert(pseudonym: str | None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "schema": "alert/1",
        "alert_id": "a1" * 16,
        "version": 1,
        "kind": "person",
        "county": NODE,
        "cluster_id": "c-0001",
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
        "match_probability": 0.9973,
        "explanation": [
            {"field": "given_name", "level": "identical, a common name", "weight": 6.1},
            {"field": "family_name", "level": "very similar", "weight": 3.2},
            {"field": "date_of_birth", "level": "day and month swapped", "weight": 4.4},
            {"field": "nhs_number", "level": "identical", "weight": 9.1},
            {"field": "sex", "level": "identical", "weight": 1.0},
            {"field": "postcode", "level": "missing", "weight": 0.0},
        ],
        "reviews": [],
        "created_at": time.time(),
    }
    body.update(overrides)
    return body


def _login_token(html: str) -> str:
    match = re.search(r'name="login_token" value="([^"]+)"', html)
    assert match, "no login token in the sign-in form"
    return match.group(1)


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def _sign_in(
    client: httpx.Client, username: str = USER, password: str = PASSWORD, next_path: str = "/inbox"
) -> httpx.Response:
    page = client.get("/inbox/login")
    assert page.status_code == 200
    return client.post(
        "/inbox/login",
        data={
            "login_token": _login_token(page.text),
            "next": next_path,
            "username": username,
            "password": password,
        },
    )


def _person_alert(node: Node, **overrides: Any) -> tuple[dict[str, Any], pd.Series]:
    """A person alert about the first record that shares its household with others."""
    records = node.records()
    sizes = records.groupby("household_id")["record_id"].transform("count")
    record = records[sizes > 1].iloc[0]
    body = _alert(str(record["pseudonym"]), **overrides)
    node.deliver(body)
    return body, record


def _text(html: str) -> str:
    """A page's visible text, tags removed and spaces collapsed (for plain assertions)."""
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).replace(" :", ":").strip()
    return unescape(text)


# --------------------------------------------------------------------------- sign-in


def test_every_page_wants_a_session_and_refuses_alike(node: Node) -> None:
    body, _ = _person_alert(node)
    client = node.client
    refusals = [
        client.get("/inbox"),
        client.get(f"/inbox/alerts/{body['alert_id']}"),
        node.get_with_cookie("/inbox", f"jigsaw_session_{NODE}=forged.value"),
        client.post(f"/inbox/alerts/{body['alert_id']}/decision", data={"decision": "same"}),
        client.post("/inbox/logout", data={}),
    ]
    for response in refusals:
        assert response.status_code == 401
        assert "<h1>Sign in</h1>" in response.text
        assert 'name="password"' in response.text
        assert "Sign-in failed" not in response.text  # no hint of why
    # The sign-in form brings the person back where they were going.
    assert f'value="/inbox/alerts/{body["alert_id"]}"' in refusals[1].text
    # The JSON API keeps its own uniform refusal.
    assert client.get("/v1/alerts").json() == {"detail": "request refused"}


def test_signing_in_sets_a_strict_http_only_session_cookie(node: Node) -> None:
    response = _sign_in(node.client, next_path="/inbox?kind=person")
    assert response.status_code == 303
    assert response.headers["location"] == "/inbox?kind=person"
    cookie = next(
        c
        for c in response.headers.get_list("set-cookie")
        if c.startswith(f"jigsaw_session_{NODE}=")
    )
    attributes = {part.strip().lower() for part in cookie.split(";")}
    assert {"httponly", "samesite=strict", "path=/inbox"} <= attributes
    assert "secure" not in attributes  # plain HTTP here; TLS or inbox_secure_cookies sets it
    page = node.client.get("/inbox")
    assert page.status_code == 200
    assert "Signed in as lead" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp
    assert page.headers["cache-control"] == "no-store"
    assert "<script" not in page.text and "http" not in re.sub(r'href="/[^"]*"', "", page.text)
    events = [(e, a) for e, a, _ in node.audit_events()]
    assert ("inbox.signed_in", "user:lead") in events


def test_a_failed_sign_in_looks_the_same_whatever_the_cause_and_locks_out(node: Node) -> None:
    wrong = _sign_in(node.client, password="not the password at all")
    unknown = _sign_in(node.client, username="nobody")
    assert wrong.status_code == unknown.status_code == 401
    assert _text(wrong.text) == _text(unknown.text)
    assert "Sign-in failed" in wrong.text
    for _ in range(4):
        assert _sign_in(node.client, password="still wrong, again").status_code == 401
    # Five failures within the window: the right password no longer works, and says nothing.
    locked = _sign_in(node.client)
    assert locked.status_code == 401
    assert _text(locked.text) == _text(wrong.text)
    reasons = [d.get("reason") for e, _, d in node.audit_events() if e == "inbox.sign_in_refused"]
    assert reasons.count("locked out") == 1 and "unknown user" in reasons
    # An administrator resetting the password lifts the lock.
    r = node.client.post(
        "/v1/admin/users",
        json={"username": USER, "password": "a brand new passphrase", "replace": True},
        headers=ADMIN,
    )
    assert r.json() == {"username": USER, "status": "replaced"}
    assert _sign_in(node.client, password="a brand new passphrase").status_code == 303


def test_forms_without_their_tokens_are_refused_with_403(node: Node) -> None:
    client = node.client
    page = client.get("/inbox/login")
    token = _login_token(page.text)
    form = {"login_token": token, "username": USER, "password": PASSWORD, "next": "/inbox"}
    assert client.post("/inbox/login", data={**form, "login_token": "x" * 32}).status_code == 403
    evil = {"origin": "http://evil.example"}
    assert client.post("/inbox/login", data=form, headers=evil).status_code == 403
    assert client.post("/inbox/login", data=form).status_code == 303

    body, _ = _person_alert(node)
    url = f"/inbox/alerts/{body['alert_id']}/decision"
    csrf = _csrf(client.get(f"/inbox/alerts/{body['alert_id']}").text)
    no_token = client.post(url, data={"decision": "same"})
    wrong_token = client.post(url, data={"decision": "same", "csrf_token": "y" * 43})
    cross_site = client.post(url, data={"decision": "same", "csrf_token": csrf}, headers=evil)
    as_json = client.post(url, json={"decision": "same", "csrf_token": csrf})
    for response in (no_token, wrong_token, cross_site, as_json):
        assert response.status_code == 403
        assert "Request refused" in response.text
    assert node.store.inbox()[0]["feedback"] == []


def test_sign_in_never_redirects_off_site(node: Node) -> None:
    for target in ("https://evil.example/", "//evil.example/inbox", "/inbox\\@evil", "/v1/alerts"):
        response = _sign_in(node.client, next_path=target)
        assert response.headers["location"] == "/inbox", target


def test_signing_out_ends_the_session(node: Node) -> None:
    _sign_in(node.client)
    csrf = _csrf(node.client.get("/inbox").text)
    cookie = node.client.cookies.get(f"jigsaw_session_{NODE}")
    response = node.client.post("/inbox/logout", data={"csrf_token": csrf})
    assert (response.status_code, response.headers["location"]) == (303, "/inbox/login")
    # Even with the old cookie put back, the session is gone.
    assert node.get_with_cookie("/inbox", f"jigsaw_session_{NODE}={cookie}").status_code == 401


# --------------------------------------------------------------------------- pages


def test_the_inbox_lists_alerts_newest_first_with_filters_and_a_count(node: Node) -> None:
    records = node.records()
    first, second = records.iloc[0], records.iloc[1]
    older = _alert(str(first["pseudonym"]), alert_id="b1" * 16)
    node.deliver(older)
    time.sleep(0.01)
    newer = _alert(
        str(second["pseudonym"]),
        alert_id="b2" * 16,
        other_counties=[
            {
                "county": THIRD,
                "display_name": "Solihull",
                "contact_name": "Front door",
                "contact_email": "front.door@example.org",
                "contact_phone": "01632 960003",
            }
        ],
    )
    node.deliver(newer)
    family = _alert(
        None,
        alert_id="b3" * 16,
        kind="family",
        household=str(first["household"]),
        cluster_id="f-0001",
        explanation=[],
    )
    time.sleep(0.01)
    node.deliver(family)
    _sign_in(node.client)

    page = node.client.get("/inbox")
    text = _text(page.text)
    assert "3 alerts need your attention" in text
    assert "3 have not been opened yet" in text
    order = [m for m in re.findall(r'href="/inbox/alerts/([0-9a-f]+)"', page.text)]
    assert order == [family["alert_id"], newer["alert_id"], older["alert_id"]]
    assert json.loads(first["display"])["family_name"] in text  # the county's own record

    def shown(**params: str) -> list[str]:
        html = node.client.get("/inbox", params=params).text
        return re.findall(r'href="/inbox/alerts/([0-9a-f]+)"', html)

    assert shown(kind="family") == [family["alert_id"]]
    assert shown(kind="person", county=THIRD) == [newer["alert_id"]]
    assert shown(county=OTHER) == [family["alert_id"], older["alert_id"]]
    assert shown(status="withdrawn") == []
    assert shown(kind="nonsense", status="nonsense") == order  # unknown values are ignored
    # Every control has a label.
    for control in re.findall(r'<(?:select|input|textarea)[^>]*id="([^"]+)"', page.text):
        assert f'for="{control}"' in page.text, control


def test_an_alert_page_reidentifies_locally_and_explains_in_plain_english(node: Node) -> None:
    body, record = _person_alert(node)
    _sign_in(node.client)
    page = node.client.get(f"/inbox/alerts/{body['alert_id']}")
    assert page.status_code == 200
    text = _text(page.text)
    display = json.loads(record["display"])
    assert display["given_name"] in text and display["family_name"] in text
    dob = pd.Timestamp(display["date_of_birth"])
    assert f"{dob.day} {dob.strftime('%B %Y')}" in text
    # The household's other members, from the county's own records.
    records = node.records()
    members = records[
        (records["household_id"] == record["household_id"])
        & (records["record_id"] != record["record_id"])
    ]
    for member in members["display"]:
        assert json.loads(member)["given_name"] in text
    # The other county and who to call there.
    assert "Warwickshire" in text and "MASH duty desk" in text
    assert 'href="mailto:mash@example.org"' in page.text and 'href="tel:01632960002"' in page.text
    # Confidence in words and as a probability.
    assert "Very likely that this is the same child: probability 0.9973 (99.7%)" in text
    # The explanation, field by field, in plain English.
    assert "Family name: very similar (supports a match)" in text
    assert "Date of birth: day and month swapped (strong evidence of a match)" in text
    assert "NHS number: identical (strong evidence of a match)" in text
    assert "Given name: identical (a common name, so it counts for less)" in text
    assert "Sex: the same" in text
    assert "Postcode: not recorded by one of the counties (no evidence either way)" in text
    assert body["pseudonym"] not in page.text
    # Headings in order, one h1.
    levels = [int(h) for h in re.findall(r"<h([1-6])[\s>]", page.text)]
    assert levels.count(1) == 1 and all(b - a <= 1 for a, b in itertools.pairwise(levels))
    # Viewing it is audited, with the viewer, and the list no longer calls it new.
    assert ("alert.viewed", "user:lead", {"alert_id": body["alert_id"]}) in node.audit_events()
    assert "Needs attention" in node.client.get("/inbox").text
    assert node.client.get("/inbox/alerts/" + "f" * 32).status_code == 404
    assert node.client.get("/inbox/alerts/not-hex").status_code == 404


def test_a_decision_is_kept_with_its_note_and_queued_without_it(node: Node) -> None:
    body, _ = _person_alert(node)
    client = node.client
    _sign_in(client)
    url = f"/inbox/alerts/{body['alert_id']}"
    csrf = _csrf(client.get(url).text)
    note = "Spoke to Warwickshire MASH; same school, same GP."
    response = client.post(
        f"{url}/decision", data={"csrf_token": csrf, "decision": "same", "note": note}
    )
    assert response.status_code == 303
    assert response.headers["location"] == f"{url}?recorded=same"
    page = _text(client.get(response.headers["location"]).text)
    assert "Decision recorded" in page and "same child" in page
    assert note in page and "Waiting to send" in page and "lead" in page

    [row] = node.store.inbox()
    [decision] = row["feedback"]
    assert (decision["decision"], decision["note"]) == ("same", note)
    message = json.loads(node.store.message_body(decision["feedback_id"]))
    assert message == {
        "schema": "feedback/1",
        "feedback_id": decision["feedback_id"],
        "alert_id": body["alert_id"],
        "county": NODE,
        "decision": "same",
    }
    audit = node.audit_events()
    assert (
        "feedback.queued",
        "user:lead",
        {"feedback_id": decision["feedback_id"], "alert_id": body["alert_id"], "decision": "same"},
    ) in audit
    assert note not in json.dumps(audit)
    listing = _text(client.get("/inbox").text)
    assert "Nothing needs your attention" in listing
    assert "Reviewed: same child" in listing
    # A nonsense decision is not recorded.
    bad = client.post(f"{url}/decision", data={"csrf_token": csrf, "decision": "maybe"})
    assert bad.status_code == 400
    assert len(node.store.inbox()[0]["feedback"]) == 1


def test_other_counties_reviews_show_and_withdrawn_alerts_take_no_decision(node: Node) -> None:
    body, _ = _person_alert(node)
    reviewed = {**body, "version": 2, "reviews": [{"county": OTHER, "decision": "not_same"}]}
    node.deliver(reviewed)
    client = node.client
    _sign_in(client)
    assert "Reviewed by Warwickshire: not the same child" in _text(client.get("/inbox").text)
    elsewhere = client.get("/inbox", params={"status": "reviewed_elsewhere"}).text
    assert re.findall(r'href="/inbox/alerts/([0-9a-f]+)"', elsewhere) == [body["alert_id"]]
    url = f"/inbox/alerts/{body['alert_id']}"
    page = client.get(url)
    assert "Reviewed by Warwickshire: Not the same child" in _text(page.text)
    csrf = _csrf(page.text)

    withdrawal = {
        "schema": "withdrawal/1",
        "alert_id": body["alert_id"],
        "version": 3,
        "county": NODE,
        "reason": "record withdrawn",
    }
    node.deliver(withdrawal, kind="withdrawal")
    page = client.get(url)
    assert "no decision is needed" in page.text and 'name="decision"' not in page.text
    late = client.post(f"{url}/decision", data={"csrf_token": csrf, "decision": "same"})
    assert late.status_code == 409
    assert _text(client.get("/inbox", params={"status": "withdrawn"}).text).count("Withdrawn") >= 2


# --------------------------------------------------------------------------- accounts


@pytest.fixture
def accounts(tmp_path: Path) -> Iterator[Accounts]:
    store = NodeStore(tmp_path / "node.duckdb")
    policy = AccountPolicy(
        lockout_failures=3,
        lockout_window=60,
        session_idle=100,
        session_max=1000,
        password_hash=FAST_HASH,
    )
    yield Accounts(store, policy=policy)
    store.close()


def test_passwords_are_argon2id_and_rules_are_enforced(accounts: Accounts) -> None:
    assert accounts.add_user("alice", "a long enough passphrase") == "created"
    with accounts.store.lock:
        [(stored,)] = accounts.store.conn.execute(
            "SELECT password_hash FROM inbox_users"
        ).fetchall()
    assert stored.startswith("$argon2id$") and "passphrase" not in stored
    for username, password, rule in [
        ("Alice", "a long enough passphrase", "username"),
        ("bob", "short", "at least 12"),
        ("carol.lead", "carol.lead", "at least 12"),
        ("dave-the-lead", "Dave-The-Lead", "must not be the username"),
    ]:
        with pytest.raises(AccountError, match=rule) as error:
            accounts.add_user(username, password)
        assert password not in str(error.value)
    with pytest.raises(AccountError, match="already exists"):
        accounts.add_user("alice", "another long passphrase")
    assert accounts.usernames() == ["alice"]
    assert accounts.authenticate("  ALICE ", "a long enough passphrase") == "alice"


def test_lock_out_lifts_as_failures_age_out(accounts: Accounts) -> None:
    accounts.add_user("alice", "a long enough passphrase")
    for i in range(3):
        with pytest.raises(AuthError) as error:
            accounts.authenticate("alice", "wrong", now=1000 + i)
        assert error.value.reason == "wrong password" and str(error.value) == "request refused"
    with pytest.raises(AuthError) as error:
        accounts.authenticate("alice", "a long enough passphrase", now=1010)
    assert error.value.reason == "locked out"
    # 60 s after the failures, the lock has lifted; success clears the count.
    assert accounts.authenticate("alice", "a long enough passphrase", now=1071) == "alice"
    with accounts.store.lock:
        stored = accounts.store.conn.execute("SELECT who FROM inbox_login_failures").fetchall()
    assert all("alice" not in str(row) for row in stored)


def test_sessions_expire_when_idle_or_old_and_cookies_are_signed(accounts: Accounts) -> None:
    accounts.add_user("alice", "a long enough passphrase")
    session = accounts.create_session("alice", now=0)
    assert accounts.session(session.session_id, now=90) is not None
    assert accounts.session(session.session_id, now=185) is not None  # idle clock restarted
    assert accounts.session(session.session_id, now=300) is None  # idle 115 s
    old = accounts.create_session("alice", now=0)
    for t in range(90, 1000, 90):
        assert accounts.session(old.session_id, now=t) is not None
    assert accounts.session(old.session_id, now=1001) is None  # older than session_max
    with accounts.store.lock:
        stored = accounts.store.conn.execute("SELECT session_hash FROM inbox_sessions").fetchall()
    assert session.session_id not in str(stored)  # only hashes of ids are kept

    key = b"k" * 32
    cookie = sign_session_id(key, "abc123")
    assert unsign_session_id(key, cookie) == "abc123"
    assert unsign_session_id(b"j" * 32, cookie) is None
    assert unsign_session_id(key, "abc124" + cookie[6:]) is None
    assert unsign_session_id(key, "no-signature") is None


# --------------------------------------------------------------------------- adding users


def test_admin_api_adds_users_and_refuses_alike(node: Node) -> None:
    client = node.client
    new = {"username": "deputy", "password": "deputy's long passphrase"}
    for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token-xx"}):
        refused = client.post("/v1/admin/users", json=new, headers=headers)
        assert (refused.status_code, refused.json()) == (401, {"detail": "request refused"})
    weak = client.post(
        "/v1/admin/users", json={"username": "deputy", "password": "hunter2"}, headers=ADMIN
    )
    assert weak.status_code == 422 and "hunter2" not in weak.text
    assert client.post("/v1/admin/users", json=new, headers=ADMIN).status_code == 201
    again = client.post("/v1/admin/users", json=new, headers=ADMIN)
    assert again.status_code == 422 and "already exists" in again.text
    assert _sign_in(client, "deputy", new["password"]).status_code == 303


def test_cli_user_add_opens_a_stopped_nodes_store(federation: Federation, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        "\n".join(
            [
                f'node_id = "{NODE}"',
                f'data_dir = "{tmp_path / "data"}"',
                f'registry = "{registry_path(federation.directory)}"',
                f'private_key = "{node_key_path(federation.directory, NODE)}"',
                f'secret = "{secret_path(federation.directory)}"',
                f'admin_token = "{ADMIN_TOKEN}"',
            ]
        )
    )
    password_file = tmp_path / "password.txt"
    password_file.write_text("a passphrase from a file\n")
    runner = CliRunner()
    args = ["node", "user-add", "--config", str(config), "--password-file", str(password_file)]
    result = runner.invoke(cli_app, [*args, "alice"])
    assert result.exit_code == 0, result.output
    assert "User alice created" in result.output and "passphrase" not in result.output
    assert runner.invoke(cli_app, [*args, "alice"]).exit_code == 2  # exists: needs --replace
    prompted = runner.invoke(
        cli_app,
        ["node", "user-add", "--config", str(config), "bob"],
        input="typed at the prompt\ntyped at the prompt\n",
    )
    assert prompted.exit_code == 0, prompted.output
    store = NodeStore(tmp_path / "data" / "node.duckdb")
    try:
        accounts = Accounts(store)
        assert accounts.usernames() == ["alice", "bob"]
        assert accounts.authenticate("alice", "a passphrase from a file") == "alice"
        assert AuditLog(store.conn, lock=store.lock).verify().ok
    finally:
        store.close()
    # The rules hold however a user is added.
    with pytest.raises(AccountError):
        add_user_to_database(tmp_path / "x.duckdb", "x", "short")


# --------------------------------------------------------------------------- e-mail notices


class _Inbox:
    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(envelope.content)
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[int, _Inbox]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    handler = _Inbox()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, handler
    finally:
        controller.stop()


def test_new_alerts_send_one_notice_with_a_link_and_no_personal_data(
    node: Node, smtp: tuple[int, _Inbox], federation: Federation, tmp_path: Path
) -> None:
    port, mailbox = smtp
    settings = federation.settings(
        tmp_path / "data",
        smtp_host="127.0.0.1",
        smtp_port=port,
        notify_to=["safeguarding.team@example.org"],
        inbox_url="https://jigsaw.coventry.example/inbox",
    )
    notifier = Notifier(node.store, settings, county_name="Coventry", now=0)
    assert notifier.enabled
    body, record = _person_alert(node)
    assert notifier.check_once() is True
    assert notifier.check_once() is False  # nothing new since
    [raw] = mailbox.messages
    message = message_from_bytes(raw)
    assert message["To"] == "safeguarding.team@example.org"
    text = message.get_payload(decode=True).decode()
    assert "https://jigsaw.coventry.example/inbox" in text
    display = json.loads(record["display"])
    for value in [*display.values(), record["record_id"], body["alert_id"], body["pseudonym"]]:
        if value and len(str(value)) > 2:
            assert str(value) not in raw.decode(), "a notice must carry no personal data or ids"

    # When the SMTP server is down, nothing is marked notified, so the next look retries.
    node.deliver(_alert(str(node.records().iloc[5]["pseudonym"]), alert_id="c1" * 16))
    down = Notifier(
        node.store,
        federation.settings(
            tmp_path / "data", smtp_host="127.0.0.1", smtp_port=9, notify_to=["x@example.org"]
        ),
        county_name="Coventry",
    )
    with pytest.raises(OSError):
        down.check_once()
    assert notifier.check_once() is True
    assert len(mailbox.messages) == 2


def test_the_inbox_link_names_a_reachable_host(federation: Federation, tmp_path: Path) -> None:
    settings = federation.settings(tmp_path, port=8443)
    assert inbox_url(settings) == "http://127.0.0.1:8443/inbox"
    assert "0.0.0.0" not in inbox_url(federation.settings(tmp_path, host="0.0.0.0"))
    assert inbox_url(federation.settings(tmp_path, host="::1")).startswith("http://[::1]:")
    configured = federation.settings(tmp_path, inbox_url="https://jigsaw.example/inbox/")
    assert inbox_url(configured) == "https://jigsaw.example/inbox"
