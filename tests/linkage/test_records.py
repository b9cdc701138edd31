"""Reading county exports: formats, encodings, column mappings and the record schema."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from linkage.errors import InputError, MappingError
from linkage.normalise import normalise_records
from linkage.records import (
    CANONICAL_COLUMNS,
    ROW_NUMBER,
    ColumnMapping,
    date_pattern,
    read_county_file,
    read_report,
)

ROOT = Path(__file__).resolve().parents[2]
MAPPINGS = ROOT / "configs" / "mappings"
SCHEMAS = ROOT / "schemas"


def write(path: Path, text: str | bytes) -> Path:
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path


# --------------------------------------------------------------------------- schema


def test_canonical_columns_are_the_contract() -> None:
    assert CANONICAL_COLUMNS == (
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
    )


def test_county_record_schema_matches_canonical_columns() -> None:
    schema = json.loads((SCHEMAS / "county_record.schema.json").read_text(encoding="utf-8"))
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["$id"].rsplit("/", 1)[-1] == "1.0.0"
    assert schema["required"] == ["record_id"]
    assert tuple(schema["properties"]) == CANONICAL_COLUMNS


def test_schemas_validate_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    record_schema = json.loads((SCHEMAS / "county_record.schema.json").read_text("utf-8"))
    validator = jsonschema.Draft202012Validator(record_schema)
    validator.check_schema(record_schema)
    good = {
        "record_id": "P1",
        "given_name": "Zoë",
        "date_of_birth": "2012-03-04",
        "sex": "F",
        "nhs_number": "943 476 5919",
        "postcode": "cv1 2ab",
        "role": "",
    }
    assert list(validator.iter_errors(good)) == []
    assert list(validator.iter_errors({"record_id": "P1", "address": None})) == []
    for bad in (
        {},
        {"record_id": ""},
        {"record_id": "P1", "date_of_birth": "04/03/2012"},
        {"record_id": "P1", "nhs_number": "94347659"},
        {"record_id": "P1", "sex": "Female"},
        {"record_id": "P1", "favourite_colour": "blue"},
    ):
        assert list(validator.iter_errors(bad)), bad

    import tomllib

    mapping_schema = json.loads((SCHEMAS / "column_mapping.schema.json").read_text("utf-8"))
    mapping_validator = jsonschema.Draft202012Validator(mapping_schema)
    for path in MAPPINGS.glob("*.toml"):
        data = tomllib.loads(path.read_text("utf-8"))
        assert list(mapping_validator.iter_errors(data)) == [], path


# --------------------------------------------------------------------------- CSV basics


def test_csv_values_are_text_exactly_as_exported(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.csv",
        'record_id,nhs_number,given_name,household_id\n007,0123456789,NA,\n"008","",NULL,nan\n',
    )
    frame = read_county_file(path)
    assert list(frame.columns) == [ROW_NUMBER, *CANONICAL_COLUMNS]
    assert frame[ROW_NUMBER].tolist() == [1, 2]
    assert frame["record_id"].tolist() == ["007", "008"]
    assert frame["nhs_number"].tolist() == ["0123456789", ""]
    assert frame["given_name"].tolist() == ["NA", "NULL"]  # never read as missing
    assert frame["household_id"].tolist() == ["", "nan"]
    assert frame["postcode"].tolist() == ["", ""]  # absent column: present and empty
    assert not frame.drop(columns=ROW_NUMBER).isna().any().any()


def test_csv_bom_quoted_newlines_and_blank_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.csv",
        b'\xef\xbb\xbfrecord_id,address\r\n1,"1 High St\r\nCoventry"\r\n\r\n2,x\r\n',
    )
    frame = read_county_file(path)
    assert frame["record_id"].tolist() == ["1", "2"]
    assert frame["address"].tolist() == ["1 High St\r\nCoventry", "x"]
    assert frame[ROW_NUMBER].tolist() == [1, 2]  # blank lines are not rows


def test_header_is_matched_case_insensitively_and_trimmed(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", " Record_ID , GIVEN_NAME\n1,Ann\n")
    frame = read_county_file(path)
    assert frame["record_id"].tolist() == ["1"]
    assert frame["given_name"].tolist() == ["Ann"]


def test_extra_and_missing_columns_are_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", "record_id,Notes,given_name,Worker\n1,secret,Ann,Bob\n")
    frame = read_county_file(path)
    assert "Notes" not in frame.columns and "Worker" not in frame.columns
    report = read_report(frame)
    assert report is not None
    assert report.extra_columns == ("Notes", "Worker")
    assert set(report.missing_columns) == set(CANONICAL_COLUMNS) - {"record_id", "given_name"}
    assert report.encoding == "utf-8" and report.file_format == "csv"


def test_header_only_file_gives_empty_frame(tmp_path: Path) -> None:
    frame = read_county_file(write(tmp_path / "c.csv", "record_id,given_name\n"))
    assert len(frame) == 0
    assert list(frame.columns) == [ROW_NUMBER, *CANONICAL_COLUMNS]


# --------------------------------------------------------------------------- CSV encodings


def test_non_utf8_cells_are_recoded_and_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.csv",
        b"record_id,given_name,family_name\n"
        + "1,Zoë,Smith\n".encode()  # valid UTF-8 stays as it is
        + b"2,Ren\xe9e,O\x92Brien\n"  # Windows-1252: é and a curly apostrophe
        + b"3,Ann,Lee\n",
    )
    frame = read_county_file(path)
    assert frame["given_name"].tolist() == ["Zoë", "Renée", "Ann"]
    assert frame["family_name"].tolist() == ["Smith", "O’Brien", "Lee"]
    report = read_report(frame)
    assert report is not None
    assert report.encoding == "utf-8+cp1252"
    assert report.recoded_cells == ((2, "given_name"), (2, "family_name"))


def test_non_utf8_header_is_recoded(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", b"record_id,Pr\xe9nom\n1,Ann\n")
    frame = read_county_file(path)
    report = read_report(frame)
    assert report is not None
    assert report.extra_columns == ("Prénom",)
    assert frame["record_id"].tolist() == ["1"]


def test_cp1252_undefined_bytes_do_not_crash(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", b"record_id,given_name\n1,A\x81n\n")
    frame = read_county_file(path)
    assert frame["given_name"].tolist() == ["A\ufffdn"]
    report = read_report(frame)
    assert report is not None and report.recoded_cells == ((1, "given_name"),)


# --------------------------------------------------------------------------- malformed rows


def test_rows_with_wrong_field_count_are_kept_and_listed(tmp_path: Path) -> None:
    path = write(
        tmp_path / "c.csv",
        "record_id,given_name,family_name\n1,Ann,Lee\n2,Bob\n3,Cy,Di,extra\n\n4,Ed,Fox\n",
    )
    frame = read_county_file(path)
    assert frame["record_id"].tolist() == ["1", "2", "3", "4"]
    assert frame["family_name"].tolist() == ["Lee", "", "Di", "Fox"]
    report = read_report(frame)
    assert report is not None
    assert report.malformed_rows == ((2, 2), (3, 4))
    assert report.header_fields == 3


def test_malformed_and_non_utf8_together(tmp_path: Path) -> None:
    path = write(tmp_path / "c.csv", b'record_id,given_name\n1,Ren\xe9e\n2\n3,"Zo\xc3\xab"\n')
    frame = read_county_file(path)
    assert frame["given_name"].tolist() == ["Renée", "", "Zoë"]
    report = read_report(frame)
    assert report is not None
    assert report.recoded_cells == ((1, "given_name"),)
    assert report.malformed_rows == ((2, 1),)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("c.csv", "given_name,family_name\nAnn Secret,Lee\n", "no record_id column"),
        ("c.csv", "", "empty"),
        ("c.csv", "\n\n", "empty"),
        ("c.csv", "record_id,record_id\n1,2\n", "appears 2 times"),
        ("c.txt", "record_id\n1\n", "unsupported file type"),
        ("c.parquet", "record_id\nnot parquet\n", "not a readable Parquet file"),
    ],
)
def test_unreadable_files_raise_input_error_naming_the_file(
    tmp_path: Path, name: str, content: str, expected: str
) -> None:
    path = write(tmp_path / name, content)
    with pytest.raises(InputError, match=expected) as info:
        read_county_file(path)
    assert str(path) in str(info.value)
    assert "Secret" not in str(info.value)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found") as info:
        read_county_file(tmp_path / "nope.csv")
    assert "nope.csv" in str(info.value)
    (tmp_path / "dir.csv").mkdir()
    with pytest.raises(InputError, match=r"dir\.csv"):
        read_county_file(tmp_path / "dir.csv")


# --------------------------------------------------------------------------- Parquet


def test_csv_and_parquet_read_the_same(tmp_path: Path) -> None:
    text = (
        "record_id,given_name,date_of_birth,nhs_number,postcode\n"
        "001,Zoë,2012-03-04,943 476 5919,CV1 2AB\n"
        "002,,,,\n"
    )
    csv_frame = read_county_file(write(tmp_path / "c.csv", text))
    pq.write_table(pa.Table.from_pandas(csv_frame.drop(columns=ROW_NUMBER)), tmp_path / "c.parquet")
    parquet_frame = read_county_file(tmp_path / "c.parquet")
    pd.testing.assert_frame_equal(csv_frame, parquet_frame)
    report = read_report(parquet_frame)
    assert report is not None and report.file_format == "parquet"


def test_parquet_typed_columns_become_text(tmp_path: Path) -> None:
    table = pa.table(
        {
            "record_id": pa.array([1, 2, 3], pa.int64()),
            "nhs_number": pa.array([9434765919.0, None, 4010232137.0]),
            "date_of_birth": pa.array([dt.date(2012, 3, 4), None, dt.date(1999, 12, 31)]),
            "given_name": pa.array(["Ann", None, "Zoë"]).dictionary_encode(),
            "family_name": pa.array([b"Lee", b"Ren\xe9e", None], pa.binary()),
            "Notes": pa.array([{"x": 1}, {"x": 2}, None]),  # dropped, never converted
        }
    )
    path = tmp_path / "typed.parquet"
    pq.write_table(table, path)
    frame = read_county_file(path)
    assert frame["record_id"].tolist() == ["1", "2", "3"]
    assert frame["nhs_number"].tolist() == ["9434765919", "", "4010232137"]
    assert frame["date_of_birth"].tolist() == ["2012-03-04", "", "1999-12-31"]
    assert frame["given_name"].tolist() == ["Ann", "", "Zoë"]
    assert frame["family_name"].tolist() == ["Lee", "Renée", ""]
    report = read_report(frame)
    assert report is not None
    assert report.recoded_cells == ((2, "family_name"),)
    assert report.extra_columns == ("Notes",)


# --------------------------------------------------------------------------- mappings


@pytest.mark.parametrize("name", ["liquidlogic_example.toml", "mosaic_example.toml"])
def test_example_mappings_load(name: str) -> None:
    mapping = ColumnMapping.from_toml(MAPPINGS / name)
    assert mapping.columns["record_id"]
    assert set(mapping.columns) <= set(CANONICAL_COLUMNS)


def test_liquidlogic_export_through_mapping(tmp_path: Path) -> None:
    mapping = ColumnMapping.from_toml(MAPPINGS / "liquidlogic_example.toml")
    path = write(
        tmp_path / "warwickshire.csv",
        "PersonID,Forename,Surname,DOB,Gender,NHSNumber,Postcode,PersonType,CaseWorker\n"
        "L1,Bill,Smith-Jones,04/03/2012,1,943 476 5919,cv12ab,Subject,Jo Bloggs\n"
        "L2,Zoë,Smith,31/12/1985,2,,CV1 2AB,Parent/Carer,Jo Bloggs\n"
        "L3,Ann,Lee,30/02/2019,0,,,,\n",
    )
    raw = read_county_file(path, mapping=mapping)
    report = read_report(raw)
    assert report is not None and report.extra_columns == ("CaseWorker",)
    assert raw["given_name"].tolist() == ["Bill", "Zoë", "Ann"]

    result = normalise_records(raw, source="warwickshire")  # mapping found in the report
    records = result.records.set_index("record_id")
    assert records.loc["L1", "date_of_birth"] == "2012-03-04"
    assert records.loc["L1", "sex"] == "M"
    assert records.loc["L1", "role"] == "child"
    assert records.loc["L1", "given_canonical"] == "william"
    assert records.loc["L2", "sex"] == "F"
    assert records.loc["L2", "role"] == "adult"
    assert records.loc["L3", "sex"] is None  # "0" = not known: no warning
    assert records.loc["L3", "date_of_birth"] is None
    assert [(i.row_number, i.column) for i in result.warnings if i.row_number] == [
        (3, "date_of_birth")
    ]


def test_mosaic_export_through_mapping(tmp_path: Path) -> None:
    mapping = ColumnMapping.from_toml(MAPPINGS / "mosaic_example.toml")
    path = write(
        tmp_path / "coventry.csv",
        "CHILD_REF,FIRST_NAME,LAST_NAME,BIRTH_DATE,GENDER_CODE,NHS_NO,POST_CODE,PERSON_ROLE,"
        "ALIAS_SURNAMES\n"
        "M-001,Katie,O'Brien,04-Mar-2012,F,4010232137,B33 8TH,CYP,Smith; Jones-Brown\n"
        "M-002,Liz,Khan,2001-07-08,I,,,PARENT,\n",
    )
    result = normalise_records(read_county_file(path, mapping=mapping), source="coventry")
    records = result.records.set_index("record_id")
    assert records.loc["M-001", "date_of_birth"] == "2012-03-04"
    assert records.loc["M-001", "given_canonical"] == "katherine"
    assert records.loc["M-001", "family_name"] == "obrien"
    assert records.loc["M-001", "previous_family_names"] == "smith;jones brown"
    assert records.loc["M-001", "role"] == "child"
    assert records.loc["M-002", "date_of_birth"] == "2001-07-08"  # ISO accepted as well
    assert records.loc["M-002", "sex"] is None
    assert records.loc["M-002", "role"] == "adult"


def test_unmapped_canonical_columns_fall_back_to_their_own_name(tmp_path: Path) -> None:
    mapping = ColumnMapping(columns={"record_id": "ID", "given_name": "family_name"})
    path = write(tmp_path / "c.csv", "ID,family_name,postcode\n1,Ann,CV1 2AB\n")
    frame = read_county_file(path, mapping=mapping)
    assert frame["given_name"].tolist() == ["Ann"]
    assert frame["postcode"].tolist() == ["CV1 2AB"]
    # "family_name" in the export holds given names here, so it is not also the family name.
    assert frame["family_name"].tolist() == [""]
    report = read_report(frame)
    assert report is not None and "family_name" in report.missing_columns


def test_mapped_record_id_column_missing(tmp_path: Path) -> None:
    mapping = ColumnMapping(columns={"record_id": "PersonID"})
    with pytest.raises(InputError, match="PersonID"):
        read_county_file(write(tmp_path / "c.csv", "record_id\n1\n"), mapping=mapping)


def test_mapping_errors_list_every_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path / "bad.toml",
        """
