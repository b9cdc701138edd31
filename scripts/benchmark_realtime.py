"""Real-time benchmark: publish throughput over HTTP and alert latency with a large index.

    python scripts/benchmark_realtime.py --records 1000000 --trials 100 --out bench-out/realtime

First, one node alone publishes ``--solo-records`` records to a matcher (records per second
over HTTP, from the end of its ingest to the last token stored; ``--solo-records 0`` skips it).
Then it starts a real federation on loopback (a matcher and one node per county, separate
processes), has every node ingest and publish its county over HTTP at the same time,
trains and links everything, then runs trials: a record known to one county is published by
another county as a new record (a delta load of one row, ``jigsaw node ingest --delta``), and
the time from the node's acknowledgement of the load until the alert is in *both* counties'
alert APIs is measured. Prints percentiles and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import pandas as pd

from federation.demo import LocalFederation
from linkage.synthetic import generate_federation, write_federation


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _wait_for_alert(
    local: LocalFederation, county: str, record_id: str, since: float, timeout: float
) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for alert in local.alerts(county, since=str(since)):
            if alert.get("local_record_id") == record_id and alert["status"] != "withdrawn":
                return alert
        time.sleep(0.02)
    return None


def _solo_publish(out: Path, records: int, seed: int) -> dict[str, Any]:
    """One node ingests ``records`` records, then publishes them to the matcher over HTTP."""
    fed = generate_federation(counties=2, records=2 * records, seed=seed)
    files = sorted(write_federation(fed, out / "solo-counties"))
    big = max(files, key=lambda f: f.stat().st_size)
    with LocalFederation(out / "solo", [f.stem for f in files]) as local:
        start = time.perf_counter()
        report = local.ingest(big.stem, big)
        ingested = time.perf_counter()
        local.wait_for_tokens(int(report["accepted"]), timeout=3600)
        done = time.perf_counter()
    return {
        "records": int(report["accepted"]),
        "ingest_seconds": round(ingested - start, 2),
        "publish_seconds": round(done - ingested, 2),
        "publish_records_per_second": round(int(report["accepted"]) / (done - ingested)),
        "ingest_and_publish_records_per_second": round(int(report["accepted"]) / (done - start)),
    }


def main() -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--counties", type=int, default=6)
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-out/realtime"))
    parser.add_argument("--solo-records", type=int, default=200_000)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"records": args.records, "counties": args.counties}
    if args.solo_records:
        results["solo_publish"] = _solo_publish(out, args.solo_records, args.seed)
        print(json.dumps(results["solo_publish"]), flush=True)

    fed = generate_federation(counties=args.counties, records=args.records, seed=args.seed)
    files = sorted(write_federation(fed, out / "counties", truth_path=out / "truth.csv"))
    exports = {f.stem: pd.read_csv(f, dtype=str, keep_default_na=False) for f in files}
    truth = fed.truth
    known_in = truth.groupby("person_id")["county"].agg(set).to_dict()
    keys = zip(truth["county"], truth["record_id"], strict=True)
    person_of = dict(zip(keys, truth["person_id"], strict=True))
    del fed
    counties = [f.stem for f in files]
    with LocalFederation(out / "federation", counties) as local:
        start = time.perf_counter()
        reports = local.ingest_all(files)
        ingested = time.perf_counter() - start
        accepted = sum(r["accepted"] for r in reports.values())
        local.wait_for_tokens(accepted, timeout=3600)
        published = time.perf_counter() - start
        results["publish"] = {
            "records": accepted,
            "ingest_seconds": round(ingested, 1),
            "ingest_and_publish_seconds": round(published, 1),
            "records_per_second_all_nodes": round(accepted / published),
            "records_per_second_per_node": round(accepted / published / len(counties)),
        }
        print(json.dumps(results["publish"]), flush=True)
        t = time.perf_counter()
        results["link"] = local.relink(retrain=True)
        results["link"]["seconds"] = round(time.perf_counter() - t, 1)
        t = time.perf_counter()
        local.wait_until_delivered(timeout=3600)
        results["first_delivery_seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(results["link"]), flush=True)

        rng = random.Random(args.seed)
        latencies: list[float] = []
        with_ingest: list[float] = []
        misses = 0
        for trial in range(args.trials):
            source, target = rng.sample(counties, 2)
            frame = exports[source]
            while True:  # a person the target county does not know yet
                row = frame.iloc[[rng.randrange(len(frame))]].copy()
                source_id = str(row["record_id"].iloc[0])
                if target not in known_in[person_of[(source, source_id)]]:
                    break
            new_id = f"RT-{trial:04d}"
            row["record_id"] = new_id
            row["household_id"] = f"RT-HH-{trial:04d}"
            # The target county's feed of new records (a delta load): just this one.
            feed = out / "feeds" / f"{target}-{trial:04d}.csv"
            feed.parent.mkdir(exist_ok=True)
            row.to_csv(feed, index=False)
            since = time.time()
            t0 = time.perf_counter()
            report = local.ingest(target, feed, delta=True)
            assert report["upserts"] == 1, report
            published_at = time.perf_counter()
            mine = _wait_for_alert(local, target, new_id, since - 1, timeout=30)
            theirs = (
                _wait_for_alert(local, source, source_id, since - 1, timeout=30) if mine else None
            )
            if mine is None or theirs is None or mine["cluster_id"] != theirs["cluster_id"]:
                misses += 1
                continue
            done = time.perf_counter()
            latencies.append(done - published_at)
            with_ingest.append(done - t0)
            if trial % 10 == 0:
                print(f"trial {trial}: {latencies[-1] * 1000:.0f} ms", flush=True)
        results["alert_latency"] = {
            "trials": args.trials,
            "linked": len(latencies),
            "missed": misses,
            "index_records": accepted,
            "median_seconds": round(statistics.median(latencies), 3) if latencies else None,
            "p95_seconds": round(_percentile(latencies, 0.95), 3) if latencies else None,
            "max_seconds": round(max(latencies), 3) if latencies else None,
            "p95_seconds_including_node_load": (
                round(_percentile(with_ingest, 0.95), 3) if with_ingest else None
            ),
        }
        print(json.dumps(results["alert_latency"]), flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
