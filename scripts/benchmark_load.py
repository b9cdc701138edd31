"""Load benchmark: many counties publishing at once, then a stream of new records.

    python scripts/benchmark_load.py --counties 6 --records-per-node 100000 --out bench-out/load

Starts a real federation on loopback (a matcher and one node per county, each its own process)
and measures, sampling the matcher's queues and every process's memory (RSS) all along:

1. **Publish**: every node ingests its county (``--records-per-node`` records) at the same
   time and publishes signed token batches over HTTP; throughput is records stored by the
   matcher per second, from the first ingest request to the last token stored.
2. **First link**: the matcher trains, links everything and delivers the alerts.
3. **Stream**: ``--rounds`` rounds; in each, one county (in turn) loads its next export with
   ``--new-per-round`` new records, most of them people already known elsewhere. The alert
   latency of a new record is the time from its node committing the load (its outbox row) to
   that node storing the record's alert, and to every county involved storing theirs; both
   are read from the nodes' own databases afterwards, to the millisecond.

Prints a summary and a Markdown table for BENCHMARKS.md, and writes ``results.json`` with the
time series. Runs for about half an hour at the default size on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import psutil

from federation.demo import LocalFederation
from linkage.synthetic import generate_federation, write_federation


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Monitor:
    """Samples the matcher's queues and every party's RSS once a second, in a thread."""

    local: LocalFederation
    interval: float = 0.5
    samples: list[dict[str, Any]] = field(default_factory=list)
    phase: str = "start"
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(10)

    def _rss(self, name: str) -> float:
        process = self.local.party(name).process
        try:
            return psutil.Process(process.pid).memory_info().rss / 2**20 if process else 0.0
        except psutil.Error:
            return 0.0

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            sample: dict[str, Any] = {
                "t": time.time(),
                "phase": self.phase,
                "load1": os.getloadavg()[0],
                "matcher_rss_mib": self._rss("matcher"),
                "nodes_rss_mib": sum(self._rss(c) for c in self.local.nodes),
                "max_node_rss_mib": max(self._rss(c) for c in self.local.nodes),
            }
            try:
                status = self.local.status()
                sample.update(
                    tokens=status["tokens"],
                    pending=status["pending"],
                    alerts_pending=status["alerts_pending"],
                    alerts_delivered=status["alerts_delivered"],
                )
            except Exception:  # busy or restarting: the sample keeps the memory figures
                pass
            self.samples.append(sample)

    def summary(self, phase: str) -> dict[str, Any]:
        rows = [s for s in self.samples if s["phase"] == phase]
        if not rows:
            return {}

        def top(key: str) -> float:
            return round(max(s.get(key, 0) or 0 for s in rows), 1)

        return {
            "seconds": round(rows[-1]["t"] - rows[0]["t"], 1),
            "matcher_rss_mib_peak": top("matcher_rss_mib"),
            "matcher_rss_mib_end": round(rows[-1]["matcher_rss_mib"], 1),
            "node_rss_mib_peak": top("max_node_rss_mib"),
            "max_pending_records": top("pending"),
            "max_alerts_pending": top("alerts_pending"),
            "load1_mean": round(statistics.mean(s["load1"] for s in rows), 2),
        }


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.5)


def _stream_exports(
    fed: Any, exports: dict[str, pd.DataFrame], rounds: int, per_round: int, seed: int
) -> list[tuple[str, pd.DataFrame]]:
    """Each round's county and its new rows: mostly people known elsewhere, some strangers."""
    rng = random.Random(seed)
    truth = fed.truth
    known_in = truth.groupby("person_id")["county"].agg(set).to_dict()
    person = dict(
        zip(zip(truth["county"], truth["record_id"], strict=True), truth["person_id"], strict=True)
    )
    counties = sorted(exports)
    plan = []
    for r in range(rounds):
        county = counties[r % len(counties)]
        rows = []
        while len(rows) < per_round:
            source = rng.choice([c for c in counties if c != county])
            row = exports[source].iloc[rng.randrange(len(exports[source]))].copy()
            if county in known_in[person[(source, row["record_id"])]]:
                continue
            i = len(rows)
            if i % 5 == 4:  # a stranger: nobody else knows this person
                letters = "abcdefghijklmnopqrstuvwxyz"
                row["date_of_birth"] = f"{rng.randint(1930, 2020)}-0{rng.randint(1, 9)}-1{i % 10}"
                row["given_name"] = "".join(rng.choices(letters, k=7)).title()
                row["family_name"] = "".join(rng.choices(letters, k=9)).title()
                for column in ("nhs_number", "postcode", "address", "previous_family_names"):
                    row[column] = ""
            row["record_id"] = f"LD-{r:03d}-{i:04d}"
            row["household_id"] = f"LD-HH-{r:03d}-{i // 2:04d}"
            rows.append(row)
        plan.append((county, pd.DataFrame(rows)))
    return plan


