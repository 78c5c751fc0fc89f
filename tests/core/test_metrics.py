"""Ranking metrics against hand-computed values and Spark's RankingMetrics; bootstrap intervals seeded."""

from __future__ import annotations

import math

import numpy as np
import pytest

from llmrec_spark.core.metrics import (
    METRIC_FUNCTIONS,
    auc_from_scores,
    average_popularity_percentile,
    average_precision_at_k,
    average_recommendation_popularity,
    bootstrap_interval,
    catalog_coverage,
    f1_at_k,
    hit_rate_at_k,
    mean_metrics,
    ndcg_at_k,
    novelty,
    paired_bootstrap,
    per_user_metrics,
    precision_at_k,
    recall_at_k,
)
from llmrec_spark.core.topn import top_n_block


def test_list_metrics_on_a_hand_computed_list():
    recommended = ["a", "b", "c", "d", "e"]
    relevant = {"b", "e", "x"}  # hits at ranks 2 and 5; x never recommended

    assert precision_at_k(recommended, relevant, 5) == pytest.approx(0.4)
    assert recall_at_k(recommended, relevant, 5) == pytest.approx(0.6666667)
    assert f1_at_k(recommended, relevant, 5) == pytest.approx(0.5)  # 2 * 0.4 * 2/3 / (0.4 + 2/3)
    # (1/log2(3) + 1/log2(6)) / (1 + 1/log2(3) + 1/log2(4))
    assert ndcg_at_k(recommended, relevant, 5) == pytest.approx(0.4776237)
    assert average_precision_at_k(recommended, relevant, 5) == pytest.approx(0.3)  # (1/2 + 2/5) / 3
    assert hit_rate_at_k(recommended, relevant, 5) == 1.0

    assert precision_at_k(recommended, relevant, 2) == pytest.approx(0.5)
    assert recall_at_k(recommended, relevant, 2) == pytest.approx(
        0.3333333
    )  # |rel|, not min(k, |rel|)
    assert f1_at_k(recommended, relevant, 2) == pytest.approx(0.4)  # 2 * 1/2 * 1/3 / (5/6)
    assert ndcg_at_k(recommended, relevant, 2) == pytest.approx(0.3868528)  # 0.6309 / 1.6309
    assert average_precision_at_k(recommended, relevant, 2) == pytest.approx(0.25)  # (1/2) / 2
    assert hit_rate_at_k(recommended, relevant, 1) == 0.0
    assert f1_at_k(recommended, relevant, 1) == 0.0  # precision and recall both 0


def test_fewer_positives_than_k_divides_map_and_ndcg_by_the_positives():
    recommended = ["b", "a", "c"]  # shorter than k = 10
    relevant = {"a"}

    assert precision_at_k(recommended, relevant, 10) == pytest.approx(0.1)  # still / k
    assert recall_at_k(recommended, relevant, 10) == 1.0
    assert f1_at_k(recommended, relevant, 10) == pytest.approx(0.1818182)  # 2 * 0.1 / 1.1
    assert ndcg_at_k(recommended, relevant, 10) == pytest.approx(0.6309298)  # 1/log2(3) over 1
    assert average_precision_at_k(recommended, relevant, 10) == pytest.approx(0.5)  # (1/2) / 1
    assert hit_rate_at_k(recommended, relevant, 10) == 1.0


def test_empty_lists_and_empty_relevant_sets_score_zero():
    for name, fn in METRIC_FUNCTIONS.items():
        assert fn([], {"a"}, 5) == 0.0, name
        assert fn(["a", "b"], set(), 5) == 0.0, name
    assert list(METRIC_FUNCTIONS) == ["precision", "recall", "f1", "ndcg", "map", "hit_rate"]


def test_per_user_metrics_skip_users_without_positives_and_zero_users_without_lists():
    recommended = {"u1": ["a", "b"], "u2": ["a"], "u4": ["z"]}
    relevant = {"u3": {"a"}, "u1": {"b"}, "u2": set()}  # u2 skipped; u3 has no list

    per_user = per_user_metrics(recommended, relevant, [1, 2])

    # Sorted user order: u1, u3.
    assert per_user["hit_rate@2"].tolist() == [1.0, 0.0]
    assert per_user["hit_rate@1"].tolist() == [0.0, 0.0]
    assert per_user["f1@2"].tolist() == pytest.approx([0.6666667, 0.0])  # p = 1/2, r = 1
    assert per_user["ndcg@2"].tolist() == pytest.approx([0.6309298, 0.0])
    means = mean_metrics(recommended, relevant, [1, 2])
    assert means["precision@2"] == pytest.approx(0.25)
    assert means["map@2"] == pytest.approx(0.25)
    assert sorted(means) == sorted(
        f"{m}@{k}" for m in ("precision", "recall", "f1", "ndcg", "map", "hit_rate") for k in (1, 2)
    )
    assert mean_metrics({}, {"u1": set()}, [5]) == {
        f"{m}@5": 0.0 for m in ("precision", "recall", "f1", "ndcg", "map", "hit_rate")
    }


