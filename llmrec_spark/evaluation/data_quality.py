"""Data-quality views over the pipeline's own tables (for notebooks and reports)."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql import functions as F


def stage_counts(runs: DataFrame, *, stage: str) -> DataFrame:
    """The latest successful run of `stage` per date with its row counts, newest date first."""
    latest = (
        runs.where((F.col("stage") == stage) & (F.col("status") == "ok"))
        .groupBy("ds")
        .agg(F.max_by(F.struct(*[c for c in runs.columns if c != "ds"]), "started_at").alias("run"))
    )
    return latest.select("ds", "run.*").orderBy(F.col("ds").desc())


def quarantine_reasons(quarantine: DataFrame) -> DataFrame:
    """Quarantined records per landing date and reason code."""
    return (
        quarantine.select("ds", F.explode("reasons").alias("reason"))
        .groupBy("ds", "reason")
        .count()
        .orderBy(F.col("ds").desc(), F.col("count").desc())
    )
