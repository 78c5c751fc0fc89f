"""The one factory that builds a SparkSession from configuration."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pyspark.sql import SparkSession

from llmrec_spark.config import Config, is_uri

log = logging.getLogger(__name__)


def build_spark(cfg: Config) -> SparkSession:
    """Create (or reuse) the session described by `cfg.spark`, with Arrow on and a checkpoint dir."""
    local = cfg.spark.master.startswith("local")
    java_options = f"-Dderby.system.home={_scratch(cfg)}"
    if local:
        # Local Python workers must run this interpreter, or pandas UDFs cannot import
        # pandas/torch. On a cluster the executors' Python comes from spark-submit
        # (--archives venv, spark.pyspark.python), not from the driver's path.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        # Everything of a local run is on this machine: bind to loopback. Otherwise, where the
        # host name resolves to 127.0.0.1, the JVM warns that it picks another interface and
        # to set SPARK_LOCAL_IP (spark.driver.host does not stop it). The Spark UI, when
        # enabled, then listens on 127.0.0.1 only. Read when the JVM starts.
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        log4j2 = _local_log4j2(cfg)
        if log4j2:
            java_options += f" -Dlog4j2.configurationFile={log4j2}"
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
        .config("spark.driver.extraJavaOptions", java_options)
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
    log.info(
        "spark %s master=%s checkpoints=%s",
        spark.version,
        spark.sparkContext.master,
        checkpoint_dir,
    )
    return spark


# Spark's log4j2 defaults (org/apache/spark/log4j2-defaults.properties) at the level build_spark
# sets anyway, with the warnings every local run printed and no user can act on made quiet.
LOCAL_LOG4J2 = """\
# Written by llmrec_spark.runtime.session.build_spark for local Spark; Spark's defaults plus the last two.
rootLogger.level = warn
rootLogger.appenderRef.stderr.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
logger.jetty.name = org.sparkproject.jetty
logger.jetty.level = warn
logger.jetty_lifecycle.name = org.sparkproject.jetty.util.component.AbstractLifeCycle
logger.jetty_lifecycle.level = error
logger.hive_metastore.name = org.apache.hadoop.hive.metastore.RetryingHMSHandler
logger.hive_metastore.level = fatal
logger.hive_functions.name = org.apache.hadoop.hive.ql.exec.FunctionRegistry
logger.hive_functions.level = error
logger.parquet_stats.name = org.apache.parquet.CorruptStatistics
logger.parquet_stats.level = error
# pip's pyspark has no libhadoop.so; Hadoop's Java code does the same work.
logger.hadoop_native.name = org.apache.hadoop.util.NativeCodeLoader
logger.hadoop_native.level = error
# MLlib's Java BLAS wants the JDK's incubating Vector API, which the JVM warns about when it is
# enabled; without it, the level-1 calls fall back to F2J. Only that message is dropped: the
# native BLAS/LAPACK warnings (JNIBLAS, JNILAPACK) still show (`make native-blas`).
logger.netlib_blas.name = dev.ludovic.netlib.blas.InstanceBuilder
logger.netlib_blas.filter.vector_api.type = RegexFilter
logger.netlib_blas.filter.vector_api.regex = .*VectorBLAS.*
logger.netlib_blas.filter.vector_api.onMatch = DENY
logger.netlib_blas.filter.vector_api.onMismatch = NEUTRAL
"""


def _local_log4j2(cfg: Config) -> str | None:
    """Path of LOCAL_LOG4J2, written to the scratch folder; None where the user's Spark conf
    folder has its own log4j2.properties (theirs wins)."""
    spark_home = os.environ.get("SPARK_HOME")
    conf_dir = os.environ.get("SPARK_CONF_DIR") or (spark_home and os.path.join(spark_home, "conf"))
    if conf_dir and os.path.isfile(os.path.join(conf_dir, "log4j2.properties")):
        return None
    path = Path(_scratch(cfg)) / "log4j2.properties"
    path.write_text(LOCAL_LOG4J2)
    return str(path)


def _scratch(cfg: Config) -> str:
    """A local folder for Derby's home and the local log4j2 file: `_scratch` under the lakehouse
    when that is a local path, else under the machine's temp folder (an s3a:// or dbfs:/
    lakehouse is no place for either, and a Path would fold its `//`)."""
    lakehouse = cfg.path(cfg.storage.lakehouse)
    base = Path(tempfile.gettempdir()) / "llmrec-spark" if is_uri(lakehouse) else Path(lakehouse)
    path = base / "_scratch"
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
