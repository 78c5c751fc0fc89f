"""Benchmarks' one home: `llmrec bench NAME` writes bench-results/NAME.json and prints it.

Each benchmark measures this product against the reference it must beat, in the same run
and session, and returns one flat-ish JSON object.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

from llmrec_spark.config import Config
from llmrec_spark.errors import InputError

log = logging.getLogger(__name__)

BenchFn = Callable[[Config], dict[str, Any]]


def _bench_delta_write(cfg: Config) -> dict[str, Any]:
    """Embedded Delta write of a recommendations-shaped table against a plain Parquet write."""
    from pyspark.sql import functions as F

    from llmrec_spark.runtime.session import build_spark

    spark = build_spark(cfg)
    rows = 2_000_000
    df = (
        spark.range(rows)
        .select(
            (F.col("id") % 100_000).cast("string").alias("user_id"),
            ((F.col("id") % 20) + 1).cast("int").alias("rank"),
            (F.col("id") * 7919 % 20_000).cast("string").alias("item_id"),
            (F.rand(3) * 10).cast("float").alias("score"),
            F.lit("hybrid").alias("source"),
            F.lit("bench").alias("model_version"),
            F.lit("2026-01-01").alias("ds"),
        )
        .cache()
    )
    df.count()
    try:
        return {"rows": rows, **measure_delta_write(spark, df, runs=3)}
    finally:
        df.unpersist()
        spark.stop()


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


def _bench_topn(cfg: Config) -> dict[str, Any]:
    """Blocked top-N against MLlib recommendForAllUsers + seen filtering, then the Delta write."""
    from llmrec_spark.runtime.session import build_spark
    from llmrec_spark.stages.recommend import bench_topn

    spark = build_spark(cfg)
    try:
        sizes, rows = bench_topn(
            spark,
            block_size=cfg.recommend.user_block_size,
            runs=int(os.environ.get("LLMREC_BENCH_RUNS", "2")),
        )
        write = measure_delta_write(spark, rows, runs=5)
        write["rows"] = rows.count()
        rows.unpersist()
        return {
            "sizes": sizes,
            "speedup_vs_recommend_for_all": {
                name: size["speedup_vs_recommend_for_all"] for name, size in sizes.items()
            },
            "delta_write_ratio": write["delta_write_ratio"],
            "delta_write": write,
        }
    finally:
        spark.stop()


def _bench_embed(cfg: Config) -> dict[str, Any]:
    from llmrec_spark.runtime.session import build_spark
    from llmrec_spark.stages.embed import bench_embed

    spark = build_spark(cfg)
    try:
        return bench_embed(spark, cfg, n_items=int(os.environ.get("LLMREC_BENCH_ITEMS", "4000")))
    finally:
        spark.stop()


def _bench_clean(cfg: Config) -> dict[str, Any]:
    from llmrec_spark.runtime.session import build_spark
    from llmrec_spark.stages.clean import bench_clean

    spark = build_spark(cfg)
    try:
        return bench_clean(
            spark,
            cfg,
            n_events=int(os.environ.get("LLMREC_BENCH_EVENTS", "5000000")),
            runs=int(os.environ.get("LLMREC_BENCH_RUNS", "2")),
        )
    finally:
        spark.stop()


def _bench_als(cfg: Config) -> dict[str, Any]:
    from llmrec_spark.runtime.session import build_spark
    from llmrec_spark.stages.als import bench_als

    spark = build_spark(cfg)
    try:
        return bench_als(
            spark,
            cfg.als,
            n_interactions=int(os.environ.get("LLMREC_BENCH_INTERACTIONS", "5000000")),
            runs=int(os.environ.get("LLMREC_BENCH_RUNS", "1")),
            with_cholesky=os.environ.get("LLMREC_BENCH_ALS_CHOLESKY", "0") == "1",
        )
    finally:
        spark.stop()


def _bench_distributor(cfg: Config) -> dict[str, Any]:
    from llmrec_spark.bench.distributor import bench_distributor
    from llmrec_spark.runtime.session import build_spark

    spark = build_spark(cfg)
    try:
        return bench_distributor(
            spark,
            cfg,
            n_users=int(os.environ.get("LLMREC_BENCH_USERS", "24000")),
            n_items=int(os.environ.get("LLMREC_BENCH_ITEMS", "5000")),
            runs=int(os.environ.get("LLMREC_BENCH_RUNS", "1")),
        )
    finally:
        spark.stop()


def _bench_cores(cfg: Config) -> dict[str, Any]:
    """The encoder and the tower's training step on the accelerator (if any) against the CPU."""
    from llmrec_spark.bench.cores import bench_cores
    from llmrec_spark.core.encoder import resolve_model

    model_path, _ = resolve_model(cfg.embed.model)
    on_cpu_only = os.environ.get("LLMREC_BENCH_DEVICE", "auto") == "cpu"
    return bench_cores(
        model_path,
        device="cpu" if on_cpu_only else "auto",
        texts=int(os.environ.get("LLMREC_BENCH_TEXTS", "20000")),
        cpu_texts=int(os.environ.get("LLMREC_BENCH_CPU_TEXTS", "1000")),
    )


BENCHMARKS: dict[str, BenchFn] = {
    "als": _bench_als,
    "cores": _bench_cores,
    "distributor": _bench_distributor,
    "clean": _bench_clean,
    "delta-write": _bench_delta_write,
    "embed": _bench_embed,
    "topn": _bench_topn,
}


def _bench_quality(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    from llmrec_spark.bench.quality import bench_quality

    if not options.get("path"):
        raise InputError(
            "bench quality needs the dataset folder: llmrec bench quality --dataset movielens --path DIR"
        )
    return bench_quality(cfg, dataset=options.get("dataset") or "movielens", path=options["path"])


# Benchmarks that take command-line options (--dataset, --path).
BENCHMARKS_WITH_OPTIONS: dict[str, Callable[[Config, dict[str, Any]], dict[str, Any]]] = {
    "quality": _bench_quality,
}


def run_benchmark(
    name: str, cfg: Config, out_dir: str = "bench-results", options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run benchmark `name`, write `<out_dir>/<name>.json`, return the result."""
    names = sorted([*BENCHMARKS, *BENCHMARKS_WITH_OPTIONS])
    if name == "list":
        return {"benchmarks": names}
    if name not in names:
        raise InputError(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    started = time.perf_counter()
    if name in BENCHMARKS_WITH_OPTIONS:
        result = BENCHMARKS_WITH_OPTIONS[name](cfg, dict(options or {}))
    else:
        result = BENCHMARKS[name](cfg)
    result = {
        "benchmark": name,
        **result,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{name}.json"), "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    log.info("bench %s -> %s", name, os.path.join(out_dir, f"{name}.json"))
    return result
