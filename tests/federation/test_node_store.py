"""The node store: records, outbox, alerts, feedback and status round trips, all-or-nothing."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from federation.errors import StoreError
from federation.node.store import LoadChanges, NodeStore
from federation.protocol import AlertBody, WithdrawalBody

NOW = 1_767_225_600.0


def _pseudonym(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _records(*ids: str, household: str | None = "h1") -> pd.DataFrame:
    return pd.DataFrame(
        {
            "record_id": list(ids),
            "pseudonym": [_pseudonym(i) for i in ids],
            "household_id": [household] * len(ids),
            "household": [_pseudonym(household) if household else None] * len(ids),
            "content_hash": ["c" * 64] * len(ids),
            "display": [json.dumps({"given_name": f"Name {i}"}) for i in ids],
        }
    )


def _load(
    load_id: str = "load1",
    *,
    inserts: pd.DataFrame | None = None,
    updates: pd.DataFrame | None = None,
    tombstones: tuple[str, ...] = (),
    quarantine: pd.DataFrame | None = None,
    messages: tuple[tuple[str, Any, str], ...] = (),
) -> LoadChanges:
    empty = _records().iloc[0:0]
    return LoadChanges(
        load_id=load_id,
        file_name="county.csv",
        started_at=NOW,
        counts={"input_rows": 3},
        inserts=empty if inserts is None else inserts,
        updates=empty if updates is None else updates,
        tombstones=list(tombstones),
        quarantine=pd.DataFrame(columns=["row_number", "record_id", "reason"])
        if quarantine is None
        else quarantine,
        messages=list(messages),
    )


def _alert(version: int = 1, **overrides: Any) -> AlertBody:
    data: dict[str, Any] = {
        "alert_id": "f" * 32,
        "version": version,
        "kind": "person",
        "county": "northshire",
        "cluster_id": "c-1",
        "pseudonym": _pseudonym("r1"),
        "other_counties": [
            {
                "county": "southmoor",
                "display_name": "Southmoor",
                "contact_name": "Duty desk",
                "contact_email": "duty@example.org",
                "contact_phone": "01632 960002",
            }
        ],
        "match_probability": 0.99,
        "explanation": [{"field": "dob", "level": "exact", "weight": 7.5}],
        "created_at": NOW,
    }
    data.update(overrides)
    return AlertBody.model_validate(data)


def _withdrawal(version: int) -> WithdrawalBody:
    return WithdrawalBody.model_validate(
        {"alert_id": "f" * 32, "version": version, "county": "northshire", "reason": "split"}
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStore]:
    s = NodeStore(tmp_path / "data" / "node.duckdb")
    yield s
    s.close()


def test_records_round_trip_and_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "node.duckdb"
    store = NodeStore(path)
    store.write_load(_load(inserts=_records("r1", "r2", "r3")), now=NOW)
    changed = _records("r2").assign(display=json.dumps({"given_name": "Changed"}))
    store.write_load(_load("load2", updates=changed, tombstones=("r3",)), now=NOW + 1)
    store.close()

    store = NodeStore(path)
    snap = store.records_snapshot().set_index("record_id")
    assert list(snap.index) == ["r1", "r2", "r3"]
    assert snap.loc["r2", "display"] == json.dumps({"given_name": "Changed"})
    assert snap.loc["r2", "pseudonym"] == _pseudonym("r2")
    assert snap["active"].tolist() == [True, True, False]
    assert store.status()["records"] == {"active": 2, "inactive": 1}
    store.close()
    assert not store.is_open
    with pytest.raises(StoreError):
        store.records_snapshot()


def test_a_failed_load_writes_nothing(store: NodeStore) -> None:
    store.write_load(_load(inserts=_records("r1")), now=NOW)
    # The second load's new record is fine but its message id repeats an earlier one: the
    # whole load, records included, must be rolled back.
    bad = _load(
        "load2",
        inserts=_records("r2"),
        messages=(("m1", "token_batch", "{}"), ("m1", "token_batch", "{}")),
    )
    with pytest.raises(StoreError):
        store.write_load(bad, now=NOW)
    assert store.records_snapshot()["record_id"].tolist() == ["r1"]
    assert store.pending() == []
    assert store.status()["last_load"]["load_id"] == "load1"


def test_quarantine_rows_are_kept_per_load(store: NodeStore) -> None:
    rows = pd.DataFrame(
        {"row_number": [4, 2], "record_id": ["r9", None], "reason": ["no name", "empty id"]}
    )
    store.write_load(_load(quarantine=rows), now=NOW)
    got = store.quarantine("load1")
    assert got["row_number"].tolist() == [2, 4]
    assert got["reason"].tolist() == ["empty id", "no name"]
    assert store.quarantine("other").empty


def test_outbox_keeps_order_and_tracks_attempts(store: NodeStore) -> None:
    messages = (("m1", "token_batch", '{"n": 1}'), ("m2", "token_batch", '{"n": 2}'))
    store.write_load(_load(messages=messages), now=NOW)
    pending = store.pending()
    assert [p.message_id for p in pending] == ["m1", "m2"]
    assert pending[0].seq < pending[1].seq
    assert store.message_body("m2") == '{"n": 2}'

    assert store.defer("m1", next_attempt_at=NOW + 5, error="HTTP 503") == 1
    assert store.defer("m1", next_attempt_at=NOW + 9, error="HTTP 503") == 2
    first = store.pending()[0]
    assert (first.attempts, first.next_attempt_at) == (2, NOW + 9)

    assert store.mark_acked("m1", now=NOW)
    assert not store.mark_acked("m1", now=NOW)  # already acked: not counted twice
    assert [p.message_id for p in store.pending()] == ["m2"]
    assert store.status()["outbox"]["pending"] == 1
    assert store.status()["outbox"]["acked"] == 1
    with pytest.raises(StoreError):
        store.message_body("nope")


def test_alert_versions_duplicates_and_withdrawal(store: NodeStore) -> None:
    store.write_load(_load(inserts=_records("r1")), now=NOW)
    assert store.store_alert(_alert(1), now=NOW) == "stored"
    assert store.store_alert(_alert(1), now=NOW) == "duplicate"
    assert store.store_alert(_alert(2, match_probability=0.5), now=NOW + 1) == "stored"
    assert store.store_alert(_alert(1), now=NOW + 2) == "duplicate"  # a late retry of v1

    [item] = store.inbox()
    assert (item["version"], item["status"]) == (2, "open")
    assert item["body"]["match_probability"] == 0.5
    assert item["received_at"] == NOW and item["updated_at"] == NOW + 1
    assert [r["record_id"] for r in item["records"]] == ["r1"]
    assert item["records"][0]["given_name"] == "Name r1"

    assert store.withdraw_alert(_withdrawal(2), now=NOW + 3) == "stored"
    assert store.withdraw_alert(_withdrawal(2), now=NOW + 3) == "duplicate"
    assert store.store_alert(_alert(2), now=NOW + 4) == "duplicate"  # does not reopen it
    [item] = store.inbox()
    assert (item["status"], item["reason"]) == ("withdrawn", "split")
    assert store.inbox(status="open") == []
    assert store.store_alert(_alert(3), now=NOW + 5) == "stored"
    assert store.inbox(status="open")[0]["version"] == 3
    assert store.status()["alerts"] == {"open": 1, "withdrawn": 0}


def test_a_withdrawal_before_its_alert_keeps_the_alert_hidden(store: NodeStore) -> None:
    assert store.withdraw_alert(_withdrawal(2), now=NOW) == "stored"
    assert store.inbox() == []
    assert not store.has_alert("f" * 32)
    assert store.store_alert(_alert(1), now=NOW) == "duplicate"
    assert store.inbox() == []


def test_family_alerts_show_the_household(store: NodeStore) -> None:
    store.write_load(_load(inserts=_records("r1", "r2")), now=NOW)
    store.write_load(_load("l2", inserts=_records("r3", household="h2")), now=NOW)
    family = _alert(kind="family", pseudonym=None, household=_pseudonym("h1"))
    store.store_alert(family, now=NOW)
    [item] = store.inbox(kind="family")
    assert [r["record_id"] for r in item["records"]] == ["r1", "r2"]
    assert store.inbox(kind="person") == []


def test_feedback_is_stored_with_its_message_atomically(store: NodeStore) -> None:
    assert not store.add_feedback(
        feedback_id="e" * 32, alert_id="f" * 32, decision="same", note="x", body="{}"
    )
    assert store.pending() == []
    store.store_alert(_alert(1), now=NOW)
    assert store.add_feedback(
        feedback_id="e" * 32,
        alert_id="f" * 32,
        decision="same",
        note="rang their duty desk",
        body='{"decision": "same"}',
        now=NOW,
    )
    [entry] = store.pending()
    assert (entry.message_id, entry.kind) == ("e" * 32, "feedback")
    assert "duty desk" not in store.message_body(entry.message_id)
    [item] = store.inbox()
    assert item["feedback"][0]["note"] == "rang their duty desk"
