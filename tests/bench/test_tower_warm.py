"""`llmrec bench tower-warm`: replayed nights of a warm tower against retraining, on a tiny
MovieLens-100K folder end to end, and its pieces on hand-made numbers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pytest

from llmrec_spark.bench import tower_warm
from llmrec_spark.errors import InputError
from tests.bench.test_quality import TINY_QUALITY, write_ml100k
from tests.conftest import make_config


def test_run_needs_a_dataset_folder(tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(InputError, match="bench tower-warm needs a dataset folder"):
        tower_warm.run(cfg, {"path": str(tmp_path / "missing")})


@pytest.mark.spark
def test_night_cuts_leave_out_the_newest_share_of_events_one_night_at_a_time(spark):
    start = dt.datetime(2026, 11, 1)
    train = spark.createDataFrame(
        [(start + dt.timedelta(hours=h),) for h in range(100)], "event_ts timestamp"
    )
    cuts = tower_warm.night_cuts(train, 3, 0.1)
    # 100 events: the first night ends before event 70, then 80, 90; the last takes them all.
    assert cuts == [start + dt.timedelta(hours=h) for h in (70, 80, 90)] + [None]
    with pytest.raises(InputError, match="no training events"):
        tower_warm.night_cuts(train.limit(0), 3, 0.1)


def test_summary_pairs_the_arms_and_judges_the_warm_one_against_another_seed():
    users = 50
    retrained = np.linspace(0.2, 0.6, users)
    per_user = {
        "retrained": {"recall@20": retrained, "ndcg@20": retrained / 2},
        "reseeded": {"recall@20": retrained - 0.02, "ndcg@20": retrained / 2},
        "first_night": {"recall@20": retrained - 0.05, "ndcg@20": retrained / 2},
        "warm": {"recall@20": retrained - 0.01, "ndcg@20": retrained / 2},
    }
    out = tower_warm.summarize(per_user, samples=50, seed=1)
    assert out["metrics"]["warm"]["recall@20"]["mean"] == pytest.approx(0.39, abs=1e-4)
    low, high = out["metrics"]["retrained"]["recall@20"]["interval"]
    assert low < 0.4 < high
    # Every user 0.01 below: the paired difference is exactly -0.01, with no spread.
    assert out["differences"]["warm_minus_retrained"]["recall@20"] == [-0.01, -0.01, -0.01]
    assert out["differences"]["warm_minus_first_night"]["recall@20"][0] == pytest.approx(0.04)
    assert out["differences"]["reseeded_minus_retrained"]["recall@20"][0] == pytest.approx(-0.02)
    assert out["warm_as_good_as_retrained"]  # 0.01 short, another seed is 0.02 short
    per_user["warm"]["recall@20"] = retrained - 0.03
    assert not tower_warm.summarize(per_user, samples=50, seed=1)["warm_as_good_as_retrained"]


@pytest.mark.spark
@pytest.mark.slow
def test_bench_tower_warm_on_a_tiny_movielens(spark, tmp_path):
    folder = tmp_path / "ml-100k"
    write_ml100k(folder)
    cfg = make_config(tmp_path, *TINY_QUALITY, "contrastive.batch_size=16")

    # In the test session's Spark (`llmrec bench tower-warm` builds its own and stops it).
    result = tower_warm.bench_tower_warm(spark, cfg, str(folder))

    assert result["path"] == str(folder)
    assert spark.sparkContext._jsc is not None  # the shared session is still up
    assert set(result["metrics"]) == {"warm", "retrained", "reseeded", "first_night", "text_frozen"}
    assert result["cold_test_users"] > 0
    for arm in result["metrics"].values():
        for metric in ("recall@20", "ndcg@20"):
            low, high = arm[metric]["interval"]
            assert 0.0 <= low <= arm[metric]["mean"] <= high <= 1.0
    assert len(result["seconds"]["warm_nights"]) == tower_warm.NIGHTS
    assert result["warm_settings"]["warm_epochs"] == 1
    assert result["warm_vs_retrained_seconds"] > 0
