"""The one factory that builds a SparkSession from configuration."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from pyspark.sql import SparkSession

from llmrec_spark.config import Config

log = logging.getLogger(__name__)


def build_spark(cfg: Config) -> SparkSession:
    """Create (or reuse) the session described by `cfg.spark`, with Arrow on and a checkpoint dir."""
    if cfg.spark.master.startswith("local"):
        # Local Python workers must run this interpreter, or pandas UDFs cannot import
        # pandas/torch. On a cluster the executors' Python comes from spark-submit
        # (--archives venv, spark.pyspark.python), not from the driver's path.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    builder = SparkSession.builder
    if cfg.spark.master:  # empty on a cluster: spark-submit's --master decides
        builder = builder.master(cfg.spark.master)
    builder = (
        builder.appName(cfg.spark.app_name)
        .config("spark.sql.shuffle.partitions", str(cfg.spark.shuffle_partitions))
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.execution.arrow.pyspark.fallback.enabled", "false")
        # Delta readers other than Spark (delta-rs, Polars, DuckDB) expect INT64 timestamps.
        .config("spark.sql.parquet.outputTimestampType", "TIMESTAMP_MICROS")
        .config("spark.ui.enabled", str(cfg.spark.ui_enabled).lower())
        .config("spark.ui.showConsoleProgress", "true")
        .config("spark.driver.memory", cfg.spark.driver_memory)
        .config(
            "spark.sql.warehouse.dir", cfg.path(os.path.join(cfg.storage.lakehouse, "_warehouse"))
        )
        .config("spark.driver.extraJavaOptions", f"-Dderby.system.home={_scratch(cfg)}")
        # MLlib's guide: native BLAS single-threaded in each task, or every task's OpenBLAS
        # threads compete for the executor's cores. (A local-mode executor is the driver JVM,
        # which inherits this process's environment; measured on 2 cores, ALS at rank 64 is
        # the same either way: OpenBLAS does not thread its small dspr/dppsv calls.)
        .config("spark.executorEnv.OPENBLAS_NUM_THREADS", "1")
    )
    for key, value in cfg.spark.extra.items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel(cfg.spark.log_level)
    checkpoint_dir = cfg.path(cfg.storage.checkpoint_dir)
    spark.sparkContext.setCheckpointDir(checkpoint_dir)
    log.info("spark %s master=%s checkpoints=%s", spark.version, cfg.spark.master, checkpoint_dir)
    return spark


def _scratch(cfg: Config) -> str:
    path = Path(cfg.path(cfg.storage.lakehouse)) / "_scratch"
    if "://" not in str(path):
        path.mkdir(parents=True, exist_ok=True)
    return str(path)


@contextlib.contextmanager
def session_conf(spark: SparkSession, key: str, value: str) -> Iterator[None]:
    """Set one SQL conf of `spark` for the duration of the block, then restore its value."""
    previous = spark.conf.get(key, None)
    spark.conf.set(key, value)
    try:
        yield
    finally:
        if previous is None:
            spark.conf.unset(key)
        else:
            spark.conf.set(key, previous)
