"""The Spark engine gives the same links as DuckDB: one model JSON, two backends.

A model trained once on DuckDB is applied to the same token tables on both engines, which must
agree on every pair, its probability (to 1e-6), its partial match weights, and on the clusters
and families. Training on Spark must land near DuckDB's parameters (EM is the same; u comes
from each engine's own random sample). ``jigsaw link --engine spark`` writes what the DuckDB
run writes.

One local Spark session serves the module (start-up alone takes tens of seconds). The module
skips only when there is no Java to run Spark on; pyspark itself is a dev dependency.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from linkage.engine import SplinkEngine
from linkage.model import LinkageModel, TrainingOptions
from linkage.pipeline import MatchResult, match_tokens, prepare_county
from linkage.synthetic import SyntheticFederation, generate_federation, write_federation
from linkage.tokenise import Tokeniser

if shutil.which("java") is None:
    pytest.skip("the Spark engine needs Java (java not on PATH)", allow_module_level=True)

pytestmark = [
    pytest.mark.slow,
    # pyspark 4.3 warns on import that it does not yet fully support pandas 3; the engine
    # exchanges Arrow tables with Spark, not pandas frames.
    pytest.mark.filterwarnings("ignore:PySpark does not yet fully support pandas:FutureWarning"),
]

PAIR_KEY = ["county_l", "pseudonym_l", "county_r", "pseudonym_r"]
#: Sampling sizes small enough for a quick test; the same on both engines.
TRAINING = TrainingOptions(u_max_pairs=3e5, seed=7)


@pytest.fixture(scope="module")
def federation() -> SyntheticFederation:
    """Three counties of about 600 records each."""
    return generate_federation(counties=3, records=1800, seed=23)


@pytest.fixture(scope="module")
def tables(federation: SyntheticFederation, tokeniser: Tokeniser) -> dict[str, pd.DataFrame]:
    return {
        county: prepare_county(county, raw, tokeniser, seed=i).tokens
        for i, (county, raw) in enumerate(federation.counties.items())
    }


#: Settings for a short-lived test session: two shuffle partitions for tiny tables, and the
#: JVM's quick compiler only (the optimising one costs more than it saves in a minute's run).
TEST_SPARK_CONF = {
    "spark.sql.shuffle.partitions": "2",
    "spark.driver.extraJavaOptions": "-XX:TieredStopAtLevel=1 -XX:ReservedCodeCacheSize=256m",
}


@pytest.fixture(scope="module")
def spark() -> Iterator[SplinkEngine]:
    """The module's Spark engine (a local[2] session of its own)."""
    engine = SplinkEngine("spark", spark_conf=TEST_SPARK_CONF)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def trained(tables: dict[str, pd.DataFrame], tokeniser: Tokeniser) -> MatchResult:
    """Trained and calibrated on DuckDB."""
    spec = tokeniser.spec
    return match_tokens(
        tables, training=TRAINING, spec_fingerprint=spec.fingerprint, bloom=spec.bloom
    )


@pytest.fixture(scope="module")
def on_duckdb(tables: dict[str, pd.DataFrame], trained: MatchResult) -> MatchResult:
    return match_tokens(tables, model=trained.model)


@pytest.fixture(scope="module")
def on_spark(
    tables: dict[str, pd.DataFrame], trained: MatchResult, spark: SplinkEngine
) -> MatchResult:
    return match_tokens(tables, model=trained.model, engine=spark)


def test_spark_scores_the_same_pairs_as_duckdb(
    on_duckdb: MatchResult, on_spark: MatchResult
) -> None:
    assert len(on_duckdb.pairs) > 300
    assert on_spark.candidate_pairs == on_duckdb.candidate_pairs
    joined = on_duckdb.pairs.merge(
        on_spark.pairs, on=PAIR_KEY, how="outer", suffixes=("_duckdb", "_spark"), indicator=True
    )
    assert (joined["_merge"] == "both").all(), joined["_merge"].value_counts()
    diff = (joined["match_probability_duckdb"] - joined["match_probability_spark"]).abs()
    assert diff.max() <= 1e-6
    weights = [c for c in on_duckdb.pairs.columns if c == "match_weight" or c.startswith("mw_")]
    assert len(weights) == 8
    for column in weights:
        gap = (joined[f"{column}_duckdb"] - joined[f"{column}_spark"]).abs().max()
        assert gap <= 1e-9, column


def test_spark_gives_the_same_clusters_and_families(
    on_duckdb: MatchResult, on_spark: MatchResult
) -> None:
    assert on_duckdb.clusters.members["cluster_id"].nunique() > 100
    pd.testing.assert_frame_equal(on_spark.clusters.members, on_duckdb.clusters.members)
    pd.testing.assert_frame_equal(on_spark.families, on_duckdb.families)


