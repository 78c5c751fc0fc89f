"""`llmrec bench embed` at a tiny size: the catalog it makes, and the JSON it reports."""

from __future__ import annotations

import json

import pytest

from llmrec_spark.bench import embed as bench
from llmrec_spark.bench.embed import BENCH_WORDS, bench_items
from llmrec_spark.core.encoder import resolve_model

N_ITEMS = 24


@pytest.mark.spark
def test_bench_items_are_a_seeded_catalog_of_varied_lengths(spark):
    rows = bench_items(spark, 40).collect()
    assert rows == bench_items(spark, 40).collect()
    assert rows != bench_items(spark, 40, seed=12).collect()
    assert [r.item_id for r in rows[:3]] == ["i000000", "i000001", "i000002"]
    assert (rows[18].category, rows[18].brand, rows[32].brand) == ("cat1", "brand18", "brand1")
    assert {(r.available, r.added_ds) for r in rows} == {("true", "2026-11-01")}
    words = set(BENCH_WORDS)
    for row in rows:
        assert row.title == row.title.title()
        assert 2 <= len(row.title.split()) <= 7
        assert 5 <= len(row.description.split()) <= 119
        assert set(row.description.split()) <= words
    # Lengths vary: the stage's length bucketing has something to do.
    assert len({len(r.description.split()) for r in rows}) > 10


def _rate_of(count: float, seconds: float) -> object:
    """count / seconds, within what rounding seconds to 3 decimals and the rate to 1 allows."""
    expected = count / seconds
    return pytest.approx(expected, abs=expected * 0.0006 / seconds + 0.051)


def _ratio_of(top: float, bottom: float) -> object:
    """top / bottom, within what rounding both to 1 decimal and the ratio to 3 allows."""
    expected = top / bottom
    return pytest.approx(expected, abs=expected * (0.051 / top + 0.051 / bottom) + 0.0006)


@pytest.mark.slow  # loads the model in Spark's Python workers and in sentence-transformers
@pytest.mark.spark
def test_bench_embed_reports_rates_from_its_timed_runs(spark, cfg, monkeypatch):
    monkeypatch.setenv("LLMREC_BENCH_ITEMS", str(N_ITEMS))
    # The test session stands in for the one `run` builds, and outlives it.
    monkeypatch.setattr(bench, "build_spark", lambda _cfg: spark)
    monkeypatch.setattr(spark, "stop", lambda: None)
    result = bench.run(cfg, {})
    assert set(result) == {
        "n_items",
        "model_id",
        "cores",
        "batch_size",
        "max_length",
        "items_per_s",
        "items_per_s_cold",
        "st_items_per_s",
        "ratio_vs_sentence_transformers",
        "ratio_cold_vs_sentence_transformers",
        "embed_seconds",
        "embed_seconds_cold",
        "st_seconds",
        "timing",
    }
    assert result["n_items"] == N_ITEMS
    assert result["model_id"] == resolve_model(cfg.embed.model)[1]
    assert result["cores"] == spark.sparkContext.defaultParallelism
    assert (result["batch_size"], result["max_length"]) == (
        cfg.embed.batch_size,
        cfg.embed.max_length,
    )
    assert result["items_per_s"] == _rate_of(N_ITEMS, result["embed_seconds"])
    assert result["items_per_s_cold"] == _rate_of(N_ITEMS, result["embed_seconds_cold"])
    assert result["st_items_per_s"] == _rate_of(N_ITEMS, result["st_seconds"])
    st_rate = result["st_items_per_s"]
    assert result["ratio_vs_sentence_transformers"] == _ratio_of(result["items_per_s"], st_rate)
    assert result["ratio_cold_vs_sentence_transformers"] == _ratio_of(
        result["items_per_s_cold"], st_rate
    )
    assert json.loads(json.dumps(result)) == result
