"""The node's DuckDB store: the county's records, its outbox, its alert inbox and feedback.

One database file holds everything a node keeps, and one connection, serialised by one
re-entrant lock, talks to it (DuckDB connections are not safe to share between threads without
one). The nonce stores and the audit log share ``conn`` and ``lock``. Tables::

    records     record_id PK, pseudonym UNIQUE, household_id, household, content_hash,
                display (JSON: the county's own plaintext, shown only in its own inbox),
                active, updated_at, normalised (JSON: the normalised values the tokens are
                made from, kept so that a new key epoch can re-tokenise without an export)
    outbox      seq, message_id PK, kind (token_batch | feedback), body (JSON text),
                status (pending | acked), attempts, next_attempt_at, created_at, acked_at,
                last_error
    alerts      alert_id PK, version, kind, cluster_id, pseudonym, household, body (JSON),
                status (open | withdrawn), reason, received_at, updated_at
    feedback    feedback_id PK, alert_id, decision, note (never leaves the node), created_at
    quarantine  load_id, row_number, record_id, reason
    loads       load_id PK, file_name, started_at, finished_at, counts (JSON)
    key_epochs  epoch PK, started_at, records: each key epoch the node has published under
                (the newest is the current one)

Personal data lives in ``records.display``, ``records.normalised`` and ``feedback.note`` only
(record and household ids are the county's own references); ``outbox`` holds exactly what
will be sent: pseudonyms, keyed tokens, decisions. Records are never deleted: a
record removed from the county's export is marked inactive, so it keeps its pseudonym if it
comes back and its alerts can still be shown.

Every change that spans rows or tables runs in one transaction, so a crash leaves either all
of it or none. Times are seconds since the UTC epoch. DuckDB errors become
:class:`~federation.errors.StoreError`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import duckdb
import pandas as pd

from federation.errors import StoreError
from federation.protocol import AlertBody, WithdrawalBody
from linkage.relations import registered

__all__ = ["LoadChanges", "NodeStore", "OutboxEntry"]

MessageKind = Literal["token_batch", "feedback"]
StoreOutcome = Literal["stored", "duplicate"]

#: Columns of the records snapshot that ingest compares a new load with.
SNAPSHOT_COLUMNS = (
    "record_id",
    "pseudonym",
    "household_id",
    "household",
    "content_hash",
    "display",
    "active",
)
#: Columns of the frames given to :meth:`NodeStore.write_load` (new and updated records).
RECORD_COLUMNS = ("record_id", "pseudonym", "household_id", "household", "content_hash", "display")
#: A further column those frames may have: the normalised values as JSON (see ``records``).
NORMALISED_COLUMN = "normalised"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    record_id VARCHAR PRIMARY KEY,
    pseudonym VARCHAR NOT NULL UNIQUE,
    household_id VARCHAR,
    household VARCHAR,
    content_hash VARCHAR NOT NULL,
    display JSON NOT NULL,
    active BOOLEAN NOT NULL,
    updated_at DOUBLE NOT NULL
);
CREATE SEQUENCE IF NOT EXISTS outbox_seq;
CREATE TABLE IF NOT EXISTS outbox (
    seq BIGINT NOT NULL DEFAULT nextval('outbox_seq'),
    message_id VARCHAR PRIMARY KEY,
    kind VARCHAR NOT NULL CHECK (kind IN ('token_batch', 'feedback')),
    -- JSON text, but VARCHAR: DuckDB's JSON type re-parses megabytes of tokens on insert.
    body VARCHAR NOT NULL,
    status VARCHAR NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'acked')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE NOT NULL,
    created_at DOUBLE NOT NULL,
    acked_at DOUBLE,
    last_error VARCHAR
);
CREATE TABLE IF NOT EXISTS alerts (
    alert_id VARCHAR PRIMARY KEY,
    version INTEGER NOT NULL,
    kind VARCHAR,
    cluster_id VARCHAR,
    pseudonym VARCHAR,
    household VARCHAR,
    body JSON,
    status VARCHAR NOT NULL CHECK (status IN ('open', 'withdrawn')),
    reason VARCHAR,
    received_at DOUBLE NOT NULL,
    updated_at DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS feedback (
    feedback_id VARCHAR PRIMARY KEY,
    alert_id VARCHAR NOT NULL,
    decision VARCHAR NOT NULL,
    note VARCHAR NOT NULL,
    created_at DOUBLE NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    load_id VARCHAR NOT NULL,
    row_number BIGINT NOT NULL,
    record_id VARCHAR,
    reason VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS loads (
    load_id VARCHAR PRIMARY KEY,
    file_name VARCHAR NOT NULL,
    started_at DOUBLE NOT NULL,
    finished_at DOUBLE NOT NULL,
    counts JSON NOT NULL
);
ALTER TABLE records ADD COLUMN IF NOT EXISTS normalised VARCHAR;
CREATE TABLE IF NOT EXISTS key_epochs (
    epoch INTEGER PRIMARY KEY,
    started_at DOUBLE NOT NULL,
    records BIGINT NOT NULL
);
"""


