"""The matcher's linkage state: scoring new tokens, keeping clusters and families, and alerts.

Two paths lead to the same tables, through the same linkage code:

* :meth:`LinkIndex.relink` links everything stored with :func:`linkage.pipeline.match_tokens`
  (exactly what ``jigsaw link`` runs), training and calibrating the model first if needed.
* :meth:`LinkIndex.score_pending` scores only records that arrived or changed since, against
  the whole index, with the stored model (Splink's ``predict_between``), then re-clusters just
  the connected part of the graph they touch with :func:`linkage.cluster.cluster_people`.

Either way, :meth:`LinkIndex.refresh_alerts` compares the alerts each county should hold with
what was sent, and queues new versions and withdrawals for delivery.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pyarrow as pa

from federation.matcher.store import MatcherStore, keyed
from federation.registry import Registry
from linkage.cluster import cluster_people, link_families
from linkage.engine import DEFAULT_SPARK_MASTER, Engine, SplinkEngine
from linkage.model import LinkageModel
from linkage.pipeline import Stages, match_tokens
from linkage.relations import registered

__all__ = ["LinkIndex", "alert_id_for"]

logger = logging.getLogger(__name__)

Key = tuple[str, str]


def _key_table(keys: Iterable[Key]) -> pa.Table:
    """``(county, key)`` pairs as a relation with string columns ``c`` and ``k``, for
    :func:`federation.matcher.store.keyed`."""
    pairs = list(keys)
    return pa.table(
        {
            "c": pa.array([c for c, _ in pairs], pa.string()),
            "k": pa.array([k for _, k in pairs], pa.string()),
        }
    )


def _household_set(members: pd.DataFrame) -> set[Key]:
    return {
        (c, h)
        for c, h in zip(members["county"], members["household"], strict=True)
        if h is not None and not pd.isna(h)
    }


def alert_id_for(kind: str, county: str, subject: str) -> str:
    """Stable alert id: one person alert per record, one family alert per household."""
    return hashlib.sha256(f"{kind}|{county}|{subject}".encode()).hexdigest()[:32]


@dataclass
class ScoreReport:
    """What one scoring round did."""

    records: int = 0
    pairs: int = 0
    alerts_queued: int = 0
    seconds: float = 0.0
    #: Seconds per stage (read, score, pairs, cluster, family, alerts), for the log.
    stages: dict[str, float] = field(default_factory=dict)

    def mark(self, stage: str, since: float) -> float:
        """Record the time since ``since`` under ``stage``; returns now."""
        now = time.perf_counter()
        self.stages[stage] = round(now - since, 4)
        return now


class LinkIndex:
    """Linkage state over a :class:`MatcherStore`.

    Args:
        store: The matcher's store.
        registry: The federation registry (contacts for alerts).
        model: A trained model, or ``None`` until :meth:`relink` trains one.
        threshold: Alert threshold overriding the model's.
        engine: Where the full link (:meth:`relink`) runs Splink: ``duckdb`` or ``spark``.
            Incremental scoring always runs on the store's DuckDB.
        spark_master: Spark master URL for ``engine="spark"``.
    """

    def __init__(
        self,
        store: MatcherStore,
        registry: Registry,
        *,
        model: LinkageModel | None = None,
        threshold: float | None = None,
        engine: Engine = "duckdb",
        spark_master: str = DEFAULT_SPARK_MASTER,
    ) -> None:
        self.store = store
        # --- full-link engine (issue 8)
        self.engine: Engine = engine
        self.spark_master = spark_master
        self._full_link_engine: SplinkEngine | None = None
        # --- end full-link engine
        self.registry = registry
        self.threshold = threshold
        self.model: LinkageModel | None = None
        self._linker: Any = None
        self._engine: SplinkEngine | None = None
        self._generation = 0
        stored = store.get_meta("model")
        if model is not None:
            self._set_model(model)
        elif stored:
            self._set_model(LinkageModel(**_model_fields(json.loads(stored))))

    # ------------------------------------------------------------------ model
    def _set_model(self, model: LinkageModel) -> None:
        if self.threshold is not None:
            model.threshold = self.threshold
        self.model = model
        self.store.set_meta("model", json.dumps(model.to_dict()))
        self._linker = None  # rebuilt lazily on the next scoring round

    def _index_linker(self) -> Any:
        if self._linker is None:
            from splink import Linker

            assert self.model is not None
            # Splink's tables live in the store's database; only tokens are ever in them.
            self._engine = SplinkEngine(connection=self.store.conn.cursor())
            self._index = self._engine.db_api.register(
                "tokens", table_name="token_index", dataset_display_name="index"
            )
            self._linker = Linker(self._index, self.model.settings, log_level=logging.WARNING)
        return self._linker

    # ------------------------------------------------------------------ full link
    def relink(self, *, retrain: bool = False, stages: Stages | None = None) -> dict[str, Any]:
        """Link every stored token with the batch pipeline, training first if needed.

        Records keep the cluster ids they had (where a cluster carries over), so a full link
        (after a retrain, or on a new key epoch's tokens) re-sends no unchanged alert.
        """
        with self.store.lock:
            # Records queued after this read are left queued for incremental scoring.
            read_at = time.time()
            tokens = self.store.conn.execute("SELECT * FROM tokens").df()
        tables = {
            str(county): frame.drop(
                columns=["source_dataset", "epoch", "batch_id", "stored_at"]
            ).reset_index(drop=True)
            for county, frame in tokens.groupby("source_dataset", sort=True)
        }
        if len(tables) < 2:
            return {"status": "waiting", "counties": len(tables)}
        model = None if retrain else self.model
        result = match_tokens(
            tables,
            model=model,
            engine=self._relink_engine(),
            stages=stages,
            spec_fingerprint=self.store.spec.fingerprint,
            bloom=self.store.spec.bloom,
        )
        if model is None:
            self._set_model(result.model)
        pairs = self._pairs_frame(result.pairs)
        members = result.clusters.members
        with self.store.transaction() as conn:
            previous = {
                (str(c), str(p)): str(cid)
                for c, p, cid in conn.execute(
                    "SELECT county, pseudonym, cluster_id FROM clusters"
                ).fetchall()
            }
            members = _keep_cluster_ids(members, previous)
            conn.execute("DELETE FROM pairs")
            conn.execute("DELETE FROM clusters")
            conn.execute("DELETE FROM families")
            conn.execute("DELETE FROM pending WHERE queued_at <= ?", [read_at])
            with registered(conn, "p", pairs):
                conn.execute("INSERT INTO pairs SELECT * FROM p")
            with registered(conn, "m", members):
                conn.execute("INSERT INTO clusters SELECT cluster_id, county, pseudonym FROM m")
            with registered(conn, "f", result.families):
                conn.execute("INSERT INTO families SELECT family_id, county, household FROM f")
            # In the same transaction: a crash must not leave new clusters without their
            # alerts (nothing would queue them again).
            queued = self._queue_alerts(conn, None)
        return {
            "status": "linked",
            "records": len(tokens),
            "candidate_pairs": result.candidate_pairs,
            "pairs": len(pairs),
            "clusters": int(members["cluster_id"].nunique()) if len(members) else 0,
            "families": int(result.families["family_id"].nunique()) if len(result.families) else 0,
            "alerts_queued": queued,
            "threshold": self.model.threshold if self.model else None,
        }

    def forget_index(self) -> None:
        """Drop the scoring linker (rebuilt on the next round) after the tokens were replaced
        wholesale, as when the matcher switches to a new key epoch."""
        self._linker = None

    def _relink_engine(self) -> SplinkEngine | None:
        """The engine of the full link: a fresh in-memory DuckDB each time (``None``), or one
        Spark session kept for the matcher's lifetime (it takes tens of seconds to start)."""
        if self.engine == "duckdb":
            return None
        if self._full_link_engine is None:
            self._full_link_engine = SplinkEngine(self.engine, spark_master=self.spark_master)
        return self._full_link_engine

    def close(self) -> None:
        """Stop the full link's Spark session, if one was started."""
        if self._full_link_engine is not None:
            self._full_link_engine.close()
            self._full_link_engine = None

    def _pairs_frame(self, pairs: pd.DataFrame) -> pd.DataFrame:
        """Pairs in the store's column order, each pair once with its smaller end on the left."""
        cols = ["county_l", "pseudonym_l", "county_r", "pseudonym_r"]
        swap = (pairs["county_l"] > pairs["county_r"]) | (
            (pairs["county_l"] == pairs["county_r"]) & (pairs["pseudonym_l"] > pairs["pseudonym_r"])
        )
        out = pairs.copy()
        out.loc[swap, cols] = pairs.loc[
            swap, ["county_r", "pseudonym_r", "county_l", "pseudonym_l"]
        ].to_numpy()
        keep = [*cols, "match_probability", "match_weight", *self.store.mw_columns]
        for c in keep:
            if c not in out:
                out[c] = 0.0
        return out[keep].drop_duplicates(cols).reset_index(drop=True)

    # ------------------------------------------------------------------ incremental
    def score_pending(self, *, limit: int = 20_000) -> ScoreReport:
        """Score records that arrived or changed against the whole index; update clusters."""
        report = ScoreReport()
        if self.model is None:
            return report
        start = time.perf_counter()
        with self.store.lock:
            conn = self.store.conn
            pending = conn.execute(
                "SELECT source_dataset, pseudonym, queued_at FROM pending "
                "ORDER BY queued_at LIMIT ?",
                [limit],
            ).df()
            if pending.empty:
                return report
            keys = set(zip(pending["source_dataset"], pending["pseudonym"], strict=True))
            # The queued records' tokens (a tombstoned record has none: it is only re-clustered).
            with registered(conn, "k", _key_table(keys)):
                new = conn.sql(
                    "SELECT * EXCLUDE (row_id, epoch, batch_id, stored_at) FROM "
                    f"{keyed('tokens', 'source_dataset', 'pseudonym', 'k')}"
                ).to_arrow_table()
        t = report.mark("read", start)
        scored = pd.DataFrame()
        if new.num_rows:
            with self.store.lock:
                scored = self._predict_between(new)
            t = report.mark("score", t)
        threshold = self.model.threshold
        if len(scored):
            scored = scored[scored["match_probability"] >= threshold]
        pairs = self._pairs_frame(scored) if len(scored) else scored
        with self.store.transaction() as conn:
            with registered(conn, "k", _key_table(keys)):
                left = keyed("pairs", "county_l", "pseudonym_l", "k")
                right = keyed("pairs", "county_r", "pseudonym_r", "k")
                neighbours = conn.execute(
                    f"SELECT county_r, pseudonym_r FROM {left} "
                    f"UNION SELECT county_l, pseudonym_l FROM {right}"
                ).fetchall()
                conn.execute(
                    "DELETE FROM pairs WHERE rowid IN "
                    f"(SELECT row_id FROM {left} UNION SELECT row_id FROM {right})"
                )
                if len(pairs):
                    with registered(conn, "p", pairs):
                        # Every stored pair of these records was deleted above, so a plain insert:
                        # DuckDB's upsert costs several times as much at a million pairs.
                        conn.execute("INSERT INTO pairs SELECT * FROM p")
            # Only the queue entries read above: a batch stored while this round scored has
            # re-queued its records with a later time, and they must stay queued.
            with registered(conn, "done", pending):
                conn.execute(
                    "DELETE FROM pending WHERE (source_dataset, pseudonym, queued_at) IN "
                    "(SELECT source_dataset, pseudonym, queued_at FROM done)"
                )
            t = report.mark("pairs", t)
            seeds = keys | {(c, p) for c, p in neighbours}
            affected = self._recluster(conn, seeds)
            t = report.mark("cluster", t)
            households = self._refamily(conn, affected)
            t = report.mark("family", t)
            # In the same transaction as the pending rows' removal: committed apart, a crash
            # (or an error) between the two would lose these alerts for good.
            report.alerts_queued = self._queue_alerts(conn, affected, households)
            t = report.mark("alerts", t)
        report.mark("commit", t)
        report.records = len(pending)
        report.pairs = len(pairs)
        report.seconds = time.perf_counter() - start
        return report

    # --- candidate pre-filter (issue 8)
    def _predict_between(self, new: pa.Table, *, prefilter: bool = True) -> pd.DataFrame:
        """Score new tokens against the index: the model's blocking rules, then its comparisons.

        Splink's ``predict_between`` against the whole index reads and copies every stored
        record on every call (about a second per new record at a million records). With
        ``prefilter`` the index is first cut down to the records that share a block with a
        new record: one equi-join per blocking rule (the model's own rule text) from the new
        records into the stored tokens, which DuckDB answers by probing with the handful of
        new keys. Splink then blocks and scores the new records against that subset with the
        same rules and comparisons, so pairs and scores are exactly those of the full path.
        """
        linker = self._index_linker()
        assert self._engine is not None
        self._generation += 1
        name = f"new_tokens_{self._generation}"
        conn = self._engine.connection
        sdf = self._engine.db_api.register(new, table_name=name)
        candidates = f"index_candidates_{self._generation}"
        try:
            right = self._index
            if prefilter:
                conn.execute(f"CREATE TEMP TABLE {candidates} AS {self._candidates_sql(name)}")
                if not conn.execute(f"SELECT count(*) FROM {candidates}").fetchall()[0][0]:
                    return pd.DataFrame()
                right = self._engine.db_api.register(
                    candidates, table_name=candidates, dataset_display_name="index"
                )
            pred = linker.inference.predict_between(sdf, right, warning_mode="never")
            try:
                frame = pred.as_pandas_dataframe()
            finally:
                pred.drop_table_from_database_and_remove_from_cache()
        finally:
            conn.execute(f"DROP TABLE IF EXISTS {candidates}")
            conn.unregister(name)
        return frame.rename(
            columns={
                "source_dataset_l": "county_l",
                "source_dataset_r": "county_r",
            }
        )

    def _candidates_sql(self, new: str) -> str:
        """Stored records that share a block with a record of table ``new`` (another county)."""
        assert self.model is not None
        rules = [
            rule["blocking_rule"] if isinstance(rule, dict) else str(rule)
            for rule in self.model.settings["blocking_rules_to_generate_predictions"]
        ]
        # DuckDB pushes each join's keys from the few new rows into its scan of the stored
        # tokens as filters, so a rule costs a scan of two columns (milliseconds at a million
        # records); the rows are then fetched by row id. (ART indexes on the blocking columns
        # were tried and measured: DuckDB does not use them for these joins.)
        rows = " UNION ".join(
            f"SELECT r.rowid AS row_id FROM {new} AS l JOIN tokens AS r "
            f"ON ({rule}) AND l.source_dataset <> r.source_dataset"
            for rule in rules
        )
        return f"SELECT * FROM tokens WHERE rowid IN (SELECT row_id FROM ({rows}))"

    # --- end candidate pre-filter

    def _recluster(self, conn: Any, seeds: set[Key]) -> set[Key]:
        """Re-cluster the connected part of the pair graph around ``seeds``."""
        component = set(seeds)
        component |= self._cluster_members_of(conn, component)
        frontier = set(component)
        while frontier:
            with registered(conn, "f", _key_table(frontier)):
                ends = conn.execute(
                    "SELECT county_l, pseudonym_l, county_r, pseudonym_r FROM "
                    f"{keyed('pairs', 'county_l', 'pseudonym_l', 'f')} UNION "
                    "SELECT county_l, pseudonym_l, county_r, pseudonym_r FROM "
                    f"{keyed('pairs', 'county_r', 'pseudonym_r', 'f')}"
                ).fetchall()
            found = {(cl, pl) for cl, pl, _, _ in ends} | {(cr, pr) for _, _, cr, pr in ends}
            frontier = found - component
            component |= found
        if not component:
            return component
        with registered(conn, "c", _key_table(component)):
            pairs = conn.execute(
                f"SELECT * EXCLUDE (row_id) FROM {keyed('pairs', 'county_l', 'pseudonym_l', 'c')}"
            ).df()
            in_clusters = keyed("clusters", "county", "pseudonym", "c")
            rows = conn.execute(
                f"SELECT county, pseudonym, cluster_id FROM {in_clusters}"
            ).fetchall()
            previous: dict[Key, str] = {(c, p): cid for c, p, cid in rows}
            conn.execute(f"DELETE FROM clusters WHERE rowid IN (SELECT row_id FROM {in_clusters})")
        if len(pairs):
            members = _keep_cluster_ids(cluster_people(pairs).members, previous)
            if len(members):
                with registered(conn, "m", members):
                    conn.execute("INSERT INTO clusters SELECT cluster_id, county, pseudonym FROM m")
        return component

    @staticmethod
    def _cluster_members_of(conn: Any, keys: set[Key]) -> set[Key]:
        """Every record in a cluster with one of ``keys``."""
        if not keys:
            return set()
        with registered(conn, "q", _key_table(keys)):
            rows = conn.execute(
                "SELECT county, pseudonym FROM clusters WHERE cluster_id IN (SELECT cluster_id "
                f"FROM {keyed('clusters', 'county', 'pseudonym', 'q')})"
            ).fetchall()
        return {(c, p) for c, p in rows}

    @staticmethod
    def _households_of(conn: Any, records: Iterable[Key]) -> set[Key]:
        """The ``(county, household)`` of each of ``records`` that has one."""
        with registered(conn, "q", _key_table(records)):
            rows = conn.execute(
                "SELECT source_dataset, household FROM "
                f"{keyed('tokens', 'source_dataset', 'pseudonym', 'q')} WHERE household IS NOT NULL"
            ).fetchall()
        return {(c, h) for c, h in rows}

    @staticmethod
    def _family_members(conn: Any, households: set[Key]) -> pd.DataFrame:
        """Every member (``cluster_id, county, pseudonym, household``) of the clusters that
        hold a record of one of ``households``: one index lookup per step."""
        with registered(conn, "h", _key_table(households)):
            records_in = conn.execute(
                "SELECT source_dataset, pseudonym FROM "
                f"{keyed('tokens', 'source_dataset', 'household', 'h')}"
            ).fetchall()
        with registered(conn, "q", _key_table(records_in)):
            clustered = conn.execute(
                "SELECT cluster_id, county, pseudonym FROM clusters WHERE cluster_id IN "
                f"(SELECT cluster_id FROM {keyed('clusters', 'county', 'pseudonym', 'q')})"
            ).df()
        members = _key_table(zip(clustered["county"], clustered["pseudonym"], strict=True))
        with registered(conn, "q", members):
            held = conn.execute(
                "SELECT source_dataset AS county, pseudonym, household FROM "
                f"{keyed('tokens', 'source_dataset', 'pseudonym', 'q')}"
            ).df()
        return clustered.merge(held, on=["county", "pseudonym"])

    def _refamily(self, conn: Any, records: set[Key]) -> set[Key]:
        """Recompute the families reachable from the households of ``records``."""
        households = self._households_of(conn, records)
        # ... and every household already in a family with one of them.
        with registered(conn, "q", _key_table(households)):
            rows = conn.execute(
                "SELECT county, household FROM families WHERE family_id IN (SELECT family_id "
                f"FROM {keyed('families', 'county', 'household', 'q')})"
            ).fetchall()
        households |= {(c, h) for c, h in rows}
        frontier = set(households)
        while frontier:
            found = _household_set(self._family_members(conn, frontier))
            frontier = found - households
            households |= found
        # Every member of every cluster that touches the closure: what the families are
        # made of.
        members = self._family_members(conn, households)
        if households:
            with registered(conn, "h", _key_table(households)):
                conn.execute(
                    "DELETE FROM families WHERE rowid IN (SELECT row_id FROM "
                    f"{keyed('families', 'county', 'household', 'h')})"
                )
        if len(members):
            hh = members[["county", "pseudonym", "household"]]
            families = link_families(members[["cluster_id", "county", "pseudonym"]], hh)
            if len(families):
                with registered(conn, "f", families):
                    # Every household here was deleted above (the closure holds them all), so a
                    # plain insert: DuckDB's upsert costs ten times as much.
                    conn.execute("INSERT INTO families SELECT family_id, county, household FROM f")
        return households

    # ------------------------------------------------------------------ alerts
    def refresh_alerts(
        self, records: Iterable[Key] | None, households: Iterable[Key] | None = None
    ) -> int:
        """Queue the alert versions and withdrawals that the current clusters imply.

        Args:
            records: Records whose person alerts may have changed (``None``: all).
            households: Households whose family alerts may have changed (``None`` with
                ``records=None``: all).

        Returns:
            How many alert messages were queued.
        """
        with self.store.transaction() as conn:
            return self._queue_alerts(conn, records, households)

    def _queue_alerts(
        self, conn: Any, records: Iterable[Key] | None, households: Iterable[Key] | None = None
    ) -> int:
        """:meth:`refresh_alerts` within the caller's open transaction on the store."""
        assert self.model is not None
        desired = self._desired_alerts(records, households)
        now = time.time()
        queued = 0
        with self.store.lock:  # re-entrant: the caller's transaction holds it already
            if records is None:
                current = conn.execute(
                    "SELECT alert_id, version, state, digest FROM alerts"
                ).fetchall()
            else:
                ids = [alert_id_for("person", c, p) for c, p in records]
                ids += [alert_id_for("family", c, h) for c, h in (households or [])]
                with registered(conn, "ids", pa.table({"alert_id": pa.array(ids, pa.string())})):
                    current = conn.execute(
                        "SELECT alert_id, version, state, digest FROM alerts "
                        "WHERE alert_id IN (SELECT alert_id FROM ids)"  # the key index, no scan
                    ).fetchall()
            existing = {a: (v, s, d) for a, v, s, d in current}
            rows = []
            for alert_id, (county, kind, subject, body) in desired.items():
                digest = _digest(body)
                old = existing.get(alert_id)
                if old and old[1] == "active" and old[2] == digest:
                    continue
                version = (old[0] + 1) if old else 1
                full = {**body, "alert_id": alert_id, "version": version}
                rows.append(
                    (
                        alert_id,
                        county,
                        kind,
                        subject,
                        version,
                        "active",
                        digest,
                        json.dumps(full),
                        now,
                    )
                )
            for alert_id, (version, state, _) in existing.items():
                if alert_id in desired or state == "withdrawn":
                    continue
                old_body = json.loads(
                    conn.execute(
                        "SELECT body FROM alerts WHERE alert_id = ?", [alert_id]
                    ).fetchall()[0][0]
                )
                withdrawal = {
                    "schema": "withdrawal/1",
                    "alert_id": alert_id,
                    "version": version + 1,
                    "county": old_body["county"],
                    "reason": "the records behind this alert no longer link",
                }
                rows.append(
                    (
                        alert_id,
                        old_body["county"],
                        old_body["kind"],
                        old_body.get("pseudonym") or old_body.get("household") or "",
                        version + 1,
                        "withdrawn",
                        "",
                        json.dumps(withdrawal),
                        now,
                    )
                )
            if rows:
                frame = pd.DataFrame(
                    rows,
                    columns=[
                        "alert_id",
                        "county",
                        "kind",
                        "subject",
                        "version",
                        "state",
                        "digest",
                        "body",
                        "updated_at",
                    ],
                )
                with registered(conn, "a", frame):
                    conn.execute(
                        "INSERT INTO alerts (alert_id, county, kind, subject, version, state, "
                        "digest, body, "
                        "delivered_version, attempts, next_attempt_at, updated_at) "
                        "SELECT alert_id, county, kind, subject, version, state, digest, body, "
                        "NULL, 0, 0, updated_at "
                        "FROM a ON CONFLICT (alert_id) DO UPDATE SET version = EXCLUDED.version, "
                        "state = EXCLUDED.state, digest = EXCLUDED.digest, body = EXCLUDED.body, "
                        "attempts = 0, next_attempt_at = 0, updated_at = EXCLUDED.updated_at"
                    )
                    conn.execute("INSERT OR IGNORE INTO alerts_due SELECT alert_id FROM a")
                queued = len(rows)
        return queued

    def _desired_alerts(
        self, records: Iterable[Key] | None, households: Iterable[Key] | None
    ) -> dict[str, tuple[str, str, str, dict[str, Any]]]:
        assert self.model is not None
        conn = self.store.conn
        with self.store.lock:
            if records is None:
                members = conn.execute("SELECT * FROM clusters").df()
                fams = conn.execute("SELECT * FROM families").df()
            else:
                with registered(conn, "q", _key_table(records)):
                    members = conn.execute(
                        "SELECT * FROM clusters WHERE cluster_id IN (SELECT cluster_id FROM "
                        f"{keyed('clusters', 'county', 'pseudonym', 'q')})"
                    ).df()
                with registered(conn, "q", _key_table(households or [])):
                    fams = conn.execute(
                        "SELECT * FROM families WHERE family_id IN (SELECT family_id FROM "
                        f"{keyed('families', 'county', 'household', 'q')})"
                    ).df()
            if records is None:
                pairs = conn.execute("SELECT * FROM pairs").df()
            else:
                members_keys = zip(members["county"], members["pseudonym"], strict=True)
                with registered(conn, "m", _key_table(members_keys)):
                    pairs = conn.execute(
                        "SELECT * EXCLUDE (row_id) FROM "
                        f"{keyed('pairs', 'county_l', 'pseudonym_l', 'm')}"
                    ).df()
            # The labelled alerts through the alerts' key index (a join would scan them all).
            labels = conn.execute(
                "WITH a AS MATERIALIZED (SELECT alert_id, subject, county, kind FROM alerts "
                "WHERE alert_id IN (SELECT alert_id FROM labels)) "
                "SELECT a.subject, a.county, l.decision, a.kind FROM labels l "
                "JOIN a USING (alert_id) ORDER BY l.received_at"
            ).df()
        cluster_of = {
            (c, p): cid
            for cid, c, p in zip(
                members["cluster_id"], members["county"], members["pseudonym"], strict=True
            )
        }
        best: dict[Key, tuple[float, dict[str, float]]] = {}
        mw_cols = self.store.mw_columns
        for row in pairs.to_dict("records"):
            a = (str(row["county_l"]), str(row["pseudonym_l"]))
            b = (str(row["county_r"]), str(row["pseudonym_r"]))
            if cluster_of.get(a) is None or cluster_of.get(a) != cluster_of.get(b):
                continue
            weights = {c: float(row[c]) for c in mw_cols}
            probability = float(row["match_probability"])
            for key in (a, b):
                if key not in best or probability > best[key][0]:
                    best[key] = (probability, weights)
        reviews: dict[str, list[dict[str, str]]] = {}
        for subject, county, decision, kind in labels.itertuples(index=False):
            cid = cluster_of.get((county, subject)) if kind == "person" else None
            if cid:
                reviews.setdefault(cid, []).append({"county": county, "decision": decision})
        out: dict[str, tuple[str, str, str, dict[str, Any]]] = {}
        now = time.time()
        for cid, group in members.groupby("cluster_id", sort=False):
            counties = sorted(set(group["county"]))
            for county, pseudonym in zip(group["county"], group["pseudonym"], strict=True):
                prob, weights = best.get((county, pseudonym), (0.0, {}))
                body = {
                    "schema": "alert/1",
                    "kind": "person",
                    "county": county,
                    "cluster_id": cid,
                    "pseudonym": pseudonym,
                    "household": None,
                    "other_counties": self._others(counties, county),
                    "match_probability": round(prob, 6),
                    "explanation": [
                        {"field": f, "level": lvl, "weight": w}
                        for f, lvl, w in self.model.explain(weights)
                    ],
                    "reviews": _dedupe_reviews(reviews.get(str(cid), [])),
                    "created_at": now,
                }
                out[alert_id_for("person", county, pseudonym)] = (county, "person", pseudonym, body)
        family_prob = self._family_probability(members, best, fams)
        for fid, group in fams.groupby("family_id", sort=False):
            counties = sorted(set(group["county"]))
            for county, household in zip(group["county"], group["household"], strict=True):
                body = {
                    "schema": "alert/1",
                    "kind": "family",
                    "county": county,
                    "cluster_id": fid,
                    "pseudonym": None,
                    "household": household,
                    "other_counties": self._others(counties, county),
                    "match_probability": family_prob.get(str(fid), 0.0),
                    "explanation": [],
                    "reviews": [],
                    "created_at": now,
                }
                out[alert_id_for("family", county, household)] = (county, "family", household, body)
        return out

    def _family_probability(
        self,
        members: pd.DataFrame,
        best: dict[Key, tuple[float, dict[str, float]]],
        fams: pd.DataFrame,
    ) -> dict[str, float]:
        if fams.empty:
            return {}
        conn = self.store.conn
        keys = _key_table(zip(fams["county"], fams["household"], strict=True))
        # A few families: through the household index; all of them (a full link): a join.
        tokens = (
            keyed("tokens", "source_dataset", "household", "q") + " AS t"
            if len(fams) <= 10_000
            else "tokens t"
        )
        with self.store.lock, registered(conn, "f", fams), registered(conn, "q", keys):
            rows = conn.execute(
                f"SELECT f.family_id, t.source_dataset, t.pseudonym FROM f JOIN {tokens} "
                "ON t.source_dataset = f.county AND t.household = f.household"
            ).fetchall()
        out: dict[str, float] = {}
        for fid, county, pseudonym in rows:
            prob = best.get((county, pseudonym), (0.0, {}))[0]
            out[fid] = max(out.get(fid, 0.0), round(prob, 6))
        return out

    def _others(self, counties: list[str], county: str) -> list[dict[str, str]]:
        others = []
        for other in counties:
            if other == county:
                continue
            entry = self.registry.nodes.get(other)
            others.append(
                {
                    "county": other,
                    "display_name": entry.display_name if entry else other,
                    "contact_name": entry.contact.name if entry else "",
                    "contact_email": entry.contact.email if entry else "",
                    "contact_phone": entry.contact.phone if entry else "",
                }
            )
        return others


def _keep_cluster_ids(members: pd.DataFrame, previous: dict[Key, str]) -> pd.DataFrame:
    """Give each new cluster the id its members had before, where that is unambiguous.

    A cluster that grows or loses a member keeps its id, so a county's alert keeps naming the
    same cluster; a cluster that splits keeps the id in its largest part only.
    """
    if members.empty or not previous:
        return members
    keys = zip(members["county"], members["pseudonym"], strict=True)
    members = members.assign(previous=pd.Series([previous.get(k) for k in keys], dtype=object))
    votes = (
        members.dropna(subset=["previous"])
        .groupby(["cluster_id", "previous"])
        .size()
        .reset_index(name="n")
        .sort_values(["n", "cluster_id", "previous"], ascending=[False, True, True])
    )
    rename: dict[str, str] = {}
    taken: set[str] = set()
    for new_id, old_id in zip(votes["cluster_id"], votes["previous"], strict=True):
        if new_id not in rename and old_id not in taken:
            rename[new_id] = old_id
            taken.add(old_id)
    members["cluster_id"] = [rename.get(c, c) for c in members["cluster_id"]]
    return members.drop(columns=["previous"])


def _dedupe_reviews(reviews: list[dict[str, str]]) -> list[dict[str, str]]:
    latest: dict[str, dict[str, str]] = {}
    for r in reviews:
        latest[r["county"]] = r
    return [latest[c] for c in sorted(latest)]


def _digest(body: dict[str, Any]) -> str:
    stable = {k: v for k, v in body.items() if k != "created_at"}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:32]


def _model_fields(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "settings": data["splink_settings"],
        "threshold": float(data["threshold"]),
        "metadata": dict(data.get("metadata", {})),
    }