def test_auc_counts_positive_over_negative_pairs():
    # Scores 5 4 3 2 1 with positives at 5 and 2: the first beats 3 negatives, the second 1: 4/6.
    assert auc_from_scores(np.array([2.0, 5.0]), np.array([4.0, 3.0, 1.0])) == pytest.approx(4 / 6)
    assert auc_from_scores(np.array([9.0, 8.0]), np.array([1.0, 0.0])) == 1.0  # both on top
    assert auc_from_scores(np.array([-1.0, -2.0]), np.array([1.0, 0.0, 3.0])) == 0.0


def test_auc_counts_a_tied_pair_half():
    # Every candidate tied (popularity on cold items): 0.5, wherever the positive sits.
    assert auc_from_scores(np.array([0.0]), np.zeros(4)) == 0.5
    # Positive 1.0 against 2.0, 1.0, 1.0, 0.0: lose, tie, tie, win -> (0 + .5 + .5 + 1) / 4.
    assert auc_from_scores(np.array([1.0]), np.array([2.0, 1.0, 1.0, 0.0])) == 0.5
    # Unscorable candidates (-inf) tie with each other and lose to any score.
    assert auc_from_scores(np.array([-np.inf]), np.array([-np.inf, 0.0])) == 0.25
    assert auc_from_scores(np.array([0.0, -np.inf]), np.array([-np.inf])) == 0.75


def test_auc_without_pairs_is_nan_and_nan_scores_raise():
    assert math.isnan(auc_from_scores(np.array([1.0, 2.0]), np.array([])))  # no negatives
    assert math.isnan(auc_from_scores(np.array([]), np.array([1.0])))  # no positives
    with pytest.raises(ValueError, match="NaN"):
        auc_from_scores(np.array([np.nan]), np.array([1.0]))


RECOMMENDED = {"u1": ["a", "b", "c"], "u2": ["c", "z"], "u3": []}
POPULARITY = {"a": 8.0, "b": 2.0, "c": 1.0, "d": 0.0}  # training users per item, of 8


def test_catalog_coverage_counts_distinct_items_in_the_top_k():
    assert catalog_coverage(RECOMMENDED, 10, 2) == pytest.approx(0.4)  # a, b, c, z
    assert catalog_coverage(RECOMMENDED, 10, 1) == pytest.approx(0.2)  # a, c
    assert catalog_coverage({}, 10, 5) == 0.0
    with pytest.raises(ValueError):
        catalog_coverage(RECOMMENDED, 0, 5)


def test_novelty_is_self_information_clipped_at_one_user():
    # k=2: u1 [a, b]: -log2(8/8) = 0, -log2(2/8) = 2 -> 1; u2 [c, z]: c 1/8 -> 3, z unseen
    # clips to 1/8 -> 3 -> 3; u3 has no list. Mean over u1, u2 = 2.
    assert novelty(RECOMMENDED, POPULARITY, 8, 2) == pytest.approx(2.0)
    assert novelty(RECOMMENDED, POPULARITY, 8, 1) == pytest.approx(1.5)  # a -> 0, c -> 3
    assert novelty({"u1": ["d"]}, POPULARITY, 8, 5) == pytest.approx(3.0)  # 0 users clip too
    assert math.isnan(novelty({"u3": []}, POPULARITY, 8, 5))


def test_arp_is_mean_training_popularity_per_user_then_over_users():
    # k=2: u1 (8 + 2) / 2 = 5, u2 (1 + 0) / 2 = 0.5 (z unseen), u3 skipped -> 2.75
    assert average_recommendation_popularity(RECOMMENDED, POPULARITY, 2) == pytest.approx(2.75)
    assert average_recommendation_popularity(RECOMMENDED, POPULARITY, 1) == pytest.approx(4.5)
    # k=3: u1 (8 + 2 + 1) / 3, u2 (1 + 0) / 2 -> (11/3 + 1/2) / 2 = 25/12
    assert average_recommendation_popularity(RECOMMENDED, POPULARITY, 3) == pytest.approx(2.0833333)
    assert math.isnan(average_recommendation_popularity({}, POPULARITY, 3))


