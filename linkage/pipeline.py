"""The linkage flow end to end, in the two halves that the federation splits between machines.

* :func:`prepare_county` is what a **node** does: read, validate, normalise and tokenise one
  county's export. Plaintext stays in its result's ``normalised`` frame and pseudonym map; only
  ``tokens`` may leave.
* :func:`match_tokens` is what the **matcher** does: train (or load) the model, score blocked
  candidates, calibrate, cluster people and roll up families, on token tables alone.

:func:`link_files` runs both in one process for ``jigsaw link``; the services call the same two
functions, so offline and federated results are the same code path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from linkage.cluster import Clusters, cluster_people, link_families
from linkage.engine import SplinkEngine
from linkage.model import LinkageModel, TrainingOptions
from linkage.normalise import NormalisedRecords, normalise_records
from linkage.records import ColumnMapping, read_county_file
from linkage.tokenise import (
    FREQUENCY_COLUMNS,
    KNOWN_BLOCKING,
    KNOWN_EXACT,
    BloomSpec,
    Tokeniser,
    TokenSpec,
    new_pseudonyms,
)

__all__ = [
    "LinkResult",
    "MatchResult",
    "PreparedCounty",
    "Stages",
    "link_files",
    "match_tokens",
    "prepare_county",
]

#: Token columns that order a county's rows before linking (together nearly unique): the
#: date of birth, the NHS number and the first word of each name field's first filter.
_ORDER_COLUMNS = ["dob", "nhs"]
_ORDER_FILTERS = ("given", "family", "surnames")


def _order_columns(columns: Sequence[str]) -> list[str]:
    present = set(columns)
    out = [c for c in _ORDER_COLUMNS if c in present]
    for f in _ORDER_FILTERS:
        first = next((c for c in columns if c.startswith(f"{f}_") and c.endswith("_bf_0")), None)
        if first is not None:
            out.append(first)
    return out


#: Columns of a token table besides the tokens themselves.
ID_COLUMNS = ("pseudonym", "household", "role")


class Stages:
    """Times named stages; an optional hook sees each one start and end (for progress bars).

    Args:
        hook: Called as ``hook(stage, None)`` on start and ``hook(stage, seconds)`` on end.
    """

    def __init__(self, hook: Callable[[str, float | None], None] | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self._hook = hook

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as stage ``name`` (times add up if a name repeats)."""
        if self._hook:
            self._hook(name, None)
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed
            if self._hook:
                self._hook(name, elapsed)


@dataclass
class PreparedCounty:
    """One county after the node's half of the flow.

    Attributes:
        county: County id.
        normalised: Accepted records and every warning and quarantine (plaintext: stays local).
        identities: ``pseudonym, record_id, household, household_id`` (stays local).
        tokens: ``pseudonym, household, role`` and the token columns: the only part to publish.
    """

    county: str
    normalised: NormalisedRecords
    identities: pd.DataFrame
    tokens: pd.DataFrame


def prepare_county(
    county: str,
    raw: pd.DataFrame,
    tokeniser: Tokeniser,
    *,
    mapping: ColumnMapping | None = None,
    pseudonyms: Mapping[str, str] | None = None,
    households: Mapping[str, str] | None = None,
    seed: int | None = None,
    stages: Stages | None = None,
) -> PreparedCounty:
    """Validate, normalise and tokenise one county's export.

    Args:
        county: County id.
        raw: The export as read by :func:`linkage.records.read_county_file`.
        tokeniser: The federation's tokeniser.
        mapping: Column mapping used to read the export (for date formats and sex codes).
        pseudonyms: Existing ``record_id -> pseudonym`` to reuse (a node's earlier loads);
            records not in it get fresh random pseudonyms.
        households: Existing ``household_id -> household pseudonym`` to reuse.
        seed: Seed for the tokeniser's bit flips (tests and benchmarks only).
        stages: Stage timer (``normalise`` and ``tokenise``).
    """
    stages = stages or Stages()
    with stages("normalise"):
        normalised = normalise_records(raw, source=county, mapping=mapping)
    with stages("tokenise"):
        tokens = tokeniser.tokenise(normalised.records.reset_index(drop=True), seed=seed)
    return _prepared(county, normalised, tokens, pseudonyms, households)


