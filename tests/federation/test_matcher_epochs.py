"""The matcher's side of a key rotation, on its real store and index (no HTTP).

Two counties publish under epoch 1. Batches of epoch 2 are kept apart and never scored; other
epochs are refused without storing anything; tombstones apply whatever the epoch. The switch
waits for every county holding tokens to complete epoch 2, then replaces the index in one
transaction, deletes the old tokens, queues every record for scoring and audits it; after it,
epoch 1 is refused, and a resent epoch-1 batch that was stored before is still acknowledged.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest

from federation.keys import init_federation, registry_path
from federation.matcher.epochs import KeyEpochs
from federation.matcher.index import LinkIndex
from federation.matcher.store import EpochRefused, MatcherStore
from federation.protocol import TokenBatch, TokenSpecRef
from federation.registry import Registry
from linkage.model import LinkageModel
from linkage.pipeline import ID_COLUMNS, prepare_county
from linkage.synthetic import generate_federation
from linkage.tokenise import TokenSpec

A, B, C = "coventry", "warwickshire", "leicestershire"
SPEC = TokenSpec()


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    directory = tmp_path_factory.mktemp("keys")
    init_federation(
        directory,
        node_ids=[A, B, C],
        matcher_url="http://127.0.0.1:9",
        node_urls={n: f"http://{n}.invalid" for n in (A, B, C)},
    )
    return Registry.load(registry_path(directory))


@pytest.fixture(scope="module")
def tables() -> dict[int, dict[str, pd.DataFrame]]:
    """Each county's tokens under epochs 1 and 2, same records, same pseudonyms."""
    fed = generate_federation(counties=2, records=80, seed=13)
    out: dict[int, dict[str, pd.DataFrame]] = {}
    for epoch in (1, 2):
        tokeniser = SPEC.bind(hashlib.sha256(f"secret {epoch}".encode()).digest(), epoch=epoch)
        out[epoch] = {}
        for county, frame in zip((A, B), fed.counties.values(), strict=True):
            raw = frame.assign(row_number=range(1, len(frame) + 1))
            tokens = prepare_county(county, raw, tokeniser, seed=epoch).tokens
            mark = "a" if county == A else "b"
            tokens["pseudonym"] = [f"{mark}{i:031x}" for i in range(len(tokens))]
            out[epoch][county] = tokens
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[MatcherStore]:
    mw = [
        f"mw_{c['output_column_name']}"
        for c in LinkageModel.untrained(SPEC.bloom).settings["comparisons"]
    ]
    s = MatcherStore(tmp_path / "matcher.duckdb", SPEC, mw_columns=mw)
    yield s
    s.close()


def _batch(
    frame: pd.DataFrame,
    county: str,
    epoch: int,
    *,
    tombstones: tuple[str, ...] = (),
    complete: bool = False,
) -> TokenBatch:
    columns = [*ID_COLUMNS, *SPEC.token_columns()]
    return TokenBatch.model_validate(
        {
            "batch_id": secrets.token_hex(16),
            "county": county,
            "token_spec": TokenSpecRef(
                version=SPEC.version, fingerprint=SPEC.fingerprint, epoch=epoch
            ),
            "columns": columns,
            "rows": json.loads(frame.loc[:, columns].to_json(orient="values")),
            "tombstones": list(tombstones),
            "epoch_complete": complete,
        }
    )


def _count(store: MatcherStore, sql: str) -> int:
    return int(store.query(sql).iloc[0, 0])


