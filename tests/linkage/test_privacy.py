"""Design invariant 1 at the matcher: linking writes no plaintext identifier to its store.

The matcher's pipeline runs on token tables alone against a file-backed DuckDB; afterwards the
raw bytes of every file it left behind are searched for the identifiers of a sample of records.
A positive control shows that the same search finds those identifiers when they are stored.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from linkage.engine import SplinkEngine
from linkage.normalise import normalise_postcode
from linkage.pipeline import MatchResult, PreparedCounty, match_tokens
from linkage.synthetic import SyntheticFederation
from linkage.tokenise import Tokeniser

SAMPLE_SIZE = 300
MIN_LENGTH = 4
IDENTIFIER_COLUMNS = {
    "record_id",
    "household_id",
    "given_name",
    "given_canonical",
    "middle_names",
    "family_name",
    "previous_family_names",
    "display_given_name",
    "display_family_name",
    "date_of_birth",
    "nhs_number",
    "postcode_sector",
    "address",
}
NON_TOKEN_COLUMNS = ("pseudonym", "household", "role")


def connect(path: Path) -> duckdb.DuckDBPyConnection:
    connection = duckdb.connect(str(path))
    # Store strings as they are, so that any plaintext written would show in the file's bytes.
    connection.execute("SET force_compression = 'uncompressed'")
    return connection


def file_bytes(directory: Path) -> bytes:
    """Every file DuckDB left in ``directory`` (database, WAL, spill files), lower-cased ASCII."""
    files = [p for p in sorted(directory.rglob("*")) if p.is_file()]
    assert files
    return b"\n".join(p.read_bytes() for p in files).lower()


def found(haystack: bytes, needles: Iterable[str]) -> list[str]:
    return [n for n in needles if n.encode("utf-8").lower() in haystack]


@pytest.fixture(scope="module")
def needles(
    small_federation: SyntheticFederation, prepared_counties: dict[str, PreparedCounty]
) -> set[str]:
    """Identifiers of a sample of records, as exported and as normalised (4+ characters)."""
    raw = pd.concat(
        [frame.assign(county=county) for county, frame in small_federation.counties.items()],
        ignore_index=True,
    )
    sample = raw.iloc[np.random.default_rng(5).choice(len(raw), SAMPLE_SIZE, replace=False)]
    normalised = pd.concat(
        [p.normalised.records.assign(county=c) for c, p in prepared_counties.items()],
        ignore_index=True,
    ).merge(sample[["county", "record_id"]], on=["county", "record_id"])
    assert len(normalised) == SAMPLE_SIZE
    values: set[str] = set()
    for column in ("given_name", "family_name", "date_of_birth"):
        values |= set(sample[column].str.strip())
    values |= set(normalised[["given_name", "given_canonical", "family_name"]].stack())
    for nhs in sample["nhs_number"]:
        values |= {nhs.strip(), "".join(nhs.split())}
        digits = "".join(nhs.split())
        values.add(f"{digits[:3]} {digits[3:6]} {digits[6:]}")
    for postcode in sample["postcode"]:
        canonical = normalise_postcode(postcode)
        values |= {postcode.strip(), " ".join(postcode.split())}
        if canonical:
            values |= {canonical, canonical.replace(" ", "")}
    return {v for v in values if isinstance(v, str) and len(v) >= MIN_LENGTH}


@pytest.fixture(scope="module")
def matched_on_file(
    prepared_counties: dict[str, PreparedCounty],
    tokeniser: Tokeniser,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[MatchResult, Path]:
    """The matcher's pipeline run on token tables in a file-backed DuckDB, then closed."""
    directory = tmp_path_factory.mktemp("matcher_store")
    connection = connect(directory / "m.duckdb")
    tables = {county: p.tokens for county, p in prepared_counties.items()}
    try:
        result = match_tokens(
            tables,
            engine=SplinkEngine(connection=connection),
            spec_fingerprint=tokeniser.spec.fingerprint,
            bloom=tokeniser.spec.bloom,
        )
        stored = connection.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_type = 'BASE TABLE'"
        ).fetchone()
    finally:
        connection.close()
    assert stored is not None and stored[0] > 0  # the matcher did write tables to the file
    return result, directory


def test_the_needles_cover_every_kind_of_identifier(needles: set[str]) -> None:
    assert len(needles) > 4 * SAMPLE_SIZE
    assert any(len(v) == 10 and v.isdigit() for v in needles)  # NHS numbers without spaces
    assert any(len(v) == 12 and v[3] == " " for v in needles)  # NHS numbers with spaces
    assert any(len(v) == 10 and v[4] == "-" for v in needles)  # dates of birth


def test_the_search_finds_identifiers_that_are_stored(needles: set[str], tmp_path: Path) -> None:
    connection = connect(tmp_path / "control.duckdb")
    plaintext = pd.DataFrame({"value": sorted(needles)})
    connection.register("plaintext", plaintext)
    connection.execute("CREATE TABLE leaked AS SELECT upper(value) AS value FROM plaintext")
    connection.close()
    haystack = file_bytes(tmp_path)
    ascii_needles = [n for n in needles if n.isascii()]  # upper() on ASCII only is reversible
    assert found(haystack, ascii_needles) == ascii_needles


def test_the_matcher_store_holds_no_plaintext_identifier(
    matched_on_file: tuple[MatchResult, Path], needles: set[str]
) -> None:
    result, directory = matched_on_file
    assert len(result.pairs) > 500  # linking really happened
    assert found(file_bytes(directory), sorted(needles)) == []


def test_the_matcher_store_holds_no_identifier_column(
    matched_on_file: tuple[MatchResult, Path],
) -> None:
    _, directory = matched_on_file
    connection = duckdb.connect(str(directory / "m.duckdb"), read_only=True)
    try:
        columns = connection.execute(
            "SELECT column_name, data_type FROM information_schema.columns"
        ).fetchall()
    finally:
        connection.close()
    names = {name for name, _ in columns}
    assert names
    assert not {n.removesuffix("_l").removesuffix("_r") for n in names} & IDENTIFIER_COLUMNS


def test_token_tables_have_no_identifier_column(
    prepared_counties: dict[str, PreparedCounty], tokeniser: Tokeniser
) -> None:
    allowed = {*NON_TOKEN_COLUMNS, *tokeniser.spec.token_columns()}
    for prepared in prepared_counties.values():
        tokens = prepared.tokens
        assert list(tokens.columns[:3]) == list(NON_TOKEN_COLUMNS)
        assert set(tokens.columns) == allowed
        assert not set(tokens.columns) & IDENTIFIER_COLUMNS
        for column in tokeniser.spec.token_columns():
            assert pd.api.types.is_integer_dtype(tokens[column]), column
        assert set(tokens["role"].dropna()) <= {"child", "adult"}


def test_pseudonyms_carry_no_identifier(prepared_counties: dict[str, PreparedCounty]) -> None:
    for prepared in prepared_counties.values():
        ids = prepared.identities
        assert ids["pseudonym"].str.fullmatch("[0-9a-f]{32}").all()
        household = ids["household"].dropna()
        assert household.str.fullmatch("[0-9a-f]{32}").all()
        assert not set(ids["pseudonym"]) & set(household)
