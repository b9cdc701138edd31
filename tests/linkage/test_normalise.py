"""Validation and normalisation of county records: a test per rule, then one with every defect."""

from __future__ import annotations

import csv
import datetime as dt
import random
import re
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from linkage.errors import InputError
from linkage.normalise import (
    OUTPUT_COLUMNS,
    NormalisedRecords,
    canonical_given_name,
    nhs_number_is_valid,
    nicknames,
    normalise_name,
    normalise_postcode,
    normalise_records,
)
from linkage.records import CANONICAL_COLUMNS, ColumnMapping, read_county_file

TODAY = dt.date(2025, 6, 1)


def run(rows: list[dict[str, str]], **kwargs: object) -> NormalisedRecords:
    """Normalise hand-written rows (record ids default to R1, R2, ...)."""
    frame = pd.DataFrame([{"record_id": f"R{i}", **row} for i, row in enumerate(rows, 1)])
    kwargs.setdefault("today", TODAY)
    return normalise_records(frame, source="test", **kwargs)  # type: ignore[arg-type]


def one(column: str, value: str, **kwargs: object) -> tuple[object, list[str]]:
    """Normalise one value (in a row that also has a family name, so it is never quarantined)."""
    extra = {"family_name": "Lee"} if column != "family_name" else {"given_name": "Ann"}
    result = run([{column: value, **extra}], **kwargs)
    assert len(result.records) == 1
    reasons = [i.reason for i in result.warnings if i.row_number == 1]
    return result.records.iloc[0][column], reasons


def with_check_digit(nine: str) -> str | None:
    """A valid NHS number from nine digits, or None if those nine have no valid check digit."""
    total = sum(int(d) * w for d, w in zip(nine, range(10, 1, -1), strict=True))
    check = 11 - total % 11
    if check == 10:
        return None
    return nine + str(0 if check == 11 else check)


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Zoë", "zoe"),
        ("José", "jose"),
        ("Łukasz", "lukasz"),
        ("Søren", "soren"),
        ("Strauß", "strauss"),
        ("Æthelred", "aethelred"),
        ("Œdipus", "oedipus"),
        ("Đorđe", "dorde"),
        ("Þór", "thor"),
        ("İbrahim", "ibrahim"),
        ("Nguyễn", "nguyen"),
        ("Ａｎｎ", "ann"),  # full-width
        ("O'Brien", "obrien"),
        ("O’Brien", "obrien"),
        ("D`Arcy", "darcy"),
        ("Smith-Jones", "smith jones"),
        ("Smith–Jones", "smith jones"),  # en dash
        ("  Mary   Ann  ", "mary ann"),
        ("Mary-Ann.", "mary ann"),
        ("=HYPERLINK(1)", "hyperlink"),
        ("+Ann", "ann"),
        ("@Ann", "ann"),
        ("-Ann", "ann"),
        ("Ann\x00\x07\nLee", "ann lee"),
        ("Ann2", "ann"),
        ("Мария", "мария"),  # other scripts keep their letters
        ("محمد", "محمد"),
        ("123", ""),
        ("", ""),
        ("---", ""),
    ],
)
def test_normalise_name(raw: str, expected: str) -> None:
    assert normalise_name(raw) == expected


@given(st.text(max_size=40))
@settings(max_examples=200, deadline=None)
def test_normalise_name_is_idempotent_and_clean(value: str) -> None:
    name = normalise_name(value)
    assert normalise_name(name) == name
    assert name == name.strip() and "  " not in name
    assert all(ch == " " or ch.isalpha() or unicodedata.category(ch)[0] == "M" for ch in name)
    assert name == name.casefold()


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Bill", "william"),
        ("billy", "william"),
        ("Will", "william"),
        ("Liam", "william"),
        ("William", "william"),
        ("Liz", "elizabeth"),
        ("Beth", "elizabeth"),
        ("Katie", "katherine"),
        ("Catherine", "katherine"),
        ("Mohamed", "mohammed"),
        ("Muhammad", "mohammed"),
        ("Sasha", "alexander"),
        ("Alex", "alexander"),
        ("Billy-Joe", "william joe"),
        ("Joe Bill", "joseph bill"),  # only the first word is resolved
        ("Xanthe", "xanthe"),
        ("", ""),
    ],
)
def test_canonical_given_name(raw: str, expected: str) -> None:
    assert canonical_given_name(raw) == expected