def _latencies(out: Path, counties: list[str]) -> dict[str, Any]:
    """Per new record: load committed -> its own alert stored, and -> every county's."""
    own: dict[str, tuple[float, str]] = {}  # record id -> (seconds, cluster)
    loaded_at: dict[str, float] = {}
    by_cluster: dict[str, dict[str, float]] = {}
    for county in counties:
        path = out / "federation" / "nodes" / county / "node.duckdb"
        with duckdb.connect(str(path), read_only=True) as conn:
            rows = conn.execute(
                "SELECT r.record_id, r.updated_at, a.received_at, a.cluster_id FROM records r "
                "JOIN alerts a ON a.pseudonym = r.pseudonym AND a.kind = 'person' "
                "WHERE r.record_id LIKE 'LD-%'"
            ).fetchall()
            for record_id, t0, received, cluster in rows:
                own[record_id] = (received - t0, cluster)
                loaded_at[record_id] = t0
            for cluster, updated in conn.execute(
                "SELECT cluster_id, updated_at FROM alerts WHERE kind = 'person'"
            ).fetchall():
                by_cluster.setdefault(cluster, {})[county] = updated
    own_seconds = [s for s, _ in own.values()]
    everyone = []
    for record_id, (seconds, cluster) in own.items():
        others = [u - loaded_at[record_id] for u in by_cluster.get(cluster, {}).values()]
        everyone.append(max([seconds, *[o for o in others if o >= 0]]))
    if not own_seconds:
        return {"linked_new_records": 0}
    return {
        "linked_new_records": len(own_seconds),
        "own_alert_median_seconds": round(statistics.median(own_seconds), 3),
        "own_alert_p95_seconds": round(_percentile(own_seconds, 0.95), 3),
        "own_alert_max_seconds": round(max(own_seconds), 3),
        "all_counties_p95_seconds": round(_percentile(everyone, 0.95), 3),
        "all_counties_max_seconds": round(max(everyone), 3),
    }


