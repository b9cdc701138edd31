"""A tamper-evident, hash-chained audit log in DuckDB.

Each entry is ``(seq, time, event, actor, details)`` plus two hashes::

    hash[seq] = sha256(hash[seq - 1] || canonical_bytes({seq, time, event, actor, details}))

with ``hash[0]`` = 64 zeros. Each row also stores the hash it was chained to
(``prev_hash``), so :meth:`AuditLog.verify` can tell *what* happened to a broken entry:

* **edited**: the row's contents no longer match its hash;
* **deleted**: a seq number is missing;
* **reordered** (e.g. two entries swapped): the row is intact but was written at another seq;
* **replaced**: the row was edited *and* its hash recomputed, so the next row no longer
  links to it.

An **anchor** (one row in ``<table>_head``: the entry count and the last hash) is updated in the
same transaction as each append, so deleting the *last* entries, which leaves an intact but
shorter chain, is detected too.

Limits, honestly: the anchor lives in the same database file. Someone who can write the file
can rewrite the entire chain from the first altered entry *and* the anchor, and nothing in the
file will show it. To detect that, keep :meth:`AuditLog.head` somewhere they cannot write (a
log shipped off the machine, a periodic email, another party) and pass it back as
``expected_head``. The log detects tampering; it cannot prevent it.

**No personal data in details.** Callers pass ids only (county ids, record ids, batch ids,
cluster ids, counts), never names, dates of birth, NHS numbers, postcodes or addresses (design
invariant 1). :meth:`AuditLog.append` refuses details whose keys are the names of identifier
fields, as a guard against mistakes; it cannot judge values, so the rule stays the caller's.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb

from federation.errors import StoreError
from federation.signing import canonical_bytes

__all__ = ["GENESIS_HASH", "AuditHead", "AuditLog", "AuditReport", "verify_audit_file"]

GENESIS_HASH = "0" * 64
"""The hash the first entry is chained to."""

_IDENTIFIER_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,57}")
_EVENT_RE = re.compile(r"[a-z0-9_.:-]{1,64}")
_ACTOR_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
# Names of the canonical record's identifier fields (and common aliases): a details key with
# one of these names almost certainly carries personal data.
_PERSONAL_KEYS = frozenset(
    {
        "given_name",
        "middle_names",
        "family_name",
        "previous_family_names",
        "date_of_birth",
        "dob",
        "nhs_number",
        "postcode",
        "address",
    }
)


@dataclass(frozen=True)
class AuditReport:
    """The result of checking an audit log.

    Attributes:
        ok: True if no problem was found.
        entries: How many entries the log holds.
        problems: One sentence per problem, naming the seq of each entry involved.
    """

    ok: bool
    entries: int
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class AuditHead:
    """The state of the chain after its last entry: keep a copy outside the database.

    Attributes:
        count: Number of entries (equal to the last seq).
        hash: Hash of the last entry (:data:`GENESIS_HASH` if empty).
    """

    count: int
    hash: str


@dataclass(frozen=True)
class _Row:
    seq: int
    time: float
    event: str
    actor: str
    details: str
    prev_hash: str
    hash: str


def _entry_hash(prev_hash: str, seq: int, when: float, event: str, actor: str, details: Any) -> str:
    payload = canonical_bytes(
        {"seq": seq, "time": when, "event": event, "actor": actor, "details": details}
    )
    return hashlib.sha256(bytes.fromhex(prev_hash) + payload).hexdigest()


def _check_details(details: Mapping[str, Any]) -> None:
    stack: list[Any] = [details]
    while stack:
        value = stack.pop()
        if isinstance(value, Mapping):
            bad = sorted(k for k in value if isinstance(k, str) and k.lower() in _PERSONAL_KEYS)
            if bad:
                raise ValueError(f"audit details must not carry personal data (keys {bad})")
            stack.extend(value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend(value)


class AuditLog:
    """An append-only, hash-chained audit log in a DuckDB table.

    Args:
        conn: An open DuckDB connection (the service's database file).
        lock: The lock that serialises every use of ``conn`` across threads; if omitted the
            log uses its own, which is only safe if nothing else uses ``conn``.
        table: Table name (a plain SQL identifier); the anchor is ``<table>_head``.

    Raises:
        ValueError: If ``table`` is not a plain SQL identifier.
        StoreError: If the tables cannot be created.
    """

    def __init__(
        self,
        conn: duckdb.DuckDBPyConnection,
        *,
        lock: threading.Lock | threading.RLock | None = None,
        table: str = "audit_log",
    ) -> None:
        if not _IDENTIFIER_RE.fullmatch(table):
            raise ValueError("table must be a plain SQL identifier")
        self._conn = conn
        self._lock = lock if lock is not None else threading.Lock()
        self._name = table
        self._table = f'"{table}"'
        self._head = f'"{table}_head"'
        with self._lock:
            try:
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._table} ("
                    "seq BIGINT PRIMARY KEY, time DOUBLE NOT NULL, event VARCHAR NOT NULL, "
                    "actor VARCHAR NOT NULL, details VARCHAR NOT NULL, "
                    "prev_hash VARCHAR NOT NULL, hash VARCHAR NOT NULL)"
                )
                conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {self._head} ("
                    "id INTEGER PRIMARY KEY CHECK (id = 1), "
                    "count BIGINT NOT NULL, hash VARCHAR NOT NULL)"
                )
                # Only a brand-new log gets a fresh anchor. A missing anchor next to existing
                # entries is tampering, and silently recreating it would hide that.
                conn.execute(
                    f"INSERT INTO {self._head} SELECT 1, 0, ? "
                    f"WHERE NOT EXISTS (SELECT 1 FROM {self._head}) "
                    f"AND NOT EXISTS (SELECT 1 FROM {self._table})",
                    [GENESIS_HASH],
                )
            except duckdb.Error as e:
                raise StoreError(f"cannot open audit log {table}") from e

    def append(
        self,
        event: str,
        actor: str,
        details: Mapping[str, Any],
        *,
        now: float | None = None,
    ) -> int:
        """Append an entry and return its seq (1, 2, ...).

        Args:
            event: What happened, e.g. ``"batch.accepted"`` (``[a-z0-9_.:-]``).
            actor: Who did it: a registry id, ``"cli"``, ... (no personal data).
            details: JSON object of ids and counts only; never personal data.
            now: Entry time (seconds since the UTC epoch); defaults to ``time.time()``.

        Returns:
            The new entry's seq.

        Raises:
            ValueError: If ``event``/``actor`` are malformed, or ``details`` is not canonical
                JSON or has a key named after an identifier field (``family_name``, ...).
            StoreError: If DuckDB fails, or the anchor is missing (the log was tampered with).
        """
        if not _EVENT_RE.fullmatch(event):
            raise ValueError("event must match [a-z0-9_.:-]{1,64}")
        if not _ACTOR_RE.fullmatch(actor):
            raise ValueError("actor must match [A-Za-z0-9_.:@-]{1,128}")
        if not isinstance(details, Mapping):
            raise ValueError("details must be a JSON object")
        _check_details(details)
        details_json = canonical_bytes(details).decode("utf-8")
        # Hash what verify() will read back, so that e.g. tuples and lists agree.
        stored_details = json.loads(details_json)
        when = float(time.time() if now is None else now)
        with self._lock:
            try:
                self._conn.begin()
                try:
                    head = self._conn.execute(
                        f"SELECT count, hash FROM {self._head} WHERE id = 1"
                    ).fetchone()
                    if head is None:
                        raise StoreError(f"audit anchor {self._name}_head is missing; run verify")
                    # Chain onto the anchor, not onto max(seq): if the tail was deleted,
                    # new entries must not paper over the gap.
                    seq, prev_hash = int(head[0]) + 1, str(head[1])
                    entry_hash = _entry_hash(prev_hash, seq, when, event, actor, stored_details)
                    self._conn.execute(
                        f"INSERT INTO {self._table} VALUES (?, ?, ?, ?, ?, ?, ?)",
                        [seq, when, event, actor, details_json, prev_hash, entry_hash],
                    )
                    self._conn.execute(
                        f"UPDATE {self._head} SET count = ?, hash = ? WHERE id = 1",
                        [seq, entry_hash],
                    )
                    self._conn.commit()
                except BaseException:
                    self._conn.rollback()
                    raise
            except duckdb.Error as e:
                raise StoreError("cannot append to the audit log") from e
        return seq

    def head(self) -> AuditHead:
        """Return the anchor (entry count and last hash), to keep a copy elsewhere.

        Raises:
            StoreError: If DuckDB fails or the anchor is missing.
        """
        with self._lock:
            try:
                row = self._conn.execute(
                    f"SELECT count, hash FROM {self._head} WHERE id = 1"
                ).fetchone()
            except duckdb.Error as e:
                raise StoreError("cannot read the audit anchor") from e
        if row is None:
            raise StoreError(f"audit anchor {self._name}_head is missing")
        return AuditHead(count=int(row[0]), hash=str(row[1]))

    def verify(self, *, expected_head: AuditHead | None = None) -> AuditReport:
        """Check the whole chain and the anchor; report every problem, naming seqs.

        Args:
            expected_head: A head kept outside the database (see :meth:`head`); if given,
                the log must still contain that entry with that hash.

        Returns:
            The report.

        Raises:
            StoreError: If DuckDB fails.
        """
        with self._lock:
            return _verify_connection(self._conn, self._name, expected_head)


def verify_audit_file(
    db_path: Path,
    *,
    table: str = "audit_log",
    expected_head: AuditHead | None = None,
) -> AuditReport:
    """Check the audit log in a DuckDB file, opening it read-only.

    DuckDB will not open a file read-only while another process has it open for writing:
    stop the service first, or check a copy.

    Args:
        db_path: The DuckDB database file.
        table: The audit table name.
        expected_head: A head kept outside the database, as for :meth:`AuditLog.verify`.

    Returns:
        The report.

    Raises:
        ValueError: If ``table`` is not a plain SQL identifier.
        StoreError: If the file does not exist or cannot be opened.
    """
    if not _IDENTIFIER_RE.fullmatch(table):
        raise ValueError("table must be a plain SQL identifier")
    db_path = Path(db_path)
    if not db_path.is_file():
        raise StoreError(f"{db_path}: no such database file")
    try:
        conn = duckdb.connect(str(db_path), read_only=True)
    except duckdb.Error as e:
        raise StoreError(f"{db_path}: cannot open read-only") from e
    try:
        return _verify_connection(conn, table, expected_head)
    finally:
        conn.close()


# --------------------------------------------------------------------------- verification


def _verify_connection(
    conn: duckdb.DuckDBPyConnection, table: str, expected_head: AuditHead | None
) -> AuditReport:
    try:
        tables = {
            str(r[0])
            for r in conn.execute(
                "SELECT table_name FROM duckdb_tables() WHERE table_name IN (?, ?)",
                [table, f"{table}_head"],
            ).fetchall()
        }
        if table not in tables:
            return AuditReport(ok=False, entries=0, problems=[f"no audit table {table!r}"])
        raw_rows = conn.execute(
            f'SELECT seq, time, event, actor, details, prev_hash, hash FROM "{table}" ORDER BY seq'
        ).fetchall()
        head_row = None
        if f"{table}_head" in tables:
            head_row = conn.execute(
                f'SELECT count, hash FROM "{table}_head" WHERE id = 1'
            ).fetchone()
    except duckdb.Error as e:
        raise StoreError(f"cannot read audit table {table!r}") from e
    rows = [_Row(*r) for r in raw_rows]
    head = None if head_row is None else AuditHead(count=int(head_row[0]), hash=str(head_row[1]))
    problems = _check_rows(rows, head, expected_head)
    return AuditReport(ok=not problems, entries=len(rows), problems=problems)


def _seals(row: _Row, seq: int) -> bool:
    """True if ``row``'s contents, written at ``seq`` after ``row.prev_hash``, give its hash."""
    try:
        details = json.loads(row.details)
        return _entry_hash(row.prev_hash, seq, row.time, row.event, row.actor, details) == row.hash
    except (ValueError, TypeError, RecursionError):
        # Unparseable details, NaN, or a prev_hash that is not hex: an edit.
        return False


def _written_at(rows: list[_Row]) -> list[int | None]:
    """For each row, the seq it was originally written at; None if its contents were edited.

    A row that seals at its current seq was written there. Otherwise follow its ``prev_hash``
    back to the row it was chained to: if that one was written at ``k``, this one must have
    been written at ``k + 1`` (which is how a swapped pair is recognised).
    """
    resolved: dict[int, int | None] = {
        i: row.seq for i, row in enumerate(rows) if _seals(row, row.seq)
    }
    by_hash = {row.hash: i for i, row in enumerate(rows)}
    for start in range(len(rows)):
        if start in resolved:
            continue
        chain: list[int] = []
        base: int | None
        i = start
        while True:
            chain.append(i)
            prev = rows[i].prev_hash
            if prev == GENESIS_HASH:
                base = 0
                break
            j = by_hash.get(prev)
            if j is None or j in chain:
                base = None
                break
            if j in resolved:
                base = resolved[j]
                break
            i = j
        for i in reversed(chain):
            if base is not None and _seals(rows[i], base + 1):
                base += 1
                resolved[i] = base
            else:
                base = None
                resolved[i] = None
    return [resolved[i] for i in range(len(rows))]


def _span(first: int, last: int) -> str:
    return f"seq {first}" if first == last else f"seq {first}-{last}"


def _check_rows(
    rows: list[_Row], head: AuditHead | None, expected_head: AuditHead | None
) -> list[str]:
    problems: list[str] = []
    written_at = _written_at(rows)
    expected_seq = 1
    prev_hash = GENESIS_HASH
    prev_flagged = False
    for row, origin in zip(rows, written_at, strict=True):
        gap = row.seq > expected_seq
        if gap:
            problems.append(f"{_span(expected_seq, row.seq - 1)}: missing (deleted)")
        elif row.seq < expected_seq:
            problems.append(f"seq {row.seq}: not a valid sequence number")
        flagged = True
        if origin is None:
            problems.append(f"seq {row.seq}: edited (contents do not match its hash)")
        elif origin != row.seq:
            problems.append(f"seq {row.seq}: reordered (this entry was written as seq {origin})")
        elif row.prev_hash != prev_hash and not gap and not prev_flagged:
            # Both rows are self-consistent but no longer linked: the previous one was
            # rewritten and its hash recomputed.
            problems.append(
                f"seq {row.seq - 1}: edited (hash recomputed; seq {row.seq} no longer links to it)"
            )
        else:
            flagged = False
        prev_flagged = flagged
        prev_hash = row.hash
        expected_seq = row.seq + 1

    last_seq = rows[-1].seq if rows else 0
    last_hash = rows[-1].hash if rows else GENESIS_HASH
    if head is None:
        problems.append("anchor missing: deletion of the last entries cannot be ruled out")
    elif head.count > last_seq:
        problems.append(f"{_span(last_seq + 1, head.count)}: missing (deleted from the end)")
    elif head.count < last_seq:
        problems.append(
            f"{_span(head.count + 1, last_seq)}: not in the anchor (added outside the log)"
        )
    elif head.hash != last_hash and not prev_flagged:
        problems.append(f"seq {last_seq}: edited (hash recomputed; differs from the anchor)")

    if expected_head is not None and expected_head.count > 0:
        kept = next((r for r in rows if r.seq == expected_head.count), None)
        if kept is None:
            problems.append(f"seq {expected_head.count}: missing (the externally kept head)")
        elif kept.hash != expected_head.hash:
            problems.append(
                f"seq 1-{expected_head.count}: rewritten (hash differs from the externally kept "
                "head)"
            )
    return problems
