"""`llmrec bench delta-write` at a few hundred rows: the fields, and the ratio from the timings."""

from __future__ import annotations

import itertools
import types

import pytest

from llmrec_spark.bench import delta_write
from llmrec_spark.bench.delta_write import (
    bench_delta_write,
    measure_delta_write,
    recommendations_rows,
)

pytestmark = pytest.mark.spark


def test_the_rows_are_shaped_like_recommendations_of_one_day(spark):
    rows = [r.asDict() for r in recommendations_rows(spark, 3).drop("score").collect()]
    common = {"source": "hybrid", "model_version": "bench", "ds": "2026-01-01"}
    assert rows == [
        {"user_id": "0", "rank": 1, "item_id": "0", **common},
        {"user_id": "1", "rank": 2, "item_id": "7919", **common},
        {"user_id": "2", "rank": 3, "item_id": "15838", **common},
    ]


def test_the_ratio_is_the_best_parquet_write_over_the_best_delta_write(spark, monkeypatch):
    # perf_counter readings: (start, parquet done, start, delta done) per run.
    # Parquet takes 2.0 s then 1.0 s; Delta 4.0 s then 2.5 s: best 1.0 / best 2.5.
    clock = iter([0.0, 2.0, 2.0, 6.0, 10.0, 11.0, 11.0, 13.5])
    monkeypatch.setattr(
        delta_write, "time", types.SimpleNamespace(perf_counter=lambda: next(clock))
    )
    result = measure_delta_write(spark, recommendations_rows(spark, 200), runs=2)
    assert result == {
        "parquet_seconds": 1.0,
        "delta_seconds": 2.5,
        "delta_write_ratio": 0.4,
        "target_delta_write_ratio": 0.8,
        "runs": 2,
        "timing": "best of 2",
    }
    assert list(itertools.islice(clock, 1)) == []  # every reading was used


def test_a_real_run_reports_its_timings_and_their_ratio(spark):
    result = bench_delta_write(spark, rows=300, runs=1)
    assert result["rows"] == 300 and result["runs"] == 1 and result["timing"] == "best of 1"
    assert result["parquet_seconds"] > 0 and result["delta_seconds"] > 0
    assert result["delta_write_ratio"] == pytest.approx(
        result["parquet_seconds"] / result["delta_seconds"], rel=0.02
    )
