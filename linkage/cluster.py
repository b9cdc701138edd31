"""From scored pairs to people and families.

Person clusters are built greedily from the strongest link down, and a link is refused when it
would put two records of the same county into one cluster. Counties do not hold one child
twice (``link_only`` never compares within a county), so such a merge can only come from a
chain through a look-alike: twins (same date of birth, same household, different given names)
in two counties are the classic case, and the guard keeps them two children.

Families are households joined through their members: two households in different counties are
one family when any person cluster has a member in each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import pandas as pd

__all__ = ["Clusters", "cluster_people", "link_families"]


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[object, object] = {}

    def find(self, x: object) -> object:
        parent = self.parent
        root = parent.setdefault(x, x)
        while root != parent[root]:
            root = parent[root]
        while x != root:  # path compression
            parent[x], x = root, parent[x]
        return root


@dataclass(frozen=True)
class Clusters:
    """Person clusters and the pairs that made them.

    Attributes:
        members: ``cluster_id, county, pseudonym`` for every record of every cluster that
            spans two or more counties.
        pairs: The input pairs that the clustering accepted (both ends in one cluster).
    """

    members: pd.DataFrame
    pairs: pd.DataFrame


def cluster_people(pairs: pd.DataFrame) -> Clusters:
    """Cluster records from pairs above the alert threshold, one record per county per cluster.

    Args:
        pairs: Columns ``county_l, pseudonym_l, county_r, pseudonym_r, match_probability``.

    Returns:
        Clusters whose ids are stable for the same input: the smallest member key
        (``county:pseudonym``) of each cluster, hashed.
    """
    uf = _UnionFind()
    counties: dict[object, set[str]] = {}
    accepted: list[int] = []
    ordered = pairs.sort_values(
        ["match_probability", "county_l", "pseudonym_l", "county_r", "pseudonym_r"],
        ascending=[False, True, True, True, True],
        kind="stable",
    )
    rows = zip(
        ordered.index,
        ordered["county_l"],
        ordered["pseudonym_l"],
        ordered["county_r"],
        ordered["pseudonym_r"],
        strict=True,
    )
    for idx, cl, pl, cr, pr in rows:
        a, b = (cl, pl), (cr, pr)
        ra, rb = uf.find(a), uf.find(b)
        if ra == rb:
            accepted.append(idx)
            continue
        ca = counties.get(ra, {cl})
        cb = counties.get(rb, {cr})
        if ca & cb:
            continue  # would put two records of one county into one person
        uf.parent[rb] = ra
        counties[ra] = ca | cb
        counties.pop(rb, None)
        accepted.append(idx)
    groups: dict[object, list[tuple[str, str]]] = {}
    for node in list(uf.parent):
        groups.setdefault(uf.find(node), []).append(node)  # type: ignore[arg-type]
    records = []
    for members in groups.values():
        if len({c for c, _ in members}) < 2:
            continue
        cid = _cluster_id(f"{c}:{p}" for c, p in members)
        records += [(cid, c, p) for c, p in members]
    frame = pd.DataFrame(records, columns=["cluster_id", "county", "pseudonym"])
    frame = frame.sort_values(["cluster_id", "county"], ignore_index=True)
    return Clusters(members=frame, pairs=pairs.loc[accepted].reset_index(drop=True))


def _cluster_id(keys: Iterable[str]) -> str:
    return "c-" + hashlib.sha256(min(keys).encode()).hexdigest()[:16]


def link_families(members: pd.DataFrame, households: pd.DataFrame) -> pd.DataFrame:
    """Join households across counties through the person clusters of their members.

    Args:
        members: ``cluster_id, county, pseudonym`` (from :func:`cluster_people`).
        households: ``county, pseudonym, household`` for every record that has a household.

    Returns:
        ``family_id, county, household`` for every household of a family spanning two or
        more counties.
    """
    joined = members.merge(households, on=["county", "pseudonym"], how="inner")
    joined = joined.dropna(subset=["household"])
    keys = list(zip(joined["county"], joined["household"], strict=True))
    joined = joined.assign(key=pd.Series(keys, index=joined.index, dtype=object))
    # Each household joins the first household of every person cluster it has a member in.
    first = joined.groupby("cluster_id", sort=False)["key"].transform("first")
    uf = _UnionFind()
    for a, b in zip(first, joined["key"], strict=True):
        ra, rb = uf.find(a), uf.find(b)
        if ra != rb:
            uf.parent[rb] = ra
    groups: dict[object, list[tuple[str, str]]] = {}
    for node in list(uf.parent):
        groups.setdefault(uf.find(node), []).append(node)  # type: ignore[arg-type]
    rows = []
    for hh in groups.values():
        if len({c for c, _ in hh}) < 2:
            continue
        fid = "f-" + _cluster_id(f"{c}:{h}" for c, h in hh)[2:]
        rows += [(fid, c, h) for c, h in hh]
    frame = pd.DataFrame(rows, columns=["family_id", "county", "household"])
    return frame.sort_values(["family_id", "county", "household"], ignore_index=True)
