"""Tests of the notebooks' analysis helpers (linkage.analysis)."""

from __future__ import annotations

import copy
import math
import os
import stat
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from splink.blocking_analysis import count_comparisons_from_blocking_rules

from linkage.analysis import (
    DEFAULT_THRESHOLDS,
    best_threshold,
    blocking_counts,
    clerical_curve,
    compare_models,
    mark_true_pairs,
    model_parameters,
    pseudonym_truth,
    rules_generating,
    scored_candidates,
    threshold_curve,
    write_threshold,
)
from linkage.engine import SplinkEngine
from linkage.evaluate import true_person_pairs
from linkage.model import BLOCKING_RULES, LinkageModel
from linkage.pipeline import MatchResult, PreparedCounty, match_tokens
from linkage.synthetic import SyntheticFederation


# ----------------------------------------------------------------------------- threshold curves
def test_threshold_curve_counts_pairs_at_or_above_each_threshold() -> None:
    curve = threshold_curve(
        [0.9, 0.8, 0.3, 0.1],
        [True, False, True, False],
        total_matches=3,
        thresholds=[0.05, 0.3, 0.85, 0.95],
    )
    assert curve["predicted"].tolist() == [4, 3, 1, 0]
    assert curve["true_positives"].tolist() == [2, 2, 1, 0]
    assert curve["false_positives"].tolist() == [2, 1, 0, 0]
    assert curve["precision"].tolist() == pytest.approx([0.5, 2 / 3, 1.0, 1.0])
    assert curve["recall"].tolist() == pytest.approx([2 / 3, 2 / 3, 1 / 3, 0.0])
    assert curve["f1"].tolist() == pytest.approx([4 / 7, 2 / 3, 0.5, 0.0])


def test_threshold_curve_defaults() -> None:
    curve = threshold_curve(np.array([0.2, 0.7]), np.array([False, True]))
    assert curve["threshold"].tolist() == list(DEFAULT_THRESHOLDS)
    assert list(curve.columns) == [
        "threshold",
        "predicted",
        "true_positives",
        "false_positives",
        "precision",
        "recall",
        "f1",
    ]
    # Recall against the scored matches alone when the total is not given.
    assert curve.loc[curve["threshold"] == 0.5, "recall"].item() == 1.0


def test_threshold_curve_with_no_pairs_or_no_matches() -> None:
    empty = threshold_curve([], [], thresholds=[0.5])
    assert empty[["predicted", "precision", "recall"]].iloc[0].tolist() == [0, 1.0, 1.0]
    none_true = threshold_curve([0.9], [False], thresholds=[0.5])
    assert none_true[["precision", "f1"]].iloc[0].tolist() == [0.0, 0.0]


def test_threshold_curve_refuses_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="probabilities"):
        threshold_curve([0.5, 0.6], [True])
    with pytest.raises(ValueError, match="total_matches"):
        threshold_curve([0.5, 0.6], [True, True], total_matches=1)


def test_best_threshold_prefers_the_lowest_of_equals_and_respects_floors() -> None:
    curve = pd.DataFrame(
        {
            "threshold": [0.3, 0.1, 0.5, 0.9],
            "precision": [0.8, 0.7, 0.8, 1.0],
            "recall": [1.0, 1.0, 1.0, 0.5],
            "f1": [0.9, 0.8, 0.9, 0.6],
        }
    )
    assert best_threshold(curve) == 0.3
    assert best_threshold(curve, min_precision=0.95) == 0.9
    assert best_threshold(curve, metric="recall") == 0.1
    with pytest.raises(ValueError, match="meets"):
        best_threshold(curve, min_precision=0.9, min_recall=0.9)
    with pytest.raises(ValueError, match="column"):
        best_threshold(curve, metric="accuracy")


def test_clerical_curve_uses_the_latest_decision_and_ignores_need_info() -> None:
    labels = pd.DataFrame(
        {
            "alert_id": ["a", "a", "b", "c", "d"],
            "received_at": [1.0, 2.0, 1.0, 1.0, 1.0],
            "decision": ["same", "not_same", "same", "need_info", "same"],
            "match_probability": [0.95, 0.95, 0.6, 0.7, 0.99],
        }
    )
    curve = clerical_curve(labels, thresholds=[0.5, 0.9])
    # a (latest: not_same), b (same), d (same); c has no answer.
    assert curve["predicted"].tolist() == [3, 2]
    assert curve["true_positives"].tolist() == [2, 1]
    assert curve["recall"].tolist() == pytest.approx([1.0, 0.5])


