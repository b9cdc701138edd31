"""Benchmark worker for clkhash + anonlink (run in a separate virtualenv that has them).

Reads ``DIR/normalised/<county>.csv`` (written by benchmark_link.py from Jigsaw's own
normalisation, so every contender sees the same cleaned values), encodes CLKs with clkhash and
links all counties with anonlink (Dice on 1024-bit CLKs, multi-party greedy solving). The
best threshold is found with the ground truth, which is the most favourable reading of
anonlink. When the federation is larger than ``--max-records``, only a sample is linked and the
all-pairs time is estimated from the measured comparison rate.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import sys
import time
from pathlib import Path

import anonlink
from clkhash import clk
from clkhash.schema import from_json_dict

SCHEMA = {
    "version": 3,
    "clkConfig": {
        "l": 1024,
        "kdf": {"type": "HKDF", "hash": "SHA256", "keySize": 64},
    },
    "features": [
        {
            "identifier": "given",
            "format": {"type": "string", "encoding": "utf-8"},
            "hashing": {
                "comparison": {"type": "ngram", "n": 2},
                "strategy": {"bitsPerToken": 15},
                "hash": {"type": "blakeHash"},
                "missingValue": {"sentinel": ""},
            },
        },
        {
            "identifier": "family",
            "format": {"type": "string", "encoding": "utf-8"},
            "hashing": {
                "comparison": {"type": "ngram", "n": 2},
                "strategy": {"bitsPerToken": 15},
                "hash": {"type": "blakeHash"},
                "missingValue": {"sentinel": ""},
            },
        },
        {
            "identifier": "dob",
            "format": {"type": "string", "encoding": "utf-8"},
            "hashing": {
                "comparison": {"type": "ngram", "n": 1, "positional": True},
                "strategy": {"bitsPerToken": 30},
                "hash": {"type": "blakeHash"},
                "missingValue": {"sentinel": ""},
            },
        },
        {
            "identifier": "sex",
            "format": {"type": "string", "encoding": "utf-8"},
            "hashing": {
                "comparison": {"type": "ngram", "n": 1},
                "strategy": {"bitsPerToken": 30},
                "hash": {"type": "blakeHash"},
                "missingValue": {"sentinel": ""},
            },
        },
        {
            "identifier": "nhs",
            "format": {"type": "string", "encoding": "utf-8"},
            "hashing": {
                "comparison": {"type": "ngram", "n": 1, "positional": True},
                "strategy": {"bitsPerToken": 10},
                "hash": {"type": "blakeHash"},
                "missingValue": {"sentinel": ""},
            },
        },
    ],
}


def main() -> None:
    """Encode, link and report as JSON on stdout."""
    parser = argparse.ArgumentParser()
    parser.add_argument("data", type=Path)
    parser.add_argument("--max-records", type=int, default=60_000)
    parser.add_argument("--min-threshold", type=float, default=0.75)
    args = parser.parse_args()
    schema = from_json_dict(SCHEMA)
    files = sorted((args.data / "normalised").glob("*.csv"))
    counties, ids, rows = [], [], []
    for f in files:
        with open(f, newline="") as fh:
            reader = csv.DictReader(fh)
            recs = list(reader)
        counties.append(f.stem)
        ids.append([r["record_id"] for r in recs])
        rows.append([[r["given"], r["family"], r["dob"], r["sex"], r["nhs"]] for r in recs])
    total = sum(len(r) for r in rows)
    start = time.perf_counter()
    clks = [clk.generate_clks(r, schema, "benchmark secret", validate=False) for r in rows]
    encode_seconds = time.perf_counter() - start
    sample_fraction = min(1.0, args.max_records / total)
    if sample_fraction < 1.0:
        step = round(1 / sample_fraction)
        clks = [c[::step] for c in clks]
        ids = [i[::step] for i in ids]
    compared = sum(len(a) * len(b) for i, a in enumerate(clks) for b in clks[i + 1 :])
    start = time.perf_counter()
    candidates = anonlink.candidate_generation.find_candidate_pairs(
        clks, anonlink.similarities.dice_coefficient_accelerated, args.min_threshold
    )
    compare_seconds = time.perf_counter() - start
    best = {"f1": -1.0}
    truth = _truth(args.data / "truth.csv", counties, ids)
    for threshold in [t / 100 for t in range(int(args.min_threshold * 100), 100)]:
        groups = anonlink.solving.greedy_solve(_filter(candidates, threshold))
        predicted = set()
        for group in groups:
            members = sorted((counties[d], ids[d][r]) for d, r in group)
            for i, a in enumerate(members):
                for b in members[i + 1 :]:
                    if a[0] != b[0]:
                        predicted.add((a[0], a[1], b[0], b[1]))
        tp = len(predicted & truth)
        p = tp / len(predicted) if predicted else 1.0
        r = tp / len(truth) if truth else 1.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        if f1 > best["f1"]:
            best = {"threshold": threshold, "precision": p, "recall": r, "f1": f1}
    all_pairs = sum(len(a) * len(b) for i, a in enumerate(rows) for b in rows[i + 1 :])
    rate = compared / compare_seconds if compare_seconds else float("inf")
    print(
        json.dumps(
            {
                "records": total,
                "encode_seconds": encode_seconds,
                "encode_records_per_second": total / encode_seconds,
                "linked_sample_fraction": sample_fraction,
                "comparisons": compared,
                "compare_seconds": compare_seconds,
                "comparisons_per_second": rate,
                "estimated_all_pairs_seconds": all_pairs / rate,
                "best": best,
                "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            }
        )
    )


def _filter(candidates, threshold):  # type: ignore[no-untyped-def]
    import array

    sims, dsets, recs = candidates
    keep = [i for i, s in enumerate(sims) if s >= threshold]
    return (
        array.array(sims.typecode, (sims[i] for i in keep)),
        tuple(array.array(d.typecode, (d[i] for i in keep)) for d in dsets),
        tuple(array.array(r.typecode, (r[i] for i in keep)) for r in recs),
    )


def _truth(path: Path, counties: list[str], ids: list[list[str]]) -> set[tuple[str, str, str, str]]:
    kept = {(c, r) for c, rs in zip(counties, ids, strict=True) for r in rs}
    people: dict[str, list[tuple[str, str]]] = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            key = (row["county"], row["record_id"])
            if key in kept:
                people.setdefault(row["person_id"], []).append(key)
    out = set()
    for members in people.values():
        members.sort()
        for i, a in enumerate(members):
            for b in members[i + 1 :]:
                if a[0] != b[0]:
                    out.add((a[0], a[1], b[0], b[1]))
    return out


if __name__ == "__main__":
    sys.exit(main())