def _prepared(
    county: str,
    normalised: NormalisedRecords,
    tokens: pd.DataFrame,
    pseudonyms: Mapping[str, str] | None,
    households: Mapping[str, str] | None,
) -> PreparedCounty:
    """A county's tokens under pseudonyms, with the pseudonym maps that stay at the node."""
    records = normalised.records.reset_index(drop=True)
    record_ids = records["record_id"].astype(str).tolist()
    known = pseudonyms or {}
    fresh = iter(new_pseudonyms(sum(1 for r in record_ids if r not in known)))
    pseudo = [known[r] if r in known else next(fresh) for r in record_ids]
    hh_ids = records["household_id"].where(records["household_id"].notna(), None).tolist()
    hh_known = dict(households or {})
    missing = sorted({h for h in hh_ids if h and h not in hh_known})
    hh_known.update(zip(missing, new_pseudonyms(len(missing)), strict=True))
    hh_pseudo = [hh_known[h] if h else None for h in hh_ids]
    identities = pd.DataFrame(
        {
            "pseudonym": pseudo,
            "record_id": record_ids,
            "household": hh_pseudo,
            "household_id": hh_ids,
        }
    )
    tokens.insert(0, "role", records["role"].astype("string"))
    tokens.insert(0, "household", pd.Series(hh_pseudo, dtype="string"))
    tokens.insert(0, "pseudonym", pd.Series(pseudo, dtype="string"))
    return PreparedCounty(county, normalised, identities, tokens)


@dataclass
class MatchResult:
    """What the matcher concludes from token tables.

    Attributes:
        model: The (trained and calibrated) model used.
        pairs: Every cross-county pair at or above the threshold, on pseudonyms, with
            partial match weights ``mw_*`` per comparison.
        clusters: Person clusters (``cluster_id, county, pseudonym``) and the pairs they
            accepted (``clusters.pairs``).
        families: ``family_id, county, household`` for families spanning counties.
        candidate_pairs: Number of blocked pairs scored.
    """

    model: LinkageModel
    pairs: pd.DataFrame
    clusters: Clusters
    families: pd.DataFrame
    candidate_pairs: int = 0


def match_tokens(
    tables: Mapping[str, pd.DataFrame],
    *,
    model: LinkageModel | None = None,
    engine: SplinkEngine | None = None,
    stages: Stages | None = None,
    training: TrainingOptions | None = None,
    spec_fingerprint: str = "",
    bloom: Any = None,
    spec: TokenSpec | None = None,
) -> MatchResult:
    """Link county token tables: the matcher's whole batch pipeline, on tokens only.

    Args:
        tables: County id -> token table (``pseudonym, household, role`` + tokens).
        model: A trained model to apply; if ``None`` one is trained here by EM and calibrated.
        engine: Where Splink runs (a fresh in-memory DuckDB by default).
        stages: Stage timer for progress and benchmarks.
        training: Training options when a model is trained here.
        spec_fingerprint: Token-spec fingerprint recorded in a newly trained model.
        bloom: The token spec's ``BloomSpec`` (its Dice SQL depends on the filter length).
        spec: The whole token spec (its blocking tokens decide the blocking rules); it
            overrides ``bloom``. Without it, the tokens the tables carry are used with
            ``bloom`` (or the default Bloom shape).
    """
    stages = stages or Stages()
    if spec is None and model is None and tables:
        spec = _spec_of(list(next(iter(tables.values())).columns), bloom)
    engine = engine or SplinkEngine()
    with stages("register"):
        # Counties in name order and rows in token order, so that the same tokens give the
        # same model and pairs wherever they are linked (Splink's sampling is seeded but
        # depends on row order); pseudonyms are random and play no part in the order.
        ordered = {
            county: tables[county]
            .drop(columns=["household"])
            .sort_values(
                _order_columns(list(tables[county].columns)), kind="stable", na_position="last"
            )
            .reset_index(drop=True)
            for county in sorted(tables)
        }
        # Splink keys pairs by (county, id) strings; small integers instead of 32-character
        # pseudonyms keep a million-record link's blocked pairs a fraction of the size.
        pseudonyms = {c: t["pseudonym"].to_numpy() for c, t in ordered.items()}
        registered = engine.register(
            {c: t.assign(pseudonym=np.arange(len(t), dtype=np.int64)) for c, t in ordered.items()}
        )
    if model is None or not model.trained:
        with stages("train"):
            base = model or LinkageModel.untrained(
                bloom, spec_fingerprint=spec_fingerprint, spec=spec
            )
            model = base.train(engine, registered, options=training)
        with stages("predict"):
            predictions = engine.predict(model, registered)
        with stages("calibrate"):
            weights, counts = engine.bayes_histogram(predictions, model)
            calibrated = model.calibrated(
                weights, counts, total_pairs=_cross_pairs([len(t) for t in tables.values()])
            )
            candidate_pairs = int(counts.sum())
    else:
        with stages("predict"):
            predictions = engine.predict(model, registered)
            calibrated = model
            candidate_pairs = engine.count_predictions(predictions)
    with stages("select"):
        pairs = engine.select_pairs(predictions, model, calibrated)
        engine.release()  # a Spark session's cached tables (issue 8); no-op on DuckDB
    with stages("cluster"):
        # Clustered on the row numbers, whose order follows the tokens, so that ties between
        # equal scores break the same way whatever the random pseudonyms are.
        by_row = cluster_people(pairs)
        members = by_row.members
        clusters = Clusters(
            members=members.assign(
                pseudonym=[
                    pseudonyms[c][i]
                    for c, i in zip(members["county"], members["pseudonym"], strict=True)
                ]
            ),
            pairs=_with_pseudonyms(by_row.pairs, pseudonyms),
        )
        pairs = _with_pseudonyms(pairs, pseudonyms)
        households = pd.concat(
            [
                pd.DataFrame(
                    {"county": c, "pseudonym": t["pseudonym"], "household": t["household"]}
                )
                for c, t in tables.items()
            ],
            ignore_index=True,
        )
        families = link_families(clusters.members, households)
    return MatchResult(calibrated, pairs, clusters, families, candidate_pairs)


