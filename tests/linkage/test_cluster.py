"""Tests of person clustering (one record per county per person) and the family roll-up."""

from __future__ import annotations

import pandas as pd
import pytest

from linkage.cluster import cluster_people, link_families

PAIR_COLUMNS = ["county_l", "pseudonym_l", "county_r", "pseudonym_r", "match_probability"]


def pairs_frame(*rows: tuple[str, str, str, str, float]) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=PAIR_COLUMNS)


def groups(members: pd.DataFrame) -> set[frozenset[tuple[str, str]]]:
    """Clusters as sets of (county, pseudonym), ignoring their ids."""
    return {
        frozenset(zip(g["county"], g["pseudonym"], strict=True))
        for _, g in members.groupby("cluster_id")
    }


def assert_one_record_per_county(members: pd.DataFrame) -> None:
    assert not members.duplicated(["cluster_id", "county"]).any()


# ----------------------------------------------------------------------------- people
def test_twins_stay_two_children() -> None:
    pairs = pairs_frame(
        ("a", "t1", "b", "t1'", 0.99),
        ("a", "t2", "b", "t2'", 0.98),
        ("a", "t1", "b", "t2'", 0.90),
        ("a", "t2", "b", "t1'", 0.85),
    )
    clusters = cluster_people(pairs)
    assert groups(clusters.members) == {
        frozenset({("a", "t1"), ("b", "t1'")}),
        frozenset({("a", "t2"), ("b", "t2'")}),
    }
    assert sorted(clusters.pairs["match_probability"]) == [0.98, 0.99]


def test_twins_stay_apart_whichever_side_a_pair_names_first() -> None:
    pairs = pairs_frame(
        ("b", "t1'", "a", "t1", 0.99),
        ("a", "t2", "b", "t2'", 0.98),
        ("b", "t2'", "a", "t1", 0.90),
        ("a", "t2", "b", "t1'", 0.85),
    )
    assert len(groups(cluster_people(pairs).members)) == 2


def test_a_chain_cannot_put_two_records_of_one_county_together() -> None:
    pairs = pairs_frame(
        ("a", "a1", "b", "b1", 0.99),
        ("b", "b1", "c", "c1", 0.97),
        ("c", "c1", "a", "a2", 0.95),  # would join a2 to a1 through b1 and c1
        ("a", "a2", "d", "d1", 0.93),
    )
    clusters = cluster_people(pairs)
    assert_one_record_per_county(clusters.members)
    assert groups(clusters.members) == {
        frozenset({("a", "a1"), ("b", "b1"), ("c", "c1")}),
        frozenset({("a", "a2"), ("d", "d1")}),
    }
    assert len(clusters.pairs) == 3


def test_merging_two_clusters_that_share_a_county_is_refused() -> None:
    pairs = pairs_frame(
        ("a", "a1", "b", "b1", 0.99),
        ("c", "c2", "a", "a2", 0.98),
        ("b", "b1", "c", "c2", 0.90),  # {a1, b1} + {a2, c2}: two records of county a
    )
    clusters = cluster_people(pairs)
    assert_one_record_per_county(clusters.members)
    assert len(groups(clusters.members)) == 2


def test_a_pair_inside_a_cluster_is_accepted() -> None:
    pairs = pairs_frame(
        ("a", "a1", "b", "b1", 0.99),
        ("b", "b1", "c", "c1", 0.97),
        ("a", "a1", "c", "c1", 0.95),
    )
    clusters = cluster_people(pairs)
    assert len(groups(clusters.members)) == 1
    assert len(clusters.pairs) == 3


def test_stronger_links_win() -> None:
    # b1 looks like both a1 and a2; the stronger link decides, whatever the row order.
    pairs = pairs_frame(
        ("a", "a2", "b", "b1", 0.91),
        ("a", "a1", "b", "b1", 0.97),
    )
    assert groups(cluster_people(pairs).members) == {frozenset({("a", "a1"), ("b", "b1")})}


