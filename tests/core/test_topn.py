"""Top-n selection against a full sort: ties, exclusions, bias, category caps, the prefilter."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec_spark.core.topn import _PREFILTER_ITEMS_PER_N, select_top_n, top_n_block


def full_sort_top(scores: np.ndarray, n: int) -> np.ndarray:
    """Reference: every item sorted by (-score, index), first n."""
    return np.array(
        [sorted(range(scores.shape[1]), key=lambda j: (-row[j], j))[:n] for row in scores]
    )


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_top_n_block_equals_full_sort_with_ties_exclusions_and_bias(backend):
    rng = np.random.default_rng(11)
    # Small integer vectors: many exactly equal scores, so ties at the cut are common.
    users = rng.integers(-2, 3, size=(40, 3)).astype(np.float32)
    items = rng.integers(-2, 3, size=(200, 3)).astype(np.float32)
    bias = rng.integers(0, 2, size=200).astype(np.float32)
    exclude = [rng.choice(200, size=rng.integers(0, 30), replace=False) for _ in range(40)]

    indices, scores = top_n_block(users, items, 15, exclude, bias, backend=backend)

    expected_scores = users @ items.T + bias
    for u, seen in enumerate(exclude):
        expected_scores[u, seen] = -np.inf
    expected = full_sort_top(expected_scores, 15)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, np.take_along_axis(expected_scores, expected, axis=1))
    assert not any(set(indices[u]) & set(seen) for u, seen in enumerate(exclude))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_top_n_block_all_tied_row_takes_lowest_indices_and_n_beyond_items(backend):
    users = np.array([[0.0], [1.0]], dtype=np.float32)
    items = np.array([[3.0], [1.0], [3.0], [2.0]], dtype=np.float32)

    indices, scores = top_n_block(users, items, 2, [np.array([0]), np.array([0])], backend=backend)
    # user 0 scores 0 everywhere; item 0 excluded -> items 1, 2 (lowest indices of the tie).
    np.testing.assert_array_equal(indices, [[1, 2], [2, 3]])
    np.testing.assert_array_equal(scores, [[0.0, 0.0], [3.0, 2.0]])

    indices, scores = top_n_block(users[1:], items, 10, [np.array([1, 2])], backend=backend)
    # n is capped at the catalog; excluded items trail at -inf, by index.
    np.testing.assert_array_equal(indices, [[0, 3, 1, 2]])
    np.testing.assert_array_equal(scores, [[3.0, 2.0, -np.inf, -np.inf]])


def test_select_top_n_caps_items_per_category():
    scores = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0]], dtype=np.float32)
    categories = np.array([0, 0, 0, 1, 1, 2], dtype=np.int32)

    indices, values = select_top_n(scores, 4, categories=categories, max_per_category=2)

    np.testing.assert_array_equal(indices, [[0, 1, 3, 4]])
    np.testing.assert_array_equal(values, [[9.0, 8.0, 6.0, 5.0]])
    # Cap 1: only three categories exist, so the fourth slot stays empty (-inf).
    indices, values = select_top_n(scores, 4, categories=categories, max_per_category=1)
    np.testing.assert_array_equal(indices[0, :3], [0, 3, 5])
    assert values[0, 3] == -np.inf


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_prefiltered_selection_equals_full_sort_with_ties_and_degenerate_rows(backend):
    rng = np.random.default_rng(23)
    n_items, n = 1000, 10
    assert n_items >= _PREFILTER_ITEMS_PER_N * n  # the bound prefilter path, not the partial sort
    users = rng.integers(-2, 3, size=(60, 3)).astype(np.float32)
    items = rng.integers(-2, 3, size=(n_items, 3)).astype(np.float32)
    exclude = [rng.choice(n_items, size=rng.integers(0, 300), replace=False) for _ in range(60)]
    # User 0 has only items 996..999 left, scoring 1, 2, 2, -1: a tie, then -inf by index.
    exclude[0] = np.arange(n_items - 4)
    users[0] = [1.0, 0.0, 0.0]
    items[996:, 0] = [1.0, 2.0, 2.0, -1.0]
    users[1] = 0.0  # every score tied at 0: the lowest indices win

    indices, scores = top_n_block(users, items, n, exclude, backend=backend)

    expected_scores = users @ items.T
    for u, seen in enumerate(exclude):
        expected_scores[u, seen] = -np.inf
    expected = full_sort_top(expected_scores, n)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, np.take_along_axis(expected_scores, expected, axis=1))
    np.testing.assert_array_equal(indices[0], [997, 998, 996, 999, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(scores[0, :5], [2.0, 2.0, 1.0, -1.0, -np.inf])
    np.testing.assert_array_equal(indices[1], np.arange(10))
