"""The matcher's DuckDB store: tokens, pairs, clusters, families, alerts outbox, labels.

It holds tokens and pseudonyms only. Tokens sit in one ``tokens`` table whose
``source_dataset`` column is the county, the shape Splink reads directly, so that the index
is scored in place without copies. Every change that spans tables runs in one transaction,
so a crash leaves either all of it or none; a batch is committed before it is acknowledged.

Key epochs: ``tokens`` holds the current key epoch only (``meta.key_epoch``). While the
federation secret is being rotated, batches of the next epoch are kept apart in
``tokens_next`` (same shape, never scored), and each node's ``epoch_complete`` batch is noted
in ``epoch_completions``. :meth:`MatcherStore.switch_epoch` then replaces ``tokens`` with
``tokens_next`` in one transaction. Batches of an older epoch, or of one more than a step
ahead, are refused (:class:`EpochRefused`); tombstones apply whatever their batch's epoch.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from federation.errors import FederationError, StoreError
from federation.protocol import TokenBatch
from linkage.relations import registered
from linkage.tokenise import TokenSpec

__all__ = ["EpochRefused", "MatcherStore"]

_ID_COLUMNS = ("source_dataset", "pseudonym", "household", "role")
_EPOCH_KEY = "key_epoch"


class EpochRefused(FederationError):
    """A token batch of a key epoch the matcher does not take (too old, or too far ahead)."""


#: Single-column indexes for the incremental path's lookups (see :func:`keyed`).
_LOOKUP_INDEXES = (
    ("tokens", "pseudonym"),
    ("tokens", "household"),
    ("pairs", "pseudonym_l"),
    ("pairs", "pseudonym_r"),
    ("clusters", "pseudonym"),
    ("clusters", "cluster_id"),
    ("families", "household"),
    ("families", "family_id"),
)


def keyed(table: str, county: str, key: str, keys: str) -> str:
    """SQL for the rows of ``table`` (plus their ``row_id``) whose (``county``, ``key``) pair
    is in the registered relation ``keys``, which has columns ``c`` and ``k``.

    DuckDB uses an index only for a bare ``key IN (subquery)`` filter on an indexed column;
    any other condition beside it, or a join, makes it scan the table. So the rows are found
    through the index on ``key`` first (materialised, so the optimiser cannot fold the exact
    filter back in), then cut to the exact pairs: a lookup at a million records takes a
    millisecond or two instead of a scan of tens of milliseconds.
    """
    return (
        f"(WITH hit AS MATERIALIZED (SELECT rowid AS row_id, * FROM {table} "
        f"WHERE {key} IN (SELECT k FROM {keys})) "
        f"SELECT * FROM hit SEMI JOIN {keys} AS kk ON hit.{county} = kk.c AND hit.{key} = kk.k)"
    )


class MatcherStore:
    """The matcher's tables in one DuckDB file.

    Args:
        path: The DuckDB file (created if missing).
        spec: The federation's token spec; fixes the token columns.
        mw_columns: Partial-match-weight columns kept with each pair (for explanations).
    """

    def __init__(self, path: Path, spec: TokenSpec, *, mw_columns: Sequence[str]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = duckdb.connect(str(path))
        except duckdb.Error as e:
            raise StoreError(f"cannot open the matcher store {path}") from e
        self.lock = threading.RLock()
        self.spec = spec
        self.token_columns = spec.token_columns()
        self.mw_columns = list(mw_columns)
        self._create()

    def close(self) -> None:
        """Close the database (checkpointing it)."""
        with self.lock:
            self.conn.close()

    def _create(self) -> None:
        tokens = ", ".join(
            f"{c} {'SMALLINT' if c.endswith(('_bf_n', '_fc')) else 'BIGINT'}"
            for c in self.token_columns
        )
        mws = ", ".join(f"{c} DOUBLE" for c in self.mw_columns)
        token_table = f"""
                    source_dataset VARCHAR NOT NULL, pseudonym VARCHAR NOT NULL,
                    household VARCHAR, role VARCHAR, {tokens},
                    epoch INTEGER NOT NULL, batch_id VARCHAR NOT NULL, stored_at DOUBLE NOT NULL,
                    PRIMARY KEY (source_dataset, pseudonym)"""
        with self.lock:
            self.conn.execute(f"""
                CREATE TABLE IF NOT EXISTS tokens ({token_table});
                CREATE TABLE IF NOT EXISTS tokens_next ({token_table});
                CREATE TABLE IF NOT EXISTS epoch_completions (
                    county VARCHAR NOT NULL, epoch INTEGER NOT NULL, batch_id VARCHAR NOT NULL,
                    completed_at DOUBLE NOT NULL, PRIMARY KEY (county, epoch));
                CREATE TABLE IF NOT EXISTS batches (
                    batch_id VARCHAR PRIMARY KEY, county VARCHAR NOT NULL,
                    upserts INTEGER, tombstones INTEGER, received_at DOUBLE);
                CREATE TABLE IF NOT EXISTS pending (
                    source_dataset VARCHAR NOT NULL, pseudonym VARCHAR NOT NULL,
                    queued_at DOUBLE NOT NULL, PRIMARY KEY (source_dataset, pseudonym));
                CREATE TABLE IF NOT EXISTS pairs (
                    county_l VARCHAR NOT NULL, pseudonym_l VARCHAR NOT NULL,
                    county_r VARCHAR NOT NULL, pseudonym_r VARCHAR NOT NULL,
                    match_probability DOUBLE NOT NULL, match_weight DOUBLE NOT NULL, {mws},
                    PRIMARY KEY (county_l, pseudonym_l, county_r, pseudonym_r));
                CREATE TABLE IF NOT EXISTS clusters (
                    cluster_id VARCHAR NOT NULL, county VARCHAR NOT NULL,
                    pseudonym VARCHAR NOT NULL, PRIMARY KEY (county, pseudonym));
                CREATE TABLE IF NOT EXISTS families (
                    family_id VARCHAR NOT NULL, county VARCHAR NOT NULL,
                    household VARCHAR NOT NULL, PRIMARY KEY (county, household));
                CREATE TABLE IF NOT EXISTS alerts (
                    alert_id VARCHAR PRIMARY KEY, county VARCHAR NOT NULL, kind VARCHAR NOT NULL,
                    subject VARCHAR NOT NULL, version INTEGER NOT NULL, state VARCHAR NOT NULL,
                    digest VARCHAR NOT NULL, body VARCHAR NOT NULL, delivered_version INTEGER,
                    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at DOUBLE NOT NULL DEFAULT 0,
                    updated_at DOUBLE NOT NULL);
                CREATE TABLE IF NOT EXISTS labels (
                    feedback_id VARCHAR PRIMARY KEY, alert_id VARCHAR NOT NULL,
                    county VARCHAR NOT NULL, decision VARCHAR NOT NULL, received_at DOUBLE);
                CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
                CREATE TABLE IF NOT EXISTS alerts_due (alert_id VARCHAR PRIMARY KEY);
            """)
            # The alerts with a version not yet delivered, so that the deliverer's frequent
            # look for work reads a few rows, not every alert. Rebuilt on opening: it can
            # only be as wrong as the last run left it, and never wrong for long.
            self.conn.execute("""
                BEGIN TRANSACTION;
                DELETE FROM alerts_due;
                INSERT INTO alerts_due SELECT alert_id FROM alerts
                    WHERE delivered_version IS NULL OR delivered_version < version;
                COMMIT;
            """)
            # Let DuckDB answer IN lists of up to 10,000 keys through an index (2,048 by
            # default): a backlog's alert batches and a token batch's records.
            self.conn.execute("SET index_scan_max_count = 10000")
            for table, column in _LOOKUP_INDEXES:
                self.conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {table}_{column} ON {table} ({column})"
                )

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """Run a block atomically under the store lock."""
        with self.lock:
            self.conn.execute("BEGIN TRANSACTION")
            try:
                yield self.conn
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read query under the lock and return a frame."""
        with self.lock:
            return self.conn.execute(sql, params or []).df()

    # --------------------------------------------------------------- batches
    def store_batch(self, batch: TokenBatch, *, epoch: int) -> tuple[bool, int]:
        """Store a token batch atomically; idempotent by ``batch_id``.

        Upserts of the current key epoch go to ``tokens`` (and are queued for scoring);
        upserts of the next epoch go to ``tokens_next``. The first batch a new store receives
        sets its current epoch. Tombstones remove the record from both tables.

        Returns:
            ``(stored, count)``: ``stored`` is False when the batch was already stored.

        Raises:
            EpochRefused: The batch is of an older epoch than the current one, or more than
                one ahead of it (nothing is stored).
        """
        with self.transaction() as conn:
            # Taken under the lock, so that queue times follow the order batches are stored
            # in (a full link clears the queue up to the time it read the tokens).
            now = time.time()
            seen = conn.execute(
                "SELECT 1 FROM batches WHERE batch_id = ?", [batch.batch_id]
            ).fetchall()
            if seen:
                return False, len(batch.rows) + len(batch.tombstones)
            current = self._epoch(conn)
            if current is None:
                current = epoch
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)", [_EPOCH_KEY, str(current)]
                )
            if epoch < current:
                raise EpochRefused(
                    f"key epoch {epoch} is retired (the federation is at epoch {current}): "
                    "re-tokenise with the federation's current secret"
                )
            if epoch > current + 1:
                raise EpochRefused(
                    f"key epoch {epoch} is not open (the federation is at epoch {current})"
                )
            table = "tokens" if epoch == current else "tokens_next"
            if batch.rows:
                frame = self._batch_frame(batch, epoch=epoch, now=now)
                with registered(conn, "incoming", frame):
                    cols = ", ".join(frame.column_names)
                    if table == "tokens":
                        keys = pa.table({"c": frame["source_dataset"], "k": frame["pseudonym"]})
                        with registered(conn, "keys", keys):
                            conn.execute(
                                "DELETE FROM tokens WHERE rowid IN (SELECT row_id FROM "
                                f"{keyed('tokens', 'source_dataset', 'pseudonym', 'keys')})"
                            )
                    else:
                        conn.execute(
                            f"DELETE FROM {table} WHERE source_dataset = ? AND pseudonym IN "
                            "(SELECT pseudonym FROM incoming)",
                            [batch.county],
                        )
                    conn.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM incoming")
                    if table == "tokens":
                        conn.execute(
                            "INSERT OR REPLACE INTO pending SELECT source_dataset, pseudonym, ? "
                            "FROM incoming",
                            [now],
                        )
            if batch.tombstones:
                gone = pa.table({"pseudonym": pa.array(batch.tombstones, pa.string())})
                with registered(conn, "gone", gone):
                    for name in ("tokens", "tokens_next"):
                        conn.execute(
                            f"DELETE FROM {name} WHERE source_dataset = ? AND pseudonym IN "
                            "(SELECT pseudonym FROM gone)",
                            [batch.county],
                        )
                    conn.execute(
                        "INSERT OR REPLACE INTO pending SELECT ?, pseudonym, ? FROM gone",
                        [batch.county, now],
                    )
            if batch.epoch_complete:
                conn.execute(
                    "INSERT OR IGNORE INTO epoch_completions VALUES (?, ?, ?, ?)",
                    [batch.county, epoch, batch.batch_id, now],
                )
            conn.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                [batch.batch_id, batch.county, len(batch.rows), len(batch.tombstones), now],
            )
        return True, len(batch.rows) + len(batch.tombstones)

    # --------------------------------------------------------------- key epochs
    def _epoch(self, conn: duckdb.DuckDBPyConnection) -> int | None:
        rows = conn.execute("SELECT value FROM meta WHERE key = ?", [_EPOCH_KEY]).fetchall()
        if rows:
            return int(rows[0][0])
        # A store from before key epochs were tracked: its tokens' epoch.
        found = conn.execute("SELECT max(epoch) FROM tokens").fetchall()
        return None if found[0][0] is None else int(found[0][0])

    def current_epoch(self) -> int | None:
        """The key epoch linked on (None until the first batch arrives)."""
        with self.lock:
            return self._epoch(self.conn)

    def epoch_progress(self) -> dict[str, Any]:
        """Where a rotation stands: the current epoch, and the next one's progress.

        Returns:
            ``current`` (epoch or None); ``next`` (current + 1); ``completed``, the counties
            that have published every record under the next epoch; ``holding``, the counties
            with tokens of the current epoch (those the switch waits for); ``staged``, rows
            held for the next epoch.
        """
        with self.lock:
            current = self._epoch(self.conn)
            nxt = None if current is None else current + 1
            completed = [
                str(r[0])
                for r in self.conn.execute(
                    "SELECT county FROM epoch_completions WHERE epoch = ? ORDER BY county",
                    [nxt],
                ).fetchall()
            ]
            holding = [
                str(r[0])
                for r in self.conn.execute(
                    "SELECT DISTINCT source_dataset FROM tokens ORDER BY 1"
                ).fetchall()
            ]
            staged = int(self.conn.execute("SELECT count(*) FROM tokens_next").fetchall()[0][0])
        return {
            "current": current,
            "next": nxt,
            "completed": completed,
            "holding": holding,
            "staged": staged,
        }

    def switch_epoch(self, epoch: int, *, awaited: Collection[str]) -> dict[str, int] | None:
        """Make ``epoch`` (the next one) current, if it is due: its tokens replace the old.

        It is due when at least one county has completed it and every county of
        ``awaited`` that holds tokens of the current epoch has. Checked and done in one
        transaction, so that no batch slips in between: every token row of the old epoch is
        deleted, the staged rows of the new epoch become the index, every record is queued
        for scoring (a full link then scores them all at once), and the epoch is recorded.
        Pairs, clusters and families are left for that link to replace, so that cluster ids
        carry over.

        Args:
            epoch: The epoch to switch to.
            awaited: The counties that must have completed it (the registry's nodes).

        Returns:
            ``deleted`` (old token rows) and ``moved`` (new token rows), or None if the
            switch is not due (nothing is changed).

        Raises:
            StoreError: If ``epoch`` is not the one after the current epoch.
        """
        with self.transaction() as conn:
            now = time.time()
            current = self._epoch(conn)
            if current is None or epoch != current + 1:
                raise StoreError(f"cannot switch to key epoch {epoch} from {current}")
            completed = {
                str(r[0])
                for r in conn.execute(
                    "SELECT county FROM epoch_completions WHERE epoch = ?", [epoch]
                ).fetchall()
            }
            holding = {
                str(r[0])
                for r in conn.execute("SELECT DISTINCT source_dataset FROM tokens").fetchall()
            }
            if not completed or (holding & set(awaited)) - completed:
                return None
            deleted = int(conn.execute("SELECT count(*) FROM tokens").fetchall()[0][0])
            moved = int(conn.execute("SELECT count(*) FROM tokens_next").fetchall()[0][0])
            cols = ", ".join(
                str(r[0])
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_name = 'tokens' AND table_schema = current_schema() "
                    "ORDER BY ordinal_position"
                ).fetchall()
            )
            conn.execute("DELETE FROM tokens")
            conn.execute(f"INSERT INTO tokens ({cols}) SELECT {cols} FROM tokens_next")
            conn.execute("DELETE FROM tokens_next")
            conn.execute("DELETE FROM pending")
            conn.execute(
                "INSERT INTO pending SELECT source_dataset, pseudonym, ? FROM tokens", [now]
            )
            conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [_EPOCH_KEY, str(epoch)])
        # Fold the deletion into the file now rather than at the next automatic checkpoint;
        # if another transaction is open, DuckDB does it when that one ends.
        with self.lock, suppress(duckdb.Error):
            self.conn.execute("CHECKPOINT")
        return {"deleted": deleted, "moved": moved}

    def _batch_frame(self, batch: TokenBatch, *, epoch: int, now: float) -> pa.Table:
        columns = list(zip(*batch.rows, strict=True))
        index = {c: i for i, c in enumerate(batch.columns)}
        n = len(batch.rows)
        data: dict[str, pa.Array] = {
            "source_dataset": pa.array([batch.county] * n, pa.string()),
            "pseudonym": pa.array(columns[index["pseudonym"]], pa.string()),
            "household": pa.array(columns[index["household"]], pa.string()),
            "role": pa.array(columns[index["role"]], pa.string()),
        }
        for c in self.token_columns:
            kind = pa.int16() if c.endswith(("_bf_n", "_fc")) else pa.int64()
            data[c] = pa.array(columns[index[c]], kind)
        data["epoch"] = pa.array([epoch] * n, pa.int32())
        data["batch_id"] = pa.array([batch.batch_id] * n, pa.string())
        data["stored_at"] = pa.array([now] * n, pa.float64())
        return pa.table(data)

    # --------------------------------------------------------------- meta
    def get_meta(self, key: str) -> str | None:
        """A stored setting (the model JSON, for example)."""
        with self.lock:
            rows = self.conn.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchall()
        return rows[0][0] if rows else None

    def set_meta(self, key: str, value: str) -> None:
        """Store a setting."""
        with self.lock:
            self.conn.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", [key, value])

    def counts(self) -> dict[str, Any]:
        """Sizes of every table, for status and metrics."""
        with self.lock:
            out: dict[str, Any] = {}
            for table in (
                "tokens",
                "tokens_next",
                "batches",
                "pending",
                "pairs",
                "clusters",
                "families",
                "labels",
            ):
                out[table] = self.conn.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            rows = self.conn.execute(
                "SELECT (delivered_version IS NULL OR delivered_version < version) AS waiting, "
                "count(*) FROM alerts GROUP BY 1"
            ).fetchall()
            out["alerts_pending"] = sum(n for waiting, n in rows if waiting)
            out["alerts_delivered"] = sum(n for waiting, n in rows if not waiting)
            out["counties"] = dict(
                self.conn.execute(
                    "SELECT source_dataset, count(*) FROM tokens GROUP BY 1 ORDER BY 1"
                ).fetchall()
            )
        return out

    def record_label(self, feedback_id: str, alert_id: str, county: str, decision: str) -> bool:
        """Store a clerical label; False if this feedback id was already stored."""
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM labels WHERE feedback_id = ?", [feedback_id]).fetchall():
                return False
            conn.execute(
                "INSERT INTO labels VALUES (?, ?, ?, ?, ?)",
                [feedback_id, alert_id, county, decision, time.time()],
            )
        return True

    def alert_body(self, alert_id: str) -> dict[str, Any] | None:
        """The newest body of an alert."""
        with self.lock:
            rows = self.conn.execute(
                "SELECT body FROM alerts WHERE alert_id = ?", [alert_id]
            ).fetchall()
        return json.loads(rows[0][0]) if rows else None
