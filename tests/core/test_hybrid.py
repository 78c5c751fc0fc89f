"""The hybrid scorer: per-user calibration against a brute-force reference, recency, kernels,
borrowed factors."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec_spark.core.hybrid import (
    ItemMatrices,
    Mix,
    history_kernel_scores,
    history_vectors,
    hybrid_scores,
    hybrid_scores_with_new_items,
    hybrid_top_n,
    neighbour_factors,
)
from llmrec_spark.stages.recommend import SOURCES


def hand_items(eligible=(True, True, True, True, True)) -> ItemMatrices:
    """Five items; item 3 has no ALS factor (cold), item 4 is the history item of user 0."""
    return ItemMatrices(
        item_ids=np.array(["a", "b", "c", "d", "e"], dtype=object),
        eligible=np.array(eligible),
        popularity=np.array([5, 1, 3, 0, 9], dtype=np.float32),
        categories=np.zeros(5, dtype=np.int32),
        als=np.array([[1], [2], [3], [0], [0]], dtype=np.float32),
        has_als=np.array([True, True, True, False, True]),
        text=np.array([[1, 0], [0, 1], [0, 1], [1, 0], [1, 0]], dtype=np.float32),
        has_text=np.ones(5, dtype=bool),
    )


def test_hybrid_calibrates_each_source_per_user_and_falls_back_to_popularity():
    indices, scores, codes = hybrid_top_n(
        np.array([[1.0], [0.0]], dtype=np.float32),
        np.array([True, False]),
        [np.array([4]), np.array([], dtype=np.int64)],
        hand_items(),
        n=4,
        mix=Mix(0.5),
    )
    # User 0: ALS raw 1, 2, 3 on a, b, c -> z -1.2247, 0, 1.2247; text cos 1, 0, 0, 1 on
    # a, b, c, d -> z 1, -1, -1, 1. Hybrid = 0.5 * als_z + 0.5 * text_z; d is cold (text only).
    np.testing.assert_array_equal(indices[0], [3, 2, 0, 1])
    np.testing.assert_allclose(scores[0], [1.0, 0.112372, -0.112372, -0.5], atol=1e-5)
    assert [("hybrid", "als", "text", "popular")[c] for c in codes[0]] == [
        "text",
        "hybrid",
        "hybrid",
        "hybrid",
    ]
    # User 1 has neither a factor nor a history: popularity 9, 5, 3, 1 over e, a, c, b.
    np.testing.assert_array_equal(indices[1], [4, 0, 2, 1])
    np.testing.assert_array_equal(scores[1], [9.0, 5.0, 3.0, 1.0])
    assert set(codes[1]) == {3}


def reference_hybrid(
    user_als, history, items: ItemMatrices, n: int, w: float, r: float = 0.0, hr: float = 0.0
):
    """Brute-force hybrid for one user with loops and a full sort: [(item_idx, score, source)].

    History is oldest first; with r > 0 the collaborative score is (1 - r) * als_z + r * the
    z-score of unit ALS factors against their 0.5 ** (age / hr)-weighted mean over the history.
    """
    candidates = [j for j in range(items.size) if items.eligible[j] and j not in set(history)]
    user_recent = None
    if r > 0:
        unit = {j: items.als[j] / np.linalg.norm(items.als[j]) for j in history if items.has_als[j]}
        ages = {j: len(history) - 1 - k for k, j in enumerate(history)}
        if unit:
            weights = {j: 0.5 ** (ages[j] / hr) if hr > 0 else 1.0 for j in unit}
            mean = sum(weights[j] * unit[j] for j in unit)
            user_recent = mean / np.linalg.norm(mean)
    text_hist = [j for j in history if items.has_text[j]]
    user_text = None
    if text_hist:
        mean = np.mean([items.text[j] for j in text_hist], axis=0)
        user_text = mean / np.linalg.norm(mean)

    def zs(values: dict[int, float]) -> dict[int, float]:
        arr = np.array(list(values.values()), dtype=np.float64)
        mu, sd = arr.mean(), arr.std() or 1.0
        return {j: (v - mu) / sd for j, v in values.items()}

    als_z = (
        zs({j: float(user_als @ items.als[j]) for j in candidates if items.has_als[j]})
        if user_als is not None
        else {}
    )
    recent_z = (
        zs(
            {
                j: float(user_recent @ (items.als[j] / np.linalg.norm(items.als[j])))
                for j in candidates
                if items.has_als[j]
            }
        )
        if user_recent is not None
        else {}
    )
    if als_z and recent_z:
        als_z = {j: (1 - r) * als_z[j] + r * recent_z[j] for j in als_z}
    elif recent_z:
        als_z = recent_z
    text_z = (
        zs({j: float(user_text @ items.text[j]) for j in candidates if items.has_text[j]})
        if user_text is not None
        else {}
    )
    scored = []
    for j in candidates:
        if j in als_z and j in text_z:
            scored.append((j, (1 - w) * als_z[j] + w * text_z[j], "hybrid"))
        elif j in als_z:
            scored.append((j, als_z[j], "als"))
        elif j in text_z:
            scored.append((j, text_z[j], "text"))
        elif not als_z and user_text is None:
            scored.append((j, float(items.popularity[j]), "popular"))
    return sorted(scored, key=lambda t: (-t[1], t[0]))[:n]


@pytest.mark.parametrize(("recent_weight", "recent_half_life"), [(0.0, 0.0), (0.4, 2.0)])
def test_hybrid_on_a_large_catalog_equals_brute_force(recent_weight, recent_half_life):
    # 400 items and n=5: selection takes the bound prefilter; mixed cold/warm items and users.
    rng = np.random.default_rng(8)
    n_items, n = 400, 5
    has_als = rng.random(n_items) > 0.3
    has_text = rng.random(n_items) > 0.2
    text = rng.standard_normal((n_items, 6))
    items = ItemMatrices(
        item_ids=np.array([f"i{j:03d}" for j in range(n_items)], dtype=object),
        eligible=rng.random(n_items) > 0.1,
        popularity=rng.integers(0, 50, n_items).astype(np.float32),
        categories=np.zeros(n_items, dtype=np.int32),
        als=(rng.standard_normal((n_items, 4)) * has_als[:, None]).astype(np.float32),
        has_als=has_als,
        text=(text / np.linalg.norm(text, axis=1, keepdims=True) * has_text[:, None]).astype(
            np.float32
        ),
        has_text=has_text,
    )
    user_als = rng.standard_normal((24, 4)).astype(np.float32)
    user_has_als = np.arange(24) % 3 != 0
    histories = [  # oldest first: a random order, so the recency weights matter
        np.array([], dtype=np.int64)
        if u % 4 == 0
        else rng.choice(n_items, size=rng.integers(1, 40), replace=False)
        for u in range(24)
    ]
    mix = Mix(0.3, recent_weight=recent_weight, recent_half_life=recent_half_life)

    indices, scores, codes = hybrid_top_n(user_als, user_has_als, histories, items, n=n, mix=mix)

    for u in range(24):
        expected = reference_hybrid(
            user_als[u] if user_has_als[u] else None,
            histories[u].tolist(),
            items,
            n,
            0.3,
            recent_weight,
            recent_half_life,
        )
        assert indices[u].tolist() == [j for j, _, _ in expected], u
        np.testing.assert_allclose(scores[u], [s for _, s, _ in expected], atol=1e-4)
        assert [SOURCES[c] for c in codes[u]] == [s for _, _, s in expected], u
    assert {SOURCES[c] for c in codes[0]} == {"popular"}  # no factor, no history


def test_user_text_vector_weighs_recent_history_items_by_half_life():
    text = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    has_text = np.array([True, True, False])
    histories = [np.array([0, 1]), np.array([0, 2, 1]), np.array([2]), np.array([], dtype=np.int64)]
    plain, has = history_vectors(histories, text, has_text)
    np.testing.assert_allclose(plain[0], [0.70711, 0.70711], atol=1e-5)
    # Half-life 1: the newest item weighs 1, the one before 0.5, two before 0.25. Item 2 has
    # no text but still ages the items before it.
    recent, has = history_vectors(histories, text, has_text, half_life=1.0)
    np.testing.assert_allclose(recent[0], [0.5, 1.0] / np.hypot(0.5, 1.0), atol=1e-5)
    np.testing.assert_allclose(recent[1], [0.25, 1.0] / np.hypot(0.25, 1.0), atol=1e-5)
    assert has.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(recent[2:], 0.0)


def test_history_kernel_scores_are_a_soft_best_match_of_the_history():
    text = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], dtype=np.float32)
    has_text = np.array([True, True, True, False])
    histories = [np.array([0, 1]), np.array([3]), np.array([1, 3, 0]), np.array([], np.int64)]
    columns = np.array([2, 0])
    scores, has = history_kernel_scores(histories, text, has_text, columns, kernel=0.1)
    assert has.tolist() == [True, False, True, False]
    # User 0 against item 2: cosines 0.6 (item 0) and 0.8 (item 1) -> 0.1 * log of the mean of
    # exp(6) and exp(8); against item 0: cosines 1 and 0.
    expected = [0.1 * np.log((np.exp(6) + np.exp(8)) / 2), 0.1 * np.log((np.exp(10) + 1) / 2)]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)
    # Item 3 has no text: user 1 has no match and user 2's history is items 1 and 0.
    np.testing.assert_array_equal(scores[1], 0.0)
    np.testing.assert_allclose(scores[2], scores[0], rtol=1e-6)
    # The limits: a narrow kernel is the best cosine, a wide one the mean cosine.
    narrow, _ = history_kernel_scores(histories, text, has_text, columns, kernel=1e-3)
    np.testing.assert_allclose(narrow[0], [0.8, 1.0], atol=2e-3)
    wide, _ = history_kernel_scores(histories, text, has_text, columns, kernel=1e3)
    np.testing.assert_allclose(wide[0], [0.7, 0.5], atol=1e-3)
    # A narrow kernel far below every cosine but the best stays finite (shifted by the best).
    far = np.array([[1.0, 0.0]] + [[-0.3, np.sqrt(0.91)]] * 150, dtype=np.float32)
    tight, _ = history_kernel_scores([np.arange(151)], far, np.ones(151, bool), [0], kernel=0.01)
    np.testing.assert_allclose(tight[0, 0], 1.0 + 0.01 * np.log(1 / 151), rtol=1e-5)
    # Blocks of one history item at a time give the same scores.
    blocked, _ = history_kernel_scores(histories, text, has_text, columns, kernel=0.1, max_cells=1)
    np.testing.assert_allclose(blocked, scores, rtol=1e-6)
    with pytest.raises(ValueError, match="kernel must be positive"):
        history_kernel_scores(histories, text, has_text, columns, kernel=0.0)


def test_text_kernel_rescores_only_the_text_only_items():
    """Item 2 is closest to the user's mean vector, item 3 to one of their history items."""
    text = np.array([[1, 0], [0, 1], [1, 1], [1, 0.05], [0, 1]], dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def items(has_als):
        return ItemMatrices(
            item_ids=np.array(["a", "b", "c", "d", "e"], dtype=object),
            eligible=np.ones(5, dtype=bool),
            popularity=np.zeros(5, dtype=np.float32),
            categories=np.zeros(5, dtype=np.int32),
            als=np.array([[1], [2], [0], [3], [0]], dtype=np.float32),
            has_als=np.array(has_als),
            text=text,
            has_text=np.ones(5, dtype=bool),
        )

    user = (np.array([[1.0]], dtype=np.float32), np.array([True]), [np.array([0, 4])])
    two_new = items([True, True, False, False, False])
    mean, _, _ = hybrid_scores(*user, two_new, mix=Mix(0.5, cold_offset=0.25))
    kernel, _, _ = hybrid_scores(*user, two_new, mix=Mix(0.5, cold_offset=0.25, text_kernel=0.1))
    # Items with an ALS factor keep their score; seen items 0 and 4 stay out.
    np.testing.assert_array_equal(kernel[0, [0, 1, 4]], mean[0, [0, 1, 4]])
    assert np.isneginf(kernel[0, [0, 4]]).all()
    # By hand: each unseen text item's cosines to the history items 0 and 4, soft-maxed with
    # kernel 0.1, z-scored over those unseen text items (1, 2, 3), plus the offset.
    cosines = text[[1, 2, 3]] @ text[[0, 4]].T  # (3, 2)
    soft = 0.1 * np.log(np.exp(cosines / 0.1).mean(axis=1))
    z = (soft - soft.mean()) / soft.std()
    np.testing.assert_allclose(kernel[0, [2, 3]], z[1:] + 0.25, atol=1e-5)
    # The mean vector (cosine 1 to item 2) puts c before d; the kernel finds d's near twin in
    # the history (item 0) and puts d first.
    assert mean[0, 2] > mean[0, 3] and kernel[0, 3] > kernel[0, 2]
    # A lone new item is z-scored against the other text items, not against itself: item 2,
    # the weakest match, stays below the average text item instead of at 0.
    one_new = items([True, True, False, True, False])
    alone, _, _ = hybrid_scores(*user, one_new, mix=Mix(0.5, text_kernel=0.1))
    np.testing.assert_allclose(alone[0, 2], z[1], atol=1e-5)
    assert alone[0, 2] < 0


def test_neighbour_factors_are_the_softmax_weighted_factors_of_the_closest_known_items():
    # Items 0-2 are known (factors), 3 and 4 are new; item 5 has a factor but no text.
    text = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8], [-1, 0], [0, 0]], dtype=np.float32)
    als = np.array([[1, 0], [0, 2], [3, 3], [0, 0], [0, 0], [9, 9]], dtype=np.float32)
    has_als = np.array([True, True, True, False, False, True])
    has_text = np.array([True, True, True, True, True, False])
    out, borrowed = neighbour_factors(als, has_als, text, has_text, k=2, temperature=0.5)
    np.testing.assert_array_equal(borrowed, [False, False, False, True, True, False])
    np.testing.assert_array_equal(out[:3], als[:3])  # known rows as given
    np.testing.assert_array_equal(out[5], als[5])
    # Item 3: cosines 0.6, 0.96, 0.8 -> the two closest are items 1 (0.96) and 2 (0.8),
    # weights softmax([0.96, 0.8] / 0.5) = [0.5793, 0.4207].
    w1 = np.exp(0.96 / 0.5) / (np.exp(0.96 / 0.5) + np.exp(0.8 / 0.5))
    np.testing.assert_allclose(out[3], w1 * als[1] + (1 - w1) * als[2], atol=1e-5)
    # Item 4: cosines -1, -0.8, 0 -> items 2 (0) and 1 (-0.8); the donor without text (5) never.
    w2 = np.exp(0.0 / 0.5) / (np.exp(0.0 / 0.5) + np.exp(-0.8 / 0.5))
    np.testing.assert_allclose(out[4], w2 * als[2] + (1 - w2) * als[1], atol=1e-5)
    # k beyond the donors takes them all; a cold temperature is the nearest donor's factor.
    everyone, _ = neighbour_factors(als, has_als, text, has_text, k=50, temperature=1e-3)
    np.testing.assert_allclose(everyone[3], als[1], atol=1e-5)
    # One block per item gives the same rows; k = 0 or no donor borrows nothing.
    blocked, _ = neighbour_factors(als, has_als, text, has_text, k=2, temperature=0.5, block=1)
    np.testing.assert_allclose(blocked, out, atol=1e-6)
    for k, known in ((0, has_als), (2, np.zeros(6, dtype=bool))):
        same, none = neighbour_factors(als, known, text, has_text, k=k, temperature=0.5)
        assert same is als and not none.any()


