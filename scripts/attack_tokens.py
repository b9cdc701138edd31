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

Attacks:

* (a) deterministic tokens: ``blk_gi``/``blk_fi`` (an initial), ``given_fc``/``family_fc``
  (frequency class) with the initial, ``blk_name`` (phonetic given|family) aligned with the
  public frequency of the code pairs, and the date-of-birth tokens;
* (b) Bloom filters: clusters of equal filters; clusters at a Dice threshold calibrated by
  simulating the spec's bit flips (centroid clustering, so flips average out), each aligned by
  size with public frequencies; then similarity-graph matching: the Dice of every cluster to
  a few anchor clusters, matched against the Dice of every public name to the anchors' names
  under the attacker's own key, iterated as the anchors grow.

For each variant of the token spec it reports the share of records whose given name, family
name and both are re-identified by the best attack, next to a blind guess (the most common
public name for everyone), and the person-pair F1 of linking the same counties with that
spec (``linkage.pipeline.link_files``; simulated designs run the same ``prepare_county`` and
``match_tokens``).

Usage::

    python scripts/attack_tokens.py                       # default and weaker specs, with F1
    python scripts/attack_tokens.py --variants default --no-link
    python scripts/attack_tokens.py --json out.json --markdown out.md
"""

from __future__ import annotations

import argparse
import hashlib
import json
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
from linkage.pipeline import PreparedCounty, link_files, match_tokens, prepare_county
from linkage.synthetic import SyntheticFederation, generate_federation, write_federation
from linkage.tokenise import BloomSpec, TokenSpec

FIELDS = {"given": "given_canonical", "family": "family_name"}
INITIAL_TOKEN = {"given": "blk_gi", "family": "blk_fi"}
NAME_ONLY_COLUMNS = ("blk_gi", "blk_fi", "blk_name", "given_fc", "family_fc")
#: Public names the Bloom attacks consider (the commonest; the rest are typos and rarities).
MAX_PUBLIC_NAMES = 3000


# --------------------------------------------------------------------------- variants


@dataclass(frozen=True)
class Variant:
    """A token design to attack.

    Attributes:
        key: Short name used on the command line.
        label: Description for the report.
        spec: The token spec the nodes use.
        hide_name_tokens: Simulate a design where the tokens of a name alone (``blk_gi``,
            ``blk_fi``, ``blk_name``, frequency classes) are not published, e.g. because they
            are combined with the date of birth as the blocking rules use them. The attacker
            does not get them; linkage uses them only inside the equivalent combined rules.
        salt: Simulate Bloom filters keyed per ``"year"`` or ``"month"`` (year and month) of
            birth (salting with a stable attribute): the same name born in another year (or
            month) gives an unrelated filter. Empty: no salting.
    """

    key: str
    label: str
    spec: TokenSpec
    hide_name_tokens: bool = False
    salt: str = ""

    @property
    def simulated(self) -> bool:
        """True when the design is not expressible as a TokenSpec alone."""
        return self.hide_name_tokens or bool(self.salt)


def _bloom(**changes: Any) -> TokenSpec:
    return TokenSpec(bloom=replace(BloomSpec(), **changes))


VARIANTS: dict[str, Variant] = {
    v.key: v
    for v in (
        Variant("default", "default spec (256 bits, 15 hashes, flip 1/64)", TokenSpec()),
        Variant("no-flip", "no hardening (flip 0)", _bloom(flip_probability=0.0)),
        Variant("128-bits", "fewer bits (128, flip 1/64)", _bloom(bits=128)),
        Variant("flip-1/8", "stronger flips (1/8)", _bloom(flip_probability=1 / 8)),
        Variant("flip-1/4", "stronger flips (1/4)", _bloom(flip_probability=1 / 4)),
        Variant(
            "flip-1/4-no-name-tokens",
            "flip 1/4, name-only tokens withheld (simulated)",
            _bloom(flip_probability=1 / 4),
            hide_name_tokens=True,
        ),
        Variant(
            "no-name-tokens",
            "default, name-only tokens withheld (simulated)",
            TokenSpec(),
            hide_name_tokens=True,
        ),
        Variant(
            "salted",
            "name-only tokens withheld, filters salted by birth year (simulated)",
            TokenSpec(),
            hide_name_tokens=True,
            salt="year",
        ),
        Variant(
            "salted-flip-1/8",
            "as salted, flip 1/8 (simulated)",
            _bloom(flip_probability=1 / 8),
            hide_name_tokens=True,
            salt="year",
        ),
        Variant(
            "salted-month",
            "name-only tokens withheld, filters salted by birth year and month (simulated)",
            TokenSpec(),
            hide_name_tokens=True,
            salt="month",
        ),
        Variant(
            "salted-month-flip-1/8",
            "as salted by year and month, flip 1/8 (simulated)",
            _bloom(flip_probability=1 / 8),
            hide_name_tokens=True,
            salt="month",
        ),
    )
}
DEFAULT_VARIANTS = (
    "default",
    "no-flip",
    "128-bits",
    "flip-1/8",
    "flip-1/4",
    "no-name-tokens",
    "flip-1/4-no-name-tokens",
    "salted",
    "salted-flip-1/8",
    "salted-month",
    "salted-month-flip-1/8",
)


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    """The generated counties, the tokens the matcher holds, and the truth (for scoring)."""

    variant: Variant
    prepared: dict[str, PreparedCounty]
    tokens: pd.DataFrame  # every county's token table, with a ``county`` column
    truth: pd.DataFrame  # given_canonical, family_name, date_of_birth per row of ``tokens``


def _salt_secret(secret: bytes, salt: str) -> bytes:
    return hashlib.sha256(secret + b"/salt/" + salt.encode()).digest()


def tokenise_world(
    counties: Mapping[str, pd.DataFrame], variant: Variant, secret: bytes, seed: int
) -> World:
    """Tokenise each county as its node would (and apply the variant's simulation)."""
    tokeniser = variant.spec.bind(secret)
    prepared: dict[str, PreparedCounty] = {}
    frames = []
    truths = []
    for i, (county, raw) in enumerate(counties.items()):
        p = prepare_county(county, raw, tokeniser, seed=seed + i)
        records = p.normalised.records.reset_index(drop=True)
        if variant.salt:
            p.tokens = _salted_bloom(p.tokens, records, variant, secret, seed + i)
        prepared[county] = p
        frames.append(p.tokens.assign(county=county))
        truths.append(records[["given_canonical", "family_name", "date_of_birth"]])
    tokens = pd.concat(frames, ignore_index=True)
    truth = pd.concat(truths, ignore_index=True)
    return World(variant, prepared, tokens, truth)


def _salted_bloom(
    tokens: pd.DataFrame, records: pd.DataFrame, variant: Variant, secret: bytes, seed: int
) -> pd.DataFrame:
    """Replace the Bloom columns by filters keyed per year (or month) of birth."""
    spec = variant.spec
    out = tokens.copy()
    salts = records["date_of_birth"].fillna("").str[: 4 if variant.salt == "year" else 7]
    bloom_cols = [c for c in spec.token_columns() if "_bf_" in c]
    for j, (salt, index) in enumerate(salts.groupby(salts).groups.items()):
        salted = spec.bind(_salt_secret(secret, str(salt) or "none"))
        part = salted.tokenise(records.loc[index].reset_index(drop=True), seed=seed * 1000 + j)
        for c in bloom_cols:
            out.loc[index, c] = part[c].to_numpy()
    return out


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
    own = TokenSpec(bloom=replace(spec.bloom, flip_probability=0.0)).bind(key)
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


def graph_match(
    bits: np.ndarray,
    labels: np.ndarray,
    public: pd.Series,
    own: np.ndarray,
    *,
    first_anchors: int = 10,
    rounds: int = 6,
) -> np.ndarray:
    """Similarity-graph matching of clusters to public names (returns a name per cluster).

    Each cluster's consensus filter is compared by Dice with a set of anchor clusters; each
    public name's filter (under the attacker's key) with the anchors' names. Dice depends on
    shared q-grams, not on the key, so the two profiles agree for the right name. Anchors
    start as the largest clusters aligned by size and grow with the most confident matches.
    """
    k = int(labels.max()) + 1
    sizes = np.bincount(labels, minlength=k).astype(float)
    sums = np.zeros((k, bits.shape[1]), dtype=np.float32)
    np.add.at(sums, labels, bits.astype(np.float32))
    consensus = (sums / sizes[:, None] >= 0.5).astype(np.uint8)
    names = public.index.to_numpy()
    share = public.to_numpy() / public.sum()
    pop_c = consensus.sum(1).astype(np.float32)
    pop_p = own.sum(1).astype(np.float32)
    prior = 0.002 * np.abs(pop_c[:, None] - pop_p[None, :]) + 0.02 * np.abs(
        np.log(sizes / sizes.sum())[:, None] - np.log(share)[None, :]
    )
    order = np.argsort(-sizes)
    anchors = {int(order[i]): i for i in range(min(first_anchors, k, len(names)))}
    best = np.zeros(k, dtype=np.int64)
    for r in range(rounds):
        cs = np.array(list(anchors))
        ns = np.array(list(anchors.values()))
        s_enc = dice_matrix(consensus, consensus[cs])  # k x anchors
        s_pub = dice_matrix(own, own[ns])  # names x anchors
        dist = np.zeros((k, len(names)), dtype=np.float32)
        for j in range(len(cs)):
            dist += np.abs(s_enc[:, j][:, None] - s_pub[:, j][None, :])
        dist = dist / len(cs) + prior
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


def birth_year_cohorts(tokens: pd.DataFrame) -> np.ndarray:
    """Records born in the same year, found without knowing any year: ``dob_ym`` tokens
    (year and month) and ``dob_yd`` tokens (year and day) chain every record of a year
    together. Records without either token get -1."""
    ym = pd.factorize(tokens["dob_ym"])[0]
    yd = pd.factorize(tokens["dob_yd"])[0]
    offset = int(ym.max()) + 1
    parent = np.arange(offset + int(yd.max()) + 1)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    for a, b in set(zip(ym.tolist(), yd.tolist(), strict=True)):
        if a >= 0 and b >= 0:
            ra, rb = root(a), root(offset + b)
            if ra != rb:
                parent[rb] = ra
    out = np.array([root(a) if a >= 0 else -1 for a in ym.tolist()])
    return np.where(out >= 0, pd.factorize(out)[0], -1)


def bloom_attacks(world: World, public: Public, name: str, seed: int) -> dict[str, np.ndarray]:
    """Every Bloom-filter attack on one field; each returns a guess per row (None: no guess)."""
    spec = world.variant.spec
    tokens = world.tokens
    present = tokens[f"{name}_bf_n"].notna().to_numpy()
    bits = filter_bits(tokens[present], name, spec.bloom.words)
    counts = public.names[name].iloc[:MAX_PUBLIC_NAMES]
    rng = np.random.default_rng(seed)
    own = public_filters(counts, spec, name, seed)
    thresholds = calibrate(own, spec.bloom.flip_probability, rng)

    def expand(guess: np.ndarray) -> np.ndarray:
        out = np.full(len(tokens), None, dtype=object)
        out[present] = guess
        return out

    exact = pd.factorize(pd.Series([row.tobytes() for row in np.packbits(bits, axis=1)]))[0]
    results = {"bloom: equal filters, frequency": expand(align_by_frequency(exact, counts))}
    if world.variant.salt:
        # Filters are keyed per birth year (or month): attack each cohort on its own.
        if world.variant.salt == "year":
            cohorts = birth_year_cohorts(tokens)[present]
        else:
            cohorts = pd.factorize(tokens["dob_ym"])[0][present]
        by_freq = np.full(len(bits), None, dtype=object)
        by_graph = np.full(len(bits), None, dtype=object)
        for cohort in np.unique(cohorts[cohorts >= 0]):
            rows = np.flatnonzero(cohorts == cohort)
            if len(rows) < 2:
                continue
            labels = cluster_filters(bits[rows], thresholds)
            by_freq[rows] = align_by_frequency(labels, counts)
            by_graph[rows] = graph_match(bits[rows], labels, counts, own)[labels]
        results["bloom: per birth cohort, Dice clusters, frequency"] = expand(by_freq)
        results["bloom: per birth cohort, graph matching"] = expand(by_graph)
        return results
    labels = cluster_filters(bits, thresholds)
    results["bloom: Dice clusters, frequency"] = expand(align_by_frequency(labels, counts))
    per_cluster = graph_match(bits, labels, counts, own)
    results["bloom: Dice clusters, graph matching"] = expand(per_cluster[labels])
    if name == "family" and spec.bloom.flip_probability > 0:
        # Members of a household mostly share a family name, and the matcher holds household
        # pseudonyms: a household's filters combined bit by bit cancel most of the flips.
        held = tokens.loc[present]
        household = held["household"].astype("string").fillna(held["pseudonym"].astype("string"))
        unit = pd.factorize(held["county"].astype(str) + "|" + household.astype(str))[0]
        sums = np.zeros((int(unit.max()) + 1, bits.shape[1]), dtype=np.float32)
        np.add.at(sums, unit, bits.astype(np.float32))
        sizes = np.bincount(unit).astype(np.float32)
        unit_bits = (sums / sizes[:, None] >= 0.5).astype(np.uint8)
        by_household = cluster_filters(unit_bits, thresholds)[unit]
        per_cluster = graph_match(bits, by_household, counts, own)
        results["bloom: household consensus, graph matching"] = expand(per_cluster[by_household])
    return results


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
    if not world.variant.hide_name_tokens:
        for f in FIELDS:
            guesses[f]["initial token"] = attack_initial(tokens, public.names[f], f)
            guesses[f]["initial + frequency class"] = attack_frequency_class(
                tokens, public.names[f], f
            )
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
    """Person-pair F1 of linking the same counties under the variant."""
    variant = world.variant
    if not variant.simulated:
        with tempfile.TemporaryDirectory() as tmp:
            files = write_federation(fed, Path(tmp) / "counties")
            result = link_files(files, variant.spec.bind(secret), seed=seed)
        clusters = result.clusters
    else:
        # The same node and matcher functions link_files runs, on the simulated tokens.
        tables = {c: p.tokens for c, p in world.prepared.items()}
        if variant.hide_name_tokens:
            # No frequency classes: the model's "identical, a common name" levels never fire.
            # The name-only blocking tokens stay, standing for the combined tokens (name with
            # date of birth) that the blocking rules are equivalent to.
            tables = {
                c: t.assign(
                    given_fc=pd.array([pd.NA] * len(t), dtype="Int16"),
                    family_fc=pd.array([pd.NA] * len(t), dtype="Int16"),
                )
                for c, t in tables.items()
            }
        match = match_tokens(
            tables,
            spec_fingerprint=variant.spec.fingerprint,
            bloom=variant.spec.bloom,
        )
        ids = pd.concat(
            [p.identities.assign(county=c) for c, p in world.prepared.items()], ignore_index=True
        ).set_index(["county", "pseudonym"])["record_id"]
        members = match.clusters.members
        clusters = members.assign(
            record_id=ids.reindex(
                pd.MultiIndex.from_arrays([members["county"], members["pseudonym"]])
            ).to_numpy()
        )
    predicted = cluster_pairs(clusters, cluster="cluster_id", county="county", member="record_id")
    quality = pair_quality(predicted, true_person_pairs(fed.truth))
    return {k: float(v) for k, v in quality.as_dict().items()}


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
        "(given / family) | person-pair F1 |",
        "|---|---|---|---|---|---|",
    ]
    for s in report["variants"].values():
        link = s.get("link")
        f1 = f"{link['f1']:.4f}" if link else "not run"
        lines.append(
            f"| {s['label']} | {_pct(s['given']['share'])} | {_pct(s['family']['share'])} "
            f"| {_pct(s['both']['share'])} | {s['given']['attack']} / {s['family']['attack']} "
            f"| {f1} |"
        )
    lines += [
        "",
        f"Shares are of records with the name present. A blind guess (the commonest public "
        f"name for everyone) gets {_pct(first['given']['blind_guess'])} of given names, "
        f"{_pct(first['family']['blind_guess'])} of family names and "
        f"{_pct(first['both']['blind_guess'])} of full names, so a single-name share near "
        f"those floors means the attack learned nothing. Date-of-birth tokens aligned by "
        f"frequency: year-month right for {_pct(first['dates'].get('dob_ym', 0))} of records "
        f"(chance {_pct(first['dates'].get('dob_ym_chance', 0))}), month-day for "
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
