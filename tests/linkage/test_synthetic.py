"""Tests of the synthetic federation generator."""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from itertools import combinations
from pathlib import Path
from typing import Literal

import pandas as pd
import pytest

from linkage.synthetic import (
    _FAMILY_NAMES,
    _FEMALE_NAMES,
    _MALE_NAMES,
    _NICKNAMES,
    DEFAULT_COUNTIES,
    SyntheticFederation,
    generate_federation,
    true_pairs,
    write_federation,
)

CANONICAL_COLUMNS = [
    "record_id",
    "household_id",
    "role",
    "given_name",
    "middle_names",
    "family_name",
    "previous_family_names",
    "date_of_birth",
    "sex",
    "nhs_number",
    "postcode",
    "address",
]


@pytest.fixture(scope="module")
def federation() -> SyntheticFederation:
    return generate_federation(counties=6, records=15_000, seed=7)


@pytest.fixture(scope="module")
def records(federation: SyntheticFederation) -> pd.DataFrame:
    """Every record of every county, joined to its truth."""
    rows = pd.concat(
        [frame.assign(county=county) for county, frame in federation.counties.items()],
        ignore_index=True,
    )
    joined = rows.merge(federation.truth, on=["county", "record_id"], how="left", validate="1:1")
    assert joined["person_id"].notna().all()
    return joined


def _same_person_pairs(records: pd.DataFrame, column: str) -> pd.DataFrame:
    """Pairs of one person's records in two counties, with ``column`` from each side."""
    keys = records[["person_id", "county", "family_id", column]]
    pairs = keys.merge(keys, on="person_id", suffixes=("_l", "_r"))
    return pairs[pairs["county_l"] < pairs["county_r"]]


def _nhs_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    check = 11 - sum(d * w for d, w in zip(digits[:9], range(10, 1, -1), strict=True)) % 11
    check = 0 if check == 11 else check
    return check != 10 and check == digits[9]


# --- Public surface and arguments. ---


def test_default_counties_are_plain_unique_ids() -> None:
    assert len(DEFAULT_COUNTIES) >= 12
    assert len(set(DEFAULT_COUNTIES)) == len(DEFAULT_COUNTIES)
    assert all(re.fullmatch(r"[a-z_]+", c) for c in DEFAULT_COUNTIES)


def test_name_lists_are_large_and_unique() -> None:
    assert len(_MALE_NAMES) + len(_FEMALE_NAMES) >= 250
    assert len(_FAMILY_NAMES) >= 400
    for names in (_MALE_NAMES, _FEMALE_NAMES, _FAMILY_NAMES):
        assert len(set(names)) == len(names)
    assert len(_NICKNAMES) >= 60


@pytest.mark.parametrize(
    ("counties", "records"), [(0, 100), (len(DEFAULT_COUNTIES) + 1, 100), (3, 0)]
)
def test_rejects_bad_arguments(counties: int, records: int) -> None:
    with pytest.raises(ValueError):
        generate_federation(counties=counties, records=records)


# --- Determinism and shape. ---


def test_same_seed_gives_same_data(federation: SyntheticFederation) -> None:
    again = generate_federation(counties=6, records=15_000, seed=7)
    assert list(again.counties) == list(federation.counties)
    for county, frame in federation.counties.items():
        pd.testing.assert_frame_equal(frame, again.counties[county])
    pd.testing.assert_frame_equal(federation.truth, again.truth)


def test_other_seed_gives_other_data(federation: SyntheticFederation) -> None:
    other = generate_federation(counties=6, records=15_000, seed=8)
    assert not other.counties["coventry"].equals(federation.counties["coventry"])


@pytest.mark.parametrize(("counties", "total"), [(2, 2_000), (6, 15_000), (12, 40_000), (1, 500)])
def test_total_size_is_within_five_percent(counties: int, total: int) -> None:
    fed = generate_federation(counties=counties, records=total, seed=3)
    assert list(fed.counties) == list(DEFAULT_COUNTIES[:counties])
    size = sum(len(frame) for frame in fed.counties.values())
    assert abs(size - total) <= 0.05 * total
    assert len(fed.truth) == size


def test_canonical_columns_all_strings(federation: SyntheticFederation) -> None:
    for frame in federation.counties.values():
        assert list(frame.columns) == CANONICAL_COLUMNS
        assert not frame.isna().any().any()
        for column in frame.columns:
            assert pd.api.types.is_string_dtype(frame[column].dtype)
            assert all(isinstance(v, str) for v in frame[column].head(200))
    assert list(federation.truth.columns) == ["county", "record_id", "person_id", "family_id"]


