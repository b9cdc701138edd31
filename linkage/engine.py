"""Where Splink runs: one small interface over its DuckDB (default) and Spark backends.

Everything the pipeline and the matcher ask of Splink goes through :class:`SplinkEngine`, so the
rest of the code never touches a backend directly and a model JSON runs unchanged on either.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import re
import shutil
import tempfile
import warnings
import weakref
from collections.abc import Mapping
from pathlib import Path
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
#: Spark master of a session the engine starts itself (issue 8).
DEFAULT_SPARK_MASTER = "local[2]"


def _logit2(p: float) -> float:
    return math.log2(p / (1.0 - p))


class SplinkEngine:
    """Runs Splink on one backend.

    Args:
        engine: ``"duckdb"`` (embedded, the default) or ``"spark"``.
        connection: An existing DuckDB connection (the matcher passes its store's), or a
            SparkSession for ``"spark"``; a fresh in-memory DuckDB, or a Spark session made
            by :func:`spark_session`, if omitted.
        spark_master: Master URL of the session made when none is given (``local[2]``,
            ``spark://host:7077``, ``yarn``, ...). A session already active in the process
            is joined instead (and left running by :meth:`close`).
        spark_conf: Extra Spark settings for that session (they override the defaults).

    Raises:
        ModelError: An unknown engine; Spark could not start (pyspark or Java missing); or a
            cluster session has no ``spark.checkpoint.dir``.
    """

    def __init__(
        self,
        engine: Engine = "duckdb",
        *,
        connection: Any = None,
        spark_master: str = DEFAULT_SPARK_MASTER,
        spark_conf: Mapping[str, str] | None = None,
    ) -> None:
        self.engine = engine
        self._scratch: Path | None = None
        self._owns_session = False
        if engine == "duckdb":
            from splink import DuckDBAPI

            self.connection: Any = connection or duckdb.connect()
            self.db_api: Any = DuckDBAPI(connection=self.connection)
        elif engine == "spark":
            try:
                from pyspark.sql import SparkSession
                from splink.backends.spark import SparkAPI
            except ImportError as e:
                raise ModelError(
                    "the spark engine needs pyspark: pip install 'jigsaw-linkage[spark]'"
                ) from e
            # PySpark 4.3 warns on every pandas conversion that pandas 3 is not yet fully
            # supported; the engine hands Spark Arrow tables and reads Arrow back.
            warnings.filterwarnings(
                "ignore",
                message="PySpark does not yet fully support pandas",
                category=FutureWarning,
            )
            if connection is None and SparkSession.getActiveSession() is None:
                self._scratch = self._new_scratch()
                self._owns_session = True
                connection = spark_session(spark_master, scratch=self._scratch, conf=spark_conf)
            self.connection = connection or SparkSession.getActiveSession()
            # Splink writes intermediate tables as parquet under the checkpoint folder, which
            # every executor must reach: a private temporary folder on one machine only.
            context = self.connection.sparkContext
            if context.getCheckpointDir() is None:
                if not str(context.master).startswith("local"):
                    raise ModelError(
                        "the spark engine on a cluster needs spark.checkpoint.dir on storage "
                        "every executor reaches (see docs/scaling.md)"
                    )
                self._scratch = self._scratch or self._new_scratch()
                context.setCheckpointDir(str(self._scratch / "checkpoints"))
            # Our comparisons use built-in SQL only; Splink's similarity UDF jar is registered
            # only when the session was started with it on spark.jars.
            jars = self.connection.conf.get("spark.jars", "") or ""
            self.db_api = SparkAPI(
                spark_session=self.connection,
                register_udfs_automatically="splink" in jars.lower(),
                # Splink materialises each step as parquet under the checkpoint folder. (Kept
                # in memory instead, a million-record link filled a 7 GB local driver with
                # cached pairs and stalled in garbage collection.)
                break_lineage_method="parquet",
            )
        else:
            raise ModelError(f"unknown engine {engine!r}; use 'duckdb' or 'spark'")
        self._generation = 0

    def _new_scratch(self) -> Path:
        """A private temporary folder, removed by :meth:`close` or, failing that, at exit."""
        path = Path(tempfile.mkdtemp(prefix="jigsaw-spark-"))
        weakref.finalize(self, shutil.rmtree, path, ignore_errors=True)
        return path

    def close(self) -> None:
        """Stop the Spark session this engine started, and remove its scratch folder.

        A DuckDB connection or Spark session passed in is left open for its owner.
        """
        if self._owns_session:
            self.connection.stop()
            self._owns_session = False
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def release(self) -> None:
        """Drop the tables Splink and :meth:`register` made in a Spark session (and their
        parquet, when checkpoints are local); the pipeline calls this after each full link.
        No-op on DuckDB, whose in-memory tables go with their connection."""
        if self.engine != "spark":
            return
        checkpoints = self.connection.sparkContext.getCheckpointDir() or ""
        for table in self.connection.catalog.listTables():
            if table.isTemporary and table.name.startswith(("__splink__", "tokens_")):
                self.connection.catalog.dropTempView(table.name)
                # Splink wrote the table's parquet there; on a cluster's shared storage the
                # files are the operator's to clear (docs/scaling.md).
                if checkpoints.startswith("file:"):
                    shutil.rmtree(
                        Path(checkpoints.removeprefix("file:")) / table.name, ignore_errors=True
                    )

    def __enter__(self) -> SplinkEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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
            # A county id may hold "-", which Spark SQL would read as a minus.
            safe = re.sub(r"[^0-9a-z_]", "_", county.lower())
            name = f"tokens_{self._generation}_{safe}"
            registered[county] = self.db_api.register(
                self._spark_table(table, name) if self.engine == "spark" else table,
                table_name=name,
                dataset_display_name=county,
            )
        return registered

    def _spark_table(self, table: pa.Table, name: str) -> Any:
        """A token table as a Spark DataFrame read from parquet under the checkpoint folder.

        Spark keeps a DataFrame made from local data in the driver and carries it in every
        query plan; written out once and read back, the tokens are ordinary files that the
        executors read (on a cluster the checkpoint folder is shared storage).
        """
        path = f"{self.connection.sparkContext.getCheckpointDir()}/{name}"
        self.connection.createDataFrame(table).write.mode("overwrite").parquet(path)
        return self.connection.read.parquet(path)

    def count_rows(self, registered: Mapping[str, Any]) -> int:
        """Total rows over registered tables."""
        union = " UNION ALL ".join(
            f"SELECT count(*) AS n FROM {t.physical_name}" for t in registered.values()
        )
        return int(self._query(f"SELECT sum(n) AS n FROM ({union})")["n"].iloc[0])

    def linker(self, registered: Mapping[str, Any], settings: dict[str, Any]) -> Any:
        """A Splink linker over registered county token tables (see :meth:`register`)."""
        from splink import Linker

        linker = Linker(list(registered.values()), settings, log_level=logging.WARNING)
        if self.engine == "spark":
            # Splink samples u in up to eleven chunks per comparison, one Spark job each, to
            # bound memory; on Spark the jobs' fixed cost (about a second each) then outweighs
            # the work, and a sample of a few million pairs fits any executor: one chunk.
            training = linker.training
            training.estimate_u_using_random_sampling = functools.partial(  # type: ignore[method-assign]
                training.estimate_u_using_random_sampling, num_chunks=1
            )
        return linker

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
        # Arrow, not toPandas(): no row-by-row conversion, and nullable integers stay integers.
        frame: pd.DataFrame = self.connection.sql(sql).toArrow().to_pandas()
        return frame


# ---------------------------------------------------------------------------- Spark (issue 8)


def _driver_memory() -> str:
    """A third of this machine's memory for a local driver (8g on 24 GiB), 1g to 16g."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return "4g"
    return f"{max(1, min(16, int(total / 3 / 2**30)))}g"


def _spark_defaults_keys() -> set[str]:
    """Keys set in ``$SPARK_CONF_DIR/spark-defaults.conf`` (read by spark-submit itself)."""
    folder = os.environ.get("SPARK_CONF_DIR")
    if not folder:
        return set()
    try:
        lines = (Path(folder) / "spark-defaults.conf").read_text().splitlines()
    except OSError:
        return set()
    return {ln.split()[0] for ln in lines if ln.strip() and not ln.lstrip().startswith("#")}


def spark_session(
    master: str = DEFAULT_SPARK_MASTER,
    *,
    scratch: Path,
    conf: Mapping[str, str] | None = None,
) -> Any:
    """Start (or join) a SparkSession for the matcher.

    Local masters get a driver that holds a third of the machine's memory, a few shuffle
    partitions (adaptive execution merges small ones), no UI, loopback only and error-only
    logs; spilled data and Splink's checkpoints go under ``scratch``. A setting in Spark's own
    ``spark-defaults.conf`` (under ``$SPARK_CONF_DIR``) wins over these defaults, and one in
    ``conf`` wins over both (for a cluster: executor memory and cores, shuffle partitions,
    ``spark.checkpoint.dir`` on shared storage).

    Args:
        master: Master URL.
        scratch: A private folder for spills, the warehouse and checkpoints.
        conf: Extra or overriding Spark settings.

    Raises:
        ModelError: pyspark is not installed or the JVM did not start (no Java).
    """
    try:
        from pyspark.sql import SparkSession
    except ImportError as e:
        raise ModelError(
            "the spark engine needs pyspark: pip install 'jigsaw-linkage[spark]'"
        ) from e
    scratch.mkdir(parents=True, exist_ok=True)
    log4j = scratch / "log4j2.properties"
    # Errors only; the REPL logger too, or Spark resets the root level to WARN and says so.
    # The code generator is silenced: the scoring query's generated class exceeds the JVM's
    # 64 KB method limit, and Spark then logs the failure with a long stack trace as an error
    # before it falls back, as designed, to compiling each operator on its own.
    log4j.write_text(
        "rootLogger.level = error\nrootLogger.appenderRef.stderr.ref = console\n"
        "logger.repl.name = org.apache.spark.repl.Main\nlogger.repl.level = error\n"
        "logger.codegen.name = org.apache.spark.sql.catalyst.expressions.codegen.CodeGenerator\n"
        "logger.codegen.level = off\n"
        "appender.console.type = Console\nappender.console.name = console\n"
        "appender.console.target = SYSTEM_ERR\nappender.console.layout.type = PatternLayout\n"
        "appender.console.layout.pattern = %d{HH:mm:ss} %p %c{1}: %m%n\n"
    )
    local = master.startswith("local")
    settings: dict[str, str] = {
        "spark.app.name": "jigsaw-matcher",
        "spark.ui.enabled": "false",
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.adaptive.enabled": "true",
        "spark.sql.adaptive.coalescePartitions.enabled": "true",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.execution.arrow.pyspark.fallback.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.warehouse.dir": str(scratch / "warehouse"),
        "spark.local.dir": str(scratch / "local"),
    }
    java_options = f"-Dlog4j2.configurationFile=file:{log4j}"
    if local:
        settings.update(
            {
                "spark.driver.memory": _driver_memory(),
                "spark.driver.host": "127.0.0.1",
                "spark.driver.bindAddress": "127.0.0.1",
                "spark.sql.shuffle.partitions": "8",
                "spark.default.parallelism": "4",
            }
        )
    for key in _spark_defaults_keys():
        settings.pop(key, None)
    settings.update(conf or {})
    extra = settings.get("spark.driver.extraJavaOptions", "")
    settings["spark.driver.extraJavaOptions"] = f"{java_options} {extra}".strip()
    # The driver binds to loopback only; say so before the JVM starts, so it does not look
    # its own host name up on the network.
    if local:
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    builder = SparkSession.builder.master(master)
    for key, value in settings.items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as e:  # py4j and the launcher raise bare Exceptions (no Java, say)
        raise ModelError(f"cannot start Spark ({master}): {e}") from e
    session.sparkContext.setLogLevel("ERROR")
    return session
