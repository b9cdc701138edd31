"""Helpers for the analyst notebooks: thresholds, blocking, model parameters, matcher settings.

Everything here works on what the matcher holds (token tables, scored pairs on pseudonyms,
clerical labels) plus, for generated federations, the ground truth:

* **Thresholds.** :func:`scored_candidates` scores every blocked pair with a model;
  :func:`threshold_curve` gives precision, recall and F1 against the alert threshold, from
  those scores and the true pairs (:func:`pseudonym_truth`, :func:`mark_true_pairs`), and
  :func:`clerical_curve` does the same from safeguarding leads' clerical labels;
  :func:`best_threshold` picks one.
* **Blocking.** :func:`blocking_counts` counts the comparisons each rule of
  :data:`linkage.model.BLOCKING_RULES` generates, alone and on top of the rules before it, and
  the share of true pairs that at least one rule lets through: the recall the rules allow,
  which no threshold can exceed. :func:`rules_generating` says which rules catch each pair.
* **Model parameters.** :func:`model_parameters` and :func:`compare_models` put m, u and
  match weights in a table, one model or two side by side.
* **Matcher settings.** :func:`write_threshold` writes a chosen threshold into the matcher's
  TOML settings file (``threshold``, see ``configs/matcher.example.toml``), keeping the rest of
  the file as it was.

Pairs are ``(county_l, pseudonym_l, county_r, pseudonym_r)`` tuples with the two sides in
either order; every function here treats ``(a, b)`` and ``(b, a)`` as the same pair.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pandas as pd

from linkage.engine import SplinkEngine
from linkage.evaluate import cluster_pairs
from linkage.model import BLOCKING_RULES, LinkageModel
from linkage.relations import registered

__all__ = [
    "DEFAULT_THRESHOLDS",
    "Pair",
    "best_threshold",
    "blocking_counts",
    "clerical_curve",
    "compare_models",
    "mark_true_pairs",
    "model_parameters",
    "pseudonym_truth",
    "rules_generating",
    "scored_candidates",
    "threshold_curve",
    "write_threshold",
]

Pair = tuple[str, str, str, str]

#: Thresholds a curve is evaluated at unless told otherwise: 0.01 to 0.99 by 0.01, then the
#: high end that a cautious matcher may want.
DEFAULT_THRESHOLDS: tuple[float, ...] = (
    *(round(0.01 * i, 2) for i in range(1, 100)),
    0.995,
    0.999,
)

#: Clerical decisions that say whether an alert was right; ``need_info`` says neither.
_SAME, _NOT_SAME = "same", "not_same"

_PAIR_COLUMNS = ("county_l", "pseudonym_l", "county_r", "pseudonym_r")


def _canonical(county_a: str, id_a: str, county_b: str, id_b: str) -> Pair:
    a, b = (str(county_a), str(id_a)), (str(county_b), str(id_b))
    lo, hi = (a, b) if a <= b else (b, a)
    return (lo[0], lo[1], hi[0], hi[1])


# ----------------------------------------------------------------------------- truth and scores
def pseudonym_truth(truth: pd.DataFrame, identities: Mapping[str, pd.DataFrame]) -> set[Pair]:
    """True cross-county pairs of one person, on pseudonyms instead of record ids.

    Args:
        truth: ``county, record_id, person_id`` (as :func:`linkage.synthetic.generate_federation`
            returns it).
        identities: County id -> ``pseudonym, record_id`` (``PreparedCounty.identities``).

    Returns:
        ``(county_l, pseudonym_l, county_r, pseudonym_r)`` with ``county_l < county_r``. Records
        that a county quarantined have no pseudonym, so their pairs are left out: no linkage
        could find them.
    """
    frames = [
        ids[["pseudonym", "record_id"]].astype(str).assign(county=county)
        for county, ids in identities.items()
    ]
    if not frames:
        return set()
    keyed = pd.concat(frames, ignore_index=True)
    people = truth[["county", "record_id", "person_id"]].astype(str)
    joined = people.merge(keyed, on=["county", "record_id"], how="inner")
    return cluster_pairs(joined, cluster="person_id", county="county", member="pseudonym")


def mark_true_pairs(pairs: pd.DataFrame, true_pairs: Collection[Pair]) -> npt.NDArray[np.bool_]:
    """Which rows of a pairs frame are true pairs, whichever way round either is written.

    Args:
        pairs: A frame with ``county_l, pseudonym_l, county_r, pseudonym_r``.
        true_pairs: The true pairs (:func:`pseudonym_truth`).

    Returns:
        One boolean per row of ``pairs``.
    """
    truth = {_canonical(*p) for p in true_pairs}
    rows = zip(*(pairs[c].astype(str) for c in _PAIR_COLUMNS), strict=True)
    return np.fromiter((_canonical(*row) in truth for row in rows), dtype=bool, count=len(pairs))


def scored_candidates(
    tables: Mapping[str, pd.DataFrame],
    model: LinkageModel,
    *,
    engine: SplinkEngine | None = None,
    min_bayes_log2: float = -10.0,
) -> pd.DataFrame:
    """Score every candidate pair the model's blocking rules generate, whatever its score.

    :func:`linkage.pipeline.match_tokens` keeps only the pairs at or above the threshold; a
    threshold curve needs the ones below it too.

    Args:
        tables: County id -> token table (``pseudonym`` and the token columns; ``household``
            and ``role`` may be there), as :func:`linkage.pipeline.match_tokens` takes them.
        model: A trained (and normally calibrated) model.
        engine: Where Splink runs (a fresh in-memory DuckDB by default).
        min_bayes_log2: Leave out pairs whose evidence (match weight less the prior) is below
            this; the default keeps everything that could reach a probability of about
            ``prior / 1000``.

    Returns:
        ``county_l, pseudonym_l, county_r, pseudonym_r, match_weight, match_probability`` and
        one ``mw_<comparison>`` column per comparison, one row per scored pair.
    """
    engine = engine or SplinkEngine()
    registered = engine.register(
        {county: tables[county].drop(columns=["household"], errors="ignore") for county in tables}
    )
    predictions = engine.predict(model, registered, min_bayes_log2=min_bayes_log2)
    # A threshold of zero clamps to the lowest weight a model can express: keep every pair.
    return engine.select_pairs(predictions, model, dataclasses.replace(model, threshold=0.0))


# ----------------------------------------------------------------------------- threshold curves
def threshold_curve(
    probabilities: npt.ArrayLike,
    is_match: npt.ArrayLike,
    *,
    total_matches: int | None = None,
    thresholds: Sequence[float] | None = None,
) -> pd.DataFrame:
    """Precision, recall and F1 of "alert when the probability is at least t", for each t.

    Args:
        probabilities: Match probability of each scored pair.
        is_match: Whether each pair is a true match (same length).
        total_matches: Every true match there is, scored or not (pairs that blocking never
            generated count against recall); the matches among the scored pairs by default.
        thresholds: Where to evaluate; :data:`DEFAULT_THRESHOLDS` by default.

    Returns:
        One row per threshold: ``threshold, predicted, true_positives, false_positives,
        precision, recall, f1``. Precision is 1.0 where nothing is predicted, as in
        :class:`linkage.evaluate.Quality`.

    Raises:
        ValueError: The inputs differ in length, or ``total_matches`` is below the number of
            matches among the scored pairs.
    """
    p = np.asarray(probabilities, dtype=float).reshape(-1)
    y = np.asarray(is_match, dtype=bool).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{len(p)} probabilities but {len(y)} match flags")
    scored_matches = int(y.sum())
    total = scored_matches if total_matches is None else int(total_matches)
    if total < scored_matches:
        raise ValueError(
            f"total_matches ({total}) is below the matches among the scored pairs "
            f"({scored_matches})"
        )
    grid = np.asarray(DEFAULT_THRESHOLDS if thresholds is None else thresholds, dtype=float)
    everything, matches = np.sort(p), np.sort(p[y])
    predicted = len(everything) - np.searchsorted(everything, grid, side="left")
    true_positives = len(matches) - np.searchsorted(matches, grid, side="left")
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positives / np.maximum(predicted, 1), 1.0)
        recall = true_positives / total if total else np.ones_like(grid)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return pd.DataFrame(
        {
            "threshold": grid,
            "predicted": predicted.astype(np.int64),
            "true_positives": true_positives.astype(np.int64),
            "false_positives": (predicted - true_positives).astype(np.int64),
            "precision": precision,
            "recall": recall,
            "f1": f1,
        }
    )


def clerical_curve(
    labels: pd.DataFrame, *, thresholds: Sequence[float] | None = None
) -> pd.DataFrame:
    """Precision and recall against threshold from clerical labels of alerts.

    Safeguarding leads label the alerts they receive (``same``, ``not_same`` or ``need_info``),
    and only alerts at or above the threshold in force are ever sent. So labels tell the
    precision at that threshold and above, and what share of the *confirmed* matches a higher
    threshold would still alert (the ``recall`` column here); they cannot tell how many matches
    a lower threshold would find. For that, review a sample of pairs below the threshold.

    Args:
        labels: One row per clerical decision with ``match_probability`` (of the alert) and
            ``decision``. With ``alert_id`` and ``received_at`` too, only the latest decision
            on each alert counts. ``need_info`` and unknown decisions are left out.
        thresholds: Where to evaluate; :data:`DEFAULT_THRESHOLDS` by default.

    Returns:
        As :func:`threshold_curve`, over the labelled alerts; ``recall`` is the share of
        confirmed alerts at or above each threshold.
    """
    frame = labels
    if {"alert_id", "received_at"} <= set(frame.columns):
        frame = frame.sort_values("received_at", kind="stable").drop_duplicates(
            "alert_id", keep="last"
        )
    frame = frame[frame["decision"].isin([_SAME, _NOT_SAME])]
    return threshold_curve(
        frame["match_probability"].to_numpy(dtype=float),
        (frame["decision"] == _SAME).to_numpy(),
        thresholds=thresholds,
    )


def best_threshold(
    curve: pd.DataFrame,
    *,
    metric: str = "f1",
    min_precision: float | None = None,
    min_recall: float | None = None,
) -> float:
    """The threshold that maximises ``metric`` on a curve, within optional floors.

    Ties go to the lowest threshold: in safeguarding a missed link costs more than one more
    alert to review.

    Args:
        curve: From :func:`threshold_curve` or :func:`clerical_curve`.
        metric: Column to maximise (``f1``, ``precision`` or ``recall``).
        min_precision: Consider only thresholds with at least this precision.
        min_recall: Consider only thresholds with at least this recall.

    Raises:
        ValueError: No threshold on the curve meets the floors, or ``metric`` is not a column.
    """
    if metric not in curve.columns:
        raise ValueError(f"no column {metric!r} on the curve")
    ok = pd.Series(True, index=curve.index)
    if min_precision is not None:
        ok &= curve["precision"] >= min_precision
    if min_recall is not None:
        ok &= curve["recall"] >= min_recall
    candidates = curve[ok].sort_values("threshold", kind="stable")
    if candidates.empty:
        raise ValueError("no threshold on the curve meets the requested precision and recall")
    best = candidates[metric].to_numpy().argmax()  # first maximum: the lowest threshold
    return float(candidates["threshold"].iloc[best])


# ----------------------------------------------------------------------------- blocking
def blocking_counts(
    tables: Mapping[str, pd.DataFrame],
    rules: Sequence[str] = BLOCKING_RULES,
    *,
    true_pairs: Collection[Pair] | None = None,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> pd.DataFrame:
    """Comparisons and true pairs each blocking rule generates between counties.

    Counts by joining the token tables on each rule in DuckDB (exact counts, pairs of records
    from different counties, each pair once), as Splink would before scoring. It materialises
    the blocked pairs, so use it on a sample at national scale; Splink's
    ``splink.blocking_analysis.count_comparisons_from_blocking_rules`` estimates from a
    sample.

    Args:
        tables: County id -> token table with ``pseudonym`` and the columns the rules name.
        rules: Blocking rules as SQL over ``l.`` and ``r.`` (the model's by default).
        true_pairs: True pairs on pseudonyms (:func:`pseudonym_truth`), for recall columns.
        connection: A DuckDB connection to count in (a fresh in-memory one by default).

    Returns:
        One row per rule, in order: ``rule, comparisons`` (the rule alone),
        ``marginal_comparisons`` (pairs no earlier rule generated, the way Splink counts them),
        ``cumulative_comparisons``; with ``true_pairs`` also ``true_pairs`` (the rule alone),
        ``marginal_true_pairs`` and ``cumulative_recall``, the share of all true pairs that
        this rule or an earlier one generates. The last row's ``cumulative_recall`` is the
        recall the rules allow.
    """
    conn = connection or duckdb.connect()
    with registered(conn, "__jigsaw_blocking_tokens", _blocking_tokens(tables)):
        try:
            selects = [
                f"SELECT {i} AS rule, l.source_dataset AS county_l, l.pseudonym AS pseudonym_l, "
                f"r.source_dataset AS county_r, r.pseudonym AS pseudonym_r "
                f"FROM __jigsaw_blocking_tokens AS l JOIN __jigsaw_blocking_tokens AS r "
                f"ON ({rule}) AND l.source_dataset < r.source_dataset"
                for i, rule in enumerate(rules)
            ]
            conn.execute(
                "CREATE OR REPLACE TEMP TABLE __jigsaw_blocked AS " + " UNION ALL ".join(selects)
            )
            alone = dict(
                conn.execute("SELECT rule, count(*) FROM __jigsaw_blocked GROUP BY 1").fetchall()
            )
            first = dict(
                conn.execute(
                    "SELECT first_rule, count(*) FROM (SELECT min(rule) AS first_rule "
                    "FROM __jigsaw_blocked GROUP BY county_l, pseudonym_l, county_r, pseudonym_r) "
                    "GROUP BY 1"
                ).fetchall()
            )
            out = pd.DataFrame(
                {
                    "rule": list(rules),
                    "comparisons": [int(alone.get(i, 0)) for i in range(len(rules))],
                    "marginal_comparisons": [int(first.get(i, 0)) for i in range(len(rules))],
                }
            )
            out["cumulative_comparisons"] = out["marginal_comparisons"].cumsum()
            if true_pairs is not None:
                # Only pairs across counties can be linked (link_only); others are not counted.
                canonical = sorted({_canonical(*p) for p in true_pairs if p[0] != p[2]})
                truth = pd.DataFrame(canonical, columns=list(_PAIR_COLUMNS))
                with registered(conn, "__jigsaw_true_pairs", truth):
                    # Blocked pairs have county_l < county_r, as canonical cross-county pairs do.
                    hits = conn.execute(
                        "SELECT b.rule, count(*) AS alone, "
                        "count(*) FILTER (WHERE b.rule = f.first_rule) AS marginal "
                        "FROM __jigsaw_blocked b "
                        "JOIN (SELECT county_l, pseudonym_l, county_r, pseudonym_r, "
                        "min(rule) AS first_rule FROM __jigsaw_blocked GROUP BY ALL) f "
                        "USING (county_l, pseudonym_l, county_r, pseudonym_r) "
                        "SEMI JOIN __jigsaw_true_pairs t "
                        "USING (county_l, pseudonym_l, county_r, pseudonym_r) GROUP BY 1"
                    ).fetchall()
                by_rule = {rule: (alone_n, marginal_n) for rule, alone_n, marginal_n in hits}
                counts = [by_rule.get(i, (0, 0)) for i in range(len(rules))]
                out["true_pairs"] = [int(alone_n) for alone_n, _ in counts]
                out["marginal_true_pairs"] = [int(marginal_n) for _, marginal_n in counts]
                total = len(canonical)
                recall = out["marginal_true_pairs"].cumsum() / total if total else 1.0
                out["cumulative_recall"] = recall
            return out
        finally:
            conn.execute("DROP TABLE IF EXISTS __jigsaw_blocked")


def rules_generating(
    tables: Mapping[str, pd.DataFrame],
    pairs: Collection[Pair],
    rules: Sequence[str] = BLOCKING_RULES,
    *,
    connection: duckdb.DuckDBPyConnection | None = None,
) -> pd.DataFrame:
    """Which blocking rules generate each of some pairs (true pairs, say, to see what is missed).

    Args:
        tables: County id -> token table with ``pseudonym`` and the columns the rules name.
        pairs: Pairs on pseudonyms, either way round.
        rules: Blocking rules as SQL over ``l.`` and ``r.`` (the model's by default).
        connection: A DuckDB connection to work in (a fresh in-memory one by default).

    Returns:
        ``county_l, pseudonym_l, county_r, pseudonym_r`` (the smaller end on the left), one
        boolean column ``rule_<i>`` per rule (a rule over a missing token is false) and
        ``any_rule``. Pairs whose records are not in ``tables`` are left out.
    """
    conn = connection or duckdb.connect()
    frame = pd.DataFrame(sorted({_canonical(*p) for p in pairs}), columns=list(_PAIR_COLUMNS))
    with (
        registered(conn, "__jigsaw_blocking_tokens", _blocking_tokens(tables)),
        registered(conn, "__jigsaw_pairs", frame),
    ):
        flags = ", ".join(f"coalesce(({rule}), false) AS rule_{i}" for i, rule in enumerate(rules))
        out = conn.execute(
            f"SELECT p.county_l, p.pseudonym_l, p.county_r, p.pseudonym_r, {flags} "
            "FROM __jigsaw_pairs p "
            "JOIN __jigsaw_blocking_tokens l "
            "ON l.source_dataset = p.county_l AND l.pseudonym = p.pseudonym_l "
            "JOIN __jigsaw_blocking_tokens r "
            "ON r.source_dataset = p.county_r AND r.pseudonym = p.pseudonym_r "
            "ORDER BY p.county_l, p.pseudonym_l, p.county_r, p.pseudonym_r"
        ).df()
    rule_columns = [f"rule_{i}" for i in range(len(rules))]
    out[rule_columns] = out[rule_columns].astype(bool)
    out["any_rule"] = out[rule_columns].any(axis=1) if rule_columns else False
    return out


def _blocking_tokens(tables: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The county token tables as one frame with ``source_dataset`` (the county)."""
    tokens = pd.concat(
        [t.assign(source_dataset=county) for county, t in tables.items()], ignore_index=True
    )
    tokens["pseudonym"] = tokens["pseudonym"].astype(str)
    return tokens


# ----------------------------------------------------------------------------- model parameters
def model_parameters(model: LinkageModel) -> pd.DataFrame:
    """The m and u probabilities and match weight of every comparison level of a model.

    Returns:
        ``comparison, level, gamma, m_probability, u_probability, match_weight`` (log2 of
        m / u), in the model's order; null levels ("missing") are left out, as they weigh
        nothing. Untrained levels have NaN probabilities and weight.
    """
    rows: list[dict[str, Any]] = []
    for comparison in model.settings["comparisons"]:
        levels = [lvl for lvl in comparison["comparison_levels"] if not lvl.get("is_null_level")]
        for i, lvl in enumerate(levels):
            m = _probability(lvl.get("m_probability"))
            u = _probability(lvl.get("u_probability"))
            weight = math.log2(m / u) if m > 0 and u > 0 else math.nan
            rows.append(
                {
                    "comparison": comparison["output_column_name"],
                    "level": lvl["label_for_charts"],
                    # Splink numbers non-null levels from the top: highest gamma = most similar.
                    "gamma": len(levels) - 1 - i,
                    "m_probability": m,
                    "u_probability": u,
                    "match_weight": weight,
                }
            )
    return pd.DataFrame(
        rows,
        columns=["comparison", "level", "gamma", "m_probability", "u_probability", "match_weight"],
    )


def _probability(value: Any) -> float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return math.nan


def compare_models(
    previous: LinkageModel,
    current: LinkageModel,
    *,
    names: tuple[str, str] = ("previous", "current"),
) -> pd.DataFrame:
    """Two models' parameters side by side, level by level.

    Args:
        previous: The model in use (or saved earlier).
        current: The candidate.
        names: Suffixes for the two models' columns.

    Returns:
        ``comparison, level`` then ``m_probability_<name>``, ``u_probability_<name>`` and
        ``match_weight_<name>`` for each model, and ``weight_change`` (current minus previous).
        Levels are matched by comparison and label; a level only one model has gets NaN for
        the other.
    """
    old, new = names
    keys = ["comparison", "level"]
    values = ["m_probability", "u_probability", "match_weight"]
    a = model_parameters(previous)[[*keys, *values]]
    b = model_parameters(current)[[*keys, *values]]
    merged = b.merge(a, on=keys, how="outer", suffixes=(f"_{new}", f"_{old}"), sort=False)
    order = {key: i for i, key in enumerate(zip(b["comparison"], b["level"], strict=True))}
    merged["_order"] = [
        order.get(k, len(order)) for k in zip(merged["comparison"], merged["level"], strict=True)
    ]
    merged = merged.sort_values("_order", kind="stable").drop(columns="_order")
    merged["weight_change"] = merged[f"match_weight_{new}"] - merged[f"match_weight_{old}"]
    columns = [
        *keys,
        *(f"{v}_{n}" for v in values for n in (old, new)),
        "weight_change",
    ]
    return merged[columns].reset_index(drop=True)


# ----------------------------------------------------------------------------- matcher settings
_TABLE_HEADER = re.compile(r"^\s*\[")
_LIVE_THRESHOLD = re.compile(r"^\s*threshold\s*=")
_COMMENTED_THRESHOLD = re.compile(r"^\s*#\s*threshold\s*=")


def write_threshold(path: Path, threshold: float, *, comment: str | None = None) -> None:
    """Set the alert threshold in the matcher's TOML settings file, changing nothing else.

    An existing top-level ``threshold = ...`` line is replaced; otherwise the setting goes
    just after a commented-out example of it (as in ``configs/matcher.example.toml``), or at
    the end of the top-level keys. Comments and every other line stay as they were. The
    matcher reads it as ``MatcherSettings.threshold``, which overrides the model's calibrated
    threshold.

    Args:
        path: The matcher's settings file.
        threshold: A probability strictly between 0 and 1.
        comment: A note written after the value on the same line (where it was chosen, say).

    Raises:
        ValueError: The threshold is not strictly between 0 and 1, the file is not valid TOML,
            or the edit would change anything but ``threshold`` (a ``threshold`` key written in
            a way this helper does not recognise).
        OSError: The file cannot be read or written.
    """
    value = float(threshold)
    if not 0.0 < value < 1.0 or math.isnan(value):
        raise ValueError(f"the threshold must be strictly between 0 and 1, not {threshold!r}")
    if comment is not None and ("\n" in comment or "\r" in comment):
        raise ValueError("the comment must be one line")
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        before = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path} is not valid TOML: {e}") from e

    lines = text.splitlines(keepends=True)
    if lines and not lines[-1].endswith(("\n", "\r")):
        lines[-1] += "\n"
    top = next((i for i, line in enumerate(lines) if _TABLE_HEADER.match(line)), len(lines))
    setting = f"threshold = {value!r}" + (f"  # {comment}" if comment else "") + "\n"
    live = [i for i in range(top) if _LIVE_THRESHOLD.match(lines[i])]
    example = [i for i in range(top) if _COMMENTED_THRESHOLD.match(lines[i])]
    if live:
        lines[live[0]] = setting
    elif example:
        lines.insert(example[0] + 1, setting)
    else:
        lines.insert(top, setting)
    new_text = "".join(lines)

    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"cannot set threshold in {path}: the result is not valid TOML") from e
    if after != {**before, "threshold": value}:
        raise ValueError(f"cannot set threshold in {path} without changing other settings")
    _replace_file(path, new_text)


def _replace_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically, keeping the file's permissions."""
    mode = path.stat().st_mode & 0o777
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
