"""Benchmark ``jigsaw link`` against plaintext Splink and clkhash + anonlink, in one run.

    python scripts/benchmark_link.py --records 15000 --counties 6 --out bench-out/15k \
        [--anonlink-python /path/to/venv-with-clkhash/bin/python]

Generates the counties (with ground truth) once, then runs each contender in its own process
so that peak memory is its own: Jigsaw (tokenise, train, predict, cluster on tokens, exactly
``jigsaw link``'s pipeline), plaintext Splink 5 with a standard model on the same normalised
records, and clkhash + anonlink at their best threshold. Prints a Markdown table for
BENCHMARKS.md and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd

from linkage.evaluate import (
    cluster_pairs,
    pair_quality,
    true_household_pairs,
    true_person_pairs,
)


def _peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# --------------------------------------------------------------------------- workers
def worker_jigsaw(data: Path, out: Path) -> dict[str, Any]:
    """Run jigsaw link's pipeline and time each stage."""
    from linkage.pipeline import Stages, link_files
    from linkage.tokenise import TokenSpec

    files = sorted((data / "counties").glob("*.csv"))
    tokeniser = TokenSpec().bind(os.urandom(32))
    start = time.perf_counter()
    result = link_files(files, tokeniser, stages=Stages(), seed=1)
    result.write(out)
    total = time.perf_counter() - start
    records = sum(c["input_rows"] for c in result.counts.values())
    return {
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        "total_seconds": total,
        "records": records,
        "tokenise_records_per_second": records / result.seconds["tokenise"],
        "normalise_records_per_second": records / result.seconds["normalise"],
        "candidate_pairs": result.match.candidate_pairs,
        "threshold": result.match.model.threshold,
        "peak_rss_gb": _peak_gb(),
    }


def worker_plaintext(data: Path, out: Path) -> dict[str, Any]:
    """Plaintext Splink 5 with a standard model on the same normalised records."""
    import logging

    import splink.comparison_library as cl
    from splink import DuckDBAPI, Linker, SettingsCreator, block_on

    from linkage.normalise import normalise_records
    from linkage.records import read_county_file

    logging.getLogger("splink").setLevel(logging.WARNING)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    frames = {}
    for f in sorted((data / "counties").glob("*.csv")):
        recs = normalise_records(read_county_file(f), source=f.stem).records
        frames[f.stem] = pd.DataFrame(
            {
                "unique_id": recs["record_id"],
                "given_name": recs["given_canonical"],
                "family_name": recs["family_name"],
                "date_of_birth": recs["date_of_birth"],
                "birth_year": recs["date_of_birth"].str.slice(0, 4),
                "sex": recs["sex"],
                "nhs_number": recs["nhs_number"],
                "postcode": recs["postcode"],
            }
        )
    seconds["read_normalise"] = time.perf_counter() - start
    settings = SettingsCreator(
        link_type="link_only",
        comparisons=[
            cl.NameComparison("given_name").configure(term_frequency_adjustments=True),
            cl.NameComparison("family_name").configure(term_frequency_adjustments=True),
            cl.DateOfBirthComparison("date_of_birth", input_is_string=True),
            cl.ExactMatch("nhs_number"),
            cl.ExactMatch("sex"),
            cl.PostcodeComparison("postcode"),
        ],
        blocking_rules_to_generate_predictions=[
            block_on("date_of_birth"),
            block_on("nhs_number"),
            block_on("given_name", "family_name"),
            block_on("given_name", "birth_year"),
        ],
        retain_intermediate_calculation_columns=False,
    )
    t = time.perf_counter()
    db_api = DuckDBAPI()
    tables = [db_api.register(df, dataset_display_name=c) for c, df in frames.items()]
    linker = Linker(tables, settings, log_level=logging.WARNING)
    linker.training.estimate_probability_two_random_records_match(
        [block_on("nhs_number"), block_on("given_name", "family_name", "date_of_birth")],
        recall=0.7,
    )
    linker.training.estimate_u_using_random_sampling(max_pairs=2e6, seed=1)
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("date_of_birth"), max_pairs=1.5e6
    )
    linker.training.estimate_parameters_using_expectation_maximisation(
        block_on("given_name", "family_name"), max_pairs=1.5e6
    )
    seconds["train"] = time.perf_counter() - t
    t = time.perf_counter()
    predictions = linker.inference.predict(threshold_match_probability=0.5)
    pairs = predictions.as_pandas_dataframe()
    seconds["predict"] = time.perf_counter() - t
    t = time.perf_counter()
    clusters = linker.clustering.cluster_pairwise_predictions_at_threshold(
        predictions, threshold_match_probability=0.9
    ).as_pandas_dataframe()
    seconds["cluster"] = time.perf_counter() - t
    out.mkdir(parents=True, exist_ok=True)
    pairs.rename(
        columns={
            "source_dataset_l": "county_l",
            "unique_id_l": "record_id_l",
            "source_dataset_r": "county_r",
            "unique_id_r": "record_id_r",
        }
    )[["county_l", "record_id_l", "county_r", "record_id_r", "match_probability"]].to_csv(
        out / "scored_pairs.csv", index=False
    )
    clusters.rename(columns={"source_dataset": "county", "unique_id": "record_id"})[
        ["cluster_id", "county", "record_id"]
    ].to_csv(out / "clusters.csv", index=False)
    records = sum(len(df) for df in frames.values())
    return {
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "total_seconds": time.perf_counter() - start,
        "records": records,
        "peak_rss_gb": _peak_gb(),
    }


