"""The hash-chained audit log: appends, and detection of each kind of tampering."""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pytest

from federation.audit import GENESIS_HASH, AuditHead, AuditLog, verify_audit_file
from federation.errors import StoreError

NOW = 1_767_225_600.0


@pytest.fixture
def conn() -> Iterator[duckdb.DuckDBPyConnection]:
    connection = duckdb.connect()
    yield connection
    connection.close()


def _filled(conn: duckdb.DuckDBPyConnection, n: int = 8) -> AuditLog:
    log = AuditLog(conn, lock=threading.Lock())
    for i in range(1, n + 1):
        seq = log.append(
            "batch.accepted",
            "northshire" if i % 2 else "southmoor",
            {"batch_id": f"b-{i}", "records": i * 10, "tokens": ["t1", "t2"]},
            now=NOW + i,
        )
        assert seq == i
    return log


def test_fresh_log_verifies(conn: duckdb.DuckDBPyConnection) -> None:
    log = AuditLog(conn)
    report = log.verify()
    assert report.ok and report.entries == 0 and report.problems == []
    assert log.head() == AuditHead(count=0, hash=GENESIS_HASH)


def test_appends_chain_and_verify(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn)
    report = log.verify()
    assert report.ok, report.problems
    assert report.entries == 8
    rows = conn.execute("SELECT seq, prev_hash, hash FROM audit_log ORDER BY seq").fetchall()
    assert rows[0][1] == GENESIS_HASH
    for (_, _, previous), (_, linked, _) in itertools.pairwise(rows):
        assert linked == previous
    assert log.head() == AuditHead(count=8, hash=rows[-1][2])


def test_append_uses_the_real_clock_by_default(conn: duckdb.DuckDBPyConnection) -> None:
    log = AuditLog(conn)
    log.append("service.started", "matcher", {})
    assert log.verify().ok


def test_details_with_personal_data_keys_are_refused(conn: duckdb.DuckDBPyConnection) -> None:
    log = AuditLog(conn)
    with pytest.raises(ValueError, match="personal data"):
        log.append("record.seen", "northshire", {"record_id": "r1", "family_name": "Smith"})
    with pytest.raises(ValueError, match="personal data"):
        log.append("record.seen", "northshire", {"records": [{"NHS_Number": "x"}]})
    with pytest.raises(ValueError):
        log.append("Bad Event", "northshire", {})
    with pytest.raises(ValueError):
        log.append("ok", "north shire", {})
    assert log.head().count == 0


def test_edited_entry_is_named(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn)
    conn.execute(
        "UPDATE audit_log SET details = ? WHERE seq = 4",
        [json.dumps({"batch_id": "b-4", "records": 9999, "tokens": ["t1", "t2"]})],
    )
    report = log.verify()
    assert not report.ok
    assert report.problems == ["seq 4: edited (contents do not match its hash)"]


def test_edited_actor_and_time_are_detected(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn)
    conn.execute("UPDATE audit_log SET actor = 'eastvale' WHERE seq = 2")
    conn.execute("UPDATE audit_log SET time = time + 1 WHERE seq = 7")
    assert log.verify().problems == [
        "seq 2: edited (contents do not match its hash)",
        "seq 7: edited (contents do not match its hash)",
    ]


def test_unparseable_details_count_as_edited(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn)
    conn.execute("UPDATE audit_log SET details = '{not json' WHERE seq = 3")
    assert log.verify().problems == ["seq 3: edited (contents do not match its hash)"]


def test_deleted_middle_entry_is_named(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn)
    conn.execute("DELETE FROM audit_log WHERE seq = 5")
    report = log.verify()
    assert report.entries == 7
    assert report.problems == ["seq 5: missing (deleted)"]
    conn.execute("DELETE FROM audit_log WHERE seq IN (2, 3)")
    assert log.verify().problems == ["seq 2-3: missing (deleted)", "seq 5: missing (deleted)"]


def test_deleted_last_entries_are_named(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn)
    conn.execute("DELETE FROM audit_log WHERE seq = 8")
    assert log.verify().problems == ["seq 8: missing (deleted from the end)"]
    conn.execute("DELETE FROM audit_log WHERE seq >= 6")
    assert log.verify().problems == ["seq 6-8: missing (deleted from the end)"]


def test_deleting_everything_is_detected(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn)
    conn.execute("DELETE FROM audit_log")
    report = log.verify()
    assert report.entries == 0
    assert report.problems == ["seq 1-8: missing (deleted from the end)"]


def test_swapped_pair_is_named(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn)
    conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = 5")
    conn.execute("UPDATE audit_log SET seq = 5 WHERE seq = 6")
    conn.execute("UPDATE audit_log SET seq = 6 WHERE seq = -1")
    assert log.verify().problems == [
        "seq 5: reordered (this entry was written as seq 6)",
        "seq 6: reordered (this entry was written as seq 5)",
    ]


def test_swapped_contents_are_named(conn: duckdb.DuckDBPyConnection) -> None:
    # Swapping only the visible columns (leaving the hashes in place) is an edit of both.
    log = _filled(conn)
    conn.execute(
        "UPDATE audit_log AS a SET actor = b.actor, details = b.details "
        "FROM audit_log AS b WHERE (a.seq, b.seq) IN ((2, 3), (3, 2))"
    )
    assert log.verify().problems == [
        "seq 2: edited (contents do not match its hash)",
        "seq 3: edited (contents do not match its hash)",
    ]


