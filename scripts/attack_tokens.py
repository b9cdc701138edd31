"""Play the matcher operator: re-identify names from the tokens the matcher holds.

The matcher never holds the federation secret, so it cannot dictionary-attack a token. What it
does hold is every county's tokens, and tokens of the same value are equal (deterministic
tokens) or similar (Bloom filters). This script is the curious operator who counts them and
lines the counts up with public name frequencies (Christen et al. 2018 pattern mining;
Vidanage et al. 2020 graph matching), and reports how many records' names come out right.

The attacker's "public" knowledge is the synthetic generator's own name lists and Zipf
frequencies, realised as an independent population drawn with another seed and normalised
with the (public) normaliser: more accurate frequencies than any real public list, so the
figures favour the attacker. The attacker also knows the token spec (it is public: every
batch carries it) and simulates it with a key of their own. Ground truth is used for scoring
only.

Attacks (each variant gets every attack its tokens allow; the best one counts):

* (a) deterministic tokens of a name alone, where a spec publishes them (spec 1.x):
  ``blk_gi``/``blk_fi`` (an initial), ``given_fc``/``family_fc`` (frequency class) with the
  initial, ``blk_name`` (phonetic given|family) aligned with the public frequency of the code
  pairs; and the date-of-birth tokens. Spec 2.x publishes names only combined with the date
  of birth (``dobu_gi``, ``name_ym``, ...): equal tokens then mean "same date and same
  initial (or phonetic names)", which is mostly the same person in two counties;
* (b) Bloom filters, each filter column on its own (the field under each salt; for family
  names also the ``surnames`` filters, which hold the same name for everyone without a
  previous one) and, for salted filters, each salt value on its own (the attacker is given
  the partitions exactly): clusters of equal filters; clusters at a Dice threshold
  calibrated by simulating the spec's bit flips (centroid clustering, so flips average out),
  each aligned by size with public frequencies; then similarity-graph matching: the Dice of
  every cluster to a few anchor clusters (corrected for the flips left in each cluster's
  consensus), matched against the Dice of every public name to the anchors' names under the
  attacker's own key, iterated as the anchors grow. Unsalted family-name filters are also
  pooled by household (the matcher holds household pseudonyms);
* (c) the views of a record combined: the majority of its filters' guesses; and chains
  (records that any view clusters together, for family names also the members of a
  household, joined across salt values), each named by the majority of its members' guesses
  or aligned by size with public frequencies.

For each variant of the token spec it reports the share of records whose given name, family
name and both are re-identified by the best attack, next to a blind guess (the most common
public name for everyone), and the person-pair F1 (from clusters, at the model's own
threshold) of ``jigsaw link``'s pipeline (``linkage.pipeline.link_files``) on the same
counties under that spec.

Usage::

    python scripts/attack_tokens.py                       # default and weaker specs, with F1
    python scripts/attack_tokens.py --variants default --no-link
    python scripts/attack_tokens.py --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import jellyfish
import numpy as np
import pandas as pd

from linkage.evaluate import cluster_pairs, pair_quality, true_person_pairs
from linkage.normalise import normalise_records
from linkage.pipeline import PreparedCounty, link_files, prepare_county
from linkage.synthetic import SyntheticFederation, generate_federation, write_federation
from linkage.tokenise import SALTS, BloomSpec, TokenSpec

FIELDS = {"given": "given_canonical", "family": "family_name"}
INITIAL_TOKEN = {"given": "blk_gi", "family": "blk_fi"}
#: Public names the Bloom attacks consider (the commonest; the rest are typos and rarities).
MAX_PUBLIC_NAMES = 3000


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """A token design to attack: a token spec, as the nodes would use it.

    Attributes:
        key: Short name used on the command line.
        label: Description for the report.
        spec: The token spec the nodes use.
    """

    key: str
    label: str
    spec: TokenSpec


def _spec(**bloom: Any) -> TokenSpec:
    """The default spec (2.x) with other Bloom settings."""
    return TokenSpec(bloom=replace(BloomSpec(), **bloom))


#: The exact tokens of spec 1.0 (spec 2.0 adds ``dob_dmu``, which its second salt needs).
LEGACY_EXACT = (
    "dob",
    "dob_unordered",
    "dob_ym",
    "dob_yd",
    "dob_md",
    "nhs",
    "sex",
    "postcode",
    "postcode_district",
)


def _legacy(**bloom: Any) -> TokenSpec:
    """The default spec of version 1.0.0: name-only blocking tokens (an initial, phonetic
    names), frequency classes, unsalted filters (256 bits, 15 hashes, flips of 1/64); other
    Bloom settings."""
    shape = {"salts": (), "hash_count": 15, "flip_probability": 1 / 64, **bloom}
    return TokenSpec(
        version="1.0.0",
        bloom=replace(BloomSpec(), **shape),
        exact=LEGACY_EXACT,
        blocking=("blk_name", "blk_gi", "blk_fi"),
        frequency_classes=True,
    )


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant(
            "default",
            "**default, spec 2.0**: combined tokens, no frequency classes; filters salted by "
            "year+month and by decade+unordered month/day; 256 bits, 10 hashes, flip 1/8",
            TokenSpec(),
        ),
        Variant(
            "legacy",
            "old default, spec 1.0: name-only tokens, frequency classes; unsalted filters; "
            "256 bits, 15 hashes, flip 1/64",
            _legacy(),
        ),
        Variant("legacy-no-flip", "spec 1.0, no flips", _legacy(flip_probability=0.0)),
        Variant("legacy-128-bits", "spec 1.0, 128 bits", _legacy(bits=128)),
        Variant("legacy-flip-1/8", "spec 1.0, flip 1/8", _legacy(flip_probability=1 / 8)),
        Variant("legacy-flip-1/4", "spec 1.0, flip 1/4", _legacy(flip_probability=1 / 4)),
        Variant(
            "combined",
            "combined tokens, no frequency classes; unsalted filters, 15 hashes, flip 1/64",
            _spec(salts=(), hash_count=15, flip_probability=1 / 64),
        ),
        Variant(
            "combined-flip-1/4",
            "combined tokens; unsalted filters, 15 hashes, flip 1/4",
            _spec(salts=(), hash_count=15, flip_probability=1 / 4),
        ),
        Variant(
            "salt-year-flip-1/8",
            "combined tokens; filters salted by birth year, 15 hashes, flip 1/8",
            _spec(salts=("year",), hash_count=15),
        ),
        Variant(
            "salt-ym-flip-1/8",
            "combined tokens; filters salted by year+month only, 15 hashes, flip 1/8",
            _spec(salts=("ym",), hash_count=15),
        ),
        Variant(
            "ym-mdu-15-hashes",
            "combined tokens; filters salted by year+month and by unordered month/day, "
            "15 hashes, flip 1/8",
            _spec(salts=("ym", "mdu"), hash_count=15),
        ),
        Variant(
            "ym-dmu-15-hashes",
            "as the default, 15 hashes",
            _spec(hash_count=15),
        ),
        Variant(
            "ym-dmu-128-bits", "as the default, 128 bits, 15 hashes", _spec(bits=128, hash_count=15)
        ),
        Variant("ym-dmu-8-hashes", "as the default, 8 hashes", _spec(hash_count=8)),
        Variant("flip-1/16", "as the default, flip 1/16", _spec(flip_probability=1 / 16)),
        Variant("flip-1/64", "as the default, flip 1/64", _spec(flip_probability=1 / 64)),
    )
}
#: The variants a plain run attacks (``--variants`` picks any of :data:`VARIANTS`).
DEFAULT_VARIANTS = (
    "default",
    "legacy",
    "legacy-no-flip",
    "legacy-128-bits",
    "legacy-flip-1/8",
    "legacy-flip-1/4",
    "combined",
    "salt-ym-flip-1/8",
    "ym-mdu-15-hashes",
    "ym-dmu-15-hashes",
    "flip-1/16",
)


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """The generated counties, the tokens the matcher holds, and the truth (for scoring)."""

    variant: Variant
    prepared: dict[str, PreparedCounty]
    tokens: pd.DataFrame  # every county's token table, with a ``county`` column
    truth: pd.DataFrame  # given_canonical, family_name, date_of_birth per row of ``tokens``


def tokenise_world(
    counties: Mapping[str, pd.DataFrame], variant: Variant, secret: bytes, seed: int
) -> World:
    """Tokenise each county as its node would."""
    tokeniser = variant.spec.bind(secret)
    prepared: dict[str, PreparedCounty] = {}
    frames = []
    truths = []
    for i, (county, raw) in enumerate(counties.items()):
        p = prepare_county(county, raw, tokeniser, seed=seed + i)
        records = p.normalised.records.reset_index(drop=True)
        prepared[county] = p
        frames.append(p.tokens.assign(county=county))
        truths.append(records[["given_canonical", "family_name", "date_of_birth"]])
    tokens = pd.concat(frames, ignore_index=True)
    truth = pd.concat(truths, ignore_index=True)
    return World(variant, prepared, tokens, truth)


@dataclass
class Public:
    """What the attacker knows: public frequencies of names and dates of birth."""

    names: dict[str, pd.Series]  # field -> counts by normalised name, most common first
    dob_ym: pd.Series
    dob_md: pd.Series


def public_knowledge(counties: int, records: int, seed: int) -> Public:
    """An independent population from the generator's lists, normalised as nodes do."""
    fed = generate_federation(counties=counties, records=records, seed=seed)
    norm = pd.concat(
        [normalise_records(df, source=c).records for c, df in fed.counties.items()],
        ignore_index=True,
    )
    dob = norm["date_of_birth"].dropna()
    return Public(
        names={f: norm[col].dropna().value_counts() for f, col in FIELDS.items()},
        dob_ym=dob.str[:7].value_counts(),
        dob_md=dob.str[5:].value_counts(),
    )