def _with_pseudonyms(pairs: pd.DataFrame, pseudonyms: Mapping[str, np.ndarray]) -> pd.DataFrame:
    out = pairs.copy()
    for side in ("l", "r"):
        out[f"pseudonym_{side}"] = [
            pseudonyms[c][i]
            for c, i in zip(pairs[f"county_{side}"], pairs[f"pseudonym_{side}"], strict=True)
        ]
    return out


def _spec_of(columns: Sequence[str], bloom: BloomSpec | None) -> TokenSpec:
    """The token spec (as far as the model needs it) of a token table made under ``bloom``."""
    base = TokenSpec(bloom=bloom) if bloom is not None else TokenSpec()
    present = set(columns)
    return dataclasses.replace(
        base,
        exact=tuple(t for t in KNOWN_EXACT if t in present) or base.exact,
        blocking=tuple(t for t in KNOWN_BLOCKING if t in present) or base.blocking,
        frequency_classes=all(c in present for c in FREQUENCY_COLUMNS),
    )


def _cross_pairs(sizes: Sequence[int]) -> float:
    """Number of pairs of records from different counties."""
    total = float(sum(sizes))
    return (total * total - sum(float(n) * n for n in sizes)) / 2.0


@dataclass
class LinkResult:
    """Output of :func:`link_files`, re-identified to county record ids.

    Attributes:
        pairs: ``county_l, record_id_l, county_r, record_id_r, match_probability, match_weight``.
        clusters: ``cluster_id, county, record_id``.
        families: ``family_id, county, household_id``.
        quarantine: ``county, row_number, record_id, reason``.
        warnings: ``county, row_number, record_id, column, reason``.
        match: The matcher's result on pseudonyms.
        counts: Input, accepted and quarantined rows per county.
        seconds: Seconds per stage.
    """

    pairs: pd.DataFrame
    clusters: pd.DataFrame
    families: pd.DataFrame
    quarantine: pd.DataFrame
    warnings: pd.DataFrame
    match: MatchResult
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def write(self, directory: Path) -> None:
        """Write ``pairs.csv``, ``clusters.csv``, ``families.csv``, ``quarantine.csv``."""
        directory.mkdir(parents=True, exist_ok=True)
        self.pairs.to_csv(directory / "pairs.csv", index=False)
        self.clusters.to_csv(directory / "clusters.csv", index=False)
        self.families.to_csv(directory / "families.csv", index=False)
        self.quarantine.to_csv(directory / "quarantine.csv", index=False)


def county_id(path: Path) -> str:
    """The county id of an export: its file name without the suffix."""
    return path.stem