# ----------------------------------------------------------------------------- truth and scores
def test_mark_true_pairs_ignores_the_order_of_the_two_sides() -> None:
    pairs = pd.DataFrame(
        {
            "county_l": ["b", "a", "a"],
            "pseudonym_l": ["2", "1", "1"],
            "county_r": ["a", "b", "c"],
            "pseudonym_r": ["1", "2", "3"],
        }
    )
    assert mark_true_pairs(pairs, {("a", "1", "b", "2")}).tolist() == [True, True, False]
    assert mark_true_pairs(pairs.iloc[:0], {("a", "1", "b", "2")}).tolist() == []


def test_pseudonym_truth_maps_record_ids_and_drops_quarantined_records() -> None:
    truth = pd.DataFrame(
        {
            "county": ["a", "a", "b", "b", "c"],
            "record_id": ["a1", "a2", "b1", "b2", "c1"],
            "person_id": ["p", "q", "p", "q", "p"],
        }
    )
    identities = {
        "a": pd.DataFrame({"pseudonym": ["x1", "x2"], "record_id": ["a1", "a2"]}),
        "b": pd.DataFrame({"pseudonym": ["y1"], "record_id": ["b1"]}),  # b2 quarantined
        "c": pd.DataFrame({"pseudonym": ["z1"], "record_id": ["c1"]}),
    }
    assert pseudonym_truth(truth, identities) == {
        ("a", "x1", "b", "y1"),
        ("a", "x1", "c", "z1"),
        ("b", "y1", "c", "z1"),
    }


def test_pseudonym_truth_has_as_many_pairs_as_the_record_truth(
    small_federation: SyntheticFederation, prepared_counties: dict[str, PreparedCounty]
) -> None:
    accepted = {
        (county, str(r))
        for county, p in prepared_counties.items()
        for r in p.identities["record_id"]
    }
    truth = small_federation.truth
    keys = zip(truth["county"], truth["record_id"], strict=True)
    kept = truth[[(c, str(r)) in accepted for c, r in keys]]
    ids = {c: p.identities for c, p in prepared_counties.items()}
    assert len(pseudonym_truth(truth, ids)) == len(true_person_pairs(kept))


@pytest.fixture(scope="module")
def matched(prepared_counties: dict[str, PreparedCounty]) -> MatchResult:
    return match_tokens({c: p.tokens for c, p in prepared_counties.items()})


def test_scored_candidates_include_the_alerted_pairs_and_those_below(
    matched: MatchResult, prepared_counties: dict[str, PreparedCounty]
) -> None:
    tables = {c: p.tokens for c, p in prepared_counties.items()}
    scored = scored_candidates(tables, matched.model)
    assert {"match_probability", "match_weight", "mw_given_name"} <= set(scored.columns)
    key = ["county_l", "pseudonym_l", "county_r", "pseudonym_r"]
    alerted = matched.pairs.set_index(key)["match_probability"]
    mine = scored.set_index(key)["match_probability"]
    assert set(alerted.index) <= set(mine.index)
    assert np.allclose(mine.reindex(alerted.index).to_numpy(), alerted.to_numpy())
    assert (scored["match_probability"] < matched.model.threshold).any()


# ----------------------------------------------------------------------------- blocking
def token_tables() -> dict[str, pd.DataFrame]:
    """Three tiny counties with two blocking keys (nullable, as tokens are)."""

    def table(pseudonyms: list[str], k1: list[int | None], k2: list[int | None]) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "pseudonym": pseudonyms,
                "k1": pd.array(k1, dtype="Int64"),
                "k2": pd.array(k2, dtype="Int64"),
            }
        )

    return {
        "a": table(["a1", "a2", "a3"], [1, 2, None], [10, 20, 30]),
        "b": table(["b1", "b2"], [1, 2], [10, 99]),
        "c": table(["c1", "c2"], [1, None], [11, 30]),
    }


RULES = ("l.k1 = r.k1", "l.k2 = r.k2")