def main() -> None:
    """Run the benchmark."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--counties", type=int, default=6)
    parser.add_argument("--records-per-node", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--new-per-round", type=int, default=50)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-out/load"))
    args = parser.parse_args()
    out = args.out.resolve()
    for previous in ("federation", "counties"):  # a previous run's, replaced
        shutil.rmtree(out / previous, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "load_before": os.getloadavg(),
    }
    print(f"load average before: {results['load_before']}", flush=True)

    t = time.perf_counter()
    fed = generate_federation(
        counties=args.counties, records=args.counties * args.records_per_node, seed=args.seed
    )
    files = sorted(write_federation(fed, out / "counties"))
    exports = {f.stem: pd.read_csv(f, dtype=str, keep_default_na=False) for f in files}
    plan = _stream_exports(fed, exports, args.rounds, args.new_per_round, args.seed)
    results["generate_seconds"] = round(time.perf_counter() - t, 1)
    counties = [f.stem for f in files]
    print(f"{sum(map(len, exports.values())):,} records in {len(files)} counties", flush=True)

    local = LocalFederation(
        out / "federation", counties, seeds={c: i for i, c in enumerate(counties)}
    )
    with local:
        monitor = Monitor(local)
        monitor.start()
        try:
            # 1. Every node publishes its county at once.
            monitor.phase = "publish"
            start = time.perf_counter()
            reports = local.ingest_all(files)
            ingested = time.perf_counter() - start
            accepted = sum(r["accepted"] for r in reports.values())
            local.wait_for_tokens(accepted, timeout=7200)
            stored = time.perf_counter() - start
            results["publish"] = {
                "records": accepted,
                "nodes": len(files),
                "ingest_seconds": round(ingested, 1),
                "all_stored_seconds": round(stored, 1),
                "records_per_second": round(accepted / stored),
                **monitor.summary("publish"),
            }
            print(json.dumps({"publish": results["publish"]}), flush=True)

            # 2. The first link, and its alerts delivered.
            monitor.phase = "first_link"
            start = time.perf_counter()
            results["first_link"] = local.relink(retrain=True)
            results["first_link"]["link_seconds"] = round(time.perf_counter() - start, 1)
            local.wait_until_delivered(timeout=7200)
            results["first_link"]["with_delivery_seconds"] = round(time.perf_counter() - start, 1)
            results["first_link"].update(monitor.summary("first_link"))
            print(json.dumps({"first_link": results["first_link"]}), flush=True)

            # 3. A stream of new records, one county's load after another.
            monitor.phase = "stream"
            start = time.perf_counter()
            rss_at_start = monitor.samples[-1]["matcher_rss_mib"] if monitor.samples else 0.0
            for number, (county, rows) in enumerate(plan):
                exports[county] = pd.concat([exports[county], rows], ignore_index=True)
                path = files[counties.index(county)]
                exports[county].to_csv(path, index=False)
                report = local.ingest(county, path)
                assert report["upserts"] == len(rows), report
                print(f"round {number}: {county} +{len(rows)}", flush=True)
            local.wait_until_delivered(timeout=3600)
            results["stream"] = {
                "rounds": len(plan),
                "new_records": sum(len(r) for _, r in plan),
                "seconds": round(time.perf_counter() - start, 1),
                "matcher_rss_mib_at_start": round(rss_at_start, 1),
                **monitor.summary("stream"),
            }
            status = local.status()
            results["final_status"] = {
                k: status[k] for k in ("tokens", "pairs", "alerts_delivered", "alerts_pending")
            }
        finally:
            monitor.stop()
    # The nodes are stopped: their databases hold the exact times.
    results["stream"].update(_latencies(out, counties))
    results["load_after"] = os.getloadavg()
    results["samples"] = monitor.samples
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2, default=str))
    print(_markdown(results))


def _markdown(r: dict[str, Any]) -> str:
    p, f, s = r["publish"], r["first_link"], r["stream"]

    def v(d: dict[str, Any], key: str, unit: str = "") -> str:
        value = d.get(key)
        if isinstance(value, bool) or value is None:
            return "n/a"
        text = f"{value:,}" if isinstance(value, (int, float)) else str(value)
        return f"{text} {unit}".strip()

    rows = [
        ("Records published at once", f"{v(p, 'records')} ({v(p, 'nodes')} nodes)"),
        ("Publish: ingest and store, all nodes at once", v(p, "all_stored_seconds", "s")),
        ("Publish throughput (stored by the matcher)", v(p, "records_per_second", "records/s")),
        ("Matcher RSS, peak while publishing", v(p, "matcher_rss_mib_peak", "MiB")),
        ("First link (train, link, queue alerts)", v(f, "link_seconds", "s")),
        ("First link with every alert delivered", v(f, "with_delivery_seconds", "s")),
        ("Alert messages queued by the first link", v(f, "alerts_queued")),
        ("Matcher RSS, peak during the first link", v(f, "matcher_rss_mib_peak", "MiB")),
        ("Stream: new records (rounds)", f"{v(s, 'new_records')} ({v(s, 'rounds')})"),
        ("New records linked", v(s, "linked_new_records")),
        (
            "Alert latency, own county: median / p95 / max",
            f"{v(s, 'own_alert_median_seconds')} / {v(s, 'own_alert_p95_seconds')} / "
            f"{v(s, 'own_alert_max_seconds', 's')}",
        ),
        ("Alert latency, every county involved: p95", v(s, "all_counties_p95_seconds", "s")),
        (
            "Matcher RSS in the stream: start / peak / end",
            f"{v(s, 'matcher_rss_mib_at_start')} / {v(s, 'matcher_rss_mib_peak')} / "
            f"{v(s, 'matcher_rss_mib_end', 'MiB')}",
        ),
        ("Largest scoring queue in the stream", v(s, "max_pending_records", "records")),
        (
            "Load average (1 min): before / mean while publishing / after",
            f"{r['load_before'][0]:.2f} / {v(p, 'load1_mean')} / {r['load_after'][0]:.2f}",
        ),
    ]
    lines = ["| measure | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