def test_nickname_table_is_large_consistent_and_normalised() -> None:
    from importlib import resources

    text = resources.files("linkage").joinpath("data/nicknames.csv").read_text("utf-8")
    rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) >= 150
    assert list(rows[0]) == ["canonical", "variant"]
    for row in rows:
        assert normalise_name(row["canonical"]) == row["canonical"], row
        assert normalise_name(row["variant"]) == row["variant"], row
        assert " " not in row["variant"]
    table = nicknames()
    assert len(table) == len(rows)  # every variant has exactly one canonical name
    assert not set(table) & set(table.values())  # no chains
    assert nicknames() is table  # loaded once


def test_name_columns_in_records() -> None:
    result = run(
        [
            {
                "given_name": " Bill ",
                "middle_names": "Jean-Luc",
                "family_name": "Smith-Jones",
                "previous_family_names": "O'Neill; Smith ;;O'NEILL",
            },
            {"given_name": "Zoë", "family_name": "  Müller \t"},
        ]
    )
    first, second = result.records.to_dict("records")
    assert first["given_name"] == "bill"
    assert first["given_canonical"] == "william"
    assert first["middle_names"] == "jean luc"
    assert first["family_name"] == "smith jones"
    assert first["previous_family_names"] == "oneill;smith"
    assert first["display_given_name"] == "Bill"
    assert first["display_family_name"] == "Smith-Jones"
    assert second["given_name"] == "zoe"
    assert second["display_given_name"] == "Zoë"  # diacritics kept for people to read
    assert second["display_family_name"] == "Müller"
    assert second["previous_family_names"] is None
    assert all(i.row_number == 0 for i in result.warnings)


def test_previous_family_names_formula_in_any_part_warns() -> None:
    value, reasons = one("previous_family_names", "Smith; =cmd|' /C calc'!A0")
    assert value == "smith;cmd c calc a"
    assert reasons == [
        "previous_family_names begins with a spreadsheet formula character (=, +, - or @), removed"
    ]


def test_formula_and_control_characters_warn_and_leave_display_safe() -> None:
    result = run(
        [
            {"given_name": "=HYPERLINK(1)", "family_name": "@Lee"},
            {"given_name": "Ann\x07e", "family_name": "Lee\u202e"},
            {"given_name": "-", "family_name": "+44"},
        ]
    )
    records = result.records.set_index("record_id")
    assert records.loc["R1", "display_given_name"] == "HYPERLINK(1)"
    assert records.loc["R1", "display_family_name"] == "Lee"
    assert records.loc["R2", "display_given_name"] == "Ann e"
    assert records.loc["R2", "display_family_name"] == "Lee"
    issues = {(i.row_number, i.column): i.reason for i in result.warnings if i.row_number}
    assert "formula character" in issues[(1, "given_name")]
    assert "formula character" in issues[(1, "family_name")]
    assert "control or invisible" in issues[(2, "given_name")]
    assert "control or invisible" in issues[(2, "family_name")]
    assert "has no letters" in issues[(3, "given_name")]
    assert "formula character" in issues[(3, "family_name")]
    assert "has no letters" in issues[(3, "family_name")]
    assert "R3" not in records.index  # no usable name and no date of birth


@pytest.mark.parametrize(
    ("column", "limit"),
    [
        ("given_name", 200),
        ("middle_names", 200),
        ("family_name", 200),
        ("previous_family_names", 500),
        ("address", 500),
        ("household_id", 200),
    ],
)
def test_too_long_values_are_dropped_with_a_warning(column: str, limit: int) -> None:
    value, reasons = one(column, "a" * limit)
    assert value is not None and reasons == []
    value, reasons = one(column, "a" * (limit + 1))
    assert value is None
    assert reasons == [f"{column} is too long (more than {limit} characters); ignored"]


# --------------------------------------------------------------------------- dates