def test_blocking_counts_counts_each_cross_county_pair_once() -> None:
    # k1: a1-b1, a1-c1, b1-c1, a2-b2; k2: a1-b1 (again), a3-c2.
    counts = blocking_counts(token_tables(), RULES)
    assert counts["rule"].tolist() == list(RULES)
    assert counts["comparisons"].tolist() == [4, 2]
    assert counts["marginal_comparisons"].tolist() == [4, 1]
    assert counts["cumulative_comparisons"].tolist() == [4, 5]
    assert "cumulative_recall" not in counts


def test_blocking_counts_recall_is_the_share_of_true_pairs_generated() -> None:
    truth = {
        ("b", "b1", "a", "a1"),  # either way round
        ("a", "a3", "c", "c2"),
        ("a", "a2", "c", "c2"),  # no rule generates it
        ("a", "a1", "a", "a2"),  # same county: cannot be linked, not counted
    }
    counts = blocking_counts(token_tables(), RULES, true_pairs=truth)
    assert counts["true_pairs"].tolist() == [1, 2]
    assert counts["marginal_true_pairs"].tolist() == [1, 1]
    assert counts["cumulative_recall"].tolist() == pytest.approx([1 / 3, 2 / 3])


def test_blocking_counts_equal_splinks_on_real_tokens(
    prepared_counties: dict[str, PreparedCounty],
) -> None:
    tables = {c: p.tokens.drop(columns=["household"]) for c, p in prepared_counties.items()}
    ours = blocking_counts(tables, BLOCKING_RULES)
    engine = SplinkEngine()
    registered = engine.register(tables)
    splink = pd.DataFrame(
        count_comparisons_from_blocking_rules(
            list(registered.values()),
            blocking_rules=list(BLOCKING_RULES),
            link_type="link_only",
            unique_id_column_name="pseudonym",
            record_sample_proportion=1.0,
        )
    )
    assert ours["marginal_comparisons"].tolist() == splink["marginal_comparison_count"].tolist()


def test_rules_generating_flags_each_rule_per_pair() -> None:
    pairs = {
        ("b", "b1", "a", "a1"),
        ("a", "a3", "c", "c2"),
        ("a", "a2", "c", "c2"),
        ("a", "zz", "b", "b1"),
    }
    hits = rules_generating(token_tables(), pairs, RULES)
    assert list(hits.columns) == [
        "county_l",
        "pseudonym_l",
        "county_r",
        "pseudonym_r",
        "rule_0",
        "rule_1",
        "any_rule",
    ]
    flags = {
        (r.pseudonym_l, r.pseudonym_r): (r.rule_0, r.rule_1, r.any_rule)
        for r in hits.itertuples(index=False)
    }
    # The unknown record zz is left out; null keys never match.
    assert flags == {
        ("a1", "b1"): (True, True, True),
        ("a3", "c2"): (False, True, True),
        ("a2", "c2"): (False, False, False),
    }


def test_blocking_recall_agrees_with_rules_generating(
    prepared_counties: dict[str, PreparedCounty], small_federation: SyntheticFederation
) -> None:
    tables = {c: p.tokens for c, p in prepared_counties.items()}
    truth = pseudonym_truth(
        small_federation.truth, {c: p.identities for c, p in prepared_counties.items()}
    )
    counts = blocking_counts(tables, true_pairs=truth)
    hits = rules_generating(tables, truth)
    assert counts["cumulative_recall"].iloc[-1] == pytest.approx(hits["any_rule"].mean())
    assert counts["true_pairs"].tolist() == [
        int(hits[f"rule_{i}"].sum()) for i in range(len(BLOCKING_RULES))
    ]
    assert counts["cumulative_recall"].iloc[-1] > 0.95


# ----------------------------------------------------------------------------- model parameters
def trained_like(model: LinkageModel, scale: float = 1.0) -> LinkageModel:
    """The model with made-up m and u on every level (u scaled by ``scale``)."""
    settings = copy.deepcopy(model.settings)
    for comparison in settings["comparisons"]:
        levels = [lvl for lvl in comparison["comparison_levels"] if not lvl.get("is_null_level")]
        for i, lvl in enumerate(levels):
            lvl["m_probability"] = 0.9 / (i + 1)
            lvl["u_probability"] = min(1.0, 0.001 * (i + 1) * scale)
    return LinkageModel(settings=settings)


