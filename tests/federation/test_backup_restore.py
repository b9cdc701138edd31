"""Backup and restore as docs/operations.md describes them, into fresh directories.

A federation links and delivers; then, with work in flight (a county's changes queued in its
outbox while the matcher is stopped), every service is stopped and backed up, both ways the
guide gives: one node by copying its DuckDB file and key (a cold copy), the other node and the
matcher with DuckDB's ``EXPORT DATABASE``. Their folders are then lost. Each is restored into a
new folder (``IMPORT DATABASE`` for the exports), pointed at by its settings, and started: the
node sends what it had queued, the matcher links it, and every county gets the new alerts. No
alert held before is lost, none arrives twice, no batch is sent twice, and the nodes' audit
logs still verify.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import pytest

from federation.audit import verify_audit_file
from federation.demo import LocalFederation
from linkage.synthetic import generate_federation, write_federation

pytestmark = pytest.mark.slow

TIMEOUT = 90.0


def _rewrite_settings(config: Path, target: Path, **changes: Path) -> Path:
    """Copy a service's TOML settings to ``target`` with some paths changed."""
    values: dict[str, Any] = tomllib.loads(config.read_text())
    values.update({k: str(v) for k, v in changes.items()})
    lines = []
    for key, value in values.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, (int, float)):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f'{key} = "{value}"')
    target.write_text("\n".join(lines) + "\n")
    target.chmod(0o600)
    return target


def _export(database: Path, target: Path) -> None:
    with duckdb.connect(str(database), read_only=True) as conn:
        conn.execute(f"EXPORT DATABASE '{target}' (FORMAT parquet)")


def _import(source: Path, database: Path) -> None:
    with duckdb.connect(str(database)) as conn:
        conn.execute(f"IMPORT DATABASE '{source}'")


def _inbox(local: LocalFederation, county: str) -> dict[str, dict[str, Any]]:
    alerts = local.alerts(county)
    assert len({a["alert_id"] for a in alerts}) == len(alerts)
    return {a["alert_id"]: a for a in alerts}


def _metric(local: LocalFederation, party: str, name: str) -> float:
    text = local.client.get(f"{local.party(party).url}/metrics").text
    (value,) = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(value)


