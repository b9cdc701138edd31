"""The threshold chosen in ``notebooks/02_choose_threshold.ipynb`` reaches the matcher.

``linkage.analysis.write_threshold`` writes it into the matcher's TOML settings; the matcher
loads them as ``MatcherSettings`` and hands ``threshold`` to its ``LinkIndex``, which then
alerts on nothing below it.
"""

from __future__ import annotations

import re
import secrets
import tomllib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from federation import MatcherSettings, Registry, load_settings
from federation.matcher.index import LinkIndex
from federation.matcher.store import MatcherStore
from federation.protocol import TokenBatch, TokenSpecRef
from linkage.analysis import write_threshold
from linkage.model import LinkageModel
from linkage.pipeline import PreparedCounty, match_tokens
from linkage.tokenise import TokenSpec

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "matcher.example.toml"


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A copy of the example matcher settings with a real admin token (the example's is a
    placeholder the settings refuse)."""
    path = tmp_path / "matcher.toml"
    token = secrets.token_urlsafe(32)
    path.write_text(
        re.sub(r"(?m)^admin_token = .*$", f'admin_token = "{token}"', EXAMPLE.read_text()),
        encoding="utf-8",
    )
    return path


def registry() -> Registry:
    return Registry(
        matcher_url="http://127.0.0.1:8100",
        matcher_public_key=Ed25519PrivateKey.generate().public_key(),
        nodes={},
    )


def store_at(path: Path, spec: TokenSpec, model: LinkageModel) -> MatcherStore:
    mw = [f"mw_{c['output_column_name']}" for c in model.settings["comparisons"]]
    return MatcherStore(path, spec, mw_columns=mw)


def test_the_example_settings_have_no_threshold(config: Path) -> None:
    assert load_settings(MatcherSettings, config).threshold is None


def test_written_threshold_round_trips_through_the_matcher_settings(config: Path) -> None:
    before = load_settings(MatcherSettings, config)
    write_threshold(config, 0.83, comment="chosen in a test")
    assert tomllib.loads(config.read_text())["threshold"] == 0.83
    after = load_settings(MatcherSettings, config)
    assert after.threshold == 0.83
    assert after.model_dump(exclude={"threshold"}) == before.model_dump(exclude={"threshold"})

    write_threshold(config, 0.91)
    text = config.read_text()
    assert len(re.findall(r"(?m)^threshold\s*=", text)) == 1
    assert load_settings(MatcherSettings, config).threshold == 0.91
    # The commented-out example stays, as documentation.
    assert re.search(r"(?m)^# threshold = 0\.9\b", text)


def test_the_file_beats_the_environment(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JIGSAW_MATCHER_THRESHOLD", "0.5")
    write_threshold(config, 0.77)
    assert load_settings(MatcherSettings, config).threshold == 0.77


def test_the_index_applies_the_settings_threshold(config: Path, tmp_path: Path) -> None:
    write_threshold(config, 0.83)
    settings = load_settings(MatcherSettings, config)
    spec = TokenSpec()
    model = LinkageModel.untrained(spec.bloom)
    store = store_at(tmp_path / "matcher.duckdb", spec, model)
    try:
        index = LinkIndex(store, registry(), model=model, threshold=settings.threshold)
        assert index.model is not None and index.model.threshold == 0.83
        # A matcher restarted on the same store and settings keeps it.
        again = LinkIndex(store, registry(), threshold=settings.threshold)
        assert again.model is not None and again.model.threshold == 0.83
    finally:
        store.close()


def test_relinking_alerts_on_nothing_below_the_written_threshold(
    config: Path, tmp_path: Path, prepared_counties: dict[str, PreparedCounty]
) -> None:
    spec = TokenSpec()
    tables = {county: p.tokens for county, p in prepared_counties.items()}
    model = match_tokens(tables, bloom=spec.bloom, spec_fingerprint=spec.fingerprint).model
    store = store_at(tmp_path / "matcher.duckdb", spec, model)
    columns = ["pseudonym", "household", "role", *spec.token_columns()]
    ref = TokenSpecRef(version=spec.version, fingerprint=spec.fingerprint, epoch=1)
    for county, table in tables.items():
        values = table[columns].astype(object)
        rows = values.where(values.notna(), None).to_numpy().tolist()
        batch = TokenBatch(
            schema="token_batch/1",
            batch_id=secrets.token_hex(16),
            county=county,
            token_spec=ref,
            columns=columns,
            rows=rows,
        )
        store.store_batch(batch, epoch=1)
    try:
        write_threshold(config, 0.999)
        settings = load_settings(MatcherSettings, config)
        index = LinkIndex(store, registry(), model=model, threshold=settings.threshold)
        strict = index.relink()
        lowest = store.query("SELECT min(match_probability) AS p FROM pairs")["p"].iloc[0]
        assert strict["threshold"] == 0.999 and lowest >= 0.999

        write_threshold(config, 0.05)
        settings = load_settings(MatcherSettings, config)
        loose = LinkIndex(store, registry(), threshold=settings.threshold).relink()
        assert loose["threshold"] == 0.05
        assert loose["pairs"] > strict["pairs"]
    finally:
        store.close()