def test_items_with_borrowed_factors_are_scored_as_known_items_plus_the_cold_offset():
    text = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]], dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    items = ItemMatrices(
        item_ids=np.array(["a", "b", "c", "d"], dtype=object),
        eligible=np.ones(4, dtype=bool),
        popularity=np.zeros(4, dtype=np.float32),
        categories=np.zeros(4, dtype=np.int32),
        als=np.array([[2, 0], [0, 1], [0, 0], [0, 0]], dtype=np.float32),
        has_als=np.array([True, True, False, False]),
        text=text,
        has_text=np.ones(4, dtype=bool),
    )
    user = (np.array([[1.0, 0.0]], dtype=np.float32), np.array([True]), [np.zeros(0, np.int64)])
    mix = Mix(0.0, cold_offset=0.5, neighbour_factors=1, neighbour_temperature=0.1)
    scores, _, _ = hybrid_scores(*user, items, mix=mix)
    # k = 1: c borrows a's factor (2, 0), d borrows b's (0, 1). ALS scores 2, 0, 2, 0 over
    # the four candidates: mean 1, std 1 -> z 1, -1, 1, -1; the new items add the offset.
    np.testing.assert_allclose(scores[0], [1.0, -1.0, 1.5, -0.5], atol=1e-5)
    # Off, the new items are scored by text alone (z over the 4 text cosines) plus the offset.
    text_only, _, _ = hybrid_scores(*user, items, mix=Mix(0.0, cold_offset=0.5))
    np.testing.assert_allclose(text_only[0, :2], [1.0, -1.0], atol=1e-5)  # ALS z over a, b
    assert items.borrowed is None  # the caller's matrices are not changed
    again = items.with_neighbour_factors(1, 0.1)
    assert again is items.with_neighbour_factors(1, 0.1)  # computed once per (k, temperature)
    np.testing.assert_array_equal(again.borrowed, [False, False, True, True])
    # Published, a new item keeps source "text" (its text placed it), though this user has
    # no text vector of their own; the known items are "als".
    indices, _, codes = hybrid_top_n(*user, items, n=4, mix=mix)
    assert indices[0].tolist() == [2, 0, 3, 1]
    assert [SOURCES[c] for c in codes[0]] == ["text", "als", "text", "als"]