@pytest.mark.parametrize(
    ("raw", "expected", "problem"),
    [
        ("2012-03-04", "2012-03-04", None),
        (" 2012-03-04 ", "2012-03-04", None),
        ("2012-03-04 00:00:00", "2012-03-04", None),
        ("2012-03-04T00:00:00.000Z", "2012-03-04", None),
        ("2024-02-29", "2024-02-29", None),
        ("2019-02-30", None, "date_of_birth is not a real calendar date; left empty"),
        ("2019-13-01", None, "date_of_birth is not a real calendar date; left empty"),
        ("2019-00-10", None, "date_of_birth is not a real calendar date; left empty"),
        ("2025-06-02", None, "date_of_birth is in the future; left empty"),
        ("1899-12-31", None, "date_of_birth is before 1900; left empty"),
        ("04/03/2012", None, "date_of_birth is not a date in the expected format (YYYY-MM-DD)"),
        ("yesterday", None, "date_of_birth is not a date in the expected format (YYYY-MM-DD)"),
        ("", None, None),
    ],
)
def test_dates_iso(raw: str, expected: str | None, problem: str | None) -> None:
    value, reasons = one("date_of_birth", raw)
    assert value == expected
    if problem is None:
        assert reasons == []
    else:
        assert len(reasons) == 1 and reasons[0].startswith(problem)


@pytest.mark.parametrize(
    ("fmt", "raw", "expected"),
    [
        ("%d/%m/%Y", "04/03/2012", "2012-03-04"),
        ("%d/%m/%Y", "4/3/2012", "2012-03-04"),
        ("%d/%m/%Y", "04/03/2012 00:00", "2012-03-04"),
        ("%d/%m/%Y", "2012-03-04", "2012-03-04"),  # ISO is always understood
        ("%d/%m/%Y", "31/04/2012", None),
        ("%d/%m/%Y", "04/13/2012", None),
        ("%d/%m/%Y", "04/03/12", None),
        ("%d-%b-%Y", "04-Mar-2012", "2012-03-04"),
        ("%d-%b-%Y", "04-mar-2012", "2012-03-04"),
        ("%d-%b-%Y", "04-Xyz-2012", None),
        ("%d %B %Y", "4 March 2012", "2012-03-04"),
        ("%Y%m%d", "20120304", "2012-03-04"),
    ],
)
def test_dates_with_mapping_format(fmt: str, raw: str, expected: str | None) -> None:
    mapping = ColumnMapping(columns={"record_id": "record_id"}, date_format=fmt)
    value, reasons = one("date_of_birth", raw, mapping=mapping)
    assert value == expected
    assert (reasons == []) == (expected is not None)


def test_date_format_named_in_reason_in_human_form() -> None:
    mapping = ColumnMapping(columns={"record_id": "record_id"}, date_format="%d/%m/%Y")
    _, reasons = one("date_of_birth", "March 4th", mapping=mapping)
    assert reasons == [
        "date_of_birth is not a date in the expected format (DD/MM/YYYY); left empty"
    ]


# --------------------------------------------------------------------------- sex and role


@pytest.mark.parametrize(
    ("raw", "expected", "warns"),
    [
        ("M", "M", False),
        ("m", "M", False),
        ("Male", "M", False),
        (" MALE ", "M", False),
        ("boy", "M", False),
        ("1", "M", False),
        ("F", "F", False),
        ("female", "F", False),
        ("Girl", "F", False),
        ("2", "F", False),
        ("U", None, False),
        ("unknown", None, False),
        ("Not Known", None, False),
        ("0", None, False),
        ("9", None, False),
        ("", None, False),
        ("Q", None, True),
        ("3", None, True),
    ],
)
def test_sex_codes(raw: str, expected: str | None, warns: bool) -> None:
    value, reasons = one("sex", raw)
    assert value == expected
    assert reasons == (["sex is not a recognised sex code; left empty"] if warns else [])


def test_mapping_sex_codes_come_first() -> None:
    mapping = ColumnMapping(
        columns={"record_id": "record_id"}, sex_codes={"1": "F", "X": "U", "W": "F"}
    )
    assert one("sex", "1", mapping=mapping) == ("F", [])
    assert one("sex", "x", mapping=mapping) == (None, [])
    assert one("sex", "w", mapping=mapping) == ("F", [])
    assert one("sex", "M", mapping=mapping) == ("M", [])  # built-ins still apply