def test_cluster_ids_are_stable_across_input_order() -> None:
    pairs = pairs_frame(
        ("a", "a1", "b", "b1", 0.99),
        ("b", "b1", "c", "c1", 0.97),
        ("a", "a2", "b", "b2", 0.96),
        ("a", "a2", "b", "b1", 0.96),  # tie with the pair above: order must not matter
        ("c", "c3", "a", "a3", 0.80),
        ("a", "a3", "b", "b3", 0.80),
        ("c", "c1", "a", "a2", 0.75),
    )
    first = cluster_people(pairs).members
    for seed in range(5):
        shuffled = pairs.sample(frac=1, random_state=seed)
        again = cluster_people(shuffled).members
        pd.testing.assert_frame_equal(first, again)
    swapped = pairs.rename(
        columns={
            "county_l": "county_r",
            "pseudonym_l": "pseudonym_r",
            "county_r": "county_l",
            "pseudonym_r": "pseudonym_l",
        }
    )[PAIR_COLUMNS]
    pd.testing.assert_frame_equal(first, cluster_people(swapped).members)


def test_cluster_id_depends_on_members_only() -> None:
    one = cluster_people(pairs_frame(("a", "x", "b", "y", 0.99))).members
    two = cluster_people(
        pairs_frame(("a", "x", "b", "y", 0.95), ("c", "p", "d", "q", 0.99))
    ).members
    assert one["cluster_id"].iloc[0] in set(two["cluster_id"])
    assert one["cluster_id"].iloc[0].startswith("c-")
    assert two["cluster_id"].nunique() == 2


def test_members_and_pairs_have_the_documented_columns() -> None:
    pairs = pairs_frame(("a", "a1", "b", "b1", 0.99)).assign(match_weight=6.6)
    clusters = cluster_people(pairs)
    assert list(clusters.members.columns) == ["cluster_id", "county", "pseudonym"]
    assert list(clusters.pairs.columns) == [*PAIR_COLUMNS, "match_weight"]


def test_no_pairs_give_no_clusters() -> None:
    clusters = cluster_people(pairs_frame())
    assert clusters.members.empty
    assert clusters.pairs.empty
    assert list(clusters.members.columns) == ["cluster_id", "county", "pseudonym"]


# ----------------------------------------------------------------------------- families
@pytest.fixture
def households() -> pd.DataFrame:
    rows = [
        ("a", "a-mum", "HA"),
        ("a", "a-kid", "HA"),
        ("b", "b-mum", "HB"),
        ("b", "b-kid", "HB2"),  # the child lives with another household in county b
        ("c", "c-kid", "HC"),
        ("c", "c-lone", "HC9"),
        ("d", "d-x", "HD"),
    ]
    return pd.DataFrame(rows, columns=["county", "pseudonym", "household"])


def test_households_join_across_counties_through_their_members(
    households: pd.DataFrame,
) -> None:
    pairs = pairs_frame(
        ("a", "a-mum", "b", "b-mum", 0.99),
        ("a", "a-kid", "c", "c-kid", 0.98),
        ("b", "b-kid", "c", "c-kid", 0.97),
    )
    families = link_families(cluster_people(pairs).members, households)
    assert list(families.columns) == ["family_id", "county", "household"]
    assert families["family_id"].nunique() == 1
    assert set(zip(families["county"], families["household"], strict=True)) == {
        ("a", "HA"),
        ("b", "HB"),
        ("b", "HB2"),
        ("c", "HC"),
    }
    assert families["family_id"].iloc[0].startswith("f-")


def test_separate_families_stay_separate(households: pd.DataFrame) -> None:
    pairs = pairs_frame(
        ("a", "a-mum", "b", "b-mum", 0.99),
        ("c", "c-lone", "d", "d-x", 0.95),
    )
    families = link_families(cluster_people(pairs).members, households)
    by_family = families.groupby("family_id")["household"].apply(frozenset)
    assert set(by_family) == {frozenset({"HA", "HB"}), frozenset({"HC9", "HD"})}


def test_a_member_without_household_joins_no_family(households: pd.DataFrame) -> None:
    pairs = pairs_frame(("a", "a-mum", "e", "no-household", 0.99))
    families = link_families(cluster_people(pairs).members, households)
    assert families.empty
    with_null = pd.concat(
        [households, pd.DataFrame([("e", "no-household", None)], columns=households.columns)],
        ignore_index=True,
    )
    assert link_families(cluster_people(pairs).members, with_null).empty


def test_family_ids_are_stable(households: pd.DataFrame) -> None:
    pairs = pairs_frame(
        ("a", "a-mum", "b", "b-mum", 0.99),
        ("a", "a-kid", "c", "c-kid", 0.98),
    )
    first = link_families(cluster_people(pairs).members, households)
    again = link_families(
        cluster_people(pairs.iloc[::-1]).members, households.sample(frac=1, random_state=1)
    )
    pd.testing.assert_frame_equal(first, again)
