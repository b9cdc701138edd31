"""Tests of quality figures against ground truth."""

from __future__ import annotations

import pandas as pd
import pytest

from linkage.evaluate import (
    Quality,
    cluster_pairs,
    pair_quality,
    true_household_pairs,
    true_person_pairs,
)
from linkage.synthetic import SyntheticFederation, true_pairs


# ----------------------------------------------------------------------------- pair_quality
def test_pair_quality_arithmetic() -> None:
    actual = [
        ("a", "1", "b", "1"),
        ("a", "2", "b", "2"),
        ("a", "3", "c", "3"),
        ("b", "4", "c", "4"),
    ]
    predicted = [("a", "1", "b", "1"), ("a", "2", "b", "2"), ("a", "9", "c", "9")]
    quality = pair_quality(predicted, actual)
    assert (quality.true_positives, quality.predicted, quality.actual) == (2, 3, 4)
    assert quality.precision == pytest.approx(2 / 3)
    assert quality.recall == pytest.approx(1 / 2)
    assert quality.f1 == pytest.approx(2 * (2 / 3) * (1 / 2) / (2 / 3 + 1 / 2))
    assert quality.as_dict() == {
        "precision": 0.6667,
        "recall": 0.5,
        "f1": 0.5714,
        "true_positives": 2,
        "predicted": 3,
        "actual": 4,
    }


def test_pair_quality_ignores_the_order_within_a_pair_and_duplicates() -> None:
    actual = [("a", "1", "b", "1")]
    predicted = [("b", "1", "a", "1"), ("a", "1", "b", "1")]
    quality = pair_quality(predicted, actual)
    assert (quality.true_positives, quality.predicted, quality.actual) == (1, 1, 1)
    assert quality.f1 == 1.0


def test_pair_quality_tells_records_apart_by_county() -> None:
    quality = pair_quality([("a", "1", "c", "1")], [("a", "1", "b", "1")])
    assert quality.true_positives == 0
    assert (quality.precision, quality.recall, quality.f1) == (0.0, 0.0, 0.0)


def test_pair_quality_accepts_generators() -> None:
    quality = pair_quality((p for p in [("a", "1", "b", "1")]), iter([("a", "1", "b", "1")]))
    assert quality.f1 == 1.0


@pytest.mark.parametrize(
    ("quality", "precision", "recall", "f1"),
    [
        (Quality(0, 0, 0), 1.0, 1.0, 1.0),  # nothing to find and nothing found
        (Quality(0, 0, 5), 1.0, 0.0, 0.0),  # nothing found
        (Quality(0, 5, 0), 0.0, 1.0, 0.0),  # only false links
        (Quality(0, 3, 4), 0.0, 0.0, 0.0),  # all wrong: no division by zero
        (Quality(4, 4, 4), 1.0, 1.0, 1.0),
    ],
)
def test_quality_edge_cases(quality: Quality, precision: float, recall: float, f1: float) -> None:
    assert quality.precision == precision
    assert quality.recall == recall
    assert quality.f1 == f1


def test_empty_inputs() -> None:
    assert pair_quality([], []) == Quality(0, 0, 0)
    assert pair_quality([], [("a", "1", "b", "1")]).recall == 0.0


# ----------------------------------------------------------------------------- cluster_pairs
def test_cluster_pairs_lists_every_cross_county_pair_of_a_cluster() -> None:
    frame = pd.DataFrame(
        {
            "k": ["c1", "c1", "c1", "c1", "c2", "c2", "c3"],
            "county": ["a", "b", "c", "a", "a", "b", "a"],
            "id": ["1", "2", "3", "4", "5", "6", "7"],
        }
    )
    pairs = cluster_pairs(frame, cluster="k", county="county", member="id")
    assert pairs == {
        ("a", "1", "b", "2"),
        ("a", "1", "c", "3"),
        ("b", "2", "c", "3"),
        ("a", "4", "b", "2"),
        ("a", "4", "c", "3"),
        ("a", "5", "b", "6"),
    }
    # Same-county members ("a", "1") and ("a", "4") are never a pair; c3 is a singleton.


def test_cluster_pairs_ignores_repeated_rows_and_extra_columns() -> None:
    frame = pd.DataFrame(
        {
            "cluster_id": ["x", "x", "x"],
            "county": ["b", "a", "b"],
            "record_id": ["7", "9", "7"],
            "extra": [1, 2, 3],
        }
    )
    pairs = cluster_pairs(frame, cluster="cluster_id", county="county", member="record_id")
    assert pairs == {("a", "9", "b", "7")}


def test_cluster_pairs_of_nothing_is_empty() -> None:
    frame = pd.DataFrame({"k": [], "c": [], "m": []}, dtype=str)
    assert cluster_pairs(frame, cluster="k", county="c", member="m") == set()


# ----------------------------------------------------------------------------- truth
def test_true_person_pairs() -> None:
    truth = pd.DataFrame(
        {
            "county": ["a", "b", "c", "a", "b", "c"],
            "record_id": ["a1", "b1", "c1", "a2", "b2", "c2"],
            "person_id": ["P1", "P1", "P1", "P2", "P3", "P3"],
        }
    )
    assert true_person_pairs(truth) == {
        ("a", "a1", "b", "b1"),
        ("a", "a1", "c", "c1"),
        ("b", "b1", "c", "c1"),
        ("b", "b2", "c", "c2"),
    }


def test_true_person_pairs_agrees_with_the_generator(small_federation: SyntheticFederation) -> None:
    expected = true_pairs(small_federation.truth)
    assert len(expected) > 500
    assert true_person_pairs(small_federation.truth) == expected


def test_true_household_pairs() -> None:
    truth = pd.DataFrame(
        {
            "county": ["a", "a", "b", "b", "c"],
            "record_id": ["a1", "a2", "b1", "b2", "c1"],
            "family_id": ["F1", "F1", "F1", "F1", "F2"],
        }
    )
    households = pd.DataFrame(
        {
            "county": ["a", "a", "b", "b", "c"],
            "record_id": ["a1", "a2", "b1", "b2", "c1"],
            "household_id": ["HA", "HA", "HB", "", "HC"],
        }
    )
    assert true_household_pairs(truth, households) == {("a", "HA", "b", "HB")}
