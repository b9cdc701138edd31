"""Where Splink runs: one small interface over its DuckDB (default) and Spark backends.

Everything the pipeline and the matcher ask of Splink goes through :class:`SplinkEngine`, so the
rest of the code never touches a backend directly and a model JSON runs unchanged on either.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from linkage.errors import ModelError
from linkage.model import SOURCE, UNIQUE_ID, LinkageModel

__all__ = ["Engine", "SplinkEngine"]

Engine = Literal["duckdb", "spark"]

logger = logging.getLogger(__name__)
# Splink logs every SQL step at INFO; the pipeline reports progress itself.
logging.getLogger("splink").setLevel(logging.WARNING)

#: Bin width (in match-weight units) of the histogram used to calibrate a model.
_HISTOGRAM_BIN = 0.05


def _logit2(p: float) -> float:
    return math.log2(p / (1.0 - p))


class SplinkEngine:
    """Runs Splink on one backend.

    Args:
        engine: ``"duckdb"`` (embedded, the default) or ``"spark"``.
        connection: An existing DuckDB connection (the matcher passes its store's), or a
            SparkSession for ``"spark"``; a fresh in-memory DuckDB if omitted.
    """

    def __init__(self, engine: Engine = "duckdb", *, connection: Any = None) -> None:
        self.engine = engine
        if engine == "duckdb":
            from splink import DuckDBAPI

            self.connection: Any = connection or duckdb.connect()
            self.db_api: Any = DuckDBAPI(connection=self.connection)
        elif engine == "spark":
            from splink import SparkAPI

            if connection is None:
                raise ModelError("the spark engine needs a SparkSession")
            self.connection = connection
            self.db_api = SparkAPI(spark_session=connection)
        else:
            raise ModelError(f"unknown engine {engine!r}; use 'duckdb' or 'spark'")
        self._generation = 0

    def register(self, tables: Mapping[str, Any]) -> dict[str, Any]:
        """Register county token tables, each under its county id (once per engine).

        Args:
            tables: County id -> pandas or Arrow token table.

        Returns:
            County id -> Splink's handle for the registered table, to pass to :meth:`linker`.
        """
        registered = {}
        for county, table in tables.items():
            if not isinstance(table, pa.Table):
                table = pa.Table.from_pandas(table, preserve_index=False)
            self._generation += 1
            registered[county] = self.db_api.register(
                table,
                table_name=f"tokens_{self._generation}_{county}",
                dataset_display_name=county,
            )
        return registered

    def count_rows(self, registered: Mapping[str, Any]) -> int:
        """Total rows over registered tables."""
        union = " UNION ALL ".join(
            f"SELECT count(*) AS n FROM {t.physical_name}" for t in registered.values()
        )
        return int(self._query(f"SELECT sum(n) AS n FROM ({union})")["n"].iloc[0])

    def linker(self, registered: Mapping[str, Any], settings: dict[str, Any]) -> Any:
        """A Splink linker over registered county token tables (see :meth:`register`)."""
        from splink import Linker

        return Linker(list(registered.values()), settings, log_level=logging.WARNING)

    def predict(
        self, model: LinkageModel, registered: Mapping[str, Any], *, min_bayes_log2: float = 0.0
    ) -> Any:
        """Score every blocked candidate pair; returns Splink's result handle.

        Args:
            model: The model to score with.
            registered: Registered county tables (:meth:`register`).
            min_bayes_log2: Keep only pairs whose evidence (match weight less the prior) is at
                least this; the default keeps pairs the evidence favours at all. Pairs below
                it cannot reach any useful threshold, and dropping them in SQL keeps a
                million-record link from materialising tens of millions of rows.
        """
        linker = self.linker(registered, model.settings)
        return linker.inference.predict(
            threshold_match_weight=min_bayes_log2 + _logit2(model.prior), warning_mode="never"
        )

    def bayes_histogram(
        self, predictions: Any, model: LinkageModel
    ) -> tuple[np.ndarray, np.ndarray]:
        """Histogram of candidate pairs' log2 Bayes factors: (bin centres, counts)."""
        offset = _logit2(model.prior)
        sql = (
            f"SELECT round((match_weight - {offset}) / {_HISTOGRAM_BIN}) * {_HISTOGRAM_BIN} AS w, "
            f"count(*) AS c FROM {predictions.physical_name} GROUP BY 1"
        )
        frame = self._query(sql)
        return frame["w"].to_numpy(dtype=float), frame["c"].to_numpy(dtype=float)

    def count_predictions(self, predictions: Any) -> int:
        """Number of candidate pairs in a prediction result."""
        return int(
            self._query(f"SELECT count(*) AS n FROM {predictions.physical_name}")["n"].iloc[0]
        )

    def select_pairs(
        self, predictions: Any, scored_with: LinkageModel, model: LinkageModel
    ) -> pd.DataFrame:
        """Pairs at or above ``model``'s threshold, re-scored with ``model``'s prior.

        Args:
            predictions: Result of :meth:`predict` made with ``scored_with``.
            scored_with: The model (prior) the predictions were made with.
            model: The calibrated model whose prior and threshold apply.

        Returns:
            Columns ``county_l, pseudonym_l, county_r, pseudonym_r, match_weight,
            match_probability`` and one ``mw_<comparison>`` (partial match weight) column
            per comparison.
        """
        shift = _logit2(model.prior) - _logit2(scored_with.prior)
        gammas = [f"mw_{c['output_column_name']}" for c in model.settings["comparisons"]]
        sql = f"""
            SELECT {SOURCE}_l AS county_l, {UNIQUE_ID}_l AS pseudonym_l,
                   {SOURCE}_r AS county_r, {UNIQUE_ID}_r AS pseudonym_r,
                   match_weight + {shift} AS match_weight,
                   1.0 / (1.0 + pow(2.0, -(match_weight + {shift}))) AS match_probability,
                   {", ".join(gammas)}
            FROM {predictions.physical_name}
            WHERE match_weight + {shift} >= {model.threshold_match_weight}
        """
        return self._query(sql)

    def _query(self, sql: str) -> pd.DataFrame:
        if self.engine == "duckdb":
            return self.connection.execute(sql).df()
        return self.connection.sql(sql).toPandas()
