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