def test_a_new_items_plausibility_is_its_text_z_score_with_or_without_a_borrowed_factor():
    # a, b known; c, d new. u0: factor (1, 0), history a; u1: d seen; u2: no history.
    text = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]], dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    items = ItemMatrices(
        item_ids=np.array(["a", "b", "c", "d"], dtype=object),
        eligible=np.ones(4, dtype=bool),
        popularity=np.zeros(4, dtype=np.float32),
        categories=np.zeros(4, dtype=np.int32),
        als=np.array([[2, 0], [0, 1], [0, 0], [0, 0]], dtype=np.float32),
        has_als=np.array([True, True, False, False]),
        text=text,
        has_text=np.ones(4, dtype=bool),
    )
    users = (
        np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]], dtype=np.float32),
        np.array([True, False, False]),
        [np.array([0]), np.array([3]), np.zeros(0, np.int64)],
    )
    # u0's text vector is a's: z of the cosines over the unseen b, c, d.
    cosines = text[[1, 2, 3]] @ text[0]
    z = (cosines - cosines.mean()) / cosines.std()
    plain = Mix(0.0, cold_offset=0.5, new_item_slots=1)
    scores, _, _, new = hybrid_scores_with_new_items(*users, items, mix=plain)
    assert new.columns.tolist() == [2, 3]
    np.testing.assert_allclose(new.z[0], z[1:], atol=1e-5)
    np.testing.assert_allclose(scores[0, [2, 3]], z[1:] + 0.5, atol=1e-5)  # text z + offset
    assert np.isneginf(new.z[1, 1]) and np.isfinite(new.z[1, 0])  # u1 has seen d
    assert np.isneginf(new.z[2]).all()  # u2 has no text vector
    # Borrowed factors change the new items' scores, not their plausibility.
    borrowing = Mix(0.0, cold_offset=0.5, neighbour_factors=1, new_item_slots=1)
    scores_b, _, _, new_b = hybrid_scores_with_new_items(*users, items, mix=borrowing)
    assert new_b.columns.tolist() == [2, 3]
    np.testing.assert_allclose(new_b.z, new.z, atol=1e-6)
    assert not np.allclose(scores_b[0, [2, 3]], scores[0, [2, 3]])
    # With a kernel: the kernel z-score, which the text-only items' score adds the offset to.
    kernel = Mix(0.0, cold_offset=0.5, text_kernel=0.1, new_item_slots=1)
    scores_k, _, _, new_k = hybrid_scores_with_new_items(*users, items, mix=kernel)
    np.testing.assert_allclose(new_k.z[0], scores_k[0, [2, 3]] - 0.5, atol=1e-5)
    # Without slots there is nothing to judge.
    assert hybrid_scores_with_new_items(*users, items, mix=Mix(0.0))[3].columns.size == 0


