"""`llmrec bench als`: the planted data, the mapping onto `implicit`, the timing summary, and
the whole benchmark at a few thousand interactions."""

from __future__ import annotations

import types

import numpy as np
import pytest

from llmrec_spark.bench import als as bench_als_module
from llmrec_spark.config import AlsConfig, Config

# ---------------------------------------------------------------------------------------------
# Pure parts


def test_implicit_mapping_of_confidence_and_regularization():
    # MLlib's confidence 1 + alpha * w is implicit's stored value (implicit's alpha stays 1).
    assert bench_als_module.implicit_confidence(np.array([0.0, 1.0, 3.0]), 10.0).tolist() == [
        1.0,
        11.0,
        31.0,
    ]
    # 600 pairs over 100 users + 20 items: 10 interactions per solved row on average.
    assert (
        bench_als_module.implicit_regularization(0.05, n_pairs=600, n_users=100, n_items=20) == 0.5
    )


def test_planted_interactions_are_distinct_seeded_and_follow_the_topics():
    data = bench_als_module.planted_interactions(
        20_000, seed=3, n_topics=4, noise=0.0, pairs_per_user=10, users_per_item=25
    )
    keys = data.users.astype(np.int64) * data.n_items + data.items
    assert len(keys) == 20_000 and len(np.unique(keys)) == 20_000
    again = bench_als_module.planted_interactions(
        20_000, seed=3, n_topics=4, noise=0.0, pairs_per_user=10, users_per_item=25
    )
    assert np.array_equal(data.items, again.items) and np.array_equal(data.weights, again.weights)
    # Without noise, a user's items come from the topics of their (sparse) mixture: the
    # user's top topic holds most of them, far above the 1/4 of a structureless draw.
    counts = np.zeros((data.n_users, 4))
    np.add.at(counts, (data.users, data.item_topics[data.items]), 1)
    busy = counts.sum(axis=1) >= 5
    assert (counts[busy].max(axis=1) / counts[busy].sum(axis=1)).mean() > 0.6


def test_timing_summary_takes_each_sides_best_run_and_divides_by_implicits():
    timings = {
        "implicit_cg": [0.5, 0.4],
        "implicit_cholesky": [2.0, 2.5],
        "spark": [3.0, 2.0],
        "spark_cg": [0.9, 0.8],
    }
    assert bench_als_module.timing_summary(timings, solver="cg") == {
        "spark_fit_seconds": 2.0,
        "implicit_fit_seconds": 0.4,
        "solver": "cg",
        "ratio_vs_implicit": 2.0,
        "ratio_vs_implicit_mllib": 5.0,
        "spark_cg_fit_seconds": 0.8,
        "ratio_vs_implicit_cg": 2.0,
        "implicit_cholesky_fit_seconds": 2.0,
        "ratio_vs_implicit_cholesky": 1.0,
    }
    assert bench_als_module.timing_summary({"implicit_cg": [0.3], "spark": [0.9]}) == {
        "spark_fit_seconds": 0.9,
        "implicit_fit_seconds": 0.3,
        "solver": "mllib",
        "ratio_vs_implicit": 3.0,
        "ratio_vs_implicit_mllib": 3.0,
    }


def test_run_sizes_the_benchmark_from_the_environment_and_stops_its_session(monkeypatch):
    session = types.SimpleNamespace(stopped=False)
    session.stop = lambda: setattr(session, "stopped", True)
    calls = []

    def fake_bench_als(spark, cfg, **sizes):
        calls.append((spark, cfg, sizes))
        return {"ratio_vs_implicit": 1.0}

    monkeypatch.setattr("llmrec_spark.runtime.session.build_spark", lambda cfg: session)
    monkeypatch.setattr(bench_als_module, "bench_als", fake_bench_als)
    monkeypatch.setenv("LLMREC_BENCH_INTERACTIONS", "1234")
    monkeypatch.setenv("LLMREC_BENCH_RUNS", "3")
    monkeypatch.setenv("LLMREC_BENCH_ALS_CHOLESKY", "1")
    cfg = Config()

    assert bench_als_module.run(cfg, {}) == {"ratio_vs_implicit": 1.0}
    assert calls == [(session, cfg.als, {"n_interactions": 1234, "runs": 3, "with_cholesky": True})]
    assert session.stopped


# ---------------------------------------------------------------------------------------------
# The benchmark, small