@pytest.mark.parametrize(
    ("raw", "expected", "warns"),
    [
        ("child", "child", False),
        ("Child", "child", False),
        ("young person", "child", False),
        ("adult", "adult", False),
        ("Parent", "adult", False),
        ("carer", "adult", False),
        ("unknown", None, False),
        ("", None, False),
        ("wizard", None, True),
    ],
)
def test_roles(raw: str, expected: str | None, warns: bool) -> None:
    value, reasons = one("role", raw)
    assert value == expected
    assert reasons == (
        ["role is not a recognised role (child or adult); left empty"] if warns else []
    )


def test_mapping_role_codes() -> None:
    mapping = ColumnMapping(columns={"record_id": "record_id"}, role_codes={"Subject": "child"})
    assert one("role", " SUBJECT ", mapping=mapping) == ("child", [])


# --------------------------------------------------------------------------- NHS numbers


def test_nhs_mod11_valid_numbers() -> None:
    rng = random.Random(11)
    made = 0
    while made < 200:
        number = with_check_digit(f"{rng.randrange(10**9):09d}")
        if number is None or len(set(number)) == 1:
            continue
        made += 1
        assert nhs_number_is_valid(number), number
        assert nhs_number_is_valid(f"{number[:3]} {number[3:6]} {number[6:]}")
        assert nhs_number_is_valid(f"{number[:3]}-{number[3:6]}-{number[6:]}")
        for wrong in set("0123456789") - {number[-1]}:
            assert not nhs_number_is_valid(number[:-1] + wrong)
    assert nhs_number_is_valid("9434765919")
    assert nhs_number_is_valid("401 023 2137")


@pytest.mark.parametrize(
    "raw",
    [
        "9434765918",  # wrong check digit
        "943476591",  # nine digits
        "94347659190",  # eleven
        "943476591X",
        "",
        "0000000000",  # passes mod-11, but a placeholder
        "9999999999",
        "١٢٣٤٥٦٧٨٩٠",  # non-ASCII digits
    ],
)
def test_nhs_invalid_numbers(raw: str) -> None:
    assert not nhs_number_is_valid(raw)


def test_nhs_check_value_of_ten_is_invalid() -> None:
    nine = next(f"{n:09d}" for n in range(10**6, 10**9) if with_check_digit(f"{n:09d}") is None)
    for last in "0123456789":
        assert not nhs_number_is_valid(nine + last)


@pytest.mark.parametrize(
    ("raw", "expected", "reason"),
    [
        ("943 476 5919", "9434765919", None),
        (" 943-476-5919 ", "9434765919", None),
        ("943\u00a0476\u00a05919", "9434765919", None),
        ("9434765918", None, "nhs_number fails the NHS number check digit; left empty"),
        ("943476591", None, "nhs_number is not 10 digits; left empty"),
        ("NHS9434765919", None, "nhs_number is not 10 digits; left empty"),
        ("0000000000", None, "nhs_number is a placeholder (every digit the same); left empty"),
        ("", None, None),
    ],
)
def test_nhs_numbers_in_records(raw: str, expected: str | None, reason: str | None) -> None:
    value, reasons = one("nhs_number", raw)
    assert value == expected
    assert reasons == ([] if reason is None else [reason])


def test_vectorised_nhs_check_agrees_with_single_value_check() -> None:
    rng = np.random.default_rng(5)
    numbers = [f"{n:010d}" for n in rng.integers(0, 10**10, size=3000)]
    numbers += [n for n in (with_check_digit(f"{i:09d}") for i in range(400)) if n]
    result = run([{"nhs_number": n, "family_name": "Lee"} for n in numbers])
    got = result.records["nhs_number"].tolist()
    assert [g is not None for g in got] == [nhs_number_is_valid(n) for n in numbers]
    assert sum(g is not None for g in got) > 300