def test_replaced_entry_with_recomputed_hash_is_named(conn: duckdb.DuckDBPyConnection) -> None:
    from federation.audit import _entry_hash

    log = _filled(conn)
    seq, when, event, actor, prev = conn.execute(
        "SELECT seq, time, event, actor, prev_hash FROM audit_log WHERE seq = 3"
    ).fetchone() or (0, 0.0, "", "", "")
    forged = {"batch_id": "b-3", "records": 0}
    conn.execute(
        "UPDATE audit_log SET details = ?, hash = ? WHERE seq = 3",
        [json.dumps(forged), _entry_hash(prev, seq, when, event, actor, forged)],
    )
    assert log.verify().problems == ["seq 3: edited (hash recomputed; seq 4 no longer links to it)"]


def test_replaced_last_entry_is_caught_by_the_anchor(conn: duckdb.DuckDBPyConnection) -> None:
    from federation.audit import _entry_hash

    log = _filled(conn)
    seq, when, event, actor, prev = conn.execute(
        "SELECT seq, time, event, actor, prev_hash FROM audit_log WHERE seq = 8"
    ).fetchone() or (0, 0.0, "", "", "")
    conn.execute(
        "UPDATE audit_log SET details = '{}', hash = ? WHERE seq = 8",
        [_entry_hash(prev, seq, when, event, actor, {})],
    )
    assert log.verify().problems == ["seq 8: edited (hash recomputed; differs from the anchor)"]


def test_external_head_catches_a_rewritten_anchor(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn, n=3)
    kept = log.head()
    assert log.verify(expected_head=kept).ok
    log.append("batch.accepted", "northshire", {"batch_id": "b-4"}, now=NOW + 4)
    assert log.verify(expected_head=kept).ok  # the log may grow past a kept head
    # Rewrite the whole log from scratch, anchor included: only the kept head shows it.
    conn.execute("DELETE FROM audit_log")
    conn.execute("DELETE FROM audit_log_head")
    conn.execute("INSERT INTO audit_log_head VALUES (1, 0, ?)", [GENESIS_HASH])
    for i in range(1, 4):
        log.append("batch.accepted", "northshire", {"batch_id": f"x-{i}"}, now=NOW + i)
    assert log.verify().ok
    assert log.verify(expected_head=kept).problems == [
        "seq 1-3: rewritten (hash differs from the externally kept head)"
    ]


def test_entries_added_behind_the_logs_back_are_named(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn, n=3)
    row = conn.execute("SELECT * FROM audit_log WHERE seq = 3").fetchone()
    assert row is not None
    conn.execute(
        "INSERT INTO audit_log VALUES (4, ?, ?, ?, ?, ?, ?)", [row[1], *row[2:5], row[6], row[6]]
    )
    problems = log.verify().problems
    assert "seq 4: edited (contents do not match its hash)" in problems
    assert "seq 4: not in the anchor (added outside the log)" in problems


def test_missing_anchor_is_reported_and_blocks_appends(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn, n=2)
    conn.execute("DELETE FROM audit_log_head")
    assert log.verify().problems == [
        "anchor missing: deletion of the last entries cannot be ruled out"
    ]
    with pytest.raises(StoreError, match="anchor"):
        log.append("x", "matcher", {})
    with pytest.raises(StoreError):
        log.head()
    # Reopening does not silently recreate the anchor.
    assert not AuditLog(conn).verify().ok


def test_appends_after_tail_deletion_do_not_hide_it(conn: duckdb.DuckDBPyConnection) -> None:
    log = _filled(conn, n=5)
    conn.execute("DELETE FROM audit_log WHERE seq = 5")
    assert log.append("batch.accepted", "northshire", {}, now=NOW + 6) == 6
    assert log.verify().problems == ["seq 5: missing (deleted)"]


def test_concurrent_appends_keep_the_chain(conn: duckdb.DuckDBPyConnection) -> None:
    log = AuditLog(conn)

    def work(actor: str) -> None:
        for i in range(20):
            log.append("batch.accepted", actor, {"i": i})

    threads = [threading.Thread(target=work, args=(f"n{k}",)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = log.verify()
    assert report.ok and report.entries == 80


def test_verify_audit_file_read_only_and_reopen(tmp_path: Path) -> None:
    db = tmp_path / "matcher.duckdb"
    conn = duckdb.connect(str(db))
    _filled(conn, n=4)
    conn.close()
    conn = duckdb.connect(str(db))
    log = AuditLog(conn)
    assert log.append("service.started", "matcher", {}, now=NOW + 10) == 5
    conn.close()

    report = verify_audit_file(db)
    assert report.ok and report.entries == 5

    conn = duckdb.connect(str(db))
    conn.execute("DELETE FROM audit_log WHERE seq = 2")
    conn.close()
    assert verify_audit_file(db).problems == ["seq 2: missing (deleted)"]


def test_verify_audit_file_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        verify_audit_file(tmp_path / "missing.duckdb")
    db = tmp_path / "empty.duckdb"
    duckdb.connect(str(db)).close()
    report = verify_audit_file(db)
    assert not report.ok and report.problems == ["no audit table 'audit_log'"]
    with pytest.raises(ValueError):
        verify_audit_file(db, table="x; DROP TABLE y")


def test_custom_table_name(conn: duckdb.DuckDBPyConnection) -> None:
    log = AuditLog(conn, table="node_audit")
    log.append("alert.shown", "northshire", {"alert_id": "a1"})
    assert log.verify().ok
    assert conn.execute("SELECT count(*) FROM node_audit_head").fetchone() == (1,)