def test_new_item_slots_put_a_plausible_new_item_last_with_source_text():
    users = (
        np.array([[1.0], [0.0]], dtype=np.float32),
        np.array([True, False]),
        [np.array([4]), np.array([], dtype=np.int64)],
    )
    # As in the first test, with d's text z-score 1 offset by -2: u0's scores are c 0.1124,
    # a -0.1124, b -0.5, d -1.0, so d is fourth.
    organic = Mix(0.5, cold_offset=-2.0)
    indices, scores, _ = hybrid_top_n(*users, hand_items(), n=3, mix=organic)
    assert indices[0].tolist() == [2, 0, 1]
    slotted = Mix(0.5, cold_offset=-2.0, new_item_slots=1, new_item_min_z=0.5)
    indices, scores, codes = hybrid_top_n(*users, hand_items(), n=3, mix=slotted)
    assert indices[0].tolist() == [2, 0, 3]
    np.testing.assert_allclose(scores[0], [0.112372, -0.112372, -1.0], atol=1e-5)
    assert [SOURCES[c] for c in codes[0]] == ["hybrid", "hybrid", "text"]
    # u1 has no text vector, so no plausible new item: popularity as before.
    assert indices[1].tolist() == [4, 0, 2]
    assert set(codes[1]) == {3}
    # z 1 is below a threshold of 1.5: the organic list.
    strict = Mix(0.5, cold_offset=-2.0, new_item_slots=1, new_item_min_z=1.5)
    assert hybrid_top_n(*users, hand_items(), n=3, mix=strict)[0][0].tolist() == [2, 0, 1]