# --------------------------------------------------------------------------- postcodes


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("CV1 2AB", "CV1 2AB"),
        ("cv12ab", "CV1 2AB"),
        ("  cv1   2ab ", "CV1 2AB"),
        ("SW1A 1AA", "SW1A 1AA"),
        ("EC1A 1BB", "EC1A 1BB"),
        ("W1A 0AX", "W1A 0AX"),
        ("M1 1AE", "M1 1AE"),
        ("B33 8TH", "B33 8TH"),
        ("CR2 6XH", "CR2 6XH"),
        ("DN55 1PT", "DN55 1PT"),
        ("gir 0aa", "GIR 0AA"),
        ("CV1", None),
        ("CV1 2A", None),
        ("QV1 2AB", None),  # Q never starts a postcode
        ("CV1 2CB", None),  # C never appears in the inward code
        ("ZZ99 3VZ", None),
        ("12345", None),
        ("CV1 2AB X", None),
        ("", None),
    ],
)
def test_normalise_postcode(raw: str, expected: str | None) -> None:
    assert normalise_postcode(raw) == expected


def test_postcode_columns_in_records() -> None:
    result = run(
        [
            {"family_name": "A", "postcode": "sw1a1aa"},
            {"family_name": "B", "postcode": "ZZ99 3CZ"},
            {"family_name": "C", "postcode": "not a postcode"},
        ]
    )
    rows = result.records.to_dict("records")
    assert (rows[0]["postcode"], rows[0]["postcode_district"], rows[0]["postcode_sector"]) == (
        "SW1A 1AA",
        "SW1A",
        "SW1A 1",
    )
    assert all(rows[i][c] is None for i in (1, 2) for c in ("postcode", "postcode_sector"))
    reasons = {i.row_number: i.reason for i in result.warnings if i.column == "postcode"}
    assert "pseudo-postcode" in reasons[2]
    assert reasons[3] == "postcode is not a valid UK postcode; left empty"


def test_address_is_folded_and_keeps_digits() -> None:
    result = run(
        [
            {"family_name": "A", "address": "Flat 2, 10 St. Mary's Road\nCoventry"},
            {"family_name": "B", "address": "12 Rue Hélène-Boucher"},
            {"family_name": "C", "address": " , ; "},
        ]
    )
    assert result.records["address"].tolist() == [
        "flat 2 10 st marys road coventry",
        "12 rue helene boucher",
        None,
    ]
    assert [(i.row_number, i.column) for i in result.warnings if i.row_number] == [(3, "address")]


# --------------------------------------------------------------------------- quarantine


def test_quarantine_rules_and_invariant() -> None:
    frame = pd.DataFrame(
        {
            "record_id": ["A", "", "A", " B ", "C", "A", "x" * 201, "B"],
            "given_name": ["Ann", "Bob", "Cy", "Di", "", "Ed", "Fay", ""],
            "family_name": ["", "", "", "", "", "", "", ""],
            "date_of_birth": ["", "", "", "", "", "", "", "2019-02-30"],
        }
    )
    result = normalise_records(frame, source="test", today=TODAY)
    assert result.records["record_id"].tolist() == ["A", "B"]
    assert result.records["row_number"].tolist() == [1, 4]
    assert len(frame) == len(result.records) + len(result.quarantined)
    quarantined = {i.row_number: i for i in result.quarantined}
    assert quarantined[2].reason == "record_id is empty"
    assert quarantined[2].record_id is None
    assert quarantined[3].reason == "record_id repeats the record_id of row 1"
    assert quarantined[6].reason == "record_id repeats the record_id of row 1"
    assert quarantined[5].reason == "no given name, family name or date of birth to link on"
    assert quarantined[5].column is None
    assert quarantined[7].reason == "record_id is longer than 200 characters"
    # Several reasons for one row are reported together, in one issue.
    assert quarantined[8].reason == (
        "record_id repeats the record_id of row 4; "
        "no given name, family name or date of birth to link on"
    )
    assert quarantined[8].column == "record_id"
    # The row's own problems are still reported, so the county can fix everything at once.
    assert any(i.row_number == 8 and i.column == "date_of_birth" for i in result.warnings)