# --------------------------------------------------------------------------- helpers


def filter_bits(tokens: pd.DataFrame, name: str, words: int) -> np.ndarray:
    """The Bloom filters of one field as an (n, bits) 0/1 array."""
    cols = [f"{name}_bf_{i}" for i in range(words)]
    raw = np.ascontiguousarray(tokens[cols].to_numpy(dtype=np.int64, na_value=0))
    return np.unpackbits(raw.view(np.uint8), axis=1)


def dice_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dice of every row of ``a`` with every row of ``b`` (0/1 or probabilities)."""
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    return 2 * (a32 @ b32.T) / (a32.sum(1)[:, None] + b32.sum(1)[None, :] + 1e-9)


def align_by_frequency(labels: np.ndarray, public: pd.Series) -> np.ndarray:
    """Give the k-th largest cluster the k-th most common public value."""
    sizes = pd.Series(labels[labels >= 0]).value_counts()
    values = public.index.to_numpy()
    mapping = {int(c): (values[i] if i < len(values) else None) for i, c in enumerate(sizes.index)}
    return np.array([mapping.get(int(x)) for x in labels], dtype=object)


def _code_map(public: pd.Series, fn: Callable[[str], str]) -> pd.Series:
    """For each code of ``fn``, the most common public value with that code."""
    frame = pd.DataFrame({"value": public.index, "n": public.to_numpy()})
    frame["code"] = [fn(v) for v in frame["value"]]
    return (
        frame.sort_values("n", ascending=False).drop_duplicates("code").set_index("code")["value"]
    )


def _nysiis(name: str) -> str:
    return str(jellyfish.nysiis(name.split(" ", 1)[0]))


# --------------------------------------------------------------------------- (a) deterministic


def attack_initial(tokens: pd.DataFrame, public: pd.Series, name: str) -> np.ndarray:
    """Initial token aligned with public initial frequencies; guess the commonest name."""
    column = tokens[INITIAL_TOKEN[name]]
    initials = public.groupby(public.index.str[:1]).sum().sort_values(ascending=False)
    labels = pd.factorize(column)[0]
    letter = align_by_frequency(labels, initials)
    commonest = _code_map(public, lambda v: v[:1])
    return np.array([commonest.get(x) if x else None for x in letter], dtype=object)


def attack_frequency_class(tokens: pd.DataFrame, public: pd.Series, name: str) -> np.ndarray:
    """Initial (as above) plus the county's frequency class: the commonest public name with
    that initial whose public share falls in that class."""
    fc = tokens[f"{name}_fc"]
    initials = public.groupby(public.index.str[:1]).sum().sort_values(ascending=False)
    letter = align_by_frequency(pd.factorize(tokens[INITIAL_TOKEN[name]])[0], initials)
    share = public / public.sum()
    table = pd.DataFrame(
        {
            "value": public.index,
            "n": public.to_numpy(),
            "letter": public.index.str[:1],
            "cls": np.clip(np.floor(-np.log2(share.to_numpy())), 0, 15).astype(int),
        }
    )
    best: dict[tuple[str, int], str] = {}
    for (lt, cls), group in table.groupby(["letter", "cls"]):
        best[(str(lt), int(str(cls)))] = str(group.sort_values("n").iloc[-1]["value"])
    by_letter = {str(k): g.sort_values("n") for k, g in table.groupby("letter")}
    out = np.empty(len(tokens), dtype=object)
    fcs = fc.to_numpy(dtype=float, na_value=np.nan)
    for i, (lt, cls) in enumerate(zip(letter, fcs, strict=True)):
        if lt is None or np.isnan(cls):
            out[i] = None
            continue
        guess = best.get((lt, int(cls)))
        if guess is None:
            group = by_letter[lt]
            guess = str(group.iloc[int(np.argmin(np.abs(group["cls"] - cls)))]["value"])
        out[i] = guess
    return out


def attack_blk_name(tokens: pd.DataFrame, public: Public) -> dict[str, np.ndarray]:
    """``blk_name`` tokens aligned with the public frequency of (phonetic given, family)."""
    codes = {f: _code_map(public.names[f], _nysiis) for f in FIELDS}
    shares = {}
    for f in FIELDS:
        counts = public.names[f]
        by_code = counts.groupby([_nysiis(v) for v in counts.index]).sum()
        shares[f] = by_code / by_code.sum()
    g, fam = shares["given"], shares["family"]
    joint = pd.Series(
        np.outer(g.to_numpy(), fam.to_numpy()).ravel(),
        index=pd.MultiIndex.from_product([g.index, fam.index]),
    ).nlargest(200_000)
    labels = pd.factorize(tokens["blk_name"])[0]
    sizes = pd.Series(labels[labels >= 0]).value_counts()
    mapping = dict(zip(sizes.index, joint.index[: len(sizes)], strict=False))
    pairs = [mapping.get(x) for x in labels]
    return {
        f: np.array([codes[f].get(p[i]) if p else None for p in pairs], dtype=object)
        for i, f in enumerate(FIELDS)
    }


def attack_dates(tokens: pd.DataFrame, truth: pd.DataFrame, public: Public) -> dict[str, float]:
    """Share of records whose birth year-month / month-day comes out of frequency alignment."""
    out = {}
    dob = truth["date_of_birth"]
    for column, reference, part in (
        ("dob_ym", public.dob_ym, dob.str[:7]),
        ("dob_md", public.dob_md, dob.str[5:]),
    ):
        if column not in tokens:
            continue
        guess = align_by_frequency(pd.factorize(tokens[column])[0], reference)
        present = dob.notna().to_numpy()
        out[column] = float((guess[present] == part.to_numpy()[present]).mean())
        out[f"{column}_chance"] = float(reference.iloc[0] / reference.sum())
    return out


# --------------------------------------------------------------------------- (b) Bloom filters


def _flip(bits: np.ndarray, p: float, rng: np.random.Generator) -> np.ndarray:
    return bits ^ (rng.random(bits.shape) < p).astype(np.uint8) if p else bits.copy()


def public_filters(public: pd.Series, spec: TokenSpec, name: str, seed: int) -> np.ndarray:
    """Filters of the public names under the attacker's own key, without flips."""
    key = hashlib.sha256(f"attacker-{seed}".encode()).digest()
    own = TokenSpec(bloom=replace(spec.bloom, flip_probability=0.0, salts=())).bind(key)
    frame = pd.DataFrame({FIELDS[name]: public.index.to_numpy()})
    return filter_bits(own.tokenise(frame, seed=0), name, spec.bloom.words)