def test_restored_services_carry_on_where_they_stopped(tmp_path: Path) -> None:
    fed = generate_federation(counties=2, records=500, seed=51)
    files = sorted(write_federation(fed, tmp_path / "counties", truth_path=tmp_path / "t.csv"))
    a, b = (f.stem for f in files)
    truth = fed.truth
    # A's changes: four people known only to B so far become known to A.
    known_to_a = set(truth.loc[truth["county"] == a, "person_id"])
    theirs = truth[(truth["county"] == b) & ~truth["person_id"].isin(known_to_a)]
    other = pd.read_csv(files[1], dtype=str, keep_default_na=False)
    fresh = other[other["record_id"].isin(sorted(theirs["record_id"])[:4])].copy()
    fresh["record_id"] = [f"NEW-{i}" for i in range(len(fresh))]
    changed = tmp_path / "changed" / files[0].name
    changed.parent.mkdir()
    export = pd.read_csv(files[0], dtype=str, keep_default_na=False)
    pd.concat([export, fresh]).to_csv(changed, index=False)

    out = tmp_path / "fed"
    with LocalFederation(
        out,
        [a, b],
        seeds={a: 3, b: 4},
        node_settings={"publish_interval": 0.05, "retry_max_seconds": 1.0},
        matcher_settings={"retry_max_seconds": 1.0},
    ) as local:
        reports = local.ingest_all(files)
        local.wait_for_tokens(sum(r["accepted"] for r in reports.values()), TIMEOUT)
        local.relink(retrain=True)
        local.wait_until_delivered(TIMEOUT)
        before = {c: _inbox(local, c) for c in (a, b)}
        assert before[a] and before[b]

        # Work in flight: the matcher is stopped, so A's changes wait in its outbox.
        local.terminate("matcher")
        report = local.ingest(a, changed)
        assert report["upserts"] == 4
        assert local.node_status(a)["outbox"]["pending"] == 1
        local.terminate(a)
        local.terminate(b)

        # Back up the stopped services (docs/operations.md, "Backup"): A by a cold copy of
        # its database file, B and the matcher by EXPORT DATABASE; keys and settings copied.
        backup = tmp_path / "backup"
        folders = {a: out / "nodes" / a, b: out / "nodes" / b, "matcher": out / "matcher"}
        files_of = {a: "node", b: "node", "matcher": "matcher"}
        for party, folder in folders.items():
            name = files_of[party]
            (backup / party).mkdir(parents=True)
            for suffix in (".key", ".toml"):
                shutil.copy2(folder / f"{name}{suffix}", backup / party / f"{name}{suffix}")
            if party == a:
                shutil.copy2(folder / "node.duckdb", backup / party / "node.duckdb")
            else:
                _export(folder / f"{name}.duckdb", backup / party / "export")

        # The folders are lost.
        for folder in folders.values():
            shutil.rmtree(folder)

        # Restore into fresh folders (docs/operations.md, "Restore") and start: they carry
        # on where they stopped.
        for party in folders:
            name = files_of[party]
            fresh_dir = tmp_path / "restored" / party
            fresh_dir.mkdir(parents=True)
            if party == a:
                shutil.copy2(backup / party / "node.duckdb", fresh_dir / "node.duckdb")
            else:
                _import(backup / party / "export", fresh_dir / f"{name}.duckdb")
            shutil.copy2(backup / party / f"{name}.key", fresh_dir / f"{name}.key")
            moved = local.party(party)
            moved.config = _rewrite_settings(
                backup / party / f"{name}.toml",
                fresh_dir / f"{name}.toml",
                data_dir=fresh_dir,
                private_key=fresh_dir / f"{name}.key",
            )
            moved.log = fresh_dir / f"{name}.log"
        for party in folders:
            local.restart(party)
        local.wait_until_delivered(TIMEOUT)
        status = local.status()
        assert status["counties"] == {
            a: reports[a]["accepted"] + 4,
            b: reports[b]["accepted"],
        }
        after = {c: _inbox(local, c) for c in (a, b)}
        for county in (a, b):
            # Nothing held before is lost or goes back in time.
            for alert_id, alert in before[county].items():
                assert after[county][alert_id]["version"] >= alert["version"]
            assert len(after[county]) > len(before[county])
        assert {x.get("local_record_id") for x in after[a].values()} >= {
            f"NEW-{i}" for i in range(4)
        }
        assert status["alerts_delivered"] == sum(len(v) for v in after.values())
        # The queued batch went once; no alert was delivered twice.
        assert _metric(local, "matcher", "jigsaw_matcher_duplicate_batches_total") == 0
        duplicates = 'jigsaw_node_alert_messages_total{outcome="duplicate"}'
        for county in (a, b):
            assert _metric(local, county, duplicates) == 0

        # B is restored again, from the now older backup, which lacks the alerts delivered
        # since; the matcher's operator queues B's alerts again (docs/operations.md,
        # "Restoring an older backup"), and B ends up with every alert, each once.
        local.terminate(b)
        local.terminate("matcher")
        older = tmp_path / "older" / b
        older.mkdir(parents=True)
        _import(backup / b / "export", older / "node.duckdb")
        shutil.copy2(backup / b / "node.key", older / "node.key")
        local.nodes[b].config = _rewrite_settings(
            local.nodes[b].config,
            older / "node.toml",
            data_dir=older,
            private_key=older / "node.key",
        )
        with duckdb.connect(str(tmp_path / "restored" / "matcher" / "matcher.duckdb")) as conn:
            conn.execute(
                "UPDATE alerts SET delivered_version = NULL, attempts = 0, next_attempt_at = 0 "
                "WHERE county = ?",
                [b],
            )
        local.restart("matcher")
        local.restart(b)
        local.wait_until_delivered(TIMEOUT)
        again = _inbox(local, b)
        assert {k: (x["version"], x["status"]) for k, x in again.items()} == {
            k: (x["version"], x["status"]) for k, x in after[b].items()
        }
        # The alerts the older backup already held, unchanged since, came again: kept once.
        unchanged = [k for k, x in before[b].items() if after[b][k]["version"] == x["version"]]
        assert _metric(local, b, duplicates) == len(unchanged) > 0
    # The nodes' hash-chained audit logs came through intact.
    for folder in (tmp_path / "restored" / a, older):
        report = verify_audit_file(folder / "node.duckdb")
        assert report.ok and report.entries > 0, report.problems