def test_record_ids_unique_and_county_specific(federation: SyntheticFederation) -> None:
    prefixes = set()
    for frame in federation.counties.values():
        assert frame["record_id"].is_unique
        assert (frame["record_id"] != "").all()
        prefixes.add(re.sub(r"\d", "9", frame["record_id"].iloc[0]))
    assert len(prefixes) == len(federation.counties)  # every county has its own style


def test_every_row_has_a_name_or_a_date_of_birth(federation: SyntheticFederation) -> None:
    for frame in federation.counties.values():
        assert ((frame["given_name"] != "") | (frame["date_of_birth"] != "")).all()
        assert (frame["family_name"] != "").all()


def test_truth_covers_every_row_once(
    federation: SyntheticFederation, records: pd.DataFrame
) -> None:
    truth = federation.truth
    assert len(truth) == len(records)
    assert not truth.duplicated(["county", "record_id"]).any()
    # Nobody appears twice in one county: true matches are cross-county only.
    assert not truth.duplicated(["county", "person_id"]).any()
    # A person belongs to one family.
    assert (truth.groupby("person_id")["family_id"].nunique() == 1).all()


def test_true_pairs_are_cross_county_and_ordered(federation: SyntheticFederation) -> None:
    truth = federation.truth
    pairs = true_pairs(truth)
    assert pairs
    person = dict(
        zip(zip(truth["county"], truth["record_id"], strict=True), truth["person_id"], strict=True)
    )
    for county_l, record_l, county_r, record_r in pairs:
        assert county_l != county_r
        assert (county_l, record_l) < (county_r, record_r)
        assert person[(county_l, record_l)] == person[(county_r, record_r)]
    sizes = truth.groupby("person_id").size()
    assert len(pairs) == int((sizes * (sizes - 1) // 2).sum())


def test_true_pairs_small_example() -> None:
    truth = pd.DataFrame(
        {
            "county": ["b", "a", "c", "a"],
            "record_id": ["1", "2", "3", "4"],
            "person_id": ["p", "p", "p", "q"],
            "family_id": ["f", "f", "f", "f"],
        }
    )
    assert true_pairs(truth) == {("a", "2", "b", "1"), ("a", "2", "c", "3"), ("b", "1", "c", "3")}


# --- The world. ---


def test_families_span_counties(federation: SyntheticFederation) -> None:
    spans = federation.truth.groupby("family_id")["county"].nunique()
    assert 0.3 <= (spans >= 2).mean() <= 0.6
    assert (spans >= 3).any()


def test_households_have_one_or_two_adults_and_up_to_five_children(
    records: pd.DataFrame,
) -> None:
    role = records["role"].str.lower()
    per_household = records.assign(adult=role == "adult", child=role == "child").groupby(
        ["county", "household_id"]
    )
    assert per_household["adult"].sum().max() <= 2
    assert per_household["child"].sum().max() <= 5
    assert (per_household["family_id"].nunique() == 1).all()


def test_ages_are_realistic(records: pd.DataFrame) -> None:
    dob = pd.to_datetime(records["date_of_birth"], format="%Y-%m-%d", errors="coerce")
    age = (pd.Timestamp("2025-04-01") - dob).dt.days / 365.25
    role = records["role"].str.lower()
    child_ok = age[role == "child"].dropna().between(0, 18)
    adult_ok = age[role == "adult"].dropna().between(18, 61)
    # DOB typos may push a few out of range.
    assert child_ok.mean() > 0.98
    assert adult_ok.mean() > 0.98


def test_common_names_collide_across_people(records: pd.DataFrame) -> None:
    people = records.drop_duplicates("person_id")
    counts = Counter(
        zip(people["given_name"].str.lower(), people["family_name"].str.lower(), strict=True)
    )
    assert counts.most_common(1)[0][1] >= 3


# --- Corruptions. ---


def test_nhs_numbers_are_ten_digits_mostly_valid_often_missing(
    federation: SyntheticFederation,
) -> None:
    for frame in federation.counties.values():
        nhs = frame["nhs_number"]
        present = nhs[nhs != ""]
        assert 0.2 <= 1 - len(present) / len(nhs) <= 0.6
        assert present.str.fullmatch(r"\d{3} ?\d{3} ?\d{4}").all()
        valid = present.map(_nhs_valid)
        assert valid.mean() > 0.95
    all_present = pd.concat([f["nhs_number"] for f in federation.counties.values()])
    all_present = all_present[all_present != ""]
    assert not all_present.map(_nhs_valid).all()  # some are mistyped
    assert all_present.str.contains(" ").any() and (~all_present.str.contains(" ")).any()


def test_swapped_day_and_month(records: pd.DataFrame) -> None:
    pairs = _same_person_pairs(records, "date_of_birth")
    dob_l, dob_r = pairs["date_of_birth_l"], pairs["date_of_birth_r"]
    swapped = dob_l.str[:4] + "-" + dob_l.str[8:10] + "-" + dob_l.str[5:7]
    assert ((swapped == dob_r) & (dob_l != dob_r)).any()
    # Every date that is present is an ISO date.
    for value in records["date_of_birth"][records["date_of_birth"] != ""]:
        dt.date.fromisoformat(value)


def test_dob_single_digit_typo(records: pd.DataFrame) -> None:
    pairs = _same_person_pairs(records, "date_of_birth")
    pairs = pairs[(pairs["date_of_birth_l"] != "") & (pairs["date_of_birth_r"] != "")]
    one_digit = [
        sum(a != b for a, b in zip(left, right, strict=True)) == 1
        for left, right in zip(pairs["date_of_birth_l"], pairs["date_of_birth_r"], strict=True)
    ]
    assert any(one_digit)


def test_hyphenated_surname_recorded_single_elsewhere(records: pd.DataFrame) -> None:
    pairs = _same_person_pairs(records, "family_name")
    left, right = pairs["family_name_l"].str.lower(), pairs["family_name_r"].str.lower()
    hyphen_l, hyphen_r = left.str.contains("-"), right.str.contains("-")
    assert (hyphen_l != hyphen_r).any()


def test_diacritics_kept_in_some_counties_and_folded_in_others(records: pd.DataFrame) -> None:
    assert records["given_name"].str.contains("[éëâÅšłŁØø]", regex=True).any()
    pairs = _same_person_pairs(records, "given_name")
    non_ascii_l = ~pairs["given_name_l"].map(str.isascii)
    ascii_r = pairs["given_name_r"].map(str.isascii) & (pairs["given_name_r"] != "")
    non_ascii_r = ~pairs["given_name_r"].map(str.isascii)
    ascii_l = pairs["given_name_l"].map(str.isascii) & (pairs["given_name_l"] != "")
    assert ((non_ascii_l & ascii_r) | (non_ascii_r & ascii_l)).any()


def test_nicknames(records: pd.DataFrame) -> None:
    pairs = _same_person_pairs(records, "given_name")
    found = any(
        right.lower() in {n.lower() for n in _NICKNAMES.get(left.title(), ())}
        or left.lower() in {n.lower() for n in _NICKNAMES.get(right.title(), ())}
        for left, right in zip(pairs["given_name_l"], pairs["given_name_r"], strict=True)
    )
    assert found


def test_twins(records: pd.DataFrame) -> None:
    children = records[(records["role"].str.lower() == "child") & (records["date_of_birth"] != "")]
    key = ["county", "household_id", "date_of_birth"]
    twins = children[children.groupby(key)["person_id"].transform("nunique") >= 2]
    assert not twins.empty
    assert (twins.groupby(key)["given_name"].nunique() >= 2).all()
    twin_families = twins["family_id"].nunique()
    families = records["family_id"].nunique()
    assert 0.005 <= twin_families / families <= 0.05


def test_surname_change_with_previous_names(records: pd.DataFrame) -> None:
    pairs = _same_person_pairs(records, "family_name")
    changed = pairs[pairs["family_name_l"].str.lower() != pairs["family_name_r"].str.lower()]
    assert len(changed) > 0
    assert records["previous_family_names"].str.contains(";").any()
    children = records[(records["role"].str.lower() == "child")]
    with_previous = children[children["previous_family_names"] != ""]
    assert len(with_previous) > 0
    # The previous name is what another county still calls the child.
    other = records.set_index("person_id")["family_name"].str.lower()
    assert any(
        prev.lower() in set(other.loc[[person]])
        for person, prev in zip(
            with_previous["person_id"], with_previous["previous_family_names"], strict=True
        )
    )


def test_typos_in_names(records: pd.DataFrame) -> None:
    pairs = _same_person_pairs(records, "family_name")
    left, right = pairs["family_name_l"].str.lower(), pairs["family_name_r"].str.lower()

    def one_edit(a: str, b: str) -> bool:
        if abs(len(a) - len(b)) > 1 or a == b:
            return False
        if len(a) == len(b):
            diffs = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
            return len(diffs) == 1 or (
                len(diffs) == 2 and diffs[1] == diffs[0] + 1 and a[diffs[0]] == b[diffs[1]]
            )
        short, long_ = sorted((a, b), key=len)
        return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))

    assert sum(one_edit(a, b) for a, b in zip(left, right, strict=True)) >= 10


