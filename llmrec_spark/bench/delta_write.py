"""`llmrec bench delta-write`: the embedded Delta write against a plain Parquet write.

Both sides write the same recommendations-shaped rows (one `ds` partition) in the same
session; the ratio is Parquet seconds / Delta seconds, so 1.0 means Delta costs nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from typing import Any

from llmrec_spark.config import Config

# Rows of the benchmark's recommendations table: 100,000 users x top 20.
ROWS = 2_000_000
RUNS = 3


def run(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    """The benchmark at its full size in a session built from `cfg`; `options` are unused."""
    from llmrec_spark.runtime.session import build_spark

    spark = build_spark(cfg)
    try:
        return bench_delta_write(spark, rows=ROWS, runs=RUNS)
    finally:
        spark.stop()


def bench_delta_write(spark: Any, *, rows: int, runs: int) -> dict[str, Any]:
    """`measure_delta_write` on `rows` synthetic recommendations rows, cached before the timing."""
    df = recommendations_rows(spark, rows).cache()
    df.count()
    try:
        return {"rows": rows, **measure_delta_write(spark, df, runs=runs)}
    finally:
        df.unpersist()


def recommendations_rows(spark: Any, rows: int) -> Any:
    """`rows` rows shaped like the recommendations table: 20 ranks per user, one `ds`."""
    from pyspark.sql import functions as F

    return spark.range(rows).select(
        (F.col("id") % 100_000).cast("string").alias("user_id"),
        ((F.col("id") % 20) + 1).cast("int").alias("rank"),
        (F.col("id") * 7919 % 20_000).cast("string").alias("item_id"),
        (F.rand(3) * 10).cast("float").alias("score"),
        F.lit("hybrid").alias("source"),
        F.lit("bench").alias("model_version"),
        F.lit("2026-01-01").alias("ds"),
    )


def measure_delta_write(spark: Any, df: Any, *, runs: int = 3) -> dict[str, Any]:
    """Best-of-`runs` plain Parquet write of `df` (recommendations rows, one ds) vs the embedded Delta overwrite."""
    from llmrec_spark.io.tables import EmbeddedDeltaEngine

    ds = df.select("ds").first()["ds"]
    scratch = tempfile.mkdtemp(prefix="llmrec-bench-")
    try:
        timings: dict[str, list[float]] = {"parquet": [], "delta": []}
        store = EmbeddedDeltaEngine(spark, os.path.join(scratch, "lake"))
        for attempt in range(runs):
            started = time.perf_counter()
            df.write.mode("overwrite").partitionBy("ds").parquet(
                os.path.join(scratch, f"plain{attempt}")
            )
            timings["parquet"].append(time.perf_counter() - started)
            started = time.perf_counter()
            store.overwrite("recommendations", df, partitions={"ds": ds})
            timings["delta"].append(time.perf_counter() - started)
        parquet_s, delta_s = min(timings["parquet"]), min(timings["delta"])
        return {
            "parquet_seconds": round(parquet_s, 3),
            "delta_seconds": round(delta_s, 3),
            "delta_write_ratio": round(parquet_s / delta_s, 3),
            "target_delta_write_ratio": 0.8,
            "runs": runs,
            "timing": f"best of {runs}",
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
