"""Signed envelopes: round trip, every refusal, nonce handling, persistent nonce store."""

from __future__ import annotations

import base64
import copy
import math
import pickle
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.errors import AUTH_REFUSED_MESSAGE, AuthError, FederationError
from federation.signing import (
    DEFAULT_MAX_SKEW_SECONDS,
    DuckDBNonceStore,
    MemoryNonceStore,
    SignedEnvelope,
    VerifiedMessage,
    canonical_bytes,
    require_sender_is,
    sign,
    verify,
)

NOW = 1_767_225_600.0  # a fixed clock, so tests never depend on the machine's time
NODE_KEY = Ed25519PrivateKey.generate()
MATCHER_KEY = Ed25519PrivateKey.generate()
OTHER_KEY = Ed25519PrivateKey.generate()
PUBLIC_KEYS = {"northshire": NODE_KEY.public_key(), "matcher": MATCHER_KEY.public_key()}
BODY = {"county": "northshire", "batch_id": "b-1", "tokens": [{"t": "abc", "w": 1.5}]}


def _envelope(**overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "kind": "token_batch",
        "sender": "northshire",
        "recipient": "matcher",
        "private_key": NODE_KEY,
        "now": NOW,
    }
    args.update(overrides)
    body = args.pop("body", BODY)
    return sign(body, **args)


def _verify(
    envelope: Any, store: MemoryNonceStore | None = None, **overrides: Any
) -> VerifiedMessage:
    args: dict[str, Any] = {
        "expected_kind": "token_batch",
        "recipient": "matcher",
        "public_keys": PUBLIC_KEYS,
        "nonces": store if store is not None else MemoryNonceStore(),
        "now": NOW,
    }
    args.update(overrides)
    return verify(envelope, **args)


# --------------------------------------------------------------------------- canonical form


def test_canonical_bytes_is_compact_sorted_utf8() -> None:
    a = canonical_bytes({"b": 1, "a": [1, 2.5, None, True], "é": "Zoë"})
    b = canonical_bytes({"é": "Zoë", "a": [1, 2.5, None, True], "b": 1})
    assert a == b
    assert a == '{"a":[1,2.5,null,true],"b":1,"é":"Zoë"}'.encode()


@pytest.mark.parametrize(
    "bad", [math.nan, math.inf, -math.inf, {"x": [math.nan]}, {1: "a"}, {"x": object()}]
)
def test_canonical_bytes_rejects_values_without_a_canonical_form(bad: Any) -> None:
    with pytest.raises(ValueError):
        canonical_bytes(bad)


# --------------------------------------------------------------------------- round trip


def test_sign_verify_round_trip() -> None:
    envelope = _envelope()
    assert set(envelope) == {
        "version",
        "sender",
        "recipient",
        "kind",
        "timestamp",
        "nonce",
        "body",
        "signature",
    }
    assert envelope["version"] == 1
    assert len(envelope["nonce"]) == 32
    assert len(base64.b64decode(envelope["signature"])) == 64
    message = _verify(envelope)
    assert message == VerifiedMessage(
        sender="northshire", kind="token_batch", timestamp=NOW, nonce=envelope["nonce"], body=BODY
    )


def test_envelope_survives_json_round_trip_and_parse() -> None:
    import json

    envelope = json.loads(json.dumps(_envelope()))
    assert SignedEnvelope.parse(envelope).to_dict() == envelope
    _verify(envelope)


def test_nonces_are_fresh_each_time() -> None:
    assert _envelope()["nonce"] != _envelope()["nonce"]


def test_sign_rejects_bad_identifiers_and_bodies() -> None:
    with pytest.raises(ValueError):
        _envelope(sender="North Shire")
    with pytest.raises(ValueError):
        _envelope(body={"x": math.nan})


def test_verify_defaults_to_the_real_clock() -> None:
    envelope = sign(
        BODY, kind="ack", sender="matcher", recipient="northshire", private_key=MATCHER_KEY
    )
    message = verify(
        envelope,
        expected_kind="ack",
        recipient="northshire",
        public_keys=PUBLIC_KEYS,
        nonces=MemoryNonceStore(),
    )
    assert message.sender == "matcher"


# --------------------------------------------------------------------------- refusals


def _tamper_body(e: dict[str, Any]) -> None:
    e["body"]["batch_id"] = "b-2"


def _tamper_header(e: dict[str, Any]) -> None:
    e["timestamp"] = e["timestamp"] + 1.0


def _tamper_nonce(e: dict[str, Any]) -> None:
    e["nonce"] = "0" * 32


def _wrong_key(e: dict[str, Any]) -> None:
    e.update(_envelope(private_key=OTHER_KEY))


def _unknown_sender(e: dict[str, Any]) -> None:
    e.update(_envelope(sender="eastvale", private_key=OTHER_KEY))


def _wrong_recipient(e: dict[str, Any]) -> None:
    e.update(_envelope(recipient="southmoor"))


def _wrong_kind(e: dict[str, Any]) -> None:
    e.update(_envelope(kind="feedback"))


