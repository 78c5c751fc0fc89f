"""Two models' z-scores mixed as one factor product."""

from __future__ import annotations

import numpy as np

from llmrec_spark.core.hybrid import item_totals
from llmrec_spark.core.zmix import mixed_item_rows, mixed_user_rows, z_scored_factors


def test_z_scored_factors_give_each_users_z_scores_and_zero_for_items_without_a_factor():
    user = np.array([[1.0, 0.0], [0.0, 2.0]], np.float32)
    item = np.array([[1.0, 0.0], [3.0, 1.0], [5.0, 2.0], [9.0, 9.0]], np.float32)
    has_item = np.array([True, True, True, False])
    candidates = np.array([True, True, True, True])
    user_z, item_z = z_scored_factors(user, item, has_item, candidates)
    scores = user_z @ item_z.T
    # User 0 scores items 0..2 as 1, 3, 5: mean 3, population std sqrt(8/3).
    std0 = np.sqrt(8 / 3)
    np.testing.assert_allclose(scores[0], [-2 / std0, 0.0, 2 / std0, 0.0], atol=1e-5)
    # User 1 scores them 0, 2, 4: the same z-scores.
    np.testing.assert_allclose(scores[1], [-2 / std0, 0.0, 2 / std0, 0.0], atol=1e-5)
    # A user whose scores are all equal has std 0: z-scores 0, not NaN.
    flat_z, flat_items = z_scored_factors(np.zeros((1, 2), np.float32), item, has_item, candidates)
    np.testing.assert_allclose(flat_z @ flat_items.T, [[0.0, 0.0, 0.0, 0.0]])


def test_mixed_rows_score_als_z_plus_weight_times_second_z_and_the_second_alone_without_als():
    als = np.array([[1.0], [3.0], [5.0], [0.0]], np.float32)
    has_als = np.array([True, True, True, False])
    second = np.array([[2.0], [0.0], [1.0], [4.0]], np.float32)
    has_second = np.array([True, True, True, True])
    eligible = np.ones(4, bool)
    items = mixed_item_rows(als, has_als, second, has_second)
    users, has = mixed_user_rows(
        np.array([[1.0], [0.0]], np.float32),
        np.array([True, False]),
        np.array([[1.0], [1.0]], np.float32),
        np.array([True, True]),
        als_totals=item_totals(als, eligible & has_als),
        second_totals=item_totals(second, eligible & has_second),
        weight=0.5,
    )
    scores = users @ items.T
    # ALS z over items 0..2 (scores 1, 3, 5): -1.2247, 0, 1.2247; item 3 has no factor: 0.
    als_z = np.array([-1.2247449, 0.0, 1.2247449, 0.0])
    # The second model's scores 2, 0, 1, 4: mean 1.75, std sqrt(2.1875).
    second_z = (np.array([2.0, 0.0, 1.0, 4.0]) - 1.75) / np.sqrt(2.1875)
    np.testing.assert_allclose(scores[0], als_z + 0.5 * second_z, atol=1e-5)
    np.testing.assert_allclose(scores[1], second_z, atol=1e-5)  # no ALS factor: weight 1
    assert has.tolist() == [True, True]


def test_with_the_second_model_at_weight_zero_the_hybrid_ranks_as_with_als_alone():
    # The recent-items term reads ALS's own columns of the mixed rows (recent_columns): the
    # second model at weight 0 changes nothing, recent term included.
    import dataclasses

    from llmrec_spark.core.hybrid import ItemMatrices, Mix, hybrid_top_n

    rng = np.random.default_rng(4)
    n, rank = 30, 4
    als = rng.normal(size=(n, rank)).astype(np.float32)
    second = rng.normal(size=(n, 7)).astype(np.float32)
    has = np.ones(n, bool)
    items = ItemMatrices(
        item_ids=np.array([f"i{k:02d}" for k in range(n)], dtype=object),
        eligible=has,
        popularity=np.zeros(n, np.float32),
        categories=np.zeros(n, np.int32),
        als=als,
        has_als=has,
    )
    users = rng.normal(size=(3, rank)).astype(np.float32)
    histories = [np.array([0, 5, 9]), np.array([2]), np.array([7, 8])]
    mix = Mix(0.0, recent_weight=0.5, recent_half_life=3.0)
    plain, plain_scores, _ = hybrid_top_n(users, np.ones(3, bool), histories, items, n=10, mix=mix)
    user_rows, user_has = mixed_user_rows(
        users,
        np.ones(3, bool),
        rng.normal(size=(3, 7)).astype(np.float32),
        np.ones(3, bool),
        als_totals=item_totals(als, has),
        second_totals=item_totals(second, has),
        weight=0.0,
    )
    mixed = dataclasses.replace(
        items, als=mixed_item_rows(als, has, second, has), recent_columns=rank
    )
    got, got_scores, _ = hybrid_top_n(user_rows, user_has, histories, mixed, n=10, mix=mix)
    np.testing.assert_array_equal(got, plain)
    np.testing.assert_allclose(got_scores, plain_scores, atol=1e-4)
