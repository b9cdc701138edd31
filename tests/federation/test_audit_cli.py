"""``jigsaw audit verify`` on copies of a node's DuckDB file, intact and tampered (issue 4).

The node's file is made by the node's own store and audit log, with the entries a node
writes (a load, alert batches, a clerical decision). Each test copies it, tampers with the copy
the way someone with the file and a DuckDB shell could (edit an entry, delete one, swap two,
rewrite one and recompute its hash, cut the tail), and runs the command line on the copy: each
kind of tampering is named and the exit code is 1; the untouched copy passes with 0.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from federation.audit import AuditLog, _entry_hash
from federation.cli import app
from federation.node.store import NodeStore

ENTRIES = 8
Tamper = Callable[[duckdb.DuckDBPyConnection], None]


@pytest.fixture(scope="module")
def node_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A node's DuckDB file with a realistic audit trail."""
    path = tmp_path_factory.mktemp("node") / "node.duckdb"
    store = NodeStore(path)
    log = AuditLog(store.conn, lock=store.lock)
    log.append("load.finished", "admin", {"load_id": "1f" * 8, "accepted": 312, "quarantined": 2})
    for i in range(ENTRIES - 2):
        log.append(
            "alerts.received",
            "matcher",
            {"batch_id": f"{i:032x}", "stored": 3 + i, "duplicates": 0},
        )
    log.append(
        "feedback.queued",
        "admin",
        {"feedback_id": "ab" * 16, "alert_id": "cd" * 16, "decision": "same"},
    )
    assert log.verify().ok
    store.close()
    return path


def tampered_copy(node_file: Path, tmp_path: Path, tamper: Tamper | None) -> Path:
    copy = tmp_path / "copy.duckdb"
    shutil.copy(node_file, copy)
    if tamper is not None:
        conn = duckdb.connect(str(copy))
        try:
            tamper(conn)
        finally:
            conn.close()
    return copy


def edit(conn: duckdb.DuckDBPyConnection) -> None:
    # Hide that a batch of alerts arrived: its count goes to zero.
    row = conn.execute("SELECT details FROM audit_log WHERE seq = 3").fetchone()
    assert row is not None
    details = json.loads(row[0])
    assert details["stored"] != 0
    details["stored"] = 0
    conn.execute(
        "UPDATE audit_log SET details = ? WHERE seq = 3",
        [json.dumps(details, sort_keys=True, separators=(",", ":"))],
    )


def delete(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute("DELETE FROM audit_log WHERE seq = 4")


def swap(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute("UPDATE audit_log SET seq = -1 WHERE seq = 5")
    conn.execute("UPDATE audit_log SET seq = 5 WHERE seq = 6")
    conn.execute("UPDATE audit_log SET seq = 6 WHERE seq = -1")


def rewrite_and_rehash(conn: duckdb.DuckDBPyConnection) -> None:
    # The careful forger: change an entry and recompute its hash so it seals again.
    row = conn.execute(
        "SELECT seq, time, event, actor, prev_hash FROM audit_log WHERE seq = 2"
    ).fetchone()
    assert row is not None
    details = {"batch_id": "0" * 32, "stored": 0, "duplicates": 0}
    new_hash = _entry_hash(row[4], row[0], row[1], row[2], row[3], details)
    conn.execute(
        "UPDATE audit_log SET details = ?, hash = ? WHERE seq = 2",
        ['{"batch_id":"' + "0" * 32 + '","duplicates":0,"stored":0}', new_hash],
    )


def cut_tail(conn: duckdb.DuckDBPyConnection) -> None:
    conn.execute(f"DELETE FROM audit_log WHERE seq >= {ENTRIES - 1}")


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (edit, "seq 3: edited"),
        (delete, "seq 4: missing (deleted)"),
        (swap, "reordered"),
        (rewrite_and_rehash, "seq 2: edited (hash recomputed"),
        (cut_tail, f"seq {ENTRIES - 1}-{ENTRIES}: missing (deleted from the end)"),
    ],
    ids=["edit", "delete", "swap", "rewrite-and-rehash", "cut-tail"],
)
def test_cli_detects_tampering(node_file: Path, tmp_path: Path, tamper: Tamper, named: str) -> None:
    copy = tampered_copy(node_file, tmp_path, tamper)
    result = CliRunner().invoke(app, ["audit", "verify", str(copy)])
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())  # the console may wrap long lines
    assert named in output
    assert "TAMPERED" in output


def test_cli_passes_an_intact_copy(node_file: Path, tmp_path: Path) -> None:
    copy = tampered_copy(node_file, tmp_path, None)
    result = CliRunner().invoke(app, ["audit", "verify", str(copy)])
    assert result.exit_code == 0, result.output
    assert f"{ENTRIES} entries; intact" in result.output


def test_installed_command_detects_a_swap(node_file: Path, tmp_path: Path) -> None:
    # Once through a real process, as an operator runs it.
    copy = tampered_copy(node_file, tmp_path, swap)
    done = subprocess.run(
        [sys.executable, "-m", "federation.cli", "audit", "verify", str(copy)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "reordered" in done.stdout + done.stderr


def test_the_copy_can_be_checked_while_the_node_holds_its_file(
    node_file: Path, tmp_path: Path
) -> None:
    # DuckDB lets one process write a file; the documented way to check a running node is a
    # copy. The original stays open for writing here while its copy is verified.
    live = tmp_path / "live.duckdb"
    shutil.copy(node_file, live)
    store = NodeStore(live)
    try:
        AuditLog(store.conn, lock=threading.RLock()).append("status.read", "admin", {})
        store.conn.execute("CHECKPOINT")
        copy = tmp_path / "copy.duckdb"
        shutil.copy(live, copy)
        result = CliRunner().invoke(app, ["audit", "verify", str(copy)])
        assert result.exit_code == 0, result.output
        assert f"{ENTRIES + 1} entries; intact" in result.output
    finally:
        store.close()


def test_cli_names_a_missing_file_without_a_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["audit", "verify", str(tmp_path / "none.duckdb")])
    assert result.exit_code == 2  # not 1: nothing was found tampered, there was nothing to read
    output = " ".join(result.output.split())
    assert "no such database file" in output and "Traceback" not in output