def worker_normalised(data: Path) -> None:
    """Write the normalised fields that clkhash encodes (same cleaning for every contender)."""
    from linkage.normalise import normalise_records
    from linkage.records import read_county_file

    target = data / "normalised"
    target.mkdir(exist_ok=True)
    for f in sorted((data / "counties").glob("*.csv")):
        recs = normalise_records(read_county_file(f), source=f.stem).records
        pd.DataFrame(
            {
                "record_id": recs["record_id"],
                "given": recs["given_canonical"].fillna(""),
                "family": recs["family_name"].fillna(""),
                "dob": recs["date_of_birth"].fillna(""),
                "sex": recs["sex"].fillna(""),
                "nhs": recs["nhs_number"].fillna(""),
            }
        ).to_csv(target / f.name, index=False)


# --------------------------------------------------------------------------- driver
def _run_worker(kind: str, data: Path, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "worker", kind, str(data), str(out)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{proc.stderr[-3000:]}")
    result = dict(json.loads(proc.stdout.strip().splitlines()[-1]))
    result["wall_seconds"] = time.perf_counter() - start
    return result


def _quality(
    truth: pd.DataFrame, households: pd.DataFrame, out: Path, *, families: bool
) -> dict[str, Any]:
    actual = true_person_pairs(truth)
    clusters = pd.read_csv(out / "clusters.csv", dtype=str)
    q: dict[str, Any] = {
        "person_pairs_from_clusters": pair_quality(
            cluster_pairs(clusters, cluster="cluster_id", county="county", member="record_id"),
            actual,
        ).as_dict()
    }
    pairs_file = out / "pairs.csv"
    if pairs_file.exists():
        pairs = pd.read_csv(pairs_file, dtype=str)
        q["person_pairs"] = pair_quality(
            zip(pairs.county_l, pairs.record_id_l, pairs.county_r, pairs.record_id_r, strict=True),
            actual,
        ).as_dict()
    if families:
        fam = pd.read_csv(out / "families.csv", dtype=str)
        largest = int(fam.groupby("family_id").size().max()) if len(fam) else 0
        q["largest_family_households"] = largest
        if largest > 2000:  # enumerating its pairs would not fit in memory; report the size
            return q
        q["families"] = pair_quality(
            cluster_pairs(fam, cluster="family_id", county="county", member="household_id"),
            true_household_pairs(truth, households),
        ).as_dict()
    return q


def _plaintext_best(truth: pd.DataFrame, out: Path) -> dict[str, Any]:
    actual = true_person_pairs(truth)
    scored = pd.read_csv(out / "scored_pairs.csv", dtype={"record_id_l": str, "record_id_r": str})
    best: dict[str, Any] = {"f1": -1.0}
    at_default: dict[str, Any] = {}
    for threshold in [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999]:
        sel = scored[scored.match_probability >= threshold]
        q = pair_quality(
            zip(sel.county_l, sel.record_id_l, sel.county_r, sel.record_id_r, strict=True), actual
        ).as_dict()
        q["threshold"] = threshold
        if threshold == 0.9:
            at_default = q
        if q["f1"] > best["f1"]:
            best = q
    return {"pairs_at_0.9": at_default, "pairs_best_threshold": best}


def main() -> None:
    """Drive the benchmark (or run one worker)."""
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        kind, data, out = sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
        if kind == "normalised":
            worker_normalised(data)
            print("{}")
            return
        fn = {"jigsaw": worker_jigsaw, "plaintext": worker_plaintext}[kind]
        print(json.dumps(fn(data, out)))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=15_000)
    parser.add_argument("--counties", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path("bench-out"))
    parser.add_argument("--skip-plaintext", action="store_true")
    parser.add_argument("--anonlink-python", help="python of a virtualenv with clkhash+anonlink")
    parser.add_argument("--anonlink-max-records", type=int, default=60_000)
    args = parser.parse_args()

    from linkage.synthetic import generate_federation, write_federation

    data = args.out / "data"
    results: dict[str, Any] = {"records": args.records, "counties": args.counties}
    t = time.perf_counter()
    fed = generate_federation(counties=args.counties, records=args.records, seed=args.seed)
    write_federation(fed, data / "counties", truth_path=data / "truth.csv")
    results["generate_seconds"] = round(time.perf_counter() - t, 1)
    truth = fed.truth
    households = pd.concat(
        [
            df.assign(county=c)[["county", "record_id", "household_id"]]
            for c, df in fed.counties.items()
        ]
    )
    del fed
    print(f"generated {args.records:,} records in {results['generate_seconds']} s", flush=True)

    jig = _run_worker("jigsaw", data, args.out / "jigsaw")
    jig["quality"] = _quality(truth, households, args.out / "jigsaw", families=True)
    results["jigsaw"] = jig
    print("jigsaw", json.dumps(jig, indent=1), flush=True)
    if not args.skip_plaintext:
        plain = _run_worker("plaintext", data, args.out / "plaintext")
        plain["quality"] = _quality(truth, households, args.out / "plaintext", families=False)
        plain["quality"].update(_plaintext_best(truth, args.out / "plaintext"))
        results["plaintext_splink"] = plain
        print("plaintext", json.dumps(plain, indent=1), flush=True)
    if args.anonlink_python:
        _run_worker("normalised", data, data)
        proc = subprocess.run(
            [
                args.anonlink_python,
                str(Path(__file__).with_name("anonlink_worker.py")),
                str(data),
                "--max-records",
                str(args.anonlink_max_records),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode != 0:
            raise SystemExit(f"anonlink worker failed:\n{proc.stderr[-3000:]}")
        results["clkhash_anonlink"] = json.loads(proc.stdout.strip().splitlines()[-1])
        print("anonlink", json.dumps(results["clkhash_anonlink"], indent=1), flush=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