@pytest.mark.spark
def test_a_small_run_reports_every_field_and_ratios_of_its_timed_seconds(spark):
    pytest.importorskip("implicit")
    cfg = AlsConfig(max_iter=2, reg_param=0.05, alpha=10.0)

    result = bench_als_module.bench_als(
        spark, cfg, n_interactions=3000, runs=1, rank=8, eval_users=40, with_cholesky=True
    )

    assert list(result) == [
        "interactions",
        "users",
        "items",
        "planted_topics",
        "rank",
        "max_iter",
        "spark_fit_seconds",
        "implicit_fit_seconds",
        "solver",
        "ratio_vs_implicit",
        "ratio_vs_implicit_mllib",
        "spark_cg_fit_seconds",
        "ratio_vs_implicit_cg",
        "implicit_cholesky_fit_seconds",
        "ratio_vs_implicit_cholesky",
        "target_ratio_vs_implicit",
        "ndcg@10",
        "ndcg@10_interval",
        "cg_ndcg_within_mllib_interval",
        "evaluation",
        "spark",
        "implicit",
        "runs",
        "timing",
        "all_seconds",
    ]
    # 3000 training pairs + 10% of the total held out = 3333 planted pairs: 66 users x 64 items.
    assert {k: result[k] for k in ("interactions", "users", "items", "planted_topics")} == {
        "interactions": 3000,
        "users": 66,
        "items": 64,
        "planted_topics": 32,
    }
    assert (result["rank"], result["max_iter"], result["runs"]) == (8, 2, 1)
    assert result["timing"].startswith("best of 1;")
    assert result["evaluation"].startswith("40 users sampled from those with held-out pairs (10%")

    # The reported seconds are the best (only) timed run of each side, and each ratio is
    # MLlib's seconds over that solver's, up to the rounding of the reported numbers.
    seconds = result["all_seconds"]
    assert list(seconds) == ["implicit_cg", "implicit_cholesky", "spark", "spark_cg"]
    assert all(len(v) == 1 and v[0] > 0 for v in seconds.values())
    assert result["spark_fit_seconds"] == seconds["spark"][0]
    assert result["spark_cg_fit_seconds"] == seconds["spark_cg"][0]
    assert result["solver"] == "cg"  # the default: ratio_vs_implicit is cg's
    assert result["implicit_fit_seconds"] == seconds["implicit_cg"][0]
    assert result["implicit_cholesky_fit_seconds"] == seconds["implicit_cholesky"][0]
    for ratio, mine, other in (
        ("ratio_vs_implicit", "spark_cg_fit_seconds", "implicit_fit_seconds"),
        ("ratio_vs_implicit_mllib", "spark_fit_seconds", "implicit_fit_seconds"),
        ("ratio_vs_implicit_cg", "spark_cg_fit_seconds", "implicit_fit_seconds"),
        ("ratio_vs_implicit_cholesky", "spark_fit_seconds", "implicit_cholesky_fit_seconds"),
    ):
        spark_s, other_s = result[mine], result[other]
        rounding = 0.005 + spark_s / other_s * (0.5e-4 / spark_s + 0.5e-4 / other_s) * 1.01
        assert abs(result[ratio] - spark_s / other_s) <= rounding, (ratio, spark_s, other_s)

    ndcg = result["ndcg@10"]
    assert list(ndcg) == ["spark", "spark_cg", "implicit_cg", "implicit_cholesky", "popularity"]
    assert all(0.0 <= v <= 1.0 for v in ndcg.values())
    intervals = result["ndcg@10_interval"]
    assert list(intervals) == list(ndcg)
    assert all(low <= ndcg[name] <= high for name, (low, high) in intervals.items())
    low, high = intervals["spark"]
    assert result["cg_ndcg_within_mllib_interval"] == (low <= ndcg["spark_cg"] <= high)
    assert result["spark"]["num_blocks"] == spark.sparkContext.defaultParallelism
    assert result["spark"]["params"] == {"regParam": 0.05, "alpha": 10.0, "implicitPrefs": True}
    # reg_param 0.05 * 2 * 3000 pairs / (66 users + 64 items)
    assert result["implicit"]["params"]["regularization"] == round(0.05 * 6000 / 130, 4)
    assert result["implicit"]["num_threads"] == spark.sparkContext.defaultParallelism
