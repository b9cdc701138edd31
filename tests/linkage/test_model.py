"""Tests of the Fellegi-Sunter model on tokens: settings, training, persistence, explanations."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from linkage.engine import SplinkEngine
from linkage.errors import ModelError
from linkage.model import DEFAULT_THRESHOLD, LinkageModel, TrainingOptions, model_settings
from linkage.pipeline import PreparedCounty
from linkage.tokenise import BloomSpec, Tokeniser

COMPARISONS = [
    "given_name",
    "family_name",
    "date_of_birth",
    "nhs_number",
    "sex",
    "role",
    "postcode",
]


def non_null_levels(model: LinkageModel) -> list[tuple[str, dict[str, Any]]]:
    return [
        (c["output_column_name"], level)
        for c in model.settings["comparisons"]
        for level in c["comparison_levels"]
        if not level.get("is_null_level")
    ]


def level(model: LinkageModel, comparison: str, label: str) -> dict[str, Any]:
    matches = [
        lvl
        for name, lvl in non_null_levels(model)
        if name == comparison and lvl["label_for_charts"] == label
    ]
    assert len(matches) == 1, (comparison, label)
    return matches[0]


@pytest.fixture(scope="module")
def engine_and_tables(
    prepared_counties: dict[str, PreparedCounty],
) -> tuple[SplinkEngine, dict[str, Any]]:
    """The small federation's token tables registered in a fresh in-memory engine."""
    engine = SplinkEngine()
    tables = {c: p.tokens.drop(columns=["household"]) for c, p in prepared_counties.items()}
    return engine, engine.register(tables)


@pytest.fixture(scope="module")
def training(
    engine_and_tables: tuple[SplinkEngine, dict[str, Any]], tokeniser: Tokeniser
) -> tuple[LinkageModel, LinkageModel]:
    """(the untrained model, the model its training returned)."""
    engine, registered = engine_and_tables
    untrained = LinkageModel.untrained(
        tokeniser.spec.bloom, spec_fingerprint=tokeniser.spec.fingerprint
    )
    return untrained, untrained.train(engine, registered, options=TrainingOptions(seed=3))


@pytest.fixture(scope="module")
def trained(training: tuple[LinkageModel, LinkageModel]) -> LinkageModel:
    return training[1]


# ----------------------------------------------------------------------------- settings
def test_untrained_settings_build_a_linker(
    engine_and_tables: tuple[SplinkEngine, dict[str, Any]],
) -> None:
    engine, registered = engine_and_tables
    linker = engine.linker(registered, model_settings(BloomSpec()))
    saved = linker.misc.save_model_to_json()
    assert [c["output_column_name"] for c in saved["comparisons"]] == COMPARISONS
    assert saved["link_type"] == "link_only"


def test_untrained_model_is_not_trained() -> None:
    model = LinkageModel.untrained(spec_fingerprint="abc")
    assert not model.trained
    assert model.threshold == DEFAULT_THRESHOLD
    assert model.metadata["token_spec"] == "abc"


@pytest.mark.parametrize("bits", [128, 256, 512])
def test_dice_sql_reads_every_filter_word(bits: int) -> None:
    bloom = BloomSpec(bits=bits)
    sql = json.dumps(model_settings(bloom))
    words = bits // 64
    for view in bloom.views:
        assert f"given{view}_bf_{words - 1}_l" in sql
        assert f"given{view}_bf_{words}_l" not in sql


def test_training_needs_two_counties(
    engine_and_tables: tuple[SplinkEngine, dict[str, Any]],
) -> None:
    engine, registered = engine_and_tables
    one = dict(list(registered.items())[:1])
    with pytest.raises(ModelError, match="two counties"):
        LinkageModel.untrained().train(engine, one)


# ----------------------------------------------------------------------------- training
def test_trained_model_has_valid_parameters(trained: LinkageModel, tokeniser: Tokeniser) -> None:
    assert trained.trained
    assert 0 < trained.prior < 1
    for name, lvl in non_null_levels(trained):
        assert 0 < lvl["m_probability"] <= 1, (name, lvl["label_for_charts"])
        assert 0 < lvl["u_probability"] <= 1, (name, lvl["label_for_charts"])
    assert trained.metadata["token_spec"] == tokeniser.spec.fingerprint
    assert trained.metadata["counties"] == 3


def test_trained_model_learns_what_identifies_a_person(trained: LinkageModel) -> None:
    assert level(trained, "date_of_birth", "identical")["m_probability"] > 0.8
    for comparison in ("date_of_birth", "nhs_number", "given_name", "family_name"):
        agree = level(trained, comparison, "identical")
        assert agree["m_probability"] > 10 * agree["u_probability"], comparison
        disagree = level(trained, comparison, "different")
        assert disagree["m_probability"] < disagree["u_probability"], comparison


def test_training_returns_a_new_model(training: tuple[LinkageModel, LinkageModel]) -> None:
    untrained, trained = training
    assert trained is not untrained
    assert not untrained.trained
    assert untrained.settings == model_settings(BloomSpec())
    assert untrained.threshold == DEFAULT_THRESHOLD


# ----------------------------------------------------------------------------- persistence
def test_save_and_load_round_trip(trained: LinkageModel, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "model.json"
    trained.save(path)
    loaded = LinkageModel.load(path)
    assert loaded == trained
    assert loaded.trained
    assert loaded.threshold_match_weight == trained.threshold_match_weight


def test_load_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="cannot read"):
        LinkageModel.load(tmp_path / "absent.json")