version = 2
date_format = "%d/%m/%y"
colour = "blue"

[columns]
given_nam = "Forename"
family_name = "Surname"
middle_names = "surname"
date_of_birth = ""

[sex_codes]
"1" = "Male"
"m" = "M"
"M " = "F"

[role_codes]
"S" = "kid"
""",
    )
    with pytest.raises(MappingError) as info:
        ColumnMapping.from_toml(path)
    message = str(info.value)
    assert str(path) in message
    for expected in (
        "unsupported version 2",
        "unknown key 'colour'",
        "'given_nam' is not a canonical column (did you mean 'given_name'?)",
        "must map 'record_id'",
        "'surname' is mapped to both 'family_name' and 'middle_names'",
        "'date_of_birth' maps to an empty export column name",
        "two-digit years",
        "'1' maps to 'Male'",
        "codes 'm' and 'M ' differ only in case",
        "[role_codes] 'S' maps to 'kid'",
    ):
        assert expected in message, expected
    assert "(10 problems)" in message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("version = 1\n[columns\n", "not valid TOML"),
        ("version = 1\n", "[columns] table is missing"),
        ("version = 1\ncolumns = 3\n", "'columns' must be a table"),
        ("[columns]\nrecord_id = 'ID'\n", "'version' is missing"),
        ("version = 1\ndate_format = 3\n[columns]\nrecord_id = 1\n", "must be a string"),
    ],
)
def test_mapping_file_shape_errors(tmp_path: Path, content: str, expected: str) -> None:
    with pytest.raises(MappingError, match=r"bad\.toml") as info:
        ColumnMapping.from_toml(write(tmp_path / "bad.toml", content))
    assert expected in str(info.value)


def test_missing_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match="cannot read column mapping"):
        ColumnMapping.from_toml(tmp_path / "absent.toml")


def test_mapping_constructor_validates_too() -> None:
    with pytest.raises(MappingError, match="must map 'record_id'"):
        ColumnMapping(columns={"given_name": "Forename"})
    mapping = ColumnMapping(columns={"record_id": " ID "}, sex_codes={" Boy  Child ": "m"})
    assert mapping.columns == {"record_id": "ID"}
    assert mapping.sex_codes == {"boy child": "M"}


@pytest.mark.parametrize(
    ("fmt", "problem"),
    [
        ("%d/%m/%y", "two-digit"),
        ("%d/%m", "exactly one day"),
        ("%d/%m/%Y %H", "unsupported directive %H"),
        ("%d/%m/%Y/%d", "more than once"),
        ("%d %b %B %Y", "exactly one day"),
    ],
)
def test_date_format_validation(fmt: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        date_pattern(fmt)


def test_date_pattern_matches_month_names_case_insensitively() -> None:
    match = date_pattern("%d-%b-%Y").match("04-MAR-2012")
    assert match is not None and match["d"] == "04" and match["Y"] == "2012"
    assert date_pattern("%d %B %Y").match("4 september 2012") is not None
    assert date_pattern("%Y%m%d").match("20120304") is not None
    assert date_pattern("%d/%m/%Y").match("2012-03-04") is None


def test_mapping_pickles_and_report_survives_frame_operations(tmp_path: Path) -> None:
    import pickle

    mapping = ColumnMapping.from_toml(MAPPINGS / "liquidlogic_example.toml")
    assert pickle.loads(pickle.dumps(mapping)) == mapping
    path = write(tmp_path / "c.csv", "PersonID,Forename,Extra\n1,Ann,x\n2\n")
    frame = read_county_file(path, mapping=mapping)
    derived = frame.iloc[:2].copy()
    report = read_report(derived)
    assert report is not None
    assert report.mapping == mapping
    assert report.malformed_rows == ((2, 1),)
    # The report is plain JSON in attrs, so writing the frame to Parquet does not warn.
    pq.write_table(pa.Table.from_pandas(derived), tmp_path / "out.parquet")


def test_csv_parse_errors_name_the_line_not_the_content(tmp_path: Path) -> None:
    # A field beyond the careful reader's limit (16 MiB, as the fast reader's blocks) in a file
    # that needs the careful reader.
    path = write(tmp_path / "c.csv", b"record_id,address\n1\n2," + b"Secret" * 3_000_000 + b"\n")
    with pytest.raises(InputError, match="not valid CSV near line") as info:
        read_county_file(path)
    assert "Secret" not in str(info.value)