def test_any_one_of_given_name_family_name_or_date_of_birth_is_enough() -> None:
    result = run(
        [
            {"given_name": "Ann", "family_name": "", "date_of_birth": ""},
            {"given_name": "", "family_name": "Lee", "date_of_birth": ""},
            {"given_name": "", "family_name": "", "date_of_birth": "2012-03-04"},
            {"given_name": "", "family_name": "", "date_of_birth": "", "nhs_number": "9434765919"},
        ]
    )
    assert result.records["record_id"].tolist() == ["R1", "R2", "R3"]
    assert [i.row_number for i in result.quarantined] == [4]


# --------------------------------------------------------------------------- output shape


def test_output_columns_and_missing_values() -> None:
    result = run([{"given_name": "Ann", "postcode": "", "sex": "Q"}])
    records = result.records
    assert tuple(records.columns) == OUTPUT_COLUMNS
    assert records["row_number"].dtype == np.int64
    for column in OUTPUT_COLUMNS[1:]:
        assert records[column].dtype == object, column
        assert all(v is None or (isinstance(v, str) and v) for v in records[column]), column
    row = records.iloc[0].to_dict()
    present = {"row_number", "record_id", "given_name", "given_canonical", "display_given_name"}
    assert {c for c, v in row.items() if v is not None} == present


def test_empty_input() -> None:
    frame = pd.DataFrame({"record_id": pd.Series([], dtype="str")})
    result = normalise_records(frame, source="empty", today=TODAY)
    assert len(result.records) == 0
    assert tuple(result.records.columns) == OUTPUT_COLUMNS
    assert result.quarantined == ()


def test_hand_built_frames_with_non_text_values() -> None:
    frame = pd.DataFrame(
        {
            "record_id": [1, 2, None],
            "given_name": ["Ann", None, np.nan],
            "date_of_birth": [None, "2012-03-04", "2012-03-04"],
            "nhs_number": [9434765919, None, None],
            "Extra": [1, 2, 3],
        }
    )
    result = normalise_records(frame, source="hand", today=TODAY)
    assert result.records["record_id"].tolist() == ["1", "2"]
    assert result.records["row_number"].tolist() == [1, 2]
    assert result.records["nhs_number"].tolist() == ["9434765919", None]
    assert [i.row_number for i in result.quarantined] == [3]
    file_level = {(i.column, i.reason) for i in result.warnings if i.row_number == 0}
    assert ("Extra", "column is not part of the county record and was ignored") in file_level
    assert ("postcode", "postcode column is missing; treated as empty") in file_level


def test_missing_record_id_column() -> None:
    with pytest.raises(InputError, match="hand: no record_id column"):
        normalise_records(pd.DataFrame({"given_name": ["Ann"]}), source="hand")


def test_issues_are_ordered_by_row_then_column() -> None:
    result = run(
        [
            {"given_name": "Ann", "sex": "Q", "date_of_birth": "2019-02-30", "postcode": "x"},
            {"record_id": "R1", "sex": "Q"},
        ]
    )
    keys = [(i.row_number, i.column) for i in result.issues if i.row_number]
    assert keys == [
        (1, "date_of_birth"),
        (1, "sex"),
        (1, "postcode"),
        (2, "record_id"),  # the quarantine issue leads its row (duplicate id; no name or dob)
        (2, "sex"),
    ]
    assert result.issues[: len(result.issues) - len(keys)] == tuple(
        i for i in result.issues if i.row_number == 0
    )