@dataclass(frozen=True)
class OutboxEntry:
    """A pending outbox message, without its body (which may be megabytes).

    Attributes:
        seq: Position in the outbox; messages of one kind are sent in this order.
        message_id: The batch or feedback id; the receiver's ack refers to it.
        kind: ``"token_batch"`` or ``"feedback"``.
        attempts: Failed sends so far.
        next_attempt_at: Earliest time for the next send.
    """

    seq: int
    message_id: str
    kind: MessageKind
    attempts: int
    next_attempt_at: float


@dataclass(frozen=True)
class LoadChanges:
    """Everything one load writes, applied by :meth:`NodeStore.write_load` in one transaction.

    Attributes:
        load_id: Id of the load.
        file_name: The file loaded (for the operator; no data from it).
        started_at: When the load began.
        counts: The load's counts (JSON-ready), kept in ``loads``.
        inserts: New records, columns :data:`RECORD_COLUMNS` (and optionally
            :data:`NORMALISED_COLUMN`).
        updates: Known records whose content or display changed, or that came back; same
            columns. Their pseudonyms and record ids are not changed.
        tombstones: Record ids to mark inactive.
        quarantine: ``row_number, record_id, reason`` of every quarantined row.
        messages: ``(message_id, kind, body JSON)`` to queue, in order.
    """

    load_id: str
    file_name: str
    started_at: float
    counts: Mapping[str, Any]
    inserts: pd.DataFrame
    updates: pd.DataFrame
    tombstones: Sequence[str]
    quarantine: pd.DataFrame
    messages: Sequence[tuple[str, MessageKind, str]]


