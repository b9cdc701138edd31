"""A node moving to a new key epoch: every active record re-tokenised, nothing lost.

Run against the node's real store with real loads (no HTTP): a node that loaded its export
under epoch 1 and is then configured with the epoch-2 secret re-tokenises every active record
from what it keeps, under the pseudonyms the records already had, queues them after whatever
is still queued, and marks the last batch ``epoch_complete``. A load of the unchanged export
afterwards publishes nothing. The node refuses an older epoch, a skipped epoch, and records it
cannot re-tokenise (until a load under the old epoch has stored what they need).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from federation.audit import AuditLog
from federation.errors import ConfigError
from federation.node.ingest import ingest_file
from federation.node.rotate import rotate_if_needed
from federation.node.store import NodeStore
from federation.protocol import TokenBatch
from linkage.pipeline import ID_COLUMNS, prepare_county
from linkage.records import read_county_file
from linkage.synthetic import generate_federation
from linkage.tokenise import Tokeniser, TokenSpec

COUNTY = "coventry"
OLD = TokenSpec().bind(hashlib.sha256(b"epoch one secret").digest(), epoch=1)
NEW = TokenSpec().bind(hashlib.sha256(b"epoch two secret").digest(), epoch=2)


@pytest.fixture(scope="module")
def export_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    frame = next(iter(generate_federation(counties=2, records=300, seed=5).counties.values()))
    path = tmp_path_factory.mktemp("export") / f"{COUNTY}.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[NodeStore]:
    s = NodeStore(tmp_path / "node.duckdb")
    yield s
    s.close()


def _load(store: NodeStore, path: Path, tokeniser: Tokeniser) -> dict[str, int]:
    report = ingest_file(store, path, tokeniser, county=COUNTY, batch_size=40, seed=3)
    return {"upserts": report.upserts, "unchanged": report.unchanged, "gone": report.tombstones}


def _rotate(store: NodeStore, tokeniser: Tokeniser, audit: AuditLog | None = None) -> object:
    return rotate_if_needed(store, tokeniser, county=COUNTY, batch_size=40, seed=4, audit=audit)


def _queued(store: NodeStore) -> list[TokenBatch]:
    return [
        TokenBatch.model_validate_json(store.message_body(e.message_id)) for e in store.pending()
    ]


def test_a_new_epoch_republishes_every_active_record_under_its_pseudonym(
    store: NodeStore, export_file: Path, tmp_path: Path
) -> None:
    assert _rotate(store, OLD) is None  # a new node simply starts at its epoch
    assert store.key_epoch() == 1
    first = _load(store, export_file, OLD)
    # One record leaves the export: it is withdrawn, and not re-published under epoch 2.
    export = pd.read_csv(export_file, dtype=str, keep_default_na=False)
    gone = str(export["record_id"].iloc[0])
    smaller = tmp_path / f"{COUNTY}.csv"
    export.iloc[1:].to_csv(smaller, index=False)
    assert _load(store, smaller, OLD)["gone"] == 1
    queued_before = len(store.pending())

    audit = AuditLog(store.conn, lock=store.lock)
    report = _rotate(store, NEW, audit)
    assert report is not None
    snapshot = store.records_snapshot()
    active = snapshot[snapshot["active"].astype(bool)]
    assert report.records == len(active) == first["upserts"] - 1  # type: ignore[attr-defined]
    assert store.key_epoch() == 2 and store.status()["key_epoch"] == 2

    batches = _queued(store)
    old, new = batches[:queued_before], batches[queued_before:]
    assert all(b.token_spec.epoch == 1 for b in old)  # still sent first, in order
    assert all(b.token_spec.epoch == 2 and not b.tombstones for b in new)
    assert [b.epoch_complete for b in new] == [False] * (len(new) - 1) + [True]
    assert not any(b.epoch_complete for b in old)
    published = [row[0] for b in new for row in b.rows]
    assert sorted(published) == sorted(active["pseudonym"])  # each active record, once

    # The tokens are what a load under epoch 2 makes of the same records.
    prepared = prepare_county(COUNTY, read_county_file(smaller), NEW, seed=9)
    by_record = dict(zip(snapshot["record_id"], snapshot["pseudonym"], strict=True))
    expected = prepared.tokens.assign(
        pseudonym=[by_record[r] for r in prepared.identities["record_id"]]
    ).set_index("pseudonym")
    columns = [*ID_COLUMNS, *NEW.spec.token_columns()]
    rows = pd.DataFrame([row for b in new for row in b.rows], columns=columns, dtype=object)
    for column in [*NEW.spec.exact, *NEW.spec.blocking]:
        want = [None if pd.isna(v) else int(v) for v in expected.loc[rows["pseudonym"], column]]
        assert rows[column].tolist() == want, column
    assert gone not in set(prepared.identities["record_id"])

    # The next load of the same export finds nothing changed.
    assert _load(store, smaller, NEW) == {"upserts": 0, "unchanged": len(active), "gone": 0}
    assert audit.verify().ok
    rows_audit = store.conn.execute("SELECT event, details FROM audit_log").fetchall()
    assert [e for e, _ in rows_audit] == ["keys.epoch_started"]
    assert '"records":' in rows_audit[0][1]


def test_the_node_refuses_an_old_or_skipped_epoch(store: NodeStore, export_file: Path) -> None:
    _rotate(store, NEW)
    _load(store, export_file, NEW)
    pending = len(store.pending())
    with pytest.raises(ConfigError, match="already publishes under epoch 2"):
        _rotate(store, OLD)
    skipped = TokenSpec().bind(hashlib.sha256(b"epoch four").digest(), epoch=4)
    with pytest.raises(ConfigError, match="one at a time"):
        _rotate(store, skipped)
    assert store.key_epoch() == 2 and len(store.pending()) == pending


def test_a_node_without_records_still_completes_the_epoch(store: NodeStore) -> None:
    _rotate(store, OLD)
    _rotate(store, NEW)
    [batch] = _queued(store)
    assert batch.token_spec.epoch == 2 and batch.epoch_complete
    assert batch.rows == [] and batch.tombstones == []


def test_records_stored_without_normalised_values_are_filled_in_by_a_load(
    store: NodeStore, export_file: Path
) -> None:
    _rotate(store, OLD)
    _load(store, export_file, OLD)
    # As a store written before normalised values were kept.
    store.conn.execute("UPDATE records SET normalised = NULL")
    with pytest.raises(ConfigError, match="cannot be re-tokenised"):
        _rotate(store, NEW)
    assert store.key_epoch() == 1
    before = len(store.pending())
    # A load under the old epoch publishes nothing new but stores what re-tokenising needs.
    assert _load(store, export_file, OLD)["upserts"] == 0
    assert len(store.pending()) == before
    assert store.records_without_normalised() == set()
    assert _rotate(store, NEW) is not None


def test_normalised_values_stay_on_the_node(store: NodeStore, export_file: Path) -> None:
    _rotate(store, OLD)
    _load(store, export_file, OLD)
    [(text,)] = store.conn.execute("SELECT normalised FROM records LIMIT 1").fetchall()
    assert '"family_name"' in text and '"date_of_birth"' in text
    # Nothing queued for the matcher carries them.
    bodies = " ".join(store.message_body(e.message_id) for e in store.pending())
    assert "family_name" not in bodies and "date_of_birth" not in bodies
    with pytest.raises(duckdb.Error):
        store.conn.execute("SELECT normalised FROM outbox")