def calibrate(base: np.ndarray, p: float, rng: np.random.Generator) -> dict[str, float]:
    """Thresholds that separate copies of one name from other names, found by simulation.

    ``noisy``: two flipped copies of one name; ``clean``: a flipped copy against the name's
    unflipped filter (what a cluster's consensus tends to); ``merge``: two consensus filters.
    """
    sample = base[: min(len(base), 400)]
    a, b = _flip(sample, p, rng), _flip(sample, p, rng)
    others = dice_matrix(sample, sample)
    np.fill_diagonal(others, 0)
    nearest = others.max(1)  # nearest other name's Dice, unflipped

    def split(same: np.ndarray, diff: np.ndarray) -> float:
        grid = np.linspace(0.3, 0.99, 139)
        score = [(same >= t).mean() - (diff >= t).mean() for t in grid]
        return float(grid[int(np.argmax(score))])

    same_noisy = np.diag(dice_matrix(a, b))
    cross_noisy = dice_matrix(a, b)
    np.fill_diagonal(cross_noisy, 0)
    same_clean = np.diag(dice_matrix(a, sample))
    cross_clean = dice_matrix(a, sample)
    np.fill_diagonal(cross_clean, 0)
    return {
        "noisy": split(same_noisy, cross_noisy.max(1)),
        "clean": split(same_clean, cross_clean.max(1)),
        "merge": split(np.ones(len(sample)), nearest),
    }