class NodeStore:
    """A county node's tables in one DuckDB file.

    Args:
        path: The DuckDB file; created (with its directory) if missing.

    Attributes:
        conn: The one connection; use it only while holding ``lock``.
        lock: Re-entrant lock serialising every use of ``conn``.
        load_lock: Held by a load from reading the store's records to writing its changes,
            so that two loads cannot both compare with the same old state.

    Raises:
        StoreError: If the file cannot be opened or the tables created.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.lock = threading.RLock()
        self.load_lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = duckdb.connect(str(self.path))
            self.conn.execute(_SCHEMA)
        except (OSError, duckdb.Error) as e:
            raise StoreError(f"cannot open the node store {self.path}") from e
        self._closed = False

    @property
    def is_open(self) -> bool:
        """Whether the store can still be used."""
        return not self._closed

    def close(self) -> None:
        """Checkpoint and close the database; later calls fail with :class:`StoreError`."""
        with self.lock:
            if not self._closed:
                self._closed = True
                self.conn.close()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _locked(self, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """Hold the lock and translate DuckDB errors (``what`` names the operation)."""
        with self.lock:
            if self._closed:
                raise StoreError(f"cannot {what}: the node store is closed")
            try:
                yield self.conn
            except duckdb.Error as e:
                raise StoreError(f"cannot {what}") from e

    @contextmanager
    def _transaction(self, what: str) -> Iterator[duckdb.DuckDBPyConnection]:
        """Run the block in one transaction: all of it is committed, or none of it."""
        with self._locked(what) as conn:
            conn.begin()
            try:
                yield conn
            except BaseException:
                conn.rollback()
                raise
            conn.commit()

    # ------------------------------------------------------------------ records

    def records_snapshot(self) -> pd.DataFrame:
        """Every record the node knows (active or not): :data:`SNAPSHOT_COLUMNS`."""
        cols = ", ".join(SNAPSHOT_COLUMNS)
        with self._locked("read records") as conn:
            frame = conn.execute(f"SELECT {cols} FROM records").df()
        # Plain Python objects: arrow-backed strings are slow to iterate into dicts, and a
        # load does exactly that.
        return frame.astype(object)

    def write_load(self, changes: LoadChanges, *, now: float | None = None) -> None:
        """Apply one load: records, quarantine, outbox messages and the load's row, atomically.

        Args:
            changes: What the load changes.
            now: Time of the change; defaults to ``time.time()``.

        Raises:
            StoreError: If anything fails; nothing is then written.
        """
        now = time.time() if now is None else now
        with self._transaction("write the load") as conn:
            if len(changes.inserts):
                columns = _record_columns(changes.inserts)
                cols = ", ".join(columns)
                with registered(conn, "load_inserts", changes.inserts.loc[:, columns]):
                    conn.execute(
                        f"INSERT INTO records ({cols}, active, updated_at) "
                        f"SELECT {cols}, true, ? FROM load_inserts",
                        [now],
                    )
            if len(changes.updates):
                # Pseudonym and record id are never updated: a record keeps its pseudonym.
                columns = _record_columns(changes.updates)
                normalised = ", normalised = u.normalised" if NORMALISED_COLUMN in columns else ""
                with registered(conn, "load_updates", changes.updates.loc[:, columns]):
                    conn.execute(
                        "UPDATE records SET household_id = u.household_id, "
                        "household = u.household, content_hash = u.content_hash, "
                        f"display = u.display{normalised}, active = true, updated_at = ? "
                        "FROM load_updates u WHERE records.record_id = u.record_id",
                        [now],
                    )
            if changes.tombstones:
                gone = pd.DataFrame({"record_id": pd.array(changes.tombstones, dtype="string")})
                with registered(conn, "load_gone", gone):
                    conn.execute(
                        "UPDATE records SET active = false, updated_at = ? "
                        "WHERE record_id IN (SELECT record_id FROM load_gone)",
                        [now],
                    )
            if len(changes.quarantine):
                quarantined = changes.quarantine.loc[:, ["row_number", "record_id", "reason"]]
                with registered(conn, "load_quarantine", quarantined):
                    conn.execute(
                        "INSERT INTO quarantine SELECT ?, row_number, record_id, reason "
                        "FROM load_quarantine",
                        [changes.load_id],
                    )
            for message_id, kind, body in changes.messages:
                self._enqueue(conn, message_id, kind, body, now)
            conn.execute(
                "INSERT INTO loads VALUES (?, ?, ?, ?, ?)",
                [
                    changes.load_id,
                    changes.file_name,
                    changes.started_at,
                    now,
                    json.dumps(dict(changes.counts)),
                ],
            )

    def records_without_normalised(self) -> set[str]:
        """Ids of records stored before the node kept their normalised values."""
        with self._locked("read records") as conn:
            rows = conn.execute("SELECT record_id FROM records WHERE normalised IS NULL").fetchall()
        return {str(r[0]) for r in rows}

    # ------------------------------------------------------------------ key epochs

    def key_epoch(self) -> int | None:
        """The key epoch the node publishes under (None before its first start)."""
        with self._locked("read the key epoch") as conn:
            rows = conn.execute("SELECT max(epoch) FROM key_epochs").fetchall()
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    def records_to_retokenise(self) -> pd.DataFrame:
        """Every active record with what re-tokenising it needs, in record id order.

        Returns:
            ``record_id, pseudonym, household, normalised`` (``normalised`` is None for a
            record stored before the node kept normalised values).
        """
        with self._locked("read records") as conn:
            frame = conn.execute(
                "SELECT record_id, pseudonym, household, normalised FROM records "
                "WHERE active ORDER BY record_id"
            ).df()
        return frame.astype(object)

    def start_key_epoch(
        self,
        epoch: int,
        *,
        content_hashes: pd.DataFrame | None = None,
        messages: Sequence[tuple[str, MessageKind, str]] = (),
        now: float | None = None,
    ) -> None:
        """Move the node to key epoch ``epoch``, atomically with what re-tokenising produced.

        Args:
            epoch: The new epoch; it must be above the current one (if any).
            content_hashes: ``record_id, content_hash`` under the new epoch, so that the next
                load finds the re-tokenised records unchanged.
            messages: The token batches re-publishing every active record, in order.
            now: Time; defaults to ``time.time()``.

        Raises:
            StoreError: If the epoch is not above the current one, or anything fails
                (nothing is then written).
        """
        now = time.time() if now is None else now
        hashes = content_hashes if content_hashes is not None else pd.DataFrame()
        with self._transaction("start the key epoch") as conn:
            rows = conn.execute("SELECT max(epoch) FROM key_epochs").fetchall()
            current = None if not rows or rows[0][0] is None else int(rows[0][0])
            if current is not None and epoch <= current:
                raise StoreError(f"key epoch {epoch} is not after the current epoch {current}")
            if len(hashes):
                with registered(conn, "epoch_hashes", hashes.loc[:, ["record_id", "content_hash"]]):
                    conn.execute(
                        "UPDATE records SET content_hash = h.content_hash FROM epoch_hashes h "
                        "WHERE records.record_id = h.record_id"
                    )
            for message_id, kind, body in messages:
                self._enqueue(conn, message_id, kind, body, now)
            conn.execute("INSERT INTO key_epochs VALUES (?, ?, ?)", [epoch, now, len(hashes)])

    def quarantine(self, load_id: str) -> pd.DataFrame:
        """The quarantined rows of one load: ``row_number, record_id, reason``."""
        with self._locked("read the quarantine") as conn:
            return conn.execute(
                "SELECT row_number, record_id, reason FROM quarantine WHERE load_id = ? "
                "ORDER BY row_number",
                [load_id],
            ).df()

    # ------------------------------------------------------------------ outbox

    @staticmethod
    def _enqueue(
        conn: duckdb.DuckDBPyConnection, message_id: str, kind: str, body: str, now: float
    ) -> None:
        conn.execute(
            "INSERT INTO outbox (message_id, kind, body, next_attempt_at, created_at) "
            "VALUES (?, ?, ?, ?, ?)",
            [message_id, kind, body, now, now],
        )

    def pending(self) -> list[OutboxEntry]:
        """Every pending outbox message (without bodies), in ``seq`` order."""
        with self._locked("read the outbox") as conn:
            rows = conn.execute(
                "SELECT seq, message_id, kind, attempts, next_attempt_at FROM outbox "
                "WHERE status = 'pending' ORDER BY seq"
            ).fetchall()
        return [OutboxEntry(int(r[0]), str(r[1]), r[2], int(r[3]), float(r[4])) for r in rows]

    def message_body(self, message_id: str) -> str:
        """The JSON body of an outbox message.

        Raises:
            StoreError: If there is no such message.
        """
        with self._locked("read the outbox") as conn:
            row = conn.execute(
                "SELECT body FROM outbox WHERE message_id = ?", [message_id]
            ).fetchone()
        if row is None:
            raise StoreError(f"no outbox message {message_id}")
        return str(row[0])

    def mark_acked(self, message_id: str, *, now: float | None = None) -> bool:
        """Mark a message acknowledged; return False if it was not pending."""
        now = time.time() if now is None else now
        with self._locked("update the outbox") as conn:
            row = conn.execute(
                "UPDATE outbox SET status = 'acked', acked_at = ?, last_error = NULL "
                "WHERE message_id = ? AND status = 'pending'",
                [now, message_id],
            ).fetchone()
        return row is not None and int(row[0]) == 1

    def defer(self, message_id: str, *, next_attempt_at: float, error: str) -> int:
        """Record a failed send and when to try again; return the attempts so far.

        Args:
            message_id: The message.
            next_attempt_at: Earliest time for the next attempt.
            error: A short description: the status code and the matcher's reason for a
                refusal, or the error class; never a message body.
        """
        with self._locked("update the outbox") as conn:
            row = conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_attempt_at = ?, last_error = ? "
                "WHERE message_id = ? RETURNING attempts",
                [next_attempt_at, error[:200], message_id],
            ).fetchone()
        return 0 if row is None else int(row[0])

    # ------------------------------------------------------------------ alerts

    def store_alert(self, alert: AlertBody, *, now: float | None = None) -> StoreOutcome:
        """Keep an alert, idempotently.

        A higher version than the one held replaces it (and reopens it); the same or a lower
        version is a duplicate. A withdrawal of the same version wins over the alert, so a
        late retry of an alert never undoes its withdrawal.

        Returns:
            ``"stored"`` or ``"duplicate"``.
        """
        now = time.time() if now is None else now
        body = alert.model_dump_json(by_alias=True)
        with self._transaction("store the alert") as conn:
            row = conn.execute(
                "SELECT version FROM alerts WHERE alert_id = ?", [alert.alert_id]
            ).fetchone()
            if row is not None and alert.version <= int(row[0]):
                return "duplicate"
            if row is None:
                conn.execute(
                    "INSERT INTO alerts VALUES (?, ?, ?, ?, ?, ?, ?, 'open', NULL, ?, ?)",
                    [
                        alert.alert_id,
                        alert.version,
                        alert.kind,
                        alert.cluster_id,
                        alert.pseudonym,
                        alert.household,
                        body,
                        now,
                        now,
                    ],
                )
            else:
                conn.execute(
                    "UPDATE alerts SET version = ?, kind = ?, cluster_id = ?, pseudonym = ?, "
                    "household = ?, body = ?, status = 'open', reason = NULL, updated_at = ? "
                    "WHERE alert_id = ?",
                    [
                        alert.version,
                        alert.kind,
                        alert.cluster_id,
                        alert.pseudonym,
                        alert.household,
                        body,
                        now,
                        alert.alert_id,
                    ],
                )
        return "stored"

    def withdraw_alert(
        self, withdrawal: WithdrawalBody, *, now: float | None = None
    ) -> StoreOutcome:
        """Mark an alert withdrawn, idempotently.

        A withdrawal of an alert never received is kept too (without a body, so it is not
        listed), so that the alert arriving late does not show.

        Returns:
            ``"stored"``, or ``"duplicate"`` if already withdrawn at this version or later, or
            if a newer version of the alert is held.
        """
        now = time.time() if now is None else now
        with self._transaction("withdraw the alert") as conn:
            row = conn.execute(
                "SELECT version, status FROM alerts WHERE alert_id = ?", [withdrawal.alert_id]
            ).fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO alerts (alert_id, version, status, reason, received_at, "
                    "updated_at) VALUES (?, ?, 'withdrawn', ?, ?, ?)",
                    [withdrawal.alert_id, withdrawal.version, withdrawal.reason, now, now],
                )
                return "stored"
            version, status = int(row[0]), str(row[1])
            if withdrawal.version < version or (
                withdrawal.version == version and status == "withdrawn"
            ):
                return "duplicate"
            conn.execute(
                "UPDATE alerts SET version = ?, status = 'withdrawn', reason = ?, updated_at = ? "
                "WHERE alert_id = ?",
                [withdrawal.version, withdrawal.reason, now, withdrawal.alert_id],
            )
        return "stored"

    def store_alert_batch(
        self,
        alerts: list[AlertBody],
        withdrawals: list[WithdrawalBody],
        *,
        now: float | None = None,
    ) -> tuple[int, int]:
        """Keep a batch of alerts and withdrawals in one transaction, with the rules of
        :meth:`store_alert` and :meth:`withdraw_alert` applied row by row, set-wise.

        Returns:
            ``(stored, duplicates)``.
        """
        now = time.time() if now is None else now
        incoming = pd.DataFrame(
            {
                "alert_id": [a.alert_id for a in alerts],
                "version": pd.array([a.version for a in alerts], dtype="int64"),
                "kind": [a.kind for a in alerts],
                "cluster_id": [a.cluster_id for a in alerts],
                "pseudonym": [a.pseudonym for a in alerts],
                "household": [a.household for a in alerts],
                "body": [a.model_dump_json(by_alias=True) for a in alerts],
            }
        )
        gone = pd.DataFrame(
            {
                "alert_id": [w.alert_id for w in withdrawals],
                "version": pd.array([w.version for w in withdrawals], dtype="int64"),
                "reason": [w.reason for w in withdrawals],
            }
        )
        with (
            self._transaction("store alerts") as conn,
            registered(conn, "incoming", incoming),
            registered(conn, "gone", gone),
        ):
            # Alerts: new ids are inserted; a higher version replaces (and reopens) one held.
            fresh = conn.execute(
                "SELECT count(*) FROM incoming i ANTI JOIN alerts a USING (alert_id)"
            ).fetchall()[0][0]
            newer = conn.execute(
                "SELECT count(*) FROM incoming i JOIN alerts a USING (alert_id) "
                "WHERE i.version > a.version"
            ).fetchall()[0][0]
            conn.execute(
                "UPDATE alerts SET version = i.version, kind = i.kind, cluster_id = i.cluster_id, "
                "pseudonym = i.pseudonym, household = i.household, body = i.body, "
                "status = 'open', reason = NULL, updated_at = ? FROM incoming i "
                "WHERE alerts.alert_id = i.alert_id AND i.version > alerts.version",
                [now],
            )
            conn.execute(
                "INSERT INTO alerts SELECT i.alert_id, i.version, i.kind, i.cluster_id, "
                "i.pseudonym, i.household, i.body, 'open', NULL, ?, ? "
                "FROM incoming i ANTI JOIN alerts a USING (alert_id)",
                [now, now],
            )
            # Withdrawals: kept even before their alert; a same-version withdrawal wins.
            fresh_gone = conn.execute(
                "SELECT count(*) FROM gone g ANTI JOIN alerts a USING (alert_id)"
            ).fetchall()[0][0]
            newer_gone = conn.execute(
                "SELECT count(*) FROM gone g JOIN alerts a USING (alert_id) "
                "WHERE g.version > a.version OR (g.version = a.version AND a.status <> 'withdrawn')"
            ).fetchall()[0][0]
            conn.execute(
                "UPDATE alerts SET version = g.version, status = 'withdrawn', reason = g.reason, "
                "updated_at = ? FROM gone g WHERE alerts.alert_id = g.alert_id AND "
                "(g.version > alerts.version OR "
                "(g.version = alerts.version AND alerts.status <> 'withdrawn'))",
                [now],
            )
            conn.execute(
                "INSERT INTO alerts (alert_id, version, status, reason, received_at, updated_at) "
                "SELECT g.alert_id, g.version, 'withdrawn', g.reason, ?, ? "
                "FROM gone g ANTI JOIN alerts a USING (alert_id)",
                [now, now],
            )
        stored = int(fresh + newer + fresh_gone + newer_gone)
        return stored, len(alerts) + len(withdrawals) - stored

    def has_alert(self, alert_id: str) -> bool:
        """Whether an alert (with a body, i.e. one that can be shown) is held."""
        with self._locked("read alerts") as conn:
            row = conn.execute(
                "SELECT 1 FROM alerts WHERE alert_id = ? AND body IS NOT NULL", [alert_id]
            ).fetchone()
        return row is not None

    def inbox(
        self, *, kind: str | None = None, status: str | None = None, since: float | None = None
    ) -> list[dict[str, Any]]:
        """Alerts held, newest change first, each re-identified to the county's own records.

        Args:
            kind: Only ``"person"`` or ``"family"`` alerts.
            status: Only ``"open"`` or ``"withdrawn"`` alerts.
            since: Only alerts changed after this time (seconds since the epoch).

        Returns:
            One dict per alert: ``alert_id, kind, cluster_id, version, status, reason,
            received_at, updated_at, body`` (the :class:`AlertBody` as a dict), ``records``
            (the local records it is about: ``record_id, household_id, active`` and the
            display fields; the record for a person alert, the household's members for a
            family alert) and ``feedback`` (this county's own decisions and notes).
        """
        where: list[str] = ["a.body IS NOT NULL"]
        params: list[Any] = []
        if kind is not None:
            where.append("a.kind = ?")
            params.append(kind)
        if status is not None:
            where.append("a.status = ?")
            params.append(status)
        if since is not None:
            where.append("a.updated_at > ?")
            params.append(since)
        condition = " AND ".join(where)
        with self._locked("read alerts") as conn:
            alerts = conn.execute(
                "SELECT alert_id, kind, cluster_id, version, status, reason, received_at, "
                f"updated_at, body FROM alerts a WHERE {condition} "
                "ORDER BY updated_at DESC, alert_id",
                params,
            ).fetchall()
            # Two equi-joins rather than one join on OR, which DuckDB runs as a nested loop.
            members = conn.execute(
                "SELECT a.alert_id, r.record_id, r.household_id, r.active, r.display "
                f"FROM alerts a JOIN records r ON r.pseudonym = a.pseudonym "
                f"WHERE a.kind = 'person' AND {condition} "
                "UNION ALL "
                "SELECT a.alert_id, r.record_id, r.household_id, r.active, r.display "
                f"FROM alerts a JOIN records r ON r.household = a.household "
                f"WHERE a.kind = 'family' AND {condition} "
                "ORDER BY 1, 2",
                params + params,
            ).fetchall()
            notes = conn.execute(
                "SELECT alert_id, feedback_id, decision, note, created_at FROM feedback "
                "ORDER BY created_at"
            ).fetchall()
        by_alert: dict[str, list[dict[str, Any]]] = {}
        for alert_id, record_id, household_id, active, display in members:
            record = {
                "record_id": record_id,
                "household_id": household_id,
                "active": bool(active),
                **json.loads(display),
            }
            by_alert.setdefault(alert_id, []).append(record)
        feedback: dict[str, list[dict[str, Any]]] = {}
        for alert_id, feedback_id, decision, note, created_at in notes:
            feedback.setdefault(alert_id, []).append(
                {
                    "feedback_id": feedback_id,
                    "decision": decision,
                    "note": note,
                    "created_at": created_at,
                }
            )
        return [
            {
                "alert_id": a[0],
                "kind": a[1],
                "cluster_id": a[2],
                "version": int(a[3]),
                "status": a[4],
                "reason": a[5],
                "received_at": float(a[6]),
                "updated_at": float(a[7]),
                "body": json.loads(a[8]),
                "records": by_alert.get(a[0], []),
                "feedback": feedback.get(a[0], []),
            }
            for a in alerts
        ]

    # ------------------------------------------------------------------ feedback

    def add_feedback(
        self,
        *,
        feedback_id: str,
        alert_id: str,
        decision: str,
        note: str,
        body: str,
        now: float | None = None,
    ) -> bool:
        """Keep a clerical decision and queue its message, atomically.

        Args:
            feedback_id: New id; also the outbox message id.
            alert_id: The alert decided on.
            decision: ``same``, ``not_same`` or ``need_info``.
            note: Free text kept here only (it is not part of ``body``).
            body: The feedback message body (JSON) to send to the matcher.
            now: Time; defaults to ``time.time()``.

        Returns:
            False (and nothing stored) if no such alert is held.
        """
        now = time.time() if now is None else now
        with self._transaction("store the feedback") as conn:
            known = conn.execute(
                "SELECT 1 FROM alerts WHERE alert_id = ? AND body IS NOT NULL", [alert_id]
            ).fetchone()
            if known is None:
                return False
            conn.execute(
                "INSERT INTO feedback VALUES (?, ?, ?, ?, ?)",
                [feedback_id, alert_id, decision, note, now],
            )
            self._enqueue(conn, feedback_id, "feedback", body, now)
        return True

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """Counts for the status page: records, outbox, alerts, and the last load."""
        with self._locked("read the status") as conn:
            records = conn.execute(
                "SELECT count(*) FILTER (WHERE active), count(*) FILTER (WHERE NOT active) "
                "FROM records"
            ).fetchone()
            outbox = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'pending'), "
                "count(*) FILTER (WHERE status = 'acked'), "
                "min(created_at) FILTER (WHERE status = 'pending') FROM outbox"
            ).fetchone()
            alerts = conn.execute(
                "SELECT count(*) FILTER (WHERE status = 'open'), "
                "count(*) FILTER (WHERE status = 'withdrawn') FROM alerts "
                "WHERE body IS NOT NULL"
            ).fetchone()
            last = conn.execute(
                "SELECT load_id, file_name, started_at, finished_at, counts FROM loads "
                "ORDER BY finished_at DESC LIMIT 1"
            ).fetchone()
            epoch = conn.execute("SELECT max(epoch) FROM key_epochs").fetchall()[0]
        assert records is not None and outbox is not None and alerts is not None
        return {
            "key_epoch": None if epoch[0] is None else int(epoch[0]),
            "records": {"active": int(records[0]), "inactive": int(records[1])},
            "outbox": {
                "pending": int(outbox[0]),
                "acked": int(outbox[1]),
                "oldest_pending_at": outbox[2],
            },
            "alerts": {"open": int(alerts[0]), "withdrawn": int(alerts[1])},
            "last_load": None
            if last is None
            else {
                "load_id": last[0],
                "file_name": last[1],
                "started_at": last[2],
                "finished_at": last[3],
                "counts": json.loads(last[4]),
            },
        }


def _record_columns(frame: pd.DataFrame) -> list[str]:
    """The record columns a load frame carries: :data:`RECORD_COLUMNS`, and the normalised
    values when it has them."""
    extra = [NORMALISED_COLUMN] if NORMALISED_COLUMN in frame.columns else []
    return [*RECORD_COLUMNS, *extra]
