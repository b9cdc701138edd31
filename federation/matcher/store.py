"""The matcher's DuckDB store: tokens, pairs, clusters, families, alerts outbox, labels.

It holds tokens and pseudonyms only. Tokens sit in one ``tokens`` table whose
``source_dataset`` column is the county, the shape Splink reads directly, so that the index
is scored in place without copies. Every change that spans tables runs in one transaction,
so a crash leaves either all of it or none; a batch is committed before it is acknowledged.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from federation.errors import StoreError
from federation.protocol import TokenBatch
from linkage.tokenise import TokenSpec

__all__ = ["MatcherStore"]

_ID_COLUMNS = ("source_dataset", "pseudonym", "household", "role")


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
        with self.lock:
            self.conn.execute(f"""
                CREATE TABLE IF NOT EXISTS tokens (
                    source_dataset VARCHAR NOT NULL, pseudonym VARCHAR NOT NULL,
                    household VARCHAR, role VARCHAR, {tokens},
                    epoch INTEGER NOT NULL, batch_id VARCHAR NOT NULL, stored_at DOUBLE NOT NULL,
                    PRIMARY KEY (source_dataset, pseudonym));
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
            """)

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

        Returns:
            ``(stored, count)``: ``stored`` is False when the batch was already stored.
        """
        now = time.time()
        with self.transaction() as conn:
            seen = conn.execute(
                "SELECT 1 FROM batches WHERE batch_id = ?", [batch.batch_id]
            ).fetchall()
            if seen:
                return False, len(batch.rows) + len(batch.tombstones)
            if batch.rows:
                frame = self._batch_frame(batch, epoch=epoch, now=now)
                conn.register("incoming", frame)
                cols = ", ".join(frame.column_names)
                conn.execute(
                    "DELETE FROM tokens WHERE source_dataset = ? AND pseudonym IN "
                    "(SELECT pseudonym FROM incoming)",
                    [batch.county],
                )
                conn.execute(f"INSERT INTO tokens ({cols}) SELECT {cols} FROM incoming")
                conn.execute(
                    "INSERT OR REPLACE INTO pending SELECT source_dataset, pseudonym, ? "
                    "FROM incoming",
                    [now],
                )
                conn.unregister("incoming")
            if batch.tombstones:
                gone = pa.table({"pseudonym": pa.array(batch.tombstones, pa.string())})
                conn.register("gone", gone)
                conn.execute(
                    "DELETE FROM tokens WHERE source_dataset = ? AND pseudonym IN "
                    "(SELECT pseudonym FROM gone)",
                    [batch.county],
                )
                conn.execute(
                    "INSERT OR REPLACE INTO pending SELECT ?, pseudonym, ? FROM gone",
                    [batch.county, now],
                )
                conn.unregister("gone")
            conn.execute(
                "INSERT INTO batches VALUES (?, ?, ?, ?, ?)",
                [batch.batch_id, batch.county, len(batch.rows), len(batch.tombstones), now],
            )
        return True, len(batch.rows) + len(batch.tombstones)

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