def test_next_epoch_is_held_apart_and_other_epochs_refused(
    store: MatcherStore, tables: dict[int, dict[str, pd.DataFrame]]
) -> None:
    store.store_batch(_batch(tables[1][A], A, 1), epoch=1)  # the first batch sets epoch 1
    store.store_batch(_batch(tables[1][B], B, 1), epoch=1)
    n = len(tables[1][A]) + len(tables[1][B])
    store.conn.execute("DELETE FROM pending")
    assert store.current_epoch() == 1

    store.store_batch(_batch(tables[2][A], A, 2, complete=True), epoch=2)
    assert _count(store, "SELECT count(*) FROM tokens WHERE epoch = 1") == n
    assert _count(store, "SELECT count(*) FROM tokens_next WHERE epoch = 2") == len(tables[2][A])
    assert _count(store, "SELECT count(*) FROM pending") == 0  # never scored before the switch
    assert store.epoch_progress()["completed"] == [A]

    batches = _count(store, "SELECT count(*) FROM batches")
    for epoch in (3, 7):
        with pytest.raises(EpochRefused, match="not open"):
            store.store_batch(_batch(tables[2][B], B, epoch), epoch=epoch)
    assert _count(store, "SELECT count(*) FROM batches") == batches

    # A tombstone of either epoch takes the record out of both tables, and is scored.
    gone = str(tables[1][A]["pseudonym"].iloc[0])
    store.store_batch(_batch(tables[2][A].iloc[0:0], A, 2, tombstones=(gone,)), epoch=2)
    for table in ("tokens", "tokens_next"):
        assert _count(store, f"SELECT count(*) FROM {table} WHERE pseudonym = '{gone}'") == 0
    assert _count(store, "SELECT count(*) FROM pending") == 1


def test_switch_waits_for_every_county_holding_tokens_then_replaces_the_index(
    store: MatcherStore, registry: Registry, tables: dict[int, dict[str, pd.DataFrame]]
) -> None:
    first = {c: _batch(tables[1][c], c, 1) for c in (A, B)}
    for batch in first.values():
        store.store_batch(batch, epoch=1)
    index = LinkIndex(store, registry)
    epochs = KeyEpochs(store, registry)
    assert epochs.switch_if_due(index) is None
    assert epochs.progress()["waiting_for"] == []  # no rotation under way

    store.store_batch(_batch(tables[2][A], A, 2, complete=True), epoch=2)
    epochs.completed()
    # C is registered but holds no tokens: it is not waited for. B is.
    assert epochs.progress()["waiting_for"] == [B]
    assert epochs.switch_if_due(index) is None
    assert store.current_epoch() == 1

    half = len(tables[2][B]) // 2
    store.store_batch(_batch(tables[2][B].iloc[:half], B, 2), epoch=2)
    store.store_batch(_batch(tables[2][B].iloc[half:], B, 2, complete=True), epoch=2)
    epochs.completed()
    summary = epochs.switch_if_due(index)
    assert summary is not None and summary["epoch"] == 2
    n = len(tables[1][A]) + len(tables[1][B])
    assert (summary["deleted"], summary["moved"]) == (n, n)
    assert store.current_epoch() == 2
    assert _count(store, "SELECT count(*) FROM tokens WHERE epoch <> 2") == 0
    assert _count(store, "SELECT count(*) FROM tokens") == n
    assert _count(store, "SELECT count(*) FROM tokens_next") == 0
    assert _count(store, "SELECT count(*) FROM pending") == n  # all to be scored afresh
    old = {int(v) for v in tables[1][A]["dob"].dropna()}
    held = {int(v) for v in store.query("SELECT dob FROM tokens")["dob"].dropna()}
    assert held and not held & old
    [(event, details)] = store.conn.execute("SELECT event, details FROM audit_log").fetchall()
    assert event == "keys.epoch_switched" and '"deleted_token_rows":' in details
    assert epochs.progress() == {
        "current": 2,
        "next": 3,
        "completed": [],
        "waiting_for": [],
        "staged": 0,
    }

    # Epoch 1 is retired; a batch stored before is still acknowledged as a duplicate.
    with pytest.raises(EpochRefused, match="epoch 1 is retired"):
        store.store_batch(_batch(tables[1][A], A, 1), epoch=1)
    assert store.store_batch(first[A], epoch=1)[0] is False
    # Epoch 2 batches are now the index, scored as usual.
    store.store_batch(_batch(tables[2][A].iloc[:3], A, 2), epoch=2)
    assert _count(store, "SELECT count(*) FROM tokens") == n


def test_a_store_from_before_key_epochs_takes_its_epoch_from_its_tokens(
    store: MatcherStore, tables: dict[int, dict[str, pd.DataFrame]]
) -> None:
    store.store_batch(_batch(tables[2][A], A, 2), epoch=2)
    store.conn.execute("DELETE FROM meta WHERE key = 'key_epoch'")
    assert store.current_epoch() == 2
    with pytest.raises(EpochRefused):
        store.store_batch(_batch(tables[1][B], B, 1), epoch=1)
