"""Time the matcher's incremental scoring of one new record against a large index.

    python scripts/benchmark_incremental.py --records 1000000 --counties 6 --work bench-out/inc \
        [--model MODEL.json] [--new 100] [--paths blocked full] [--relink]

Builds a matcher store (``MatcherStore`` + ``LinkIndex``, no HTTP) from generated counties'
tokens, holds ``--new`` records back, then sends each of them in its own one-record token
batch (``store_batch``, as a node's publish would) and times ``LinkIndex.score_pending`` for
it: Splink's scoring of the record against the index, re-clustering what it touches and
queueing alerts. Prints the median and 95th percentile per path as Markdown:

- ``blocked``: the matcher's path: the index is first cut down in SQL to the records that
  share a block with the new one (one equi-join per blocking rule), then Splink scores those.
- ``full``: Splink's ``predict_between`` against the whole index (the path before issue 8).

With both paths it also checks that they give the same pairs and scores. Tokens of the
generated counties are cached under ``--work`` (reused by ``benchmark_scale.py``). The model
is ``--model`` if given, else one trained on about 100,000 of the records; ``--relink`` first
links the whole index with it (so that pairs and clusters exist, as in a running matcher).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

#: Fixed benchmark secret (reproducible tokens; never a real federation's).
BENCH_SECRET = hashlib.sha256(b"jigsaw benchmark federation secret").digest()


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the record."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def federation_tokens(
    records: int, counties: int, *, seed: int, cache: Path
) -> dict[str, pd.DataFrame]:
    """Token tables of a generated federation, as its nodes would publish them (cached).

    Args:
        records: About how many records in all.
        counties: How many counties.
        seed: Generator seed.
        cache: Folder for the cached parquet files.

    Returns:
        County id -> token table (``pseudonym, household, role`` and the tokens).
    """
    from linkage.pipeline import prepare_county
    from linkage.synthetic import generate_federation
    from linkage.tokenise import TokenSpec

    spec = TokenSpec()
    # The spec's fingerprint in the name: tokens of another spec (or model) are never reused.
    folder = cache / f"tokens-{records}-{counties}-{seed}-{spec.fingerprint[:8]}"
    done = folder / "complete.json"
    if done.exists():
        names = json.loads(done.read_text())["counties"]
        return {c: pd.read_parquet(folder / f"{c}.parquet") for c in names}
    _log(f"generating {records:,} records in {counties} counties")
    start = time.perf_counter()
    federation = generate_federation(counties=counties, records=records, seed=seed)
    _log(f"generated in {time.perf_counter() - start:.0f} s; tokenising")
    tokeniser = spec.bind(BENCH_SECRET)
    folder.mkdir(parents=True, exist_ok=True)
    tables = {}
    for i, (county, raw) in enumerate(federation.counties.items()):
        tables[county] = prepare_county(county, raw, tokeniser, seed=seed + i).tokens
        tables[county].to_parquet(folder / f"{county}.parquet", index=False)
    del federation
    done.write_text(json.dumps({"counties": list(tables)}))
    _log(f"tokens ready in {time.perf_counter() - start:.0f} s")
    return tables


def _registry() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from federation.registry import Registry

    key = Ed25519PrivateKey.generate().public_key()
    return Registry(matcher_url="http://127.0.0.1:1", matcher_public_key=key, nodes={})


def _train(tables: dict[str, pd.DataFrame], sample: int) -> Any:
    from linkage.pipeline import match_tokens
    from linkage.tokenise import TokenSpec

    total = sum(len(t) for t in tables.values())
    fraction = min(1.0, sample / total)
    subset = {c: t.iloc[: max(1, int(len(t) * fraction))] for c, t in tables.items()}
    spec = TokenSpec()
    return match_tokens(subset, spec_fingerprint=spec.fingerprint, bloom=spec.bloom).model


def _load_store(store: Any, tables: dict[str, pd.DataFrame], held: set[tuple[str, str]]) -> int:
    """Bulk-insert every token but the held-back ones (a node's first publish, without HTTP)."""
    from linkage.relations import registered

    loaded = 0
    now = time.time()
    for county, frame in tables.items():
        keep = ~frame["pseudonym"].isin({p for c, p in held if c == county})
        part = frame[keep].reset_index(drop=True)
        table = pa.Table.from_pandas(part, preserve_index=False)
        n = len(part)
        table = table.append_column("source_dataset", pa.array([county] * n, pa.string()))
        table = table.append_column("epoch", pa.array(np.ones(n, dtype=np.int32)))
        table = table.append_column("batch_id", pa.array(["bulk"] * n, pa.string()))
        table = table.append_column("stored_at", pa.array(np.full(n, now)))
        with store.lock, registered(store.conn, "bulk", table):
            cols = ", ".join(table.column_names)
            store.conn.execute(f"INSERT INTO tokens ({cols}) SELECT {cols} FROM bulk")
        loaded += n
    return loaded


def _batch(county: str, row: pd.Series, spec: Any) -> Any:
    from federation.protocol import TokenBatch, TokenSpecRef

    ids = ["pseudonym", "household", "role"]
    columns = [*ids, *spec.token_columns()]
    values: list[Any] = [
        None if pd.isna(row[c]) else (str(row[c]) if c in ids else int(row[c])) for c in columns
    ]
    return TokenBatch(
        batch_id=os.urandom(16).hex(),
        county=county,
        token_spec=TokenSpecRef(version=spec.version, fingerprint=spec.fingerprint, epoch=1),
        columns=columns,
        rows=[values],
    )


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--counties", type=int, default=6)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("bench-out/incremental"))
    parser.add_argument("--model", type=Path, help="A trained model JSON (else trained here).")
    parser.add_argument("--train-sample", type=int, default=100_000)
    parser.add_argument("--new", type=int, default=100, help="Records to score one by one.")
    parser.add_argument("--paths", nargs="+", default=["blocked", "full"])
    parser.add_argument("--full-new", type=int, default=20, help="Records for the full path.")
    parser.add_argument("--relink", action="store_true", help="Link the whole index first.")
    args = parser.parse_args()

    from federation.matcher.index import LinkIndex
    from federation.matcher.store import MatcherStore
    from linkage.model import LinkageModel
    from linkage.tokenise import TokenSpec

    spec = TokenSpec()
    tables = federation_tokens(args.records, args.counties, seed=args.seed, cache=args.work)
    total = sum(len(t) for t in tables.values())
    if args.model:
        model = LinkageModel.load(args.model)
    else:
        model_path = args.work / f"model-{args.records}-{args.counties}-{args.seed}.json"
        if model_path.exists():
            model = LinkageModel.load(model_path)
        else:
            _log(f"training on ~{args.train_sample:,} records")
            model = _train(tables, args.train_sample)
            model.save(model_path)
    rng = np.random.default_rng(args.seed)
    counties = list(tables)
    held: list[tuple[str, str]] = []
    while len(held) < args.new:
        county = counties[int(rng.integers(len(counties)))]
        row = int(rng.integers(len(tables[county])))
        key = (county, str(tables[county]["pseudonym"].iloc[row]))
        if key not in held:
            held.append(key)

    results: dict[str, Any] = {"records": total, "counties": args.counties, "paths": {}}
    scores: dict[str, pd.DataFrame] = {}
    for path in args.paths:
        db = args.work / f"matcher-{path}.duckdb"
        for suffix in ("", ".wal"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        mw = [f"mw_{c['output_column_name']}" for c in model.settings["comparisons"]]
        store = MatcherStore(db, spec, mw_columns=mw)
        start = time.perf_counter()
        loaded = _load_store(store, tables, set(held))
        _log(f"{path}: {loaded:,} tokens stored in {time.perf_counter() - start:.0f} s")
        index = LinkIndex(store, _registry(), model=model)
        if args.relink:
            start = time.perf_counter()
            summary = index.relink()
            _log(f"{path}: relinked in {time.perf_counter() - start:.0f} s: {summary}")
        prefilter = path == "blocked"
        original = index._predict_between
        captured: list[pd.DataFrame] = []
        scoring_seconds: list[float] = []

        def scoring(
            new: pa.Table,
            _orig: Any = original,
            _pre: bool = prefilter,
            _out: list[pd.DataFrame] = captured,
            _times: list[float] = scoring_seconds,
        ) -> pd.DataFrame:
            start = time.perf_counter()
            frame = _orig(new, prefilter=_pre)
            _times.append(time.perf_counter() - start)
            _out.append(frame)
            return frame

        index._predict_between = scoring  # type: ignore[method-assign]
        n = args.new if prefilter else min(args.new, args.full_new)
        seconds: list[float] = []
        stages: dict[str, list[float]] = {}
        pairs = 0
        load = load_average()
        for county, pseudonym in held[:n]:
            frame = tables[county]
            row = frame[frame["pseudonym"] == pseudonym].iloc[0]
            store.store_batch(_batch(county, row, spec), epoch=1)
            start = time.perf_counter()
            report = index.score_pending()
            seconds.append(time.perf_counter() - start)
            pairs += report.pairs
            for stage, spent in report.stages.items():
                stages.setdefault(stage, []).append(spent)
        scored = pd.concat(captured, ignore_index=True) if captured else pd.DataFrame()
        scores[path] = scored
        results["paths"][path] = {
            "new_records": n,
            "median_s": statistics.median(seconds),
            "p95_s": _percentile(seconds, 95),
            "max_s": max(seconds),
            "first_s": seconds[0],
            "scoring_median_s": statistics.median(scoring_seconds),
            "scoring_p95_s": _percentile(scoring_seconds, 95),
            "candidate_pairs_scored": len(scored),
            "pairs_above_threshold": pairs,
            "stage_median_s": {k: round(statistics.median(v), 4) for k, v in stages.items()},
            "load_average": load,
        }
        _log(f"{path}: {results['paths'][path]}")
        store.close()
    if {"blocked", "full"} <= set(scores):
        keys = ["county_l", "pseudonym_l", "county_r", "pseudonym_r"]
        n_full = results["paths"]["full"]["new_records"]
        full_new = {p for _, p in held[:n_full]}
        blocked = scores["blocked"]
        blocked = blocked[blocked["pseudonym_l"].isin(full_new)]
        joined = blocked.merge(scores["full"], on=keys, how="outer", indicator=True)
        same = bool((joined["_merge"] == "both").all())
        diff = float((joined["match_weight_x"] - joined["match_weight_y"]).abs().max() or 0.0)
        results["same_pairs"] = same
        results["max_weight_difference"] = diff
        _log(f"same pairs: {same}; largest match-weight difference {diff}")
    print(json.dumps(results, indent=2))
    print()
    print(
        "| path | index records | new records timed | score_pending median | p95 | max "
        "| of which Splink scoring: median | p95 |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for path, r in results["paths"].items():
        print(
            f"| {path} | {total:,} | {r['new_records']} | {r['median_s'] * 1000:.0f} ms "
            f"| {r['p95_s'] * 1000:.0f} ms | {r['max_s'] * 1000:.0f} ms "
            f"| {r['scoring_median_s'] * 1000:.0f} ms | {r['scoring_p95_s'] * 1000:.0f} ms |"
        )


if __name__ == "__main__":
    main()