@given(
    st.lists(
        st.fixed_dictionaries(
            {
                c: st.sampled_from(["", "1", "Ann", "2019-02-30", "=1+1", "é\x00"])
                | st.text(max_size=8)
                for c in CANONICAL_COLUMNS
            }
        ),
        max_size=12,
    )
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_text_input_keeps_the_invariant(rows: list[dict[str, str]]) -> None:
    frame = pd.DataFrame(rows, columns=list(CANONICAL_COLUMNS), dtype="str")
    result = normalise_records(frame, source="fuzz", today=TODAY)
    assert len(frame) == len(result.records) + len(result.quarantined)
    assert len({i.row_number for i in result.quarantined}) == len(result.quarantined)
    assert set(result.records["row_number"]).isdisjoint(i.row_number for i in result.quarantined)


# --------------------------------------------------------------------------- every defect at once


DEFECT_HEADER = (
    "record_id,household_id,role,given_name,family_name,date_of_birth,sex,nhs_number,"
    "postcode,address,Case Notes\n"
)
# (raw CSV line, expected (column, action, reason start) issues for that row, secrets that no
# reason may contain). Rows are numbered from 1 in this order.
DEFECT_ROWS: list[tuple[bytes, list[tuple[str | None, str, str]], list[str]]] = [
    (b"R1,H1,child,Bill,Smith-Jones,2012-03-04,M,943 476 5919,cv1 2ab,1 High St,ok", [], []),
    (
        b"R2,H1,child,Ann,Lee,2019-02-30,F,,,,",
        [("date_of_birth", "warning", "date_of_birth is not a real calendar date")],
        ["2019-02-30"],
    ),
    (
        b"R3,H2,adult,Cyril,Lee,1980-01-01,M,943 476 5918,,,",
        [("nhs_number", "warning", "nhs_number fails the NHS number check digit")],
        ["943 476 5918", "9434765918"],
    ),
    (
        b"R4,H2,adult,Dora,Lee,1981-01-01,F,,QX9 9QQ,,",
        [("postcode", "warning", "postcode is not a valid UK postcode")],
        ["QX9 9QQ", "QX9"],
    ),
    (
        b"R5,H3,child,Eve,Khan,2015-05-05,Zebra,,,,",
        [("sex", "warning", "sex is not a recognised sex code")],
        ["Zebra"],
    ),
    (
        b",H3,child,Fred,Khan,2016-06-06,M,,,,",
        [("record_id", "quarantine", "record_id is empty")],
        ["Fred"],
    ),
    (
        b"R1,H4,child,Gwen,Owen,2017-07-07,F,,,,",
        [("record_id", "quarantine", "record_id repeats the record_id of row 1")],
        ["Gwen", "Owen"],
    ),
    (
        b"R8,H4,adult,,,,F,4010232137,CV1 2AB,2 Low Rd,",
        [(None, "quarantine", "no given name, family name or date of birth")],
        ["4010232137", "CV1 2AB", "Low Rd"],
    ),
    (
        b"R9,H5,child,Ren\xe9e,Dupont,2018-08-08,F,,,,",
        [("given_name", "warning", "given_name was not valid UTF-8")],
        ["Ren", "Dupont"],
    ),
    (
        b"R10,H5,child," + b"Huge" * 300 + b",Jones,2013-03-03,M,,," + b"Addr" * 3000 + b",",
        [
            ("given_name", "warning", "given_name is too long (more than 200 characters)"),
            ("address", "warning", "address is too long (more than 500 characters)"),
        ],
        ["HugeHuge", "AddrAddr", "Jones"],
    ),
    (
        b'R11,H6,child,"@SUM(A1:A9)","=HYPERLINK(""http://evil"")",2014-04-04,F,,,,',
        [
            ("given_name", "warning", "given_name begins with a spreadsheet formula character"),
            ("family_name", "warning", "family_name begins with a spreadsheet formula character"),
        ],
        ["SUM", "HYPERLINK", "evil"],
    ),
    (
        b"R12,H6,wizard,Ian,Ng\x07uyen,2099-01-01,M,,,,",
        [
            ("role", "warning", "role is not a recognised role"),
            ("family_name", "warning", "family_name contains control or invisible characters"),
            ("date_of_birth", "warning", "date_of_birth is in the future"),
        ],
        ["wizard", "2099", "Nguyen", "Ng\x07uyen"],
    ),
    (
        b"R13,H7,child,Jo",
        [(None, "quarantine", "row has 4 fields but the header has 11")],
        ["Jo"],
    ),
    (
        b"R14,H7,child,Kay,Ray,1899-12-31,girl,0000000000,ZZ99 3VZ,,",
        [
            ("date_of_birth", "warning", "date_of_birth is before 1900"),
            ("nhs_number", "warning", "nhs_number is a placeholder"),
            ("postcode", "warning", "postcode is an NHS pseudo-postcode"),
        ],
        ["1899", "0000000000", "ZZ99"],
    ),
]
COLUMN_ORDER = {c: i for i, c in enumerate(CANONICAL_COLUMNS)}


def test_file_with_every_defect(tmp_path: Path) -> None:
    path = tmp_path / "defects.csv"
    path.write_bytes(DEFECT_HEADER.encode() + b"\n".join(line for line, _, _ in DEFECT_ROWS))
    raw = read_county_file(path)
    result = normalise_records(raw, source="defects.csv", today=TODAY)

    # Nothing is lost: every row is either accepted or quarantined, once.
    assert len(raw) == len(DEFECT_ROWS)
    assert len(raw) == len(result.records) + len(result.quarantined)
    expected_quarantine = [
        n
        for n, (_, issues, _) in enumerate(DEFECT_ROWS, 1)
        if any(a == "quarantine" for _, a, _ in issues)
    ]
    assert [i.row_number for i in result.quarantined] == expected_quarantine
    assert sorted(result.records["row_number"]) == sorted(
        set(range(1, len(DEFECT_ROWS) + 1)) - set(expected_quarantine)
    )

    # Each defect is reported against its row and column, with its reason.
    for number, (_, expected, _) in enumerate(DEFECT_ROWS, 1):
        got = [i for i in result.issues if i.row_number == number]
        assert len(got) == len(expected), (number, got)
        ordered = sorted(
            expected, key=lambda e: (e[1] != "quarantine", COLUMN_ORDER.get(e[0] or "", -1))
        )
        for issue, (column, action, reason) in zip(got, ordered, strict=True):
            assert (issue.column, issue.action) == (column, action), (number, issue)
            assert issue.reason.startswith(reason), (number, issue.reason)
            assert issue.source == "defects.csv"
    assert result.quarantined[0].record_id is None  # the empty record_id
    assert {i.record_id for i in result.issues if i.row_number == 7} == {"R1"}

    # File-level: the missing canonical columns and the ignored extra column.
    file_level = {(i.column, i.reason) for i in result.issues if i.row_number == 0}
    assert file_level == {
        ("middle_names", "middle_names column is missing; treated as empty"),
        ("previous_family_names", "previous_family_names column is missing; treated as empty"),
        ("Case Notes", "column is not part of the county record and was ignored"),
    }

    # No reason ever repeats the offending value (or any personal value of the row).
    for number, (_, _, secrets) in enumerate(DEFECT_ROWS, 1):
        for issue in (i for i in result.issues if i.row_number == number):
            for secret in secrets:
                assert secret.casefold() not in issue.reason.casefold(), (number, secret)
    for issue in result.issues:
        assert not re.search(r"\d{4}-\d{2}-\d{2}", issue.reason)
        assert not re.search(r"\d{6,}", issue.reason)

    # Accepted rows carry their clean values.
    accepted = result.records.set_index("record_id")
    assert accepted.loc["R1", "given_canonical"] == "william"
    assert accepted.loc["R9", "display_given_name"] == "Renée"
    assert accepted.loc["R10", "given_name"] is None and accepted.loc["R10", "address"] is None
    assert accepted.loc["R11", "family_name"] == "hyperlink http evil"
    assert accepted.loc["R11", "display_family_name"] == 'HYPERLINK("http://evil")'


@given(
    st.lists(
        st.text(alphabet=st.characters(max_codepoint=127), max_size=30), min_size=1, max_size=20
    )
)
@settings(max_examples=150, deadline=None)
def test_vectorised_addresses_agree_with_the_single_value_rule(addresses: list[str]) -> None:
    from linkage.normalise import _address_cell  # the rule the pyarrow path must reproduce

    result = run([{"address": a, "family_name": "Lee"} for a in addresses])
    assert result.records["address"].tolist() == [_address_cell(a)[0] for a in addresses]
    reasons = {i.row_number: i.reason for i in result.warnings if i.column == "address"}
    for number, address in enumerate(addresses, 1):
        problem = _address_cell(address)[1]
        assert reasons.get(number) == (None if problem is None else f"address {problem}")