def test_load_refuses_a_file_that_is_not_json(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text('{"format_version": 1, "threshold": ')
    with pytest.raises(ModelError, match="cannot read"):
        LinkageModel.load(path)


def test_load_refuses_an_unknown_format_version(trained: LinkageModel, tmp_path: Path) -> None:
    data = trained.to_dict()
    data["format_version"] = 99
    path = tmp_path / "model.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="not a Jigsaw model"):
        LinkageModel.load(path)


def test_load_refuses_json_that_is_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(ModelError):
        LinkageModel.load(path)


def test_load_refuses_an_incomplete_model(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_text(json.dumps({"format_version": 1}))
    with pytest.raises(ModelError):
        LinkageModel.load(path)


# ----------------------------------------------------------------------------- explanations
def test_level_labels_number_levels_like_splink(trained: LinkageModel) -> None:
    labels = trained.level_labels()
    assert labels["date_of_birth"] == {
        3: "identical",
        2: "day and month swapped",
        1: "one of day, month or year differs",
        0: "different",
        -1: "missing on one side",
    }
    assert labels["nhs_number"] == {1: "identical", 0: "different", -1: "missing on one side"}


def test_explain_maps_partial_weights_to_level_labels(trained: LinkageModel) -> None:
    checked = 0
    for comparison in trained.settings["comparisons"]:
        name = comparison["output_column_name"]
        weights = {
            lvl["label_for_charts"]: math.log2(lvl["m_probability"] / lvl["u_probability"])
            for lvl in comparison["comparison_levels"]
            if not lvl.get("is_null_level")
        }
        for label, weight in weights.items():
            others = [w for other, w in weights.items() if other != label] + [0.0]
            if min(abs(weight - w) for w in others) < 0.01:
                continue  # not distinguishable by weight (e.g. a neutral comparison)
            assert trained.explain({f"mw_{name}": weight}) == [(name, label, round(weight, 3))]
            # A weight a little off the level's (rounding in SQL) still names the level.
            assert trained.explain({name: weight + 0.001})[0][1] == label
            checked += 1
    assert checked >= 10


def test_explain_reads_a_whole_predictions_row(trained: LinkageModel) -> None:
    dob = level(trained, "date_of_birth", "identical")
    nhs = level(trained, "nhs_number", "different")
    row = {
        "mw_date_of_birth": math.log2(dob["m_probability"] / dob["u_probability"]),
        "mw_nhs_number": math.log2(nhs["m_probability"] / nhs["u_probability"]),
        "mw_given_name": 0.0,
        "mw_family_name": float("nan"),
        "match_weight": 12.0,
    }
    explained = trained.explain(row)
    assert [(c, label) for c, label, _ in explained] == [
        ("given_name", "missing"),
        ("date_of_birth", "identical"),
        ("nhs_number", "different"),
    ]


# ----------------------------------------------------------------------------- calibration
#: A scored-candidates histogram: log2 Bayes factor -> pairs. About 1,400 true matches (the
#: pairs at 15 and 20) among a million cross-county pairs.
BAYES_LOG2 = np.array([-10.0, -5.0, 0.0, 5.0, 15.0, 20.0])
COUNTS = np.array([50_000.0, 10_000.0, 500.0, 40.0, 400.0, 1_000.0])
TOTAL_PAIRS = 1e6


def test_calibrated_prior_and_threshold_are_in_range(trained: LinkageModel) -> None:
    calibrated = trained.calibrated(BAYES_LOG2, COUNTS, total_pairs=TOTAL_PAIRS)
    assert 0 < calibrated.prior <= 0.5
    assert 0.5 <= calibrated.threshold <= 0.99
    assert calibrated.trained
    assert calibrated.metadata["candidate_pairs"] == int(COUNTS.sum())
    assert calibrated.metadata["total_pairs"] == int(TOTAL_PAIRS)


def test_calibrated_prior_counts_the_expected_matches() -> None:
    calibrated = LinkageModel.untrained().calibrated(BAYES_LOG2, COUNTS, total_pairs=TOTAL_PAIRS)
    assert calibrated.prior * TOTAL_PAIRS == pytest.approx(1_400, rel=0.03)
    assert calibrated.metadata["expected_matches"] == pytest.approx(1_400, rel=0.03)


def test_calibration_does_not_change_the_model(trained: LinkageModel) -> None:
    before = copy.deepcopy(trained.settings)
    calibrated = trained.calibrated(BAYES_LOG2, COUNTS, total_pairs=TOTAL_PAIRS)
    assert trained.settings == before
    assert calibrated.settings["comparisons"] == trained.settings["comparisons"]


@pytest.mark.parametrize("total_pairs", [2e3, 1e5, 1e7, 1e9])
def test_calibration_stays_in_range_at_any_scale(total_pairs: float) -> None:
    calibrated = LinkageModel.untrained().calibrated(BAYES_LOG2, COUNTS, total_pairs=total_pairs)
    assert 0 < calibrated.prior <= 0.5
    assert 0.5 <= calibrated.threshold <= 0.99


def test_calibration_without_candidates_keeps_the_defaults() -> None:
    model = LinkageModel.untrained()
    calibrated = model.calibrated(np.array([]), np.array([]), total_pairs=1e6)
    assert calibrated.prior == model.prior
    assert calibrated.threshold == DEFAULT_THRESHOLD


def test_threshold_match_weight_is_the_logit_of_the_threshold() -> None:
    model = LinkageModel.untrained()
    model.threshold = 0.8
    assert model.threshold_match_weight == pytest.approx(2.0)
    model.threshold = 0.5
    assert model.threshold_match_weight == pytest.approx(0.0)