def _stale(e: dict[str, Any]) -> None:
    e.update(_envelope(now=NOW - DEFAULT_MAX_SKEW_SECONDS - 1))


def _future(e: dict[str, Any]) -> None:
    e.update(_envelope(now=NOW + DEFAULT_MAX_SKEW_SECONDS + 1))


def _missing_field(e: dict[str, Any]) -> None:
    del e["nonce"]


def _extra_field(e: dict[str, Any]) -> None:
    e["admin"] = True


def _bool_version(e: dict[str, Any]) -> None:
    e["version"] = True


def _version_2(e: dict[str, Any]) -> None:
    e["version"] = 2


def _string_timestamp(e: dict[str, Any]) -> None:
    e["timestamp"] = str(e["timestamp"])


def _huge_timestamp(e: dict[str, Any]) -> None:
    e["timestamp"] = 10**400


def _short_nonce(e: dict[str, Any]) -> None:
    e["nonce"] = "abc"


def _list_body(e: dict[str, Any]) -> None:
    e["body"] = [1, 2]


def _nan_body(e: dict[str, Any]) -> None:
    e["body"]["x"] = math.nan


def _bad_base64(e: dict[str, Any]) -> None:
    e["signature"] = "not base64!"


def _short_signature(e: dict[str, Any]) -> None:
    e["signature"] = base64.b64encode(b"x" * 63).decode()


def _sender_not_str(e: dict[str, Any]) -> None:
    e["sender"] = ["northshire"]


