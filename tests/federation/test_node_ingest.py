"""Loading county exports into a node: only changes are published, pseudonyms are kept."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pytest

from federation.node.ingest import IngestReport, ingest_file
from federation.node.store import NodeStore
from federation.protocol import TokenBatch
from linkage.errors import InputError
from linkage.pipeline import ID_COLUMNS, prepare_county
from linkage.records import read_county_file
from linkage.synthetic import generate_federation
from linkage.tokenise import Tokeniser, TokenSpec

SECRET = bytes(range(7, 39))
COUNTY = "coventry"


@pytest.fixture(scope="module")
def export() -> pd.DataFrame:
    federation = generate_federation(counties=2, records=600)
    return next(iter(federation.counties.values())).reset_index(drop=True)


@pytest.fixture
def tokeniser() -> Tokeniser:
    return TokenSpec().bind(SECRET)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStore]:
    s = NodeStore(tmp_path / "node.duckdb")
    yield s
    s.close()


def _write(frame: pd.DataFrame, path: Path) -> Path:
    frame.to_csv(path, index=False)
    return path


def _ingest(store: NodeStore, path: Path, tokeniser: Tokeniser, **kw: object) -> IngestReport:
    report = ingest_file(store, path, tokeniser, county=COUNTY, seed=3, **kw)  # type: ignore[arg-type]
    # The counts always add up (design invariant 4: nothing is lost silently).
    assert report.input_rows == report.accepted + report.quarantined
    assert report.accepted == report.upserts + report.unchanged
    return report


def _batches(store: NodeStore) -> list[TokenBatch]:
    return [
        TokenBatch.model_validate_json(store.message_body(entry.message_id))
        for entry in store.pending()
    ]


def _pseudonyms(store: NodeStore) -> dict[str, str]:
    snap = store.records_snapshot()
    return dict(zip(snap["record_id"], snap["pseudonym"], strict=True))


def _active(store: NodeStore) -> dict[str, bool]:
    snap = store.records_snapshot()
    return dict(zip(snap["record_id"], snap["active"], strict=True))


def _display(store: NodeStore, record_id: str) -> dict[str, Any]:
    snap = store.records_snapshot()
    [text] = snap.loc[snap["record_id"] == record_id, "display"]
    return dict(json.loads(text))


def test_first_load_publishes_every_record_as_tokens(
    store: NodeStore, tokeniser: Tokeniser, export: pd.DataFrame, tmp_path: Path
) -> None:
    report = _ingest(store, _write(export, tmp_path / "c.csv"), tokeniser, batch_size=100)
    assert report.input_rows == len(export)
    assert report.upserts == report.accepted > 0
    assert report.tombstones == 0
    batches = _batches(store)
    assert report.batches == len(batches) == -(-report.accepted // 100)
    columns = [*ID_COLUMNS, *tokeniser.spec.token_columns()]
    rows = [row for b in batches for row in b.rows]
    assert len(rows) == report.accepted
    for batch in batches:
        assert batch.county == COUNTY
        assert batch.columns == columns
        assert batch.token_spec.fingerprint == tokeniser.spec.fingerprint
        assert batch.token_spec.epoch == tokeniser.epoch
    assert {row[0] for row in rows} == set(_pseudonyms(store).values())
    tokens = [value for row in rows for value in row[3:]]
    assert all(value is None or type(value) is int for value in tokens)
    assert any(value is not None for value in tokens)

    # Exactly the tokeniser's output (64-bit values survive the trip through JSON).
    snap = store.records_snapshot()
    expected = prepare_county(
        COUNTY,
        read_county_file(tmp_path / "c.csv"),
        tokeniser,
        pseudonyms=dict(zip(snap["record_id"], snap["pseudonym"], strict=True)),
        households=dict(zip(snap["household_id"], snap["household"], strict=True)),
        seed=3,
    ).tokens
    table = pa.Table.from_pandas(expected.loc[:, columns], preserve_index=False)
    assert rows == [list(r) for r in zip(*(c.to_pylist() for c in table.columns), strict=True)]

    # Invariant 1: no plaintext identifier is in what will be sent.
    sent = "".join(store.message_body(e.message_id) for e in store.pending()).casefold()
    for column in ("record_id", "family_name", "nhs_number", "postcode", "date_of_birth"):
        values = [v for v in export[column].astype(str) if len(v) >= 5]
        assert values
        assert not [v for v in values if v.casefold() in sent], column


def test_second_load_publishes_only_the_changes(
    store: NodeStore, tokeniser: Tokeniser, export: pd.DataFrame, tmp_path: Path
) -> None:
    first = _ingest(store, _write(export, tmp_path / "c1.csv"), tokeniser)
    assert first.quarantined == 0
    before = _pseudonyms(store)
    queued = {e.message_id for e in store.pending()}

    changed_ids = export["record_id"].iloc[10:15].tolist()
    removed_ids = export["record_id"].iloc[20:23].tolist()
    second = export.copy()
    second.loc[second["record_id"].isin(changed_ids), "family_name"] = "Zebedee-Quinton"
    second = second[~second["record_id"].isin(removed_ids)]
    new = export.iloc[30:34].copy()
    new["record_id"] = [f"NEW{i}" for i in range(4)]
    second = pd.concat([second, new], ignore_index=True)

    report = _ingest(store, _write(second, tmp_path / "c2.csv"), tokeniser)
    assert (report.upserts, report.tombstones) == (9, 3)
    assert report.unchanged == len(export) - 5 - 3
    assert report.batches == 1

    after = _pseudonyms(store)
    assert all(after[r] == p for r, p in before.items())  # a record keeps its pseudonym
    [batch] = [b for b in _batches(store) if b.batch_id not in queued]
    upserted = {row[0] for row in batch.rows}
    assert upserted == {after[r] for r in [*changed_ids, *new["record_id"]]}
    assert set(batch.tombstones) == {before[r] for r in removed_ids}
    assert not any(_active(store)[r] for r in removed_ids)
    assert store.status()["records"] == {"active": len(second), "inactive": 3}

    # Loading the same file again changes nothing and queues nothing.
    again = _ingest(store, tmp_path / "c2.csv", tokeniser)
    assert (again.upserts, again.tombstones, again.batches) == (0, 0, 0)

    # A removed record that comes back is republished under its old pseudonym.
    back = _ingest(store, tmp_path / "c1.csv", tokeniser)
    assert (back.upserts, back.tombstones) == (3 + 5, 4)
    assert _pseudonyms(store)[removed_ids[0]] == before[removed_ids[0]]


def test_a_delta_load_publishes_its_records_and_withdraws_nothing(
    store: NodeStore, tokeniser: Tokeniser, export: pd.DataFrame, tmp_path: Path
) -> None:
    _ingest(store, _write(export, tmp_path / "all.csv"), tokeniser)
    queued = {e.message_id for e in store.pending()}
    feed = export.iloc[5:7].copy()
    feed["family_name"] = "Zebedee-Quinton"  # two changed records ...
    new = export.iloc[40:41].copy()
    new["record_id"] = "NEW-1"  # ... and a new one; nothing else is mentioned
    report = _ingest(
        store, _write(pd.concat([feed, new]), tmp_path / "feed.csv"), tokeniser, delta=True
    )
    assert (report.upserts, report.tombstones, report.unchanged) == (3, 0, 0)
    [batch] = [b for b in _batches(store) if b.batch_id not in queued]
    assert not batch.tombstones and len(batch.rows) == 3
    assert all(_active(store).values())
    assert store.status()["records"] == {"active": len(export) + 1, "inactive": 0}


def test_quarantined_rows_are_recorded_and_do_not_withdraw_records(
    store: NodeStore, tokeniser: Tokeniser, export: pd.DataFrame, tmp_path: Path
) -> None:
    _ingest(store, _write(export, tmp_path / "c1.csv"), tokeniser)
    broken = export.copy()
    broken.loc[5, "record_id"] = ""  # no record id: this row is quarantined
    broken.loc[6, ["given_name", "family_name", "date_of_birth"]] = ""  # nothing to link on
    kept_id = str(export.loc[6, "record_id"])
    duplicate = broken.iloc[[7]]
    broken = pd.concat([broken, duplicate], ignore_index=True)

    report = _ingest(store, _write(broken, tmp_path / "c2.csv"), tokeniser)
    assert report.quarantined == 3
    assert report.input_rows == len(export) + 1
    # Row 5's record is really gone from the file; row 6's is there but unusable, so it keeps
    # its last good version rather than being withdrawn.
    assert report.tombstones == 1
    assert _pseudonyms(store)[kept_id] and _active(store)[kept_id]

    quarantine = store.quarantine(report.load_id)
    assert quarantine["row_number"].tolist() == [6, 7, len(broken)]
    assert all(quarantine["reason"].str.len() > 0)
    # Reasons name rows and columns, never the values.
    assert not quarantine["reason"].str.contains(str(export.loc[6, "record_id"])).any()
    assert store.status()["last_load"]["counts"]["quarantined"] == 3


def test_display_only_changes_update_the_inbox_without_republishing(
    store: NodeStore, tokeniser: Tokeniser, export: pd.DataFrame, tmp_path: Path
) -> None:
    _ingest(store, _write(export, tmp_path / "c1.csv"), tokeniser)
    record_id = str(export.loc[0, "record_id"])
    edited = export.copy()
    # Only the spelling's case changes: the normalised name, hence the tokens, are the same.
    new_spelling = str(export.loc[0, "given_name"]).swapcase()
    edited.loc[0, "given_name"] = new_spelling
    report = _ingest(store, _write(edited, tmp_path / "c2.csv"), tokeniser)
    assert (report.upserts, report.batches) == (0, 0)
    assert _display(store, record_id)["given_name"] == new_spelling

    # An address is not tokenised but is a normalised value, so its change is published.
    edited.loc[0, "address"] = "Flat 9, The Old Mill"
    report = _ingest(store, _write(edited, tmp_path / "c3.csv"), tokeniser)
    assert report.upserts == 1
    assert _display(store, record_id)["address"] == "Flat 9, The Old Mill"


def test_a_missing_file_is_an_input_error_naming_it(
    store: NodeStore, tokeniser: Tokeniser, tmp_path: Path
) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(InputError, match=r"nope\.csv"):
        ingest_file(store, missing, tokeniser, county=COUNTY)
    assert store.status()["last_load"] is None


def test_progress_hook_sees_every_stage(
    store: NodeStore, tokeniser: Tokeniser, export: pd.DataFrame, tmp_path: Path
) -> None:
    seen: list[tuple[str, bool]] = []
    report = ingest_file(
        store,
        _write(export.head(50), tmp_path / "c.csv"),
        tokeniser,
        county=COUNTY,
        progress=lambda stage, seconds: seen.append((stage, seconds is None)),
    )
    stages = ["read", "snapshot", "tokenise", "compare", "write"]
    assert [s for s, starting in seen if starting] == stages
    assert list(report.seconds) == stages
    with pytest.raises(ValueError):
        ingest_file(store, tmp_path / "c.csv", tokeniser, county=COUNTY, batch_size=0)


def test_a_delta_load_is_refused_when_the_spec_publishes_frequency_classes(
    store: NodeStore, export: pd.DataFrame, tmp_path: Path
) -> None:
    from dataclasses import replace

    from linkage.errors import InputError
    from linkage.tokenise import TokenSpec

    spec = replace(TokenSpec(), frequency_classes=True)
    tokeniser = spec.bind(bytes(range(32)))
    with pytest.raises(InputError, match="delta load"):
        ingest_file(store, _write(export, tmp_path / "f.csv"), tokeniser, county=COUNTY, delta=True)
