"""The plaintext scanner that checks the matcher's files after the demo and in the tests."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd

from federation.privacy_scan import identifier_values, scan_for_plaintext


def _export(path: Path) -> Path:
    pd.DataFrame(
        {
            "record_id": ["r1"],
            "given_name": ["Kayleigh"],
            "family_name": ["O'Brien-Whitfield"],
            "date_of_birth": ["2014-03-09"],
            "nhs_number": ["943 476 5919"],
            "postcode": ["B36 9AB"],
        }
    ).to_csv(path, index=False)
    return path


def test_values_cover_every_identifier_kind(tmp_path: Path) -> None:
    values = dict((v, k) for k, v in identifier_values([_export(tmp_path / "c.csv")]))
    assert values[b"kayleigh"] == "name"
    assert values[b"whitfield"] == "name"  # hyphenated names are split; "o'brien" is too short
    assert values[b"2014-03-09"] == "date of birth"
    assert values[b"9434765919"] == "NHS number"
    assert values[b"943 476 5919"] == "NHS number"
    assert values[b"b36 9ab"] == "postcode"


def test_finds_each_kind_case_insensitively_and_names_only_the_kind(tmp_path: Path) -> None:
    values = identifier_values([_export(tmp_path / "c.csv")])
    store = tmp_path / "store"
    store.mkdir()
    (store / "a.bin").write_bytes(b"\x00\x01KAYLEIGH\xff")
    (store / "b.log").write_bytes(b"nhs=9434765919;")
    (store / "clean.bin").write_bytes(b"\x00" * 1000)
    report = scan_for_plaintext([store], values)
    assert report.found == ("NHS number in b.log", "name in a.bin")
    assert report.files == 3
    assert not report.clean
    assert all(b"kayleigh" not in f.encode().lower() for f in report.found)


def test_hex_like_values_inside_longer_hex_runs_do_not_count(tmp_path: Path) -> None:
    values = [("NHS number", b"9434765919")]
    pseudonym = tmp_path / "pseudonym.bin"
    pseudonym.write_bytes(b"id=ab9434765919f0")  # a hex pseudonym that happens to contain it
    assert scan_for_plaintext([pseudonym], values).clean
    pseudonym.write_bytes(b"id=ab9434765919f0 and 9434765919.")  # then also on its own
    assert scan_for_plaintext([pseudonym], values).found == ("NHS number in pseudonym.bin",)


def test_no_values_scans_and_finds_nothing(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"anything")
    report = scan_for_plaintext([tmp_path], [])
    assert report.clean and report.files == 1 and report.bytes_scanned == 8


def test_reads_a_duckdb_database_through_duckdb_even_while_it_is_open(tmp_path: Path) -> None:
    # Enough similar strings that DuckDB compresses them (FSST or a dictionary): the name is
    # then not in the file's raw bytes, but the scan reads the values back and finds it.
    path = tmp_path / "store.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE alerts AS SELECT 'contact kayleigh whitfield #' || i::VARCHAR AS body, "
        "i AS n FROM range(20000) t(i)"
    )
    con.execute("CHECKPOINT")
    con.execute("INSERT INTO alerts VALUES ('late row, still in the WAL: 2014-03-09', -1)")
    try:
        report = scan_for_plaintext(
            [tmp_path], [("name", b"kayleigh"), ("date of birth", b"2014-03-09")]
        )
    finally:
        con.close()
    # The WAL is read raw as well: what is in it is written as it is.
    assert report.found == (
        "date of birth in store.duckdb",
        "date of birth in store.duckdb.wal",
        "name in store.duckdb",
    )


def test_a_clean_duckdb_database_is_clean(tmp_path: Path) -> None:
    with duckdb.connect(str(tmp_path / "m.duckdb")) as con:
        con.execute("CREATE TABLE t AS SELECT 'staffordshire' AS county, 'fosters' AS x")
        con.execute("DELETE FROM t")
    assert scan_for_plaintext([tmp_path], [("name", b"foster")]).clean