REFUSALS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "tampered body": (_tamper_body, "bad signature"),
    "tampered header": (_tamper_header, "bad signature"),
    "tampered nonce": (_tamper_nonce, "bad signature"),
    "wrong key": (_wrong_key, "bad signature"),
    "unknown sender": (_unknown_sender, "unknown sender"),
    "wrong recipient": (_wrong_recipient, "wrong recipient"),
    "wrong kind": (_wrong_kind, "wrong kind"),
    "stale": (_stale, "stale"),
    "future": (_future, "future"),
    "missing field": (_missing_field, "malformed"),
    "extra field": (_extra_field, "malformed"),
    "bool version": (_bool_version, "malformed"),
    "version 2": (_version_2, "unsupported envelope version"),
    "string timestamp": (_string_timestamp, "malformed"),
    "huge timestamp": (_huge_timestamp, "malformed"),
    "short nonce": (_short_nonce, "malformed"),
    "list body": (_list_body, "malformed"),
    "NaN body": (_nan_body, "malformed"),
    "bad base64": (_bad_base64, "malformed"),
    "short signature": (_short_signature, "malformed"),
    "sender not str": (_sender_not_str, "malformed"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_each_refusal_is_a_uniform_auth_error_with_a_specific_reason(case: str) -> None:
    mutate, reason = REFUSALS[case]
    envelope = copy.deepcopy(_envelope())
    mutate(envelope)
    store = MemoryNonceStore()
    with pytest.raises(AuthError) as info:
        _verify(envelope, store)
    assert str(info.value) == AUTH_REFUSED_MESSAGE
    assert repr(info.value) == repr(AuthError("anything"))
    assert reason in info.value.reason
    assert isinstance(info.value, FederationError)
    # A refused message never spends a nonce.
    assert len(store) == 0


def test_non_mapping_envelope_is_refused() -> None:
    with pytest.raises(AuthError, match=r"^request refused$") as info:
        _verify(["not", "an", "envelope"])
    assert "malformed" in info.value.reason


def test_refusal_messages_are_identical_whatever_the_cause() -> None:
    texts = set()
    for mutate, _ in REFUSALS.values():
        envelope = copy.deepcopy(_envelope())
        mutate(envelope)
        with pytest.raises(AuthError) as info:
            _verify(envelope)
        texts.add(str(info.value))
    assert texts == {"request refused"}


def test_bad_signature_is_translated_from_cryptography() -> None:
    envelope = _envelope()
    _tamper_body(envelope)
    with pytest.raises(AuthError) as info:
        _verify(envelope)
    assert isinstance(info.value.__cause__, InvalidSignature)


def test_timestamps_at_the_edge_of_the_skew_are_accepted() -> None:
    _verify(_envelope(now=NOW - DEFAULT_MAX_SKEW_SECONDS))
    _verify(_envelope(now=NOW + DEFAULT_MAX_SKEW_SECONDS))
    _verify(_envelope(now=NOW - 5), max_skew=10)
    with pytest.raises(AuthError):
        _verify(_envelope(now=NOW - 11), max_skew=10)


def test_auth_error_keeps_its_reason_across_pickling() -> None:
    error = pickle.loads(pickle.dumps(AuthError("bad signature")))
    assert isinstance(error, AuthError)
    assert error.reason == "bad signature"
    assert str(error) == "request refused"


# --------------------------------------------------------------------------- nonces


def test_replay_is_refused() -> None:
    store = MemoryNonceStore()
    envelope = _envelope()
    _verify(envelope, store)
    with pytest.raises(AuthError) as info:
        _verify(envelope, store)
    assert "replayed" in info.value.reason
    assert str(info.value) == "request refused"


def test_a_bad_signature_does_not_burn_the_nonce() -> None:
    store = MemoryNonceStore()
    genuine = _envelope()
    forged = copy.deepcopy(genuine)
    forged["body"]["batch_id"] = "evil"
    with pytest.raises(AuthError, match="request refused"):
        _verify(forged, store)
    # The attacker copied the genuine nonce first; the genuine message must still pass.
    assert _verify(genuine, store).body == BODY


def test_a_stale_message_does_not_enter_the_store() -> None:
    store = MemoryNonceStore()
    with pytest.raises(AuthError):
        _verify(_envelope(now=NOW - 10_000), store)
    assert len(store) == 0


def test_same_nonce_from_different_senders_is_not_a_replay() -> None:
    store = MemoryNonceStore()
    assert store.check_and_remember("northshire", "a" * 32, NOW)
    assert store.check_and_remember("southmoor", "a" * 32, NOW)
    assert not store.check_and_remember("northshire", "a" * 32, NOW)


def test_memory_store_forgets_old_nonces_and_refuses_what_it_cannot_judge() -> None:
    store = MemoryNonceStore(max_skew=10)
    assert store.check_and_remember("n", "a" * 32, NOW)
    assert store.check_and_remember("n", "b" * 32, NOW + 21)  # NOW is now beyond 2*skew
    assert len(store) == 1
    # A message from before the horizon cannot be judged, so it is refused.
    assert not store.check_and_remember("n", "c" * 32, NOW)


def test_duckdb_nonce_store_survives_reopening(tmp_path: Path) -> None:
    db = tmp_path / "matcher.duckdb"
    envelope = _envelope()
    conn = duckdb.connect(str(db))
    store = DuckDBNonceStore(conn, lock=threading.Lock(), table="nonces")
    verify(
        envelope,
        expected_kind="token_batch",
        recipient="matcher",
        public_keys=PUBLIC_KEYS,
        nonces=store,
        now=NOW,
    )
    conn.close()

    conn = duckdb.connect(str(db))
    store = DuckDBNonceStore(conn, table="nonces")
    with pytest.raises(AuthError) as info:
        verify(
            envelope,
            expected_kind="token_batch",
            recipient="matcher",
            public_keys=PUBLIC_KEYS,
            nonces=store,
            now=NOW,
        )
    assert "replayed" in info.value.reason
    # A fresh message still passes after the restart.
    verify(
        _envelope(),
        expected_kind="token_batch",
        recipient="matcher",
        public_keys=PUBLIC_KEYS,
        nonces=store,
        now=NOW,
    )
    conn.close()


def test_duckdb_nonce_store_prunes_old_entries() -> None:
    conn = duckdb.connect()
    store = DuckDBNonceStore(conn, max_skew=10)
    assert store.check_and_remember("n", "a" * 32, NOW)
    assert store.check_and_remember("n", "b" * 32, NOW + 100)
    assert store.prune() == 1
    assert not store.check_and_remember("n", "b" * 32, NOW + 100)
    assert not store.check_and_remember("n", "c" * 32, NOW)  # before the horizon


def test_duckdb_nonce_store_rejects_unsafe_table_names() -> None:
    with pytest.raises(ValueError):
        DuckDBNonceStore(duckdb.connect(), table='x"; DROP TABLE y; --')


# --------------------------------------------------------------------------- authorisation


def test_require_sender_is() -> None:
    message = _verify(_envelope())
    require_sender_is(message, "northshire")
    with pytest.raises(AuthError, match=r"^request refused$") as info:
        require_sender_is(message, "southmoor")
    assert "may not speak for" in info.value.reason


def test_require_sender_is_checks_body_claims() -> None:
    lying = _verify(_envelope(body={"county": "southmoor", "tokens": []}))
    with pytest.raises(AuthError, match=r"^request refused$"):
        require_sender_is(lying, "northshire")
    lying_node = _verify(_envelope(body={"node_id": "southmoor"}))
    with pytest.raises(AuthError):
        require_sender_is(lying_node, "northshire")
    # An alert from the matcher names the recipient county, not the sender.
    alert = verify(
        sign(
            {"county": "northshire"},
            kind="alert",
            sender="matcher",
            recipient="northshire",
            private_key=MATCHER_KEY,
            now=NOW,
        ),
        expected_kind="alert",
        recipient="northshire",
        public_keys=PUBLIC_KEYS,
        nonces=MemoryNonceStore(),
        now=NOW,
    )
    require_sender_is(alert, "matcher", body_fields=())


def test_signed_bytes_splice_equals_the_canonical_envelope() -> None:
    # sign() and verify() encode the body once and splice it in; that must be exactly the
    # canonical form of every signed field together.
    from federation.signing import SignedEnvelope, _signed_bytes

    envelope = SignedEnvelope.parse(_envelope())
    spliced = _signed_bytes(envelope, canonical_bytes(envelope.body))
    assert spliced == canonical_bytes(envelope._signed_fields())
