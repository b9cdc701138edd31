"""Both services' OpenAPI specs, fuzzed: no generated request may get a server error.

Schemathesis drives ``create_app`` of the matcher and of a node in-process (its ASGI
integration runs their lifespans), with keys from ``init_federation`` in a temporary folder.
For every operation in each spec, it generates valid and invalid requests (path, query and
headers); each goes out twice: with the admin bearer token, so that the admin routes are
exercised past authentication, and without. Any 5xx fails the test. (The operations are
walked here with Schemathesis's Hypothesis strategies rather than its pytest decorators, whose
lazy, fixture-based loader does not work with pytest 9.2.)

The signed endpoints and the admin JSON endpoints read their bodies themselves (a signed
envelope must be verified before its body is validated), so the specs do not describe those
bodies; the last tests post arbitrary JSON and bytes to them with Hypothesis.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from federation.keys import (
    init_federation,
    matcher_key_path,
    node_key_path,
    registry_path,
    secret_path,
)
from federation.matcher.app import create_app as create_matcher
from federation.node.app import create_app as create_node
from federation.settings import MatcherSettings, NodeSettings

NODE = "northshire"
ADMIN_TOKEN = "sCh3m4-Th3s1s-Fuzz-7qLp2X"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("fuzz_keys")
    init_federation(
        directory,
        node_ids=[NODE, "southshire"],
        matcher_url="http://127.0.0.1:9",  # nothing listens: publishing fails and retries
        node_urls={NODE: "http://127.0.0.1:9", "southshire": "http://127.0.0.1:9"},
    )
    return directory


def _matcher_app(keys: Path, data_dir: Path) -> FastAPI:
    return create_matcher(
        MatcherSettings(
            data_dir=data_dir,
            registry=registry_path(keys),
            private_key=matcher_key_path(keys),
            admin_token=ADMIN_TOKEN,
            auto_link=False,
            requests_per_minute=1_000_000,
        )
    )


def _node_app(keys: Path, data_dir: Path) -> FastAPI:
    return create_node(
        NodeSettings(
            node_id=NODE,
            data_dir=data_dir,
            registry=registry_path(keys),
            private_key=node_key_path(keys, NODE),
            secret=secret_path(keys),
            admin_token=ADMIN_TOKEN,
            retry_max_seconds=0.5,
            requests_per_minute=1_000_000,
        )
    )


@pytest.fixture(scope="module")
def lifespans() -> Iterator[None]:
    """Stop the apps Schemathesis started (it keeps them running until the process exits);
    a shutdown that fails fails the test that used them."""
    yield
    from schemathesis.python.asgi import shutdown_lifespans

    shutdown_lifespans()


@pytest.fixture(scope="module")
def matcher_schema(keys: Path, tmp_path_factory: pytest.TempPathFactory, lifespans: None) -> Any:
    app = _matcher_app(keys, tmp_path_factory.mktemp("fuzz_matcher"))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def node_schema(keys: Path, tmp_path_factory: pytest.TempPathFactory, lifespans: None) -> Any:
    app = _node_app(keys, tmp_path_factory.mktemp("fuzz_node"))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _fuzz(schema: Any) -> list[str]:
    """Run every operation of ``schema`` with generated requests; return their labels."""
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)
        strategy = operation.as_strategy(GenerationMode.POSITIVE)
        if operation.query or operation.path_parameters or operation.headers:
            strategy |= operation.as_strategy(GenerationMode.NEGATIVE)

        @given(case=strategy)
        @SETTINGS
        def check(case: Any) -> None:
            for headers in (ADMIN, {}):
                response = case.call(headers=headers)
                case.validate_response(response, checks=[not_a_server_error], headers=headers)

        check()
    return labels


def test_the_matcher_never_answers_a_server_error(matcher_schema: Any) -> None:
    labels = _fuzz(matcher_schema)
    assert {"POST /v1/batches", "GET /v1/admin/status", "GET /metrics"} <= set(labels)


def test_a_node_never_answers_a_server_error(node_schema: Any) -> None:
    labels = _fuzz(node_schema)
    assert {"POST /v1/alerts", "GET /v1/alerts", "POST /v1/admin/ingest"} <= set(labels)


# --------------------------------------------------------------------------- undescribed bodies


@contextlib.contextmanager
def _serve(app: FastAPI) -> Iterator[httpx.Client]:
    """Serve an app with uvicorn on a free loopback port; yield a client for it."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started, "server did not start"
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30) as c:
            yield c
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@pytest.fixture(scope="module")
def served(keys: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    matcher_app = _matcher_app(keys, tmp_path_factory.mktemp("fuzz_matcher_http"))
    node_app = _node_app(keys, tmp_path_factory.mktemp("fuzz_node_http"))
    with _serve(matcher_app) as matcher_client, _serve(node_app) as node_client:
        yield {"matcher": matcher_client, "node": node_client}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=12,
)
# Envelope-shaped objects get further than random JSON before they are refused.
envelopes = st.fixed_dictionaries(
    {
        "kind": st.sampled_from(["token_batch", "feedback", "alert_batch", "ack", "alert"])
        | st.text(max_size=5),
        "sender": st.sampled_from([NODE, "southshire", "matcher"]) | st.text(max_size=5),
        "recipient": st.sampled_from([NODE, "matcher"]) | st.text(max_size=5),
        "timestamp": st.floats() | st.integers() | st.text(max_size=5),
        "nonce": st.text(max_size=40),
        "body": json_values,
        "signature": st.text(max_size=90),
    }
)
# The admin endpoints' bodies: paths and mappings, including ones no file system accepts.
paths = st.sampled_from(
    [
        "",
        "/",
        "/etc/passwd",
        "/dev/null",
        "/dev/zero.csv",
        ".csv",
        "x\x00.csv",
        "m\x00.toml",
        "/tmp/",
        "/proc/self/environ",
        "a" * 300 + ".csv",
        "b" * 300 + ".toml",
        "../" * 40 + "x.parquet",
    ]
)
ingest_bodies = st.fixed_dictionaries(
    {"path": paths | st.text(max_size=30)},
    optional={"mapping": paths | st.text(max_size=30), "note": st.text(max_size=5)},
)
admin_bodies = ingest_bodies | st.fixed_dictionaries(
    {"decision": st.sampled_from(["same", "not_same", "need_info", "maybe"])},
    optional={"note": st.text(max_size=50)},
)
bodies = (
    json_values.map(lambda v: ("json", v))
    | envelopes.map(lambda v: ("json", v))
    | admin_bodies.map(lambda v: ("json", v))
    | st.binary(max_size=200).map(lambda v: ("bytes", v))
)
TARGETS = [
    ("matcher", "/v1/batches"),
    ("matcher", "/v1/feedback"),
    ("node", "/v1/alerts"),
    ("node", "/v1/admin/ingest"),
    ("node", "/v1/alerts/0123456789abcdef/feedback"),
]


@pytest.mark.parametrize(("service", "route"), TARGETS)
@given(body=bodies, admin=st.booleans())
@SETTINGS
def test_arbitrary_bodies_get_a_client_error_not_a_server_error(
    served: dict[str, Any], service: str, route: str, body: tuple[str, Any], admin: bool
) -> None:
    kind, value = body
    headers = ADMIN if admin else {}
    client: httpx.Client = served[service]
    if kind == "json":  # json.dumps writes NaN and Infinity, as a careless client might
        headers = {**headers, "Content-Type": "application/json"}
        value = json.dumps(value).encode()
    response = client.post(route, content=value, headers=headers)
    assert response.status_code < 500, (route, response.status_code, response.text[:200])


@given(body=ingest_bodies)
@SETTINGS
def test_loads_of_any_path_are_refused_cleanly(
    served: dict[str, Any], body: dict[str, str]
) -> None:
    """A load names files on the node's machine: missing, unreadable, absurd or not
    nameable at all, the answer is a 4xx naming the problem."""
    response = served["node"].post("/v1/admin/ingest", json=body, headers=ADMIN)
    assert 400 <= response.status_code < 500, (body, response.status_code, response.text[:200])