def test_spark_releases_its_tables_after_a_link(on_spark: MatchResult, spark: SplinkEngine) -> None:
    views = [t.name for t in spark.connection.catalog.listTables() if t.isTemporary]
    assert not [v for v in views if v.startswith(("__splink__", "tokens_"))], views


def _level_parameters(model: LinkageModel) -> dict[tuple[str, str], tuple[float, float]]:
    return {
        (c["output_column_name"], level["label_for_charts"]): (
            float(level["m_probability"]),
            float(level["u_probability"]),
        )
        for c in model.settings["comparisons"]
        for level in c["comparison_levels"]
        if not level.get("is_null_level")
    }


def _train(
    engine: SplinkEngine, tables: dict[str, pd.DataFrame], tokeniser: Tokeniser
) -> LinkageModel:
    """Train (without calibrating) on one engine, on the tables as ``match_tokens`` loads them."""
    spec = tokeniser.spec
    registered = engine.register(
        {
            county: table.drop(columns=["household"]).assign(pseudonym=range(len(table)))
            for county, table in sorted(tables.items())
        }
    )
    model = LinkageModel.untrained(spec.bloom, spec_fingerprint=spec.fingerprint)
    return model.train(engine, registered, options=TRAINING)


def test_training_on_spark_lands_near_duckdb(
    tables: dict[str, pd.DataFrame], tokeniser: Tokeniser, spark: SplinkEngine
) -> None:
    duck = _train(SplinkEngine(), tables, tokeniser)
    sprk = _train(spark, tables, tokeniser)
    spark.release()
    assert sprk.trained
    duck_levels, spark_levels = _level_parameters(duck), _level_parameters(sprk)
    assert duck_levels.keys() == spark_levels.keys()
    for level, (m_d, u_d) in duck_levels.items():
        m_s, u_s = spark_levels[level]
        # EM runs on the same blocked pairs: m agrees closely.
        assert m_s == pytest.approx(m_d, abs=0.02), level
        # u comes from each engine's own random sample of records (about 40% of them), so a
        # level's u may move, but its weight by no more than a bit (two for the rarest). The
        # salted name comparisons' u comes from the few sampled pairs that share a salt value
        # with other dates of birth (about one in 700 here): up to three bits.
        salted_name = level[0] in ("given_name", "family_name") and bool(tokeniser.spec.bloom.salts)
        allowed = 3.0 if salted_name else (1.0 if u_d >= 1e-4 else 2.0)
        assert abs(math.log2(u_s / u_d)) <= allowed, level
    # The prior from the deterministic rules counts the same pairs on both.
    assert sprk.prior == pytest.approx(duck.prior, rel=1e-6)


def test_cli_link_with_the_spark_engine_writes_what_duckdb_writes(
    federation: SyntheticFederation,
    trained: MatchResult,
    spark: SplinkEngine,
    test_secret: bytes,
    tmp_path: Path,
) -> None:
    from federation.cli import app

    files = write_federation(federation, tmp_path / "counties")
    model = tmp_path / "model.json"
    trained.model.save(model)
    secret = tmp_path / "secret"
    secret.write_text(test_secret.hex())
    secret.chmod(0o600)
    runner = CliRunner()
    outputs = {}
    for engine in ("duckdb", "spark"):
        out = tmp_path / engine
        args = ["link", *map(str, files), "--out", str(out), "--model", str(model)]
        args += ["--secret-file", str(secret), "--seed", "3", "--engine", engine]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        outputs[engine] = out
    for name in ("pairs.csv", "clusters.csv"):
        duck = pd.read_csv(outputs["duckdb"] / name)
        sprk = pd.read_csv(outputs["spark"] / name)
        assert len(duck) > 0, name
        pd.testing.assert_frame_equal(sprk, duck, check_exact=False, atol=1e-6)
    # Family ids hash household pseudonyms, which are new random ones in each run.
    assert _families(outputs["spark"]) == _families(outputs["duckdb"])


def _families(out: Path) -> set[frozenset[tuple[str, str]]]:
    frame = pd.read_csv(out / "families.csv", dtype=str)
    assert len(frame) > 0
    return {
        frozenset(zip(group["county"], group["household_id"], strict=True))
        for _, group in frame.groupby("family_id")
    }


def test_unknown_engine_is_refused() -> None:
    from linkage.errors import ModelError

    with pytest.raises(ModelError, match="unknown engine"):
        SplinkEngine("sqlite")  # type: ignore[arg-type]
