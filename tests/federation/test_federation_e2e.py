"""End to end: a matcher and 2, 3 and 5 county nodes as real server processes on loopback.

Nothing is mocked: every node ingests a generated county export into its own DuckDB file,
publishes signed token batches over HTTP, the matcher trains by EM and links, and alerts come
back, signed, to every county involved. Then records change and disappear, and the alerts follow.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from federation.demo import LocalFederation
from linkage.evaluate import cluster_pairs, pair_quality, true_person_pairs
from linkage.synthetic import generate_federation, write_federation

pytestmark = pytest.mark.slow


def _federation(tmp: Path, counties: int, records: int) -> tuple[list[Path], pd.DataFrame]:
    fed = generate_federation(counties=counties, records=records, seed=11 + counties)
    files = write_federation(fed, tmp / "counties", truth_path=tmp / "truth.csv")
    return sorted(files), fed.truth


def _open_person_alerts(local: LocalFederation) -> dict[str, list[dict[str, Any]]]:
    return {
        c: [a for a in local.alerts(c) if a["kind"] == "person" and a["status"] != "withdrawn"]
        for c in local.nodes
    }


def _assert_every_county_hears(inbox: dict[str, list[dict[str, Any]]]) -> None:
    by_cluster: dict[str, set[str]] = defaultdict(set)
    claimed: dict[str, set[str]] = defaultdict(set)
    for county, alerts in inbox.items():
        for alert in alerts:
            by_cluster[alert["cluster_id"]].add(county)
            claimed[alert["cluster_id"]].update(o["county"] for o in alert["other_counties"])
            claimed[alert["cluster_id"]].add(county)
    assert by_cluster, "no alerts at all"
    for cluster_id, counties in by_cluster.items():
        # Every county named in any alert of the cluster holds an alert with that cluster id.
        assert counties == claimed[cluster_id], cluster_id
        assert len(counties) >= 2


@pytest.mark.parametrize("counties", [2, 3, 5])
def test_federation_links_and_alerts_every_county(tmp_path: Path, counties: int) -> None:
    files, truth = _federation(tmp_path, counties, 400 * counties)
    with LocalFederation(tmp_path / "fed", [f.stem for f in files]) as local:
        reports = local.ingest_all(files)
        accepted = sum(r["accepted"] for r in reports.values())
        assert all(r["input_rows"] == r["accepted"] + r["quarantined"] for r in reports.values())
        local.wait_for_tokens(accepted)
        summary = local.relink(retrain=True)
        assert summary["status"] == "linked"
        local.wait_until_delivered()
        inbox = _open_person_alerts(local)
        _assert_every_county_hears(inbox)
        rows = [
            (a["cluster_id"], county, a["local_record_id"])
            for county, alerts in inbox.items()
            for a in alerts
        ]
        frame = pd.DataFrame(rows, columns=["cluster_id", "county", "record_id"])
        quality = pair_quality(
            cluster_pairs(frame, cluster="cluster_id", county="county", member="record_id"),
            true_person_pairs(truth),
        )
        assert quality.f1 >= 0.9, quality.as_dict()
        # Each county sees its own records only: every local id is one of its own.
        for county, alerts in inbox.items():
            own = set(pd.read_csv(tmp_path / "counties" / f"{county}.csv", dtype=str)["record_id"])
            assert {a["local_record_id"] for a in alerts} <= own
    # The services' databases (plaintext at the nodes, tokens at the matcher) and their WAL
    # and spill files are readable by their owner only.
    stores = [*(tmp_path / "fed").rglob("*.duckdb"), *(tmp_path / "fed").rglob("*.duckdb.wal")]
    assert len(stores) >= counties + 1
    assert all(p.stat().st_mode & 0o077 == 0 for p in stores), [
        (p.name, oct(p.stat().st_mode)) for p in stores
    ]


def test_changes_and_withdrawals_reach_every_county(tmp_path: Path) -> None:
    files, _ = _federation(tmp_path, 3, 1500)
    with LocalFederation(tmp_path / "fed", [f.stem for f in files]) as local:
        reports = local.ingest_all(files)
        local.wait_for_tokens(sum(r["accepted"] for r in reports.values()))
        local.relink(retrain=True)
        local.wait_until_delivered()
        inbox = _open_person_alerts(local)

        # Withdrawal: a county removes a linked record; every alert of that cluster that
        # rested on it is withdrawn, at every county.
        county = files[0].stem
        victim = next(a for a in inbox[county] if len(a["other_counties"]) == 1)
        other = victim["other_counties"][0]["county"]
        export = pd.read_csv(files[0], dtype=str, keep_default_na=False)
        export = export[export["record_id"] != victim["local_record_id"]]
        changed = tmp_path / "changed" / files[0].name
        changed.parent.mkdir()
        export.to_csv(changed, index=False)
        report = local.ingest(county, changed)
        assert report["tombstones"] == 1 and report["upserts"] == 0
        local.wait_until_delivered()
        mine = {a["alert_id"]: a for a in local.alerts(county)}
        assert mine[victim["alert_id"]]["status"] == "withdrawn"
        theirs = [a for a in local.alerts(other) if a["cluster_id"] == victim["cluster_id"]]
        assert theirs and all(a["status"] == "withdrawn" for a in theirs)

        # A new record in a third county that matches an existing one: both counties hear,
        # in near real time, with one cluster id.
        target = files[1].stem
        source = pd.read_csv(files[2], dtype=str, keep_default_na=False)
        known = {a.get("local_record_id") for a in local.alerts(files[2].stem)}
        fresh = source[~source["record_id"].isin(known)].iloc[[0]].copy()
        fresh["record_id"] = "NEW-0001"
        fresh["household_id"] = "NEW-HH-1"
        target_export = pd.read_csv(files[1], dtype=str, keep_default_na=False)
        grown = tmp_path / "changed" / files[1].name
        pd.concat([target_export, fresh]).to_csv(grown, index=False)
        report = local.ingest(target, grown)
        assert report["upserts"] == 1
        deadline = time.monotonic() + 30  # from the node's acceptance of the change
        hits: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            hits = [a for a in local.alerts(target) if a.get("local_record_id") == "NEW-0001"]
            if hits:
                break
            time.sleep(0.1)
        assert hits, "the new record was not linked"
        cluster_id = hits[0]["cluster_id"]
        assert files[2].stem in {o["county"] for o in hits[0]["other_counties"]}
        local.wait_until_delivered()
        partner = [a for a in local.alerts(files[2].stem) if a["cluster_id"] == cluster_id]
        assert partner and partner[0]["status"] != "withdrawn"