def test_popularity_percentile_splits_ties_in_half():
    popularity = {"a": 10.0, "b": 5.0, "c": 5.0, "d": 1.0}
    # a: 3 below + half of itself = 3.5/4; b and c tie: (1 + 2/2)/4 = 0.5; d: 0.5/4.
    assert average_popularity_percentile({"u1": ["a"]}, popularity, 5) == pytest.approx(0.875)
    assert average_popularity_percentile({"u1": ["c"]}, popularity, 5) == pytest.approx(0.5)
    recommended = {"u1": ["a", "b", "d"], "u2": ["d"]}
    # k=2: u1 (0.875 + 0.5)/2 = 0.6875, u2 0.125 -> 0.40625
    assert average_popularity_percentile(recommended, popularity, 2) == pytest.approx(0.40625)
    assert average_popularity_percentile({"u1": ["zz"]}, popularity, 5) == 0.0  # unseen item
    equal = {"a": 3.0, "b": 3.0}
    assert average_popularity_percentile({"u1": ["a", "b"]}, equal, 2) == pytest.approx(0.5)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    values = np.random.default_rng(7).random(200)

    first = bootstrap_interval(values, samples=500, seed=3)
    assert first == bootstrap_interval(values, samples=500, seed=3)
    assert first != bootstrap_interval(values, samples=500, seed=4)
    low, high = first
    assert low < values.mean() < high
    assert high - low < 0.2  # 200 uniform values: standard error about 0.02
    assert bootstrap_interval(np.full(5, 0.3), samples=50, seed=0) == pytest.approx((0.3, 0.3))
    assert all(math.isnan(x) for x in bootstrap_interval(np.array([]), samples=50, seed=0))


def test_paired_bootstrap_excludes_zero_only_for_a_real_difference():
    rng = np.random.default_rng(11)
    b = rng.random(300)
    a = b + 0.05 + rng.normal(0, 0.02, 300)  # every user gains about 0.05

    mean, low, high = paired_bootstrap(a, b, samples=1000, seed=5)
    assert mean == pytest.approx(float((a - b).mean()))
    assert 0.0 < low < mean < high
    assert (mean, low, high) == paired_bootstrap(a, b, samples=1000, seed=5)

    assert paired_bootstrap(b, b, samples=200, seed=5) == (0.0, 0.0, 0.0)
    # Per-user gains of +0.1 and -0.1 in equal numbers: the interval straddles 0.
    noise = np.tile([0.1, -0.1], 100)
    mean, low, high = paired_bootstrap(b[:200] + noise, b[:200], samples=1000, seed=5)
    assert low < 0.0 < high
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap(a, b[:10], samples=10, seed=0)
    assert all(math.isnan(x) for x in paired_bootstrap(b[:0], b[:0], samples=10, seed=0))


LOG2_3 = np.log2(3)


def test_tied_scores_rank_the_lower_item_index_first():
    # Items 0 and 1 tie for user 0; the rule (lower index first) puts the relevant item 1 second.
    indices, _ = top_n_block(
        np.array([[1.0, 0.0]]), np.array([[2.0, 0.0], [2.0, 5.0], [1.0, 0.0]]), 3
    )
    ranked = ["i0", "i1", "i2"]
    recommended = [ranked[j] for j in indices[0]]
    assert recommended == ["i0", "i1", "i2"]
    assert ndcg_at_k(recommended, {"i1"}, 2) == pytest.approx(1 / LOG2_3)
    assert precision_at_k(recommended, {"i1"}, 1) == 0.0


@pytest.mark.spark
def test_metrics_match_spark_ranking_metrics(spark):
    from pyspark.mllib.evaluation import RankingMetrics

    rng = np.random.default_rng(21)
    recommended, relevant = {}, {}
    for u in range(25):
        recommended[u] = [int(x) for x in rng.choice(30, size=rng.integers(0, 12), replace=False)]
        relevant[u] = {int(x) for x in rng.choice(30, size=rng.integers(1, 8), replace=False)}
    ours = mean_metrics(recommended, relevant, [3, 10])
    pairs = spark.sparkContext.parallelize(
        [(recommended[u], sorted(relevant[u])) for u in range(25)]
    )
    spark_metrics = RankingMetrics(pairs)
    for k in (3, 10):
        assert ours[f"precision@{k}"] == pytest.approx(spark_metrics.precisionAt(k))
        assert ours[f"recall@{k}"] == pytest.approx(spark_metrics.recallAt(k))
        assert ours[f"ndcg@{k}"] == pytest.approx(spark_metrics.ndcgAt(k))
        assert ours[f"map@{k}"] == pytest.approx(spark_metrics.meanAveragePrecisionAt(k))