def _centroid_similarity(x: np.ndarray, pop: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Dice of 0/1 rows ``x`` against centroid rows ``mean`` (bit probabilities)."""
    return 2 * (x @ mean.T) / (pop[:, None] + mean.sum(1)[None, :] + 1e-9)


def _nearest(x: np.ndarray, pop: np.ndarray, mean: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    best = np.empty(len(x), dtype=np.int64)
    value = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), 2048):
        sim = _centroid_similarity(x[s : s + 2048], pop[s : s + 2048], mean)
        best[s : s + 2048] = sim.argmax(1)
        value[s : s + 2048] = sim.max(1)
    return best, value


def _merge_close(consensus: np.ndarray, order: np.ndarray, threshold: float) -> np.ndarray:
    """Union clusters whose consensus filters reach ``threshold`` (largest first)."""
    parent = np.arange(len(consensus))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    c32 = consensus.astype(np.float32)
    pop = c32.sum(1)
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    for s in range(0, len(c32), 2048):
        sim = 2 * (c32[s : s + 2048] @ c32.T) / (pop[s : s + 2048, None] + pop[None, :] + 1e-9)
        rows, cols = np.nonzero(sim >= threshold)
        for i, j in zip(rows + s, cols, strict=True):
            if i < j:
                a, b = root(int(i)), root(int(j))
                if a != b:  # the larger cluster's id survives
                    keep, drop = (a, b) if rank[a] < rank[b] else (b, a)
                    parent[drop] = keep
    return np.array([root(i) for i in range(len(parent))])


def cluster_filters(bits: np.ndarray, thresholds: Mapping[str, float]) -> np.ndarray:
    """Centroid clustering: a filter joins the nearest centroid at or above the threshold,
    else starts one; then near-identical centroids are merged and every filter reassigned to
    its nearest centroid, twice, so that bit flips average out as clusters grow."""
    n, width = bits.shape
    x = bits.astype(np.float32)
    pop = x.sum(1)
    labels = np.full(n, -1, dtype=np.int64)
    sums = np.zeros((n, width), dtype=np.float32)
    counts = np.zeros(n, dtype=np.float32)
    k = 0
    step = 1024
    for s in range(0, n, step):
        chunk, cpop = x[s : s + step], pop[s : s + step]
        if k:
            mean = sums[:k] / counts[:k, None]
            sim = _centroid_similarity(chunk, cpop, mean)
            best = sim.argmax(1)
            ok = sim[np.arange(len(chunk)), best] >= thresholds["noisy"]
            labels[s : s + step][ok] = best[ok]
        rest = np.flatnonzero(labels[s : s + step] < 0)
        if len(rest):
            inner = dice_matrix(chunk[rest], chunk[rest])
            free = np.ones(len(rest), dtype=bool)
            for i in range(len(rest)):
                if free[i]:
                    members = free & (inner[i] >= thresholds["noisy"])
                    members[i] = True
                    labels[s + rest[members]] = k
                    k += 1
                    free &= ~members
        np.add.at(sums, labels[s : s + step], chunk)
        np.add.at(counts, labels[s : s + step], 1.0)
    for _ in range(2):
        consensus = (sums[:k] / counts[:k, None] >= 0.5).astype(np.uint8)
        merged = _merge_close(consensus, np.argsort(-counts[:k]), thresholds["merge"])
        labels = pd.factorize(merged[labels])[0]
        k = int(labels.max()) + 1
        sums = np.zeros((k, width), dtype=np.float32)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=k).astype(np.float32)
        labels = pd.factorize(_nearest(x, pop, sums / counts[:, None])[0])[0]
        k = int(labels.max()) + 1
        sums = np.zeros((k, width), dtype=np.float32)
        np.add.at(sums, labels, x)
        counts = np.bincount(labels, minlength=k).astype(np.float32)
    return labels


def _consensus_noise(sizes: np.ndarray, p: float) -> tuple[np.ndarray, np.ndarray]:
    """For a majority vote (ties set) of ``m`` filters each flipped with probability ``p``:
    the chance a bit that is really 0 comes out 1 (``q0``), and one that is 1 comes out 0."""
    q0 = np.zeros(len(sizes))
    q1 = np.zeros(len(sizes))
    if not p:
        return q0, q1
    for m in np.unique(sizes.astype(int)):
        flips = np.array([math.comb(m, f) * p**f * (1 - p) ** (m - f) for f in range(m + 1)])
        at = sizes == m
        q0[at] = flips[np.arange(m + 1) >= m / 2].sum()
        q1[at] = flips[np.arange(m + 1) > m / 2].sum()
    return q0, q1


def debiased_dice(
    a: np.ndarray, b: np.ndarray, noise_a: tuple[np.ndarray, np.ndarray], noise_b: Any
) -> np.ndarray:
    """Dice of every row of ``a`` with every row of ``b``, corrected for the bit flips each
    row carries (the spec's flip probability is public): an estimate of the Dice of the
    unflipped filters, so that profiles of flipped clusters compare with clean public ones."""
    n = a.shape[1]
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    shared = a32 @ b32.T
    q0a, q1a = noise_a
    q0b, q1b = noise_b
    da, db = 1 - q0a - q1a, 1 - q0b - q1b
    pa = (a32.sum(1) - n * q0a) / da  # estimated unflipped popcounts
    pb = (b32.sum(1) - n * q0b) / db
    c = (
        shared
        - (pa * da)[:, None] * q0b[None, :]
        - q0a[:, None] * (pb * db)[None, :]
        - n * q0a[:, None] * q0b[None, :]
    ) / (da[:, None] * db[None, :])
    return np.clip(2 * c / np.maximum(pa[:, None] + pb[None, :], 1.0), 0.0, 1.0)


def graph_match(
    bits: np.ndarray,
    labels: np.ndarray,
    public: pd.Series,
    own: np.ndarray,
    *,
    own_dice: np.ndarray | None = None,
    flip: float = 0.0,
    first_anchors: int = 10,
    rounds: int = 6,
) -> np.ndarray:
    """Similarity-graph matching of clusters to public names (returns a name per cluster).

    Each cluster's consensus filter is compared by Dice with a set of anchor clusters
    (corrected for the flips left in a consensus of its size); each public name's filter
    (under the attacker's key) with the anchors' names. Dice depends on shared q-grams, not
    on the key, so the two profiles agree for the right name. Anchors start as the largest
    clusters aligned by size and grow with the most confident matches.
    """
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k).astype(float)
    sums = np.zeros((k, bits.shape[1]), dtype=np.float32)
    np.add.at(sums, labels, bits.astype(np.float32))
    consensus = (sums / sizes[:, None] >= 0.5).astype(np.uint8)
    noise = _consensus_noise(sizes, flip)
    if own_dice is None:
        own_dice = dice_matrix(own, own)
    names = public.index.to_numpy()
    share = public.to_numpy() / public.sum()
    pop_c = consensus.sum(1).astype(np.float32)
    pop_p = own.sum(1).astype(np.float32)
    prior = (
        0.002 * np.abs(pop_c[:, None] - pop_p[None, :])
        + 0.02 * np.abs(np.log(sizes / sizes.sum())[:, None] - np.log(share)[None, :])
    ).astype(np.float32)
    order = np.argsort(-sizes)
    anchors = {int(order[i]): i for i in range(min(first_anchors, k, len(names)))}
    best = np.zeros(k, dtype=np.int64)
    for r in range(rounds):
        cs = np.array(list(anchors))
        ns = np.array(list(anchors.values()))
        s_enc = debiased_dice(consensus, consensus[cs], noise, (noise[0][cs], noise[1][cs]))
        s_pub = own_dice[:, ns]  # names x anchors
        s_enc32 = s_enc.astype(np.float32)
        dist = np.empty((k, len(names)), dtype=np.float32)
        step = max(1, 4_000_000 // (len(names) * len(cs)))
        for i in range(0, k, step):
            block = np.abs(s_enc32[i : i + step, None, :] - s_pub[None, :, :])
            dist[i : i + step] = block.mean(axis=2)
        dist += prior
        best = dist.argmin(1)
        part = np.partition(dist, 1, axis=1) if len(names) > 1 else np.zeros((k, 2))
        confidence = (part[:, 1] - part[:, 0]) * np.log1p(sizes)
        anchors = {}
        used: set[int] = set()
        for c in np.argsort(-confidence)[: 20 + 40 * r]:
            if int(best[c]) not in used:
                anchors[int(c)] = int(best[c])
                used.add(int(best[c]))
    return np.asarray(names[best], dtype=object)


def salt_partitions(world: World, salt: str) -> np.ndarray:
    """Each record's salt value as a partition number (records without a date of birth share
    one). The attacker can rebuild these from the date tokens (``dob_ym`` is the year and
    month; ``dob_md`` and ``dob_unordered`` chain the unordered month and day); it is given
    them exactly here, which favours it."""
    dob = world.truth["date_of_birth"]
    fn = SALTS[salt]
    values = [fn(d) if isinstance(d, str) and d else "" for d in dob]
    return pd.factorize(pd.Series(values))[0]


def _union(n: int, groups: Sequence[np.ndarray]) -> np.ndarray:
    """Connected components of ``n`` items, where each array labels items (-1: none) and
    items with the same label are joined."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for labels in groups:
        first: dict[int, int] = {}
        for i, g in enumerate(labels.tolist()):
            if g < 0:
                continue
            j = first.setdefault(g, i)
            if j != i:
                a, b = root(i), root(j)
                if a != b:
                    parent[a] = b
    return pd.factorize(np.array([root(i) for i in range(n)]))[0]


def _majority(components: np.ndarray, guesses: Sequence[np.ndarray]) -> np.ndarray:
    """For each component, the name guessed most often by its members over every view."""
    frame = pd.DataFrame(
        {
            "c": np.concatenate([components] * len(guesses)),
            "g": np.concatenate(guesses),
        }
    ).dropna()
    top = frame.groupby(["c", "g"]).size().reset_index(name="n")
    top = top.sort_values(["c", "n"], ascending=[True, False]).drop_duplicates("c")
    mapping = dict(zip(top["c"], top["g"], strict=True))
    return np.array([mapping.get(c) for c in components], dtype=object)


def _view_attacks(
    world: World,
    public: Public,
    column: str,
    salt: str,
    counts: pd.Series,
    own: np.ndarray,
    own_dice: np.ndarray,
    thresholds: Mapping[str, float],
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Attacks on one filter column (a name field under one salt, or unsalted).

    Returns the guesses per row (None: no guess), the Dice-cluster label of each row (-1:
    no filter; unique across partitions) and the graph-matching guess per row.
    """
    spec = world.variant.spec
    tokens = world.tokens
    n = len(tokens)
    present = tokens[f"{column}_bf_n"].notna().to_numpy()
    rows_present = np.flatnonzero(present)
    bits = filter_bits(tokens.iloc[rows_present], column, spec.bloom.words)
    parts = salt_partitions(world, salt)[rows_present] if salt else np.zeros(len(bits), int)
    where = f" ({salt})" if salt else ""
    exact = np.full(n, None, dtype=object)
    by_freq = np.full(n, None, dtype=object)
    by_graph = np.full(n, None, dtype=object)
    labels_all = np.full(n, -1, dtype=np.int64)
    offset = 0
    for part in np.unique(parts):
        idx = np.flatnonzero(parts == part)
        rows = rows_present[idx]
        sub = bits[idx]
        equal = pd.factorize(pd.Series([r.tobytes() for r in np.packbits(sub, axis=1)]))[0]
        exact[rows] = align_by_frequency(equal, counts)
        if len(idx) < 2:
            labels = np.zeros(len(idx), dtype=np.int64)
        else:
            labels = cluster_filters(sub, thresholds)
        by_freq[rows] = align_by_frequency(labels, counts)
        by_graph[rows] = graph_match(
            sub, labels, counts, own, own_dice=own_dice, flip=spec.bloom.flip_probability
        )[labels]
        labels_all[rows] = labels + offset
        offset += int(labels.max()) + 1
    scope = "per salt value, " if salt else ""
    results = {
        f"bloom{where}: {scope}equal filters, frequency": exact,
        f"bloom{where}: {scope}Dice clusters, frequency": by_freq,
        f"bloom{where}: {scope}graph matching": by_graph,
    }
    return results, labels_all, by_graph


def bloom_attacks(world: World, public: Public, name: str, seed: int) -> dict[str, np.ndarray]:
    """Every Bloom-filter attack on one field; each returns a guess per row (None: no guess).

    Each filter column (the field under each salt; for family names also the surnames
    filters, which hold the same name for everyone without a previous one) is attacked on
    its own, salt value by salt value. Then the views are combined: the majority of the
    views' guesses for each record; and chains of records that any view clusters together
    (for family names also the members of a household), which join the salt partitions into
    name groups, each named by the majority of its members' guesses or aligned by its size
    with public frequencies.
    """
    spec = world.variant.spec
    tokens = world.tokens
    counts = public.names[name].iloc[:MAX_PUBLIC_NAMES]
    rng = np.random.default_rng(seed)
    own = public_filters(counts, spec, name, seed)
    thresholds = calibrate(own, spec.bloom.flip_probability, rng)
    own_dice = dice_matrix(own, own)
    fields = [name, "surnames"] if name == "family" else [name]
    results: dict[str, np.ndarray] = {}
    labels: list[np.ndarray] = []
    graph: list[np.ndarray] = []
    for field_ in fields:
        for view in spec.bloom.views:
            found, lab, by_graph = _view_attacks(
                world, public, f"{field_}{view}", view[1:], counts, own, own_dice, thresholds
            )
            if field_ != name:
                found = {f"{k} [surnames filter]": v for k, v in found.items()}
            results.update(found)
            labels.append(lab)
            graph.append(by_graph)
    if len(graph) > 1:
        results["bloom: majority of the views' graph matching"] = _majority(
            np.arange(len(tokens)), graph
        )
    household = None
    if name == "family":
        hh = tokens["household"].astype("string").fillna(tokens["pseudonym"].astype("string"))
        household = pd.factorize(tokens["county"].astype(str) + "|" + hh.astype(str))[0]
    if not spec.bloom.salts:
        if household is not None and spec.bloom.flip_probability > 0:
            results.update(
                _household_consensus(world, name, household, counts, own, own_dice, thresholds)
            )
        return results
    chains = {"chained clusters": _union(len(tokens), labels)}
    if household is not None:
        chains["chained clusters and households"] = _union(len(tokens), [*labels, household])
    present = tokens[[f"{f}{spec.bloom.views[0]}_bf_n" for f in fields[:1]]].notna().all(axis=1)
    for label, comp in chains.items():
        results[f"bloom: {label}, majority of guesses"] = _majority(comp, graph)
        sized = np.where(present.to_numpy(), comp, -1)
        results[f"bloom: {label}, size aligned with frequency"] = align_by_frequency(sized, counts)
    return results


def _household_consensus(
    world: World,
    name: str,
    household: np.ndarray,
    counts: pd.Series,
    own: np.ndarray,
    own_dice: np.ndarray,
    thresholds: Mapping[str, float],
) -> dict[str, np.ndarray]:
    """Unsalted filters only: members of a household mostly share a family name, and the
    matcher holds household pseudonyms: a household's filters combined bit by bit cancel most
    of the flips."""
    spec = world.variant.spec
    tokens = world.tokens
    present = tokens[f"{name}_bf_n"].notna().to_numpy()
    bits = filter_bits(tokens[present], name, spec.bloom.words)
    unit = pd.factorize(household[present])[0]
    sums = np.zeros((int(unit.max()) + 1, bits.shape[1]), dtype=np.float32)
    np.add.at(sums, unit, bits.astype(np.float32))
    sizes = np.bincount(unit).astype(np.float32)
    unit_bits = (sums / sizes[:, None] >= 0.5).astype(np.uint8)
    by_household = cluster_filters(unit_bits, thresholds)[unit]
    # Household consensus filters are near-clean; the members' own flips are left in.
    per_cluster = graph_match(
        bits, by_household, counts, own, own_dice=own_dice, flip=spec.bloom.flip_probability
    )
    out = np.full(len(tokens), None, dtype=object)
    out[present] = per_cluster[by_household]
    return {"bloom: household consensus, graph matching": out}


# --------------------------------------------------------------------------- scoring


def _share(guess: np.ndarray, truth: np.ndarray) -> float:
    present = pd.notna(truth)
    if not present.any():
        return 0.0
    return float((guess[present] == truth[present]).mean())


def attack_world(world: World, public: Public, seed: int) -> dict[str, Any]:
    """Run every attack the variant leaves open and score it against the truth."""
    tokens, truth = world.tokens, world.truth
    guesses: dict[str, dict[str, np.ndarray]] = {f: {} for f in FIELDS}
    for f in FIELDS:
        if INITIAL_TOKEN[f] in tokens:
            guesses[f]["initial token"] = attack_initial(tokens, public.names[f], f)
            if f"{f}_fc" in tokens:
                guesses[f]["initial + frequency class"] = attack_frequency_class(
                    tokens, public.names[f], f
                )
    if "blk_name" in tokens:
        for f, g in attack_blk_name(tokens, public).items():
            guesses[f]["blk_name"] = g
    for f in FIELDS:
        guesses[f].update(bloom_attacks(world, public, f, seed))
    scores: dict[str, Any] = {"attacks": {}}
    best: dict[str, np.ndarray] = {}
    for f, col in FIELDS.items():
        actual = truth[col].to_numpy(dtype=object)
        per = {a: _share(g, actual) for a, g in guesses[f].items()}
        scores["attacks"][f] = {a: round(v, 4) for a, v in per.items()}
        top = max(per, key=lambda a: per[a])
        best[f] = guesses[f][top]
        scores[f] = {"attack": top, "share": round(per[top], 4)}
        blind = np.full(len(actual), public.names[f].index[0], dtype=object)
        scores[f]["blind_guess"] = round(_share(blind, actual), 4)
    g_true = truth["given_canonical"].to_numpy(dtype=object)
    f_true = truth["family_name"].to_numpy(dtype=object)
    both_present = pd.notna(g_true) & pd.notna(f_true)
    both = (best["given"] == g_true) & (best["family"] == f_true)
    scores["both"] = {"share": round(float(both[both_present].mean()), 4)}
    blind_both = (g_true == public.names["given"].index[0]) & (
        f_true == public.names["family"].index[0]
    )
    scores["both"]["blind_guess"] = round(float(blind_both[both_present].mean()), 4)
    scores["dates"] = {k: round(v, 4) for k, v in attack_dates(tokens, truth, public).items()}
    scores["records"] = len(tokens)
    return scores


# --------------------------------------------------------------------------- linkage quality


def link_quality(
    world: World, fed: SyntheticFederation, secret: bytes, seed: int
) -> dict[str, float]:
    """Person-pair F1 (from clusters) of ``jigsaw link`` on the same counties under the
    variant, at the threshold the model chose itself."""
    with tempfile.TemporaryDirectory() as tmp:
        files = write_federation(fed, Path(tmp) / "counties")
        result = link_files(files, world.variant.spec.bind(secret), seed=seed)
    predicted = cluster_pairs(
        result.clusters, cluster="cluster_id", county="county", member="record_id"
    )
    quality = pair_quality(predicted, true_person_pairs(fed.truth))
    out = {k: float(v) for k, v in quality.as_dict().items()}
    out["threshold"] = float(result.match.model.threshold)
    return out


# --------------------------------------------------------------------------- report


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the counties, attack every variant, link with every variant."""
    started = time.perf_counter()
    fed = generate_federation(counties=args.counties, records=args.records, seed=args.seed)
    public = public_knowledge(args.counties, args.public_records, args.seed + 1000)
    secret = hashlib.sha256(f"attack-demo-{args.seed}".encode()).digest()
    report: dict[str, Any] = {
        "command": " ".join(["python", "scripts/attack_tokens.py", *sys.argv[1:]]),
        "records": args.records,
        "counties": args.counties,
        "seed": args.seed,
        "public_records": args.public_records,
        "variants": {},
    }
    for key in args.variants:
        variant = VARIANTS[key]
        t = time.perf_counter()
        world = tokenise_world(fed.counties, variant, secret, args.seed)
        scores = attack_world(world, public, args.seed)
        scores["label"] = variant.label
        scores["attack_seconds"] = round(time.perf_counter() - t, 1)
        if args.link:
            t = time.perf_counter()
            scores["link"] = link_quality(world, fed, secret, args.seed)
            scores["link_seconds"] = round(time.perf_counter() - t, 1)
        report["variants"][key] = scores
        _print_variant(key, scores)
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _print_variant(key: str, s: Mapping[str, Any]) -> None:
    link = s.get("link")
    f1 = f", F1 {link['f1']:.4f}" if link else ""
    print(
        f"{key:18s} given {_pct(s['given']['share']):>6s} ({s['given']['attack']}), "
        f"family {_pct(s['family']['share']):>6s} ({s['family']['attack']}), "
        f"both {_pct(s['both']['share'])}{f1}  [{s['attack_seconds']} s]",
        flush=True,
    )


def markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown table (for BENCHMARKS.md and THREAT_MODEL.md)."""
    first = next(iter(report["variants"].values()))
    lines = [
        f"`{report['command']}` ({report['records']:,} records in {report['counties']} "
        f"counties, seed {report['seed']}; the attacker's public frequencies come from "
        f"{report['public_records']:,} independent records; {report['seconds']:.0f} s):",
        "",
        "| token design | given name | family name | full name (both) | best attack "
        "(given / family) | person-pair F1 (threshold) |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["variants"].values():
        link = s.get("link")
        f1 = f"{link['f1']:.4f} ({link['threshold']:.2f})" if link else "not run"
        lines.append(
            f"| {s['label']} | {_pct(s['given']['share'])} | {_pct(s['family']['share'])} "
            f"| {_pct(s['both']['share'])} | {s['given']['attack']} / {s['family']['attack']} "
            f"| {f1} |"
        )
    lines.append(
        f"| *blind guess: the commonest public name for everyone* "
        f"| *{_pct(first['given']['blind_guess'])}* | *{_pct(first['family']['blind_guess'])}* "
        f"| *{_pct(first['both']['blind_guess'])}* | | |"
    )
    lines += [
        "",
        "Shares are of records with the name present; a share at or below the blind guess "
        "means the attack learned nothing. F1 is from clusters, at the threshold the model "
        f"chose itself. Date-of-birth tokens aligned by frequency: year-month right for "
        f"{_pct(first['dates'].get('dob_ym', 0))} of records (chance "
        f"{_pct(first['dates'].get('dob_ym_chance', 0))}), month-day for "
        f"{_pct(first['dates'].get('dob_md', 0))} (chance "
        f"{_pct(first['dates'].get('dob_md_chance', 0))}).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=15_000)
    parser.add_argument("--counties", type=int, default=6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--public-records", type=int, default=100_000)
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(DEFAULT_VARIANTS),
        choices=sorted(VARIANTS),
        help="token designs to attack",
    )
    parser.add_argument("--no-link", dest="link", action="store_false", help="skip the F1 runs")
    parser.add_argument("--json", type=Path, help="write the full report as JSON")
    parser.add_argument("--markdown", type=Path, help="write the summary table as Markdown")
    args = parser.parse_args(argv)
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, sort_keys=True))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
