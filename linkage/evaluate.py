"""Quality against ground truth: precision, recall and F1 of person pairs and family links."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

__all__ = ["Quality", "cluster_pairs", "pair_quality", "true_household_pairs", "true_person_pairs"]

Pair = tuple[str, str, str, str]


@dataclass(frozen=True)
class Quality:
    """Precision, recall and F1 of a set of predicted links against the true ones."""

    true_positives: int
    predicted: int
    actual: int

    @property
    def precision(self) -> float:
        """Share of predicted links that are true (1.0 when nothing is predicted)."""
        return self.true_positives / self.predicted if self.predicted else 1.0

    @property
    def recall(self) -> float:
        """Share of true links that were predicted (1.0 when there are none)."""
        return self.true_positives / self.actual if self.actual else 1.0

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        p, r = self.precision, self.recall
        return 2 * p * r / (p + r) if p + r else 0.0

    def as_dict(self) -> dict[str, float]:
        """Figures rounded for reports."""
        return {
            "precision": round(self.precision, 4),
            "recall": round(self.recall, 4),
            "f1": round(self.f1, 4),
            "true_positives": self.true_positives,
            "predicted": self.predicted,
            "actual": self.actual,
        }


def _ordered(a: tuple[str, str], b: tuple[str, str]) -> Pair:
    lo, hi = (a, b) if a <= b else (b, a)
    return (lo[0], lo[1], hi[0], hi[1])


def pair_quality(predicted: Iterable[Pair], actual: Iterable[Pair]) -> Quality:
    """Compare predicted and true pairs, each ``(county_l, id_l, county_r, id_r)`` in any order."""
    pred = {_ordered((p[0], p[1]), (p[2], p[3])) for p in predicted}
    true = {_ordered((p[0], p[1]), (p[2], p[3])) for p in actual}
    return Quality(len(pred & true), len(pred), len(true))


def cluster_pairs(frame: pd.DataFrame, *, cluster: str, county: str, member: str) -> set[Pair]:
    """Every cross-county pair of members sharing a cluster."""
    slim = frame[[cluster, county, member]].drop_duplicates()
    slim.columns = pd.Index(["k", "c", "m"])
    both = slim.merge(slim, on="k", suffixes=("_l", "_r"))
    both = both[
        (both["c_l"] < both["c_r"]) | ((both["c_l"] == both["c_r"]) & (both["m_l"] < both["m_r"]))
    ]
    both = both[both["c_l"] != both["c_r"]]
    return set(zip(both["c_l"], both["m_l"], both["c_r"], both["m_r"], strict=True))


def true_person_pairs(truth: pd.DataFrame) -> set[Pair]:
    """Cross-county pairs of records of one person, from ``county, record_id, person_id``."""
    return cluster_pairs(truth, cluster="person_id", county="county", member="record_id")


def true_household_pairs(truth: pd.DataFrame, households: pd.DataFrame) -> set[Pair]:
    """Cross-county pairs of households of one family.

    Args:
        truth: ``county, record_id, family_id``.
        households: ``county, record_id, household_id`` as the counties exported them.
    """
    joined = truth.merge(households, on=["county", "record_id"])
    joined = joined[joined["household_id"].fillna("") != ""]
    dedup = joined[["family_id", "county", "household_id"]].drop_duplicates()
    return cluster_pairs(dedup, cluster="family_id", county="county", member="household_id")