def test_model_parameters_lists_every_non_null_level_with_its_weight() -> None:
    model = trained_like(LinkageModel.untrained())
    params = model_parameters(model)
    levels = sum(
        1
        for c in model.settings["comparisons"]
        for lvl in c["comparison_levels"]
        if not lvl.get("is_null_level")
    )
    assert len(params) == levels
    assert "missing" not in set(params["level"])
    first = params.iloc[0]
    assert (first["comparison"], first["level"]) == ("given_name", "identical")
    assert first["gamma"] == 3  # given_name has four non-null levels: the top is gamma 3
    assert first["match_weight"] == pytest.approx(math.log2(0.9 / 0.001))
    assert params.groupby("comparison")["gamma"].min().eq(0).all()


def test_model_parameters_of_an_untrained_model_are_nan() -> None:
    params = model_parameters(LinkageModel.untrained())
    assert params[["m_probability", "u_probability", "match_weight"]].isna().all().all()


def test_compare_models_side_by_side() -> None:
    base = LinkageModel.untrained()
    previous, current = trained_like(base), trained_like(base, scale=2.0)
    del current.settings["comparisons"][-1]["comparison_levels"][2]  # a level only one has
    diff = compare_models(previous, current)
    assert list(diff.columns[:4]) == [
        "comparison",
        "level",
        "m_probability_previous",
        "m_probability_current",
    ]
    assert diff["comparison"].iloc[0] == "given_name"
    first = diff.iloc[0]
    assert first["weight_change"] == pytest.approx(-1.0)  # u doubled: one bit less
    assert diff["weight_change"].isna().sum() == 1
    same = compare_models(previous, previous)
    assert (same["weight_change"] == 0).all()


# ----------------------------------------------------------------------------- matcher settings
EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "matcher.example.toml"


def test_write_threshold_goes_after_the_commented_example(tmp_path: Path) -> None:
    path = tmp_path / "matcher.toml"
    path.write_text(EXAMPLE.read_text())
    before = EXAMPLE.read_text().splitlines()
    write_threshold(path, 0.87, comment="chosen in a notebook")
    after = path.read_text().splitlines()
    example = next(i for i, line in enumerate(before) if line.startswith("# threshold ="))
    assert after[example + 1] == "threshold = 0.87  # chosen in a notebook"
    assert after[: example + 1] + after[example + 2 :] == before
    assert tomllib.loads(path.read_text())["threshold"] == 0.87


def test_write_threshold_replaces_an_existing_setting(tmp_path: Path) -> None:
    path = tmp_path / "matcher.toml"
    path.write_text('port = 8100\nthreshold = 0.5   # old\nengine = "duckdb"\n')
    write_threshold(path, 0.93)
    assert path.read_text() == 'port = 8100\nthreshold = 0.93\nengine = "duckdb"\n'


def test_write_threshold_keeps_it_a_top_level_key(tmp_path: Path) -> None:
    path = tmp_path / "matcher.toml"
    path.write_text('port = 8100\n\n[extra]\nthreshold = 3\nname = "x"')  # no final newline
    write_threshold(path, 0.6)
    data = tomllib.loads(path.read_text())
    assert data == {"port": 8100, "threshold": 0.6, "extra": {"threshold": 3, "name": "x"}}


def test_write_threshold_into_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "matcher.toml"
    path.write_text("")
    write_threshold(path, 0.25)
    assert tomllib.loads(path.read_text()) == {"threshold": 0.25}


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_write_threshold_refuses_values_the_matcher_would_refuse(
    tmp_path: Path, bad: float
) -> None:
    path = tmp_path / "matcher.toml"
    path.write_text("port = 8100\n")
    with pytest.raises(ValueError, match="between 0 and 1"):
        write_threshold(path, bad)
    assert path.read_text() == "port = 8100\n"


def test_write_threshold_refuses_files_it_cannot_edit_safely(tmp_path: Path) -> None:
    path = tmp_path / "matcher.toml"
    path.write_text("port = \n")
    with pytest.raises(ValueError, match="not valid TOML"):
        write_threshold(path, 0.5)
    path.write_text('"threshold" = 0.4\n')  # a quoted key it does not recognise
    with pytest.raises(ValueError, match="cannot set threshold"):
        write_threshold(path, 0.5)
    assert path.read_text() == '"threshold" = 0.4\n'
    with pytest.raises(ValueError, match="one line"):
        write_threshold(path, 0.5, comment="two\nlines")


def test_write_threshold_keeps_the_file_mode_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "matcher.toml"
    path.write_text("port = 8100\n")
    os.chmod(path, 0o640)
    write_threshold(path, 0.5)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["matcher.toml"]
