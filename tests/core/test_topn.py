"""Top-n selection against a full sort: ties, exclusions, bias, category caps, the prefilter."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec_spark.core.topn import (
    _PREFILTER_ITEMS_PER_N,
    reserve_new_item_slots,
    select_top_n,
    top_n_block,
)


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


# ---------------------------------------------------------------------------------------
# New-item slots: items 0-5 are known, 6-9 new. One user's list by score, 6 long (k = 6).

LIST = np.array([0, 1, 2, 3, 4, 5])
LIST_SCORES = np.array([9.0, 8.0, 7.0, 6.0, 5.0, 4.0], dtype=np.float32)
NEW = np.array([6, 7, 8, 9])
# New items 6-9 score 3.0, 3.5, 2.0, 1.0 (all below the list); their text z 2, 0.5, 1.5, 1.
NEW_SCORES = np.array([3.0, 3.5, 2.0, 1.0], dtype=np.float32)
NEW_Z = np.array([2.0, 0.5, 1.5, 1.0], dtype=np.float32)


def reserve(
    listed=LIST, scores=LIST_SCORES, new_items=NEW, new_scores=NEW_SCORES, new_z=NEW_Z, **options
):
    """`reserve_new_item_slots` on one user's list: n=4, 2 slots, min_z=1 unless given."""
    indices, top = reserve_new_item_slots(
        np.array([listed]),
        np.array([scores], dtype=np.float32),
        np.asarray(new_items, dtype=np.int64),
        np.array([new_scores], dtype=np.float32),
        np.array([new_z], dtype=np.float32),
        **({"n": 4, "slots": 2, "min_z": 1.0} | options),
    )
    return indices[0].tolist(), top[0].tolist()


def test_missing_new_items_take_the_last_places_of_the_first_n_and_the_rest_follows():
    # No new item listed: the two best plausible (6: 3.0, z 2; 8: 2.0, z 1.5; 7 scores more
    # but z 0.5 < 1) replace 2 and 3 at places 3-4; places 5-6 continue the list: 2, 3.
    assert reserve() == ([0, 1, 6, 8, 2, 3], [9.0, 8.0, 3.0, 2.0, 7.0, 6.0])
    # A lower threshold lets 7 in: it scores more than 6, so it comes first.
    assert reserve(min_z=0.5)[0] == [0, 1, 7, 6, 2, 3]
    # One slot; or the list as long as n = k: nothing follows.
    assert reserve(slots=1)[0] == [0, 1, 2, 6, 3, 4]
    assert reserve(n=6)[0] == [0, 1, 2, 3, 6, 8]
    # n beyond the list is the list's length.
    assert reserve(n=50)[0] == [0, 1, 2, 3, 6, 8]


def test_new_items_already_listed_count_towards_the_slots():
    # 7 (implausible, z 0.5, but new) is at place 2: one slot missing, 6 takes place 4.
    assert reserve(listed=[0, 7, 1, 2, 3, 4])[0] == [0, 7, 1, 6, 2, 3]
    # Two new items in the first four: the list stays as it is.
    assert reserve(listed=[6, 0, 8, 1, 2, 3])[0] == [6, 0, 8, 1, 2, 3]
    # A new item listed only after place n (8, score 4) is placed at the end of the first n,
    # and not listed twice.
    eight_at_six = np.array([3.0, 3.5, 4.0, 1.0], dtype=np.float32)
    indices, top = reserve(listed=[0, 1, 2, 3, 4, 8], new_scores=eight_at_six, slots=1)
    assert indices == [0, 1, 2, 8, 3, 4]
    assert top == [9.0, 8.0, 7.0, 4.0, 6.0, 5.0]


def test_no_plausible_new_item_leaves_the_list_and_fewer_fill_fewer_slots():
    assert reserve(min_z=2.5)[0] == LIST.tolist()
    # Only 6 reaches z 2: one slot filled of two.
    assert reserve(min_z=2.0)[0] == [0, 1, 2, 6, 3, 4]
    # -inf (seen, not a candidate) is never plausible, whatever its z.
    seen = np.array([-np.inf, 3.5, -np.inf, 1.0], dtype=np.float32)
    assert reserve(new_scores=seen, new_z=[9.0, 0.0, 9.0, 1.0])[0] == [0, 1, 2, 9, 3, 4]
    # No text vector: every z is -inf.
    assert reserve(new_z=np.full(4, -np.inf))[0] == LIST.tolist()
    # Slots 0, or no new items at all: the same arrays back.
    assert reserve(slots=0)[0] == LIST.tolist()
    assert reserve(new_items=np.zeros(0, np.int64), new_scores=[], new_z=[])[0] == LIST.tolist()


def test_ties_among_new_items_go_in_the_order_they_are_given():
    tied = np.array([2.0, 0.0, 2.0, 2.0], dtype=np.float32)  # 6, 8, 9 tie; 7 implausible
    assert reserve(new_scores=tied)[0] == [0, 1, 6, 8, 2, 3]
    # Given as 9, 8, 7, 6: 9 first, then 8.
    assert reserve(
        new_items=NEW[::-1].copy(), new_scores=tied[::-1].copy(), new_z=NEW_Z[::-1].copy()
    )[0] == [0, 1, 9, 8, 2, 3]


def test_a_short_list_takes_the_new_items_in_its_free_places_first():
    # Three items listed of n = 4 (a category cap can leave places empty): one slot takes
    # the free fourth place; two displace the list's last item, which follows them.
    short = np.array([9.0, 8.0, 7.0, -np.inf, -np.inf, -np.inf], dtype=np.float32)
    indices, top = reserve(scores=short, slots=1)
    assert indices == [0, 1, 2, 6, -1, -1]
    assert top[:4] == [9.0, 8.0, 7.0, 3.0] and np.isneginf(top[4:]).all()
    assert reserve(scores=short, slots=2)[0] == [0, 1, 6, 8, 2, -1]


def test_the_category_cap_holds_in_the_first_n():
    categories = np.array([0, 0, 1, 1, 2, 2, 3, 0, 0, 3])  # new: 6 and 9 in 3, 7 and 8 in 0
    capped = {"categories": categories, "max_per_category": 2}
    # Two slots keep 0 and 1 (category 0 full): 7 and 8 are passed over, 6 and 9 placed.
    assert reserve(min_z=0.0, **capped)[0] == [0, 1, 6, 9, 2, 3]
    # With z >= 1.5 only 6 and 8 are plausible and 8 never fits: one slot, keeping 0, 1, 2.
    assert reserve(min_z=1.5, **capped)[0] == [0, 1, 2, 6, 3, 4]


def test_rows_are_independent():
    lists = np.array([LIST, [6, 0, 8, 1, 2, 3], [0, 7, 1, 2, 3, 4]])
    scores = np.tile(LIST_SCORES, (3, 1))
    indices, _ = reserve_new_item_slots(
        lists,
        scores,
        NEW,
        np.tile(NEW_SCORES, (3, 1)),
        np.tile(NEW_Z, (3, 1)),
        n=4,
        slots=2,
        min_z=1.0,
    )
    assert indices.tolist() == [[0, 1, 6, 8, 2, 3], [6, 0, 8, 1, 2, 3], [0, 7, 1, 6, 2, 3]]
