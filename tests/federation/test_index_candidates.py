"""Incremental scoring scores new records only against their blocks, with the same results.

``LinkIndex._predict_between`` first cuts the index down, in SQL, to the stored records that
share a block with a new record, then lets Splink block and score against that subset. The
pairs, weights and probabilities must be exactly those of Splink's ``predict_between`` against
the whole index (issue 8; the timings are in BENCHMARKS.md, "Scale").
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation.matcher.index import LinkIndex
from federation.matcher.store import MatcherStore
from federation.registry import Registry
from linkage.model import LinkageModel
from linkage.pipeline import PreparedCounty, match_tokens
from linkage.tokenise import Tokeniser

PAIR_KEY = ["county_l", "pseudonym_l", "county_r", "pseudonym_r"]
NEW_PER_COUNTY = 20


@pytest.fixture(scope="module")
def model(prepared_counties: dict[str, PreparedCounty], tokeniser: Tokeniser) -> LinkageModel:
    spec = tokeniser.spec
    tables = {c: p.tokens for c, p in prepared_counties.items()}
    return match_tokens(tables, spec_fingerprint=spec.fingerprint, bloom=spec.bloom).model


@pytest.fixture
def index(
    prepared_counties: dict[str, PreparedCounty],
    tokeniser: Tokeniser,
    model: LinkageModel,
    tmp_path: Path,
) -> LinkIndex:
    mw = [f"mw_{c['output_column_name']}" for c in model.settings["comparisons"]]
    store = MatcherStore(tmp_path / "matcher.duckdb", tokeniser.spec, mw_columns=mw)
    now = time.time()
    for county, prepared in prepared_counties.items():
        table = pa.Table.from_pandas(prepared.tokens, preserve_index=False)
        n = len(table)
        table = table.append_column("source_dataset", pa.array([county] * n, pa.string()))
        table = table.append_column("epoch", pa.array(np.ones(n, dtype=np.int32)))
        table = table.append_column("batch_id", pa.array(["test"] * n, pa.string()))
        table = table.append_column("stored_at", pa.array(np.full(n, now)))
        cols = ", ".join(table.column_names)
        store.conn.register("incoming", table)
        store.conn.execute(f"INSERT INTO tokens ({cols}) SELECT {cols} FROM incoming")
        store.conn.unregister("incoming")
    registry = Registry(
        matcher_url="http://127.0.0.1:1",
        matcher_public_key=Ed25519PrivateKey.generate().public_key(),
        nodes={},
    )
    return LinkIndex(store, registry, model=model)


def _new_records(index: LinkIndex, prepared: dict[str, PreparedCounty]) -> pa.Table:
    """Some stored records of every county, shaped as ``score_pending`` passes them."""
    keys = pd.concat(
        [
            pd.DataFrame({"c": county, "p": p.tokens["pseudonym"].iloc[:NEW_PER_COUNTY]})
            for county, p in prepared.items()
        ]
    )
    index.store.conn.register("k", keys)
    new = index.store.conn.sql(
        "SELECT t.* EXCLUDE (epoch, batch_id, stored_at) FROM tokens t "
        "SEMI JOIN k ON t.source_dataset = k.c AND t.pseudonym = k.p"
    ).to_arrow_table()
    index.store.conn.unregister("k")
    return new


def test_blocked_scoring_equals_scoring_against_the_whole_index(
    index: LinkIndex, prepared_counties: dict[str, PreparedCounty]
) -> None:
    new = _new_records(index, prepared_counties)
    assert new.num_rows == NEW_PER_COUNTY * len(prepared_counties)
    blocked = index._predict_between(new, prefilter=True)
    full = index._predict_between(new, prefilter=False)
    assert len(full) > NEW_PER_COUNTY
    assert len(blocked) == len(full)
    joined = blocked.merge(full, on=PAIR_KEY, how="outer", indicator=True)
    assert (joined["_merge"] == "both").all()
    numeric = [
        c for c in full.columns if c.startswith(("mw_", "gamma_", "match_")) and c not in PAIR_KEY
    ]
    assert "match_probability" in numeric and "mw_given_name" in numeric
    for column in numeric:
        assert (joined[f"{column}_x"] == joined[f"{column}_y"]).all(), column


def test_the_candidates_are_only_the_blocks_of_the_new_records(
    index: LinkIndex, prepared_counties: dict[str, PreparedCounty]
) -> None:
    new = _new_records(index, prepared_counties)
    conn = index.store.conn
    conn.register("fresh", new)
    candidates = conn.execute(f"SELECT count(*) FROM ({index._candidates_sql('fresh')})")
    n_candidates = candidates.fetchall()[0][0]
    conn.unregister("fresh")
    stored = conn.execute("SELECT count(*) FROM tokens").fetchall()[0][0]
    assert 0 < n_candidates < stored / 10


def test_a_record_that_blocks_with_nothing_scores_no_pairs(index: LinkIndex) -> None:
    new = index.store.conn.sql(
        "SELECT * EXCLUDE (epoch, batch_id, stored_at) FROM tokens LIMIT 1"
    ).to_arrow_table()
    frame = new.to_pandas()
    for column in index.store.token_columns:
        frame[column] = pd.array([None], dtype="Int64")
    frame = frame.astype({c: "Int16" for c in frame.columns if c.endswith(("_bf_n", "_fc"))})
    scored = index._predict_between(pa.Table.from_pandas(frame, schema=new.schema))
    assert scored.empty


def test_score_pending_links_a_new_record_through_its_blocks(index: LinkIndex) -> None:
    pair = index.store.conn.execute(
        "SELECT l.source_dataset, l.pseudonym, r.source_dataset, r.pseudonym FROM tokens l "
        "JOIN tokens r ON l.nhs = r.nhs AND l.dob = r.dob AND l.source_dataset < r.source_dataset "
        "LIMIT 1"
    ).fetchall()[0]
    index.store.conn.execute("INSERT INTO pending VALUES (?, ?, ?)", [pair[0], pair[1], 0.0])
    report = index.score_pending()
    assert report.records == 1
    stored = index.store.query("SELECT county_l, pseudonym_l, county_r, pseudonym_r FROM pairs")
    assert tuple(pair) in set(stored.itertuples(index=False, name=None))


def test_a_record_queued_again_while_its_round_scores_stays_queued(
    index: LinkIndex, prepared_counties: dict[str, PreparedCounty]
) -> None:
    # A batch stored while a round is scoring re-queues its records with a later time; the
    # round must remove only the queue entries it read, or the newer version is never scored.
    county, prepared = next(iter(prepared_counties.items()))
    pseudonym = str(prepared.tokens["pseudonym"].iloc[0])
    conn = index.store.conn
    conn.execute("INSERT INTO pending VALUES (?, ?, 1.0)", [county, pseudonym])
    scoring = index._predict_between

    def scored_while_a_batch_arrives(new: pa.Table, **kw: bool) -> pd.DataFrame:
        with index.store.transaction() as tx:  # what store_batch does for an upsert
            tx.execute("INSERT OR REPLACE INTO pending VALUES (?, ?, 2.0)", [county, pseudonym])
        return scoring(new, **kw)

    index._predict_between = scored_while_a_batch_arrives  # type: ignore[method-assign]
    report = index.score_pending()
    assert report.records == 1
    assert conn.execute("SELECT queued_at FROM pending").fetchall() == [(2.0,)]
    index._predict_between = scoring  # type: ignore[method-assign]
    assert index.score_pending().records == 1
    assert conn.execute("SELECT count(*) FROM pending").fetchall() == [(0,)]