def test_county_codings_differ(federation: SyntheticFederation) -> None:
    sex_codes = {
        county: frozenset(frame["sex"].unique()) - {""}
        for county, frame in federation.counties.items()
    }
    assert len(set(sex_codes.values())) >= 4
    postcodes = pd.concat([f["postcode"] for f in federation.counties.values()])
    assert postcodes.str.fullmatch(r"[A-Z]{1,2}\d{1,2} \d[A-Z]{2}").any()
    assert postcodes.str.fullmatch(r"[a-z]{1,2}\d{1,2}\d[a-z]{2}").any()
    assert postcodes.str.fullmatch(r" [A-Z]{1,2}\d{1,2}  \d[A-Z]{2} ").any()
    middle = {c: (f["middle_names"] != "").mean() for c, f in federation.counties.items()}
    assert min(middle.values()) == 0.0 and max(middle.values()) > 0.3


def test_moves_change_postcode_and_address(records: pd.DataFrame) -> None:
    pairs = _same_person_pairs(records, "address")
    both = pairs[(pairs["address_l"] != "") & (pairs["address_r"] != "")]
    assert (both["address_l"].str.lower() != both["address_r"].str.lower()).mean() > 0.9
    assert records["address"].str.fullmatch(r"(Flat \d+, )?\d+ [A-Za-z ]+", case=False).mean() > 0.9


