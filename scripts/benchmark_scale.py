"""Scale figures for issue 8: blocked comparisons per rule, and full links on DuckDB and Spark.

    # Cross-county pairs each blocking rule generates (plain SQL join counts on the tokens):
    python scripts/benchmark_scale.py counts --records 1000000 --counties 6 --work bench-out/scale

    # The matcher's full link (train, predict, calibrate, cluster) on cached tokens, in a
    # child process whose peak memory (with Spark's JVM) is sampled:
    python scripts/benchmark_scale.py link --records 1000000 --counties 6 --engine duckdb \
        --work bench-out/scale [--spark-master local[2]] [--spark-conf KEY=VALUE ...] \
        [--model MODEL.json]   # apply a trained model: predict and cluster, no training

Tokens come from ``benchmark_incremental.federation_tokens`` (generated once, cached as
parquet under ``--work``). Each command prints one JSON object and a Markdown table row.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_incremental import federation_tokens, load_average


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- counts
def rule_counts(tables: dict[str, Any], rules: list[str]) -> list[dict[str, Any]]:
    """Cross-county pairs per blocking rule: all it finds, and those no earlier rule found.

    Splink scores a pair once, under the first rule that finds it; the second count is what
    each rule adds to the work.
    """
    import duckdb
    import pyarrow as pa

    from linkage.relations import registered

    con = duckdb.connect()
    parts = []
    for county, frame in tables.items():
        table = pa.Table.from_pandas(frame.drop(columns=["pseudonym", "household"]))
        parts.append(table.append_column("source_dataset", pa.array([county] * len(frame))))
    with registered(con, "t_arrow", pa.concat_tables(parts)):
        con.execute("CREATE TABLE t AS SELECT * FROM t_arrow")
    out = []
    for i, rule in enumerate(rules):
        earlier = "".join(f" AND NOT coalesce(({r}), false)" for r in rules[:i])
        start = time.perf_counter()
        found, new = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE TRUE{earlier}) FROM t AS l JOIN t AS r "
            f"ON ({rule}) AND l.source_dataset < r.source_dataset"
        ).fetchall()[0]
        out.append(
            {
                "rule": rule,
                "pairs": int(found),
                "new_pairs": int(new),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
        _log(f"{rule}: {found:,} pairs, {new:,} new")
    sizes = con.execute("SELECT source_dataset, count(*) FROM t GROUP BY 1").fetchall()
    total = sum(n for _, n in sizes)
    cross = (total * total - sum(n * n for _, n in sizes)) / 2
    out.append({"rule": "(all cross-county pairs)", "pairs": int(cross), "new_pairs": None})
    return out


def cmd_counts(args: argparse.Namespace) -> None:
    from linkage.model import BLOCKING_RULES

    tables = federation_tokens(args.records, args.counties, seed=args.seed, cache=args.work)
    records = sum(len(t) for t in tables.values())
    counts = rule_counts(tables, list(BLOCKING_RULES))
    print(json.dumps({"records": records, "counties": args.counties, "rules": counts}, indent=2))
    print()
    print(f"| rule | pairs ({records:,} records, {args.counties} counties) | new pairs |")
    print("| --- | ---: | ---: |")
    for row in counts:
        new = "" if row["new_pairs"] is None else f"{row['new_pairs']:,}"
        print(f"| `{row['rule']}` | {row['pairs']:,} | {new} |")


# --------------------------------------------------------------------------- link
def _tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants (Spark's JVM included)."""
    total = 0
    stack = [pid]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/statm") as f:
                total += int(f.read().split()[1]) * page
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def cmd_link(args: argparse.Namespace) -> None:
    """Run the worker in a child process, sampling its memory (and its children's)."""
    tables = federation_tokens(args.records, args.counties, seed=args.seed, cache=args.work)
    records = sum(len(t) for t in tables.values())
    del tables
    command = [sys.executable, __file__, "_worker", json.dumps(vars(args), default=str)]
    load_before = load_average()
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(child.pid))
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = child.communicate()
    done.set()
    sampler.join()
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise SystemExit(f"worker failed ({child.returncode})")
    result = json.loads(output.strip().splitlines()[-1])
    result.update(
        {
            "records": records,
            "counties": args.counties,
            "engine": args.engine,
            "wall_seconds": round(wall, 1),
            "peak_rss_gb": round(peak / 2**30, 2),
            "load_before": load_before,
            "load_after": load_average(),
        }
    )
    print(json.dumps(result, indent=2))
    print()
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
    print(
        f"| {args.engine} | {records:,} | {args.counties} | {result['link_seconds']:.0f} s "
        f"| {result['peak_rss_gb']:.1f} GB | {result['candidate_pairs']:,} "
        f"| {result['pairs']:,} | {stages} |"
    )


def cmd_worker(raw: str) -> None:
    args = argparse.Namespace(**json.loads(raw))
    args.work = Path(args.work)
    from linkage.engine import SplinkEngine
    from linkage.model import LinkageModel
    from linkage.pipeline import Stages, match_tokens
    from linkage.tokenise import TokenSpec

    tables = federation_tokens(args.records, args.counties, seed=args.seed, cache=args.work)
    spec = TokenSpec()
    engine = None
    if args.engine == "duckdb" and args.duckdb_memory:
        import duckdb

        # A cap below the machine's memory (DuckDB's default is 80% of it): on a shared
        # machine DuckDB then spills to disk instead of starving its neighbours.
        config = {"memory_limit": args.duckdb_memory, "temp_directory": str(args.work / "tmp")}
        engine = SplinkEngine(connection=duckdb.connect(config=config))
    if args.engine == "spark":
        conf = dict(item.split("=", 1) for item in args.spark_conf or [])
        engine = SplinkEngine("spark", spark_master=args.spark_master, spark_conf=conf)
    stages = Stages(lambda stage, seconds: _log(f"{stage} {'…' if seconds is None else seconds}"))
    start = time.perf_counter()
    model = LinkageModel.load(Path(args.model)) if args.model else None
    result = match_tokens(
        tables,
        model=model,
        engine=engine,
        stages=stages,
        spec_fingerprint=spec.fingerprint,
        bloom=spec.bloom,
    )
    link_seconds = time.perf_counter() - start
    if engine is not None:
        engine.close()
    if args.save_model:
        result.model.save(Path(args.save_model))
    print(
        json.dumps(
            {
                "link_seconds": round(link_seconds, 1),
                "seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
                "candidate_pairs": result.candidate_pairs,
                "pairs": len(result.pairs),
                "clusters": int(result.clusters.members["cluster_id"].nunique()),
                "threshold": result.model.threshold,
                "prior": result.model.prior,
            }
        )
    )


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "_worker":
        cmd_worker(sys.argv[2])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("counts", "link"):
        p = sub.add_parser(name)
        p.add_argument("--records", type=int, default=1_000_000)
        p.add_argument("--counties", type=int, default=6)
        p.add_argument("--seed", type=int, default=5)
        p.add_argument("--work", type=Path, default=Path("bench-out/scale"))
        if name == "link":
            p.add_argument("--engine", choices=["duckdb", "spark"], default="duckdb")
            p.add_argument("--spark-master", default="local[2]")
            p.add_argument("--spark-conf", nargs="*", help="KEY=VALUE Spark settings.")
            p.add_argument("--save-model", help="Write the trained model here.")
            p.add_argument("--model", help="Apply this trained model (no training).")
            p.add_argument("--duckdb-memory", help="DuckDB memory_limit, e.g. 12GB.")
    args = parser.parse_args()
    {"counts": cmd_counts, "link": cmd_link}[args.command](args)


if __name__ == "__main__":
    main()