def link_files(
    paths: Sequence[Path],
    tokeniser: Tokeniser,
    *,
    mappings: Mapping[str, ColumnMapping] | None = None,
    model: LinkageModel | None = None,
    engine: SplinkEngine | None = None,
    stages: Stages | None = None,
    training: TrainingOptions | None = None,
    seed: int | None = None,
) -> LinkResult:
    """Tokenise each county file as its node would, then link the tokens as the matcher would.

    Args:
        paths: One export per county; the county id is the file's stem.
        tokeniser: Tokeniser bound to the (possibly ephemeral) federation secret.
        mappings: County id -> column mapping, for exports not in the canonical shape.
        model: A trained model; trained on these tokens when omitted.
        engine: Where Splink runs.
        stages: Stage timer (progress display and benchmarks).
        training: Training options.
        seed: Seed for tokenisation bit flips (repeatable benchmarks).
    """
    stages = stages or Stages()
    counties = [county_id(path) for path in paths]
    if len(set(counties)) < len(counties):
        raise ValueError("two input files have the same county id (file stem)")
    mappings = mappings or {}
    normalised: dict[str, NormalisedRecords] = {}
    counts: dict[str, dict[str, int]] = {}
    # Each county as its node would prepare it (prepare_county), in phases across counties
    # so that tokenising, the costly part, runs every county's chunks on all cores at once.
    with stages("read"):
        raws = {
            c: read_county_file(p, mapping=mappings.get(c))
            for c, p in zip(counties, paths, strict=True)
        }
    with stages("normalise"):
        for county in counties:
            raw = raws.pop(county)
            normalised[county] = normalise_records(raw, source=county, mapping=mappings.get(county))
            counts[county] = {
                "input_rows": len(raw),
                "accepted": len(normalised[county].records),
                "quarantined": len(normalised[county].quarantined),
                "warnings": len(normalised[county].warnings),
            }
    with stages("tokenise"):
        tokens = tokeniser.tokenise_many(
            [normalised[c].records.reset_index(drop=True) for c in counties],
            seeds=[None if seed is None else seed + i for i in range(len(counties))],
        )
    prepared = {
        c: _prepared(c, normalised[c], t, None, None) for c, t in zip(counties, tokens, strict=True)
    }
    match = match_tokens(
        {c: p.tokens for c, p in prepared.items()},
        model=model,
        engine=engine,
        stages=stages,
        training=training,
        spec_fingerprint=tokeniser.spec.fingerprint,
        bloom=tokeniser.spec.bloom,
        spec=tokeniser.spec,
    )
    with stages("write"):
        result = _reidentify(prepared, match)
    result.counts = counts
    result.seconds = dict(stages.seconds)
    return result


def _reidentify(prepared: Mapping[str, PreparedCounty], match: MatchResult) -> LinkResult:
    ids = pd.concat([p.identities.assign(county=c) for c, p in prepared.items()], ignore_index=True)
    rid = ids.set_index(["county", "pseudonym"])["record_id"]
    pairs = match.pairs
    left = rid.reindex(pd.MultiIndex.from_arrays([pairs["county_l"], pairs["pseudonym_l"]]))
    right = rid.reindex(pd.MultiIndex.from_arrays([pairs["county_r"], pairs["pseudonym_r"]]))
    pairs_out = pd.DataFrame(
        {
            "county_l": pairs["county_l"].to_numpy(),
            "record_id_l": left.to_numpy(),
            "county_r": pairs["county_r"].to_numpy(),
            "record_id_r": right.to_numpy(),
            "match_probability": pairs["match_probability"].round(6).to_numpy(),
            "match_weight": pairs["match_weight"].round(4).to_numpy(),
        }
    ).sort_values(["county_l", "record_id_l", "county_r", "record_id_r"], ignore_index=True)
    members = match.clusters.members
    clusters_out = pd.DataFrame(
        {
            "cluster_id": members["cluster_id"].to_numpy(),
            "county": members["county"].to_numpy(),
            "record_id": rid.reindex(
                pd.MultiIndex.from_arrays([members["county"], members["pseudonym"]])
            ).to_numpy(),
        }
    )
    hh = ids.dropna(subset=["household"]).drop_duplicates(["county", "household"])
    hh_map = hh.set_index(["county", "household"])["household_id"]
    fam = match.families
    families_out = pd.DataFrame(
        {
            "family_id": fam["family_id"].to_numpy(),
            "county": fam["county"].to_numpy(),
            "household_id": hh_map.reindex(
                pd.MultiIndex.from_arrays([fam["county"], fam["household"]])
            ).to_numpy(),
        }
    )
    quarantine = [
        (c, i.row_number, i.record_id or "", i.reason)
        for c, p in prepared.items()
        for i in p.normalised.quarantined
    ]
    warnings = [
        (c, i.row_number, i.record_id or "", i.column or "", i.reason)
        for c, p in prepared.items()
        for i in p.normalised.warnings
    ]
    return LinkResult(
        pairs=pairs_out,
        clusters=clusters_out,
        families=families_out,
        quarantine=pd.DataFrame(
            quarantine, columns=["county", "row_number", "record_id", "reason"]
        ),
        warnings=pd.DataFrame(
            warnings, columns=["county", "row_number", "record_id", "column", "reason"]
        ),
        match=match,
    )