def test_apostrophes_kept_and_dropped(records: pd.DataFrame) -> None:
    names = records["family_name"].str.lower()
    assert names.str.contains("o'").any()
    pairs = _same_person_pairs(records, "family_name")
    kept = pairs["family_name_l"].str.contains("'") != pairs["family_name_r"].str.contains("'")
    assert kept.any()


def test_last_county_is_upper_case(federation: SyntheticFederation) -> None:
    *others, last = federation.counties.values()
    for column in last.columns:
        assert (last[column] == last[column].str.upper()).all()
    assert all((frame["given_name"] != frame["given_name"].str.upper()).any() for frame in others)
    plain = generate_federation(counties=3, records=2_000, seed=1, upper_case_county=False)
    last_plain = list(plain.counties.values())[-1]
    assert (last_plain["given_name"] != last_plain["given_name"].str.upper()).any()
    # The truth carries the exports' record ids exactly.
    exported = {
        (county, rid) for county, frame in plain.counties.items() for rid in frame["record_id"]
    }
    assert exported == set(zip(plain.truth["county"], plain.truth["record_id"], strict=True))


# --- Writing. ---


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_write_federation_round_trips(tmp_path: Path, fmt: Literal["csv", "parquet"]) -> None:
    fed = generate_federation(counties=3, records=2_000, seed=5)
    truth_path = tmp_path / "truth.csv"
    paths = write_federation(fed, tmp_path / "counties", truth_path=truth_path, fmt=fmt)
    assert [p.name for p in paths] == [f"{c}.{fmt}" for c in fed.counties]
    assert sorted(p.name for p in (tmp_path / "counties").iterdir()) == sorted(
        p.name for p in paths
    )
    for path, (county, frame) in zip(paths, fed.counties.items(), strict=True):
        if fmt == "csv":
            back = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        else:
            back = pd.read_parquet(path)
        assert list(back.columns) == CANONICAL_COLUMNS
        assert back.astype(str).equals(frame.astype(str)), county
    truth = pd.read_csv(truth_path, dtype=str, keep_default_na=False)
    assert truth.equals(fed.truth.astype(str))


def test_write_federation_refuses_truth_inside_counties_dir(tmp_path: Path) -> None:
    fed = generate_federation(counties=2, records=500, seed=5)
    with pytest.raises(ValueError):
        write_federation(fed, tmp_path, truth_path=tmp_path / "truth.csv")


def test_pairs_of_records_per_person_match_combinations(records: pd.DataFrame) -> None:
    # Cross-check true_pairs against a plain-Python count on a slice of people.
    some = records[records["person_id"].isin(records["person_id"].unique()[:300])]
    expected: set[tuple[str, str, str, str]] = set()
    for _, group in some.groupby("person_id"):
        keys = sorted(zip(group["county"], group["record_id"], strict=True))
        expected.update((a[0], a[1], b[0], b[1]) for a, b in combinations(keys, 2))
    assert true_pairs(some[["county", "record_id", "person_id", "family_id"]]) == expected


def test_valid_nhs_numbers_identify_one_person(records: pd.DataFrame) -> None:
    digits = records["nhs_number"].str.replace(" ", "", regex=False)
    valid = records.assign(nhs=digits)[digits.map(lambda d: d != "" and _nhs_valid(d))]
    assert (valid.groupby("nhs")["person_id"].nunique() == 1).all()
    assert (valid.groupby("person_id")["nhs"].nunique() == 1).all()
