"""Evaluation ranking without Spark: candidates, training items excluded, AUC, cold views, tuning."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llmrec_spark.core.hybrid import ItemMatrices, Mix
from llmrec_spark.evaluation.ranking import ndcg_per_user, protocol_result, rank_view, tie_order
from llmrec_spark.evaluation.refit import Fitted, only_items_in
from llmrec_spark.evaluation.tuning import (
    holds_on,
    pick_trial,
    tune_hybrid,
    tune_new_item_slots,
    tune_text_kernel,
)


def fitted(cold: np.ndarray | None = None) -> Fitted:
    """Two users, five items; ALS on items 0-3 (item 4 has none: it is "new"), text on all."""
    als = np.array([[1.0, 0], [0.8, 0], [0.2, 0], [0.0, 1], [0, 0]], dtype=np.float32)
    text = np.array([[1.0, 0], [0.9, 0.1], [0.5, 0.5], [0.0, 1], [0.95, 0.05]], dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    items = ItemMatrices(
        item_ids=np.array([f"i{j}" for j in range(5)], dtype=object),
        eligible=np.ones(5, dtype=bool),
        popularity=np.array([5, 4, 3, 2, 0], dtype=np.float32),
        categories=np.zeros(5, dtype=np.int32),
        als=als,
        has_als=np.array([True, True, True, True, False]),
        text=text,
        has_text=np.ones(5, dtype=bool),
    )
    return Fitted(
        items=items,
        tuned=None,
        users=["u0", "u1"],
        user_als=np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32),
        user_has_als=np.array([True, True]),
        histories=[np.array([0]), np.array([3])],
        relevant=[np.array([1, 4]), np.array([2])],
        cold=cold,
        train_users_per_item=np.array([1, 0, 0, 1, 0], dtype=np.float64),
        n_train_users=2,
    )


def test_als_ranking_excludes_training_items_and_cannot_reach_an_item_without_factors():
    f = fitted()
    ranked = rank_view(
        f,
        f.variant("als"),
        Mix(0.0, 0.0),
        rows=np.array([0, 1]),
        relevant=f.relevant,
        candidates=None,
        k=5,
    )
    # u0 (history i0): ALS scores i1 0.8 > i2 0.2 > i3 0; i4 has no factor -> not listed.
    assert ranked.top[0].tolist() == [1, 2, 3, -1, -1]
    # u1 (history i3): i0, i1, i2 all score 0 -> listed in the seeded tie order.
    tied = [int(i) for i in tie_order(5) if i in (0, 1, 2)]
    assert ranked.top[1].tolist() == tied + [-1, -1] and tied != [0, 1, 2]
    # AUC over the 4 candidates of u0: positives i1 (0.8) and i4 (unscored, -inf) against
    # negatives i2 (0.2), i3 (0): i1 wins both pairs, i4 loses both -> 2 of 4 -> 0.5.
    assert ranked.auc[0] == pytest.approx(0.5)
    # u1: positive i2 (0) ties negatives i0 and i1 (half each) and beats unscored i4 -> 2/3.
    assert ranked.auc[1] == pytest.approx(2 / 3)


def test_cold_only_view_ranks_only_cold_items_and_skips_als():
    cold = np.array([False, False, True, False, True])
    f = fitted(cold)
    result = protocol_result(f, "cold_item", params={"hybrid_frozen": Mix(0.5, 0.0)}, ks=[1, 2])
    cold_only, mixed = result.views
    assert [v.name for v in result.views] == ["cold_only", "mixed"]
    assert "als" not in cold_only.models and "als" in mixed.models
    # Cold positives: u0 has i4, u1 has i2. Frozen text: u0 (i0-like) ranks i4 (0.999) over
    # i2 (0.707) -> hit at 1; u1 (i3-like) ranks i2 (0.707) over i4 (0.05) -> hit at 1.
    assert cold_only.users == 2
    assert cold_only.models["text_frozen"].per_user["hit_rate@1"].tolist() == [1.0, 1.0]
    # Mixed view, ALS: i4 has no factor, so u0's cold positive never shows (share 0); u1's
    # cold positive i2 has one and is listed (share 1).
    assert mixed.models["als"].per_user["cold_recall@20"].tolist() == [0.0, 1.0]
    # A user whose test positives are all known has no share: NaN, left out of its mean.
    f.relevant = [np.array([4]), np.array([1])]
    mixed = protocol_result(f, "cold_item", params={}, ks=[2]).views[1]
    shares = mixed.models["als"].per_user["cold_recall@20"]
    assert shares[0] == 0.0 and np.isnan(shares[1])


def test_tune_hybrid_picks_the_cold_offset_that_lets_the_new_item_in():
    cold = np.array([False, False, False, False, True])
    f = fitted(cold)
    f.relevant = [np.array([4]), np.array([])]  # u0 wants the new item i4

    params, trials = tune_hybrid(
        f, "hybrid_frozen", text_weights=[0.5], cold_offsets=[0.0, 5.0], k=1
    )

    assert params == Mix(0.5, 5.0)
    assert trials["w=0.5,b=5,h=0"] == pytest.approx(1.0)
    assert trials["w=0.5,b=0,h=0"] < 1.0


def test_tune_text_kernel_picks_the_kernel_that_follows_one_close_history_item():
    cold = np.array([False, False, True, True, False])
    f = fitted(cold)
    # The tuned text: u0's history (i0, i1) averages to i2's direction; i3 is i0's near twin.
    tuned = np.array([[1, 0], [0, 1], [1, 1], [1, 0.05], [0.6, 0.8]], dtype=np.float32)
    f.tuned = tuned / np.linalg.norm(tuned, axis=1, keepdims=True)
    f.histories = [np.array([0, 1]), np.array([1])]
    f.relevant = [np.array([3]), np.array([2])]
    # Recall@1 over the cold items i2, i3. u1 (history i1) ranks i2 (cosine 0.71) over i3
    # (0.05) with either scorer; u0 ranks i2 first with the mean vector, i3 with the kernel.
    kernel, trials = tune_text_kernel(f, "text_finetuned", kernels=[0.0, 0.1, 0.2], k=1)
    assert kernel == 0.1
    assert trials == {"k=0": 0.5, "k=0.1": 1.0, "k=0.2": 1.0}
    # The first of equal means wins; a model that cannot be built chooses nothing (the
    # configured kernel stays).
    assert tune_text_kernel(f, "text_finetuned", kernels=[0.2, 0.1], k=1)[0] == 0.2
    f.tuned = None
    assert tune_text_kernel(f, "text_finetuned", kernels=[0.0, 0.1], k=1) == (None, {})


def test_text_frozen_kernel_is_ranked_only_with_a_kernel():
    f = fitted(np.array([False, False, True, False, True]))
    without = protocol_result(f, "cold_item", params={}, ks=[1])
    assert all("text_frozen_kernel" not in v.models for v in without.views)
    with_kernel = protocol_result(
        f, "cold_item", params={"text_frozen_kernel": Mix(0.0, text_kernel=0.1)}, ks=[1]
    )
    assert all("text_frozen_kernel" in v.models for v in with_kernel.views)


def test_variants_drop_what_a_model_does_not_use():
    f = fitted()
    assert f.variant("popularity").als is None and f.variant("popularity").text is None
    assert f.variant("als").text is None and f.variant("als").als is not None
    assert f.variant("text_frozen").als is None
    assert f.variant("text_finetuned") is None  # no tower was trained
    assert f.variant("hybrid") is None
    with pytest.raises(ValueError, match="unknown model"):
        f.variant("nope")


def test_tune_recent_term_picks_the_weight_that_follows_the_users_last_item():
    f = fitted()
    # u0's ALS factor likes dimension 0; its newest history item (i3) lies on dimension 1.
    als = np.array([[1.0, 0], [0.9, 0.1], [0.1, 0.9], [0.0, 1], [0, 0]], dtype=np.float32)
    f.items = dataclasses.replace(f.items, als=als)
    f.histories = [np.array([0, 3]), np.array([3])]  # oldest first
    f.relevant = [np.array([2]), np.array([])]
    # Candidates with factors: i1, i2. ALS: i1 0.9 > i2 0.1 -> z +1, -1. The recent vector
    # (half-life 1: i3 weighs 1, i0 0.5) is unit([0.5, 1]): cosine 0.54 to i1, 0.94 to i2 ->
    # z -1, +1. So the mix puts i2 first exactly when the recent weight is above 0.5.
    params, trials = tune_hybrid(
        f,
        "als_recent",
        text_weights=[0.0],
        cold_offsets=[0.0],
        recent_weights=[0.0, 0.4, 0.8],
        recent_half_lives=[1.0],
        k=1,
    )
    assert params == Mix(0.0, 0.0, 0.0, 0.8, 1.0)
    assert trials == {
        "w=0,b=0,h=0": 0.0,
        "w=0,b=0,h=0,r=0.4,hr=1": 0.0,
        "w=0,b=0,h=0,r=0.8,hr=1": 1.0,
    }


def test_cold_item_draws_summarise_the_cold_only_recall_per_model():
    from llmrec_spark.bench.quality import quality_json
    from llmrec_spark.evaluation.evaluate import Evaluation, _draw

    # Draw A: cold i2, i4 -> frozen text hits both users' cold positives at 1 (see above).
    fa = fitted(np.array([False, False, True, False, True]))
    a = protocol_result(fa, "cold_item", params={}, ks=[20])
    # Draw B: only i4 is cold -> u0's cold positive i4 is found, u1 has no cold positive.
    fb = fitted(np.array([False, False, False, False, True]))
    b = protocol_result(fb, "cold_item", params={}, ks=[20])
    draws = [_draw(fa, a, 5, primary=True), _draw(fb, b, 105)]
    assert (draws[0].users, draws[0].cold_items, draws[0].primary) == (2, 2, True)
    assert (draws[1].users, draws[1].cold_items, draws[1].primary) == (1, 1, False)
    assert draws[0].recall["text_frozen"] == pytest.approx(1.0)
    assert draws[1].recall["text_frozen"] == pytest.approx(1.0)
    # Popularity over the cold candidates: u0's list is i2 then i4 (popularity 3 > 0), both in
    # the top 20 -> recall 1; the ALS-only models cannot rank cold items and are absent.
    assert draws[0].recall["popularity"] == pytest.approx(1.0)
    assert "als" not in draws[0].recall

    out = quality_json(Evaluation([a], {}, {}, "report.html", 1.0, draws))
    assert out["cold_item_draws"]["seeds"] == [5, 105]
    assert out["cold_item_draws"]["cold_items"] == [2, 1]
    assert out["cold_item_draws"]["recall@20"]["text_frozen"] == [1.0, 1.0]
    assert out["cold_item_draws"]["mean_recall@20"]["text_frozen"] == pytest.approx(1.0)
    assert "cold_item_draws" not in quality_json(Evaluation([a], {}, {}, "report.html", 1.0))


def test_tune_hybrid_tries_borrowed_factors_for_the_new_item():
    cold = np.array([False, False, False, False, True])
    f = fitted(cold)
    f.relevant = [np.array([4]), np.array([])]  # u0 wants the new item i4

    params, trials = tune_hybrid(
        f,
        "hybrid_frozen",
        text_weights=[0.5],
        cold_offsets=[0.0],
        neighbour_factors=[0, 1],
        one_standard_error=True,
        k=1,
    )

    # Text alone: i4 (cosine 0.9986 to u0's i0) loses to i1, which adds its ALS score.
    assert trials["w=0.5,b=0,h=0"] == 0.0
    # Borrowing from its nearest known item (i0, factor (1, 0)) puts i4 first for u0.
    assert trials["w=0.5,b=0,h=0,n=1"] == pytest.approx(1.0)
    assert params == Mix(0.5, 0.0, neighbour_factors=1)
    # A trial the warm protocol's validation rejects is scored but never chosen.
    params, trials = tune_hybrid(
        f,
        "hybrid_frozen",
        text_weights=[0.5],
        cold_offsets=[0.0],
        neighbour_factors=[0, 0, 1],  # a repeated value: one trial key, labels still aligned
        k=1,
        admissible=lambda mix: mix.neighbour_factors == 0,
    )
    assert params == Mix(0.5, 0.0)
    assert trials == {"w=0.5,b=0,h=0": 0.0, "w=0.5,b=0,h=0,n=1 (inadmissible)": 1.0}


def test_holds_on_rejects_borrowed_factors_that_push_out_what_users_want():
    f = fitted()
    # Three users like u0 (history i0) who want the known i1: a borrowed factor lifts the
    # unwanted new i4 (text twin of i0) above i1 for all three; one user like u1 is unaffected.
    f.users = ["a", "b", "c", "d"]
    f.user_als = np.array([[1.0, 0.0]] * 3 + [[0.0, 1.0]], dtype=np.float32)
    f.user_has_als = np.ones(4, dtype=bool)
    f.histories = [np.array([0])] * 3 + [np.array([3])]
    f.relevant = [np.array([1])] * 3 + [np.array([2])]
    borrowing, plain = Mix(0.5, 0.0, neighbour_factors=1), Mix(0.5, 0.0)

    with_borrowing = ndcg_per_user(f, "hybrid_frozen", borrowing, k=1)
    without = ndcg_per_user(f, "hybrid_frozen", plain, k=1)
    assert with_borrowing.tolist() == [0.0, 0.0, 0.0, without[3]]
    assert without.tolist()[:3] == [1.0, 1.0, 1.0]
    holds, means = holds_on(with_borrowing, without)
    assert not holds
    assert means["fallback"] - means["candidate"] == pytest.approx(0.75)  # 3 of 4 users lose a hit
    # The other way round the plain mix loses nothing; values always hold against themselves.
    assert holds_on(without, with_borrowing)[0]
    assert holds_on(with_borrowing, with_borrowing)[0]
    # A difference within one standard error holds: [-1, +1, 0, 0] has mean 0.
    assert holds_on(np.array([0.0, 1.0, 0.5, 0.5]), np.array([1.0, 0.0, 0.5, 0.5]))[0]


@pytest.mark.parametrize("n", [50, 87, 161, 198, 906])
@pytest.mark.parametrize("loss", [0.1, 0.3, 0.5, 1.0])
def test_holds_on_keeps_a_loss_of_one_user_alone_on_the_one_se_boundary(n, loss):
    # One user of n loses `loss`: mean -loss/n, standard error exactly loss/n. The boundary
    # counts as within; a plain >= on the rounded floats rejected about half these cases.
    fallback = np.linspace(0.2, 0.9, n)
    candidate = fallback.copy()
    candidate[n // 2] -= loss
    holds, means = holds_on(candidate, fallback)
    assert holds
    assert means["fallback"] - means["candidate"] == pytest.approx(loss / n, abs=1e-5)
    # Two users losing as much is outside: mean -2d/n against an SE of about 1.41 d/n.
    candidate[n // 3] -= loss
    assert not holds_on(candidate, fallback)[0]
    # The one-SE rule reads the same boundary: the trial one user apart is "close".
    one_apart = fallback.copy()
    one_apart[n // 2] -= loss
    plain, offset = Mix(0.1, 0.0), Mix(0.1, 0.25)
    picked = pick_trial([(plain, fallback), (offset, one_apart)], one_standard_error=True)
    assert picked[0] == offset
    assert pick_trial([(plain, fallback), (offset, candidate)], one_standard_error=True)[0] == plain


def test_only_items_in_makes_the_other_items_ineligible_everywhere_they_rank():
    f = only_items_in(fitted(), {"i0", "i1", "i3"})  # i2 and i4 have no events here
    assert f.items.eligible.tolist() == [True, True, False, True, False]
    ranked = rank_view(
        f,
        f.variant("hybrid_frozen"),
        Mix(0.5, 5.0),  # a large cold offset would put the new i4 first
        rows=np.array([0, 1]),
        relevant=f.relevant,
        candidates=None,
        k=5,
    )
    # u0 (history i0): only i1 and i3 are left; u1 (history i3): i0 and i1.
    assert sorted(ranked.top[0][ranked.top[0] >= 0].tolist()) == [1, 3]
    assert sorted(ranked.top[1][ranked.top[1] >= 0].tolist()) == [0, 1]


def test_rank_view_gives_the_published_lists_new_item_slots_and_continues_past_them():
    f = fitted()
    # u0 (history i0): hybrid 1.078 (i1), -0.157 (i2), -1.319 (i3); the new i4 scores its
    # text z-score 0.795 offset by -5. u1 (history i3): i2, i1, i0, then i4 (z -0.578).
    organic = Mix(0.5, -5.0)
    slotted = Mix(0.5, -5.0, new_item_slots=1, new_item_min_z=0.5, list_length=2)

    def top(params: Mix, k: int) -> list[list[int]]:
        ranked = rank_view(
            f,
            f.variant("hybrid"),
            params,
            rows=np.array([0, 1]),
            relevant=f.relevant,
            candidates=None,
            k=k,
        )
        return ranked.top.tolist()

    f.tuned = f.items.text  # the hybrid's text: the frozen one
    assert top(organic, 4) == [[1, 2, 3, 4], [2, 1, 0, 4]]
    # A published list of 2 with one slot: i4 second for u0; then the rest in score order.
    # u1's i4 is below the threshold: as before.
    assert top(slotted, 4) == [[1, 4, 2, 3], [2, 1, 0, 4]]
    # Metrics at k = 1 read the same published list: its first item.
    assert top(slotted, 1) == [[1], [2]]
    assert top(dataclasses.replace(slotted, new_item_min_z=0.9), 4)[0] == [1, 2, 3, 4]
    # Among the candidates i2 and i4, i4 is in the list of 2 already: it stays second.
    ranked = rank_view(
        f,
        f.variant("hybrid"),
        slotted,
        rows=np.array([0]),
        relevant=f.relevant[:1],
        candidates=np.array([False, False, True, False, True]),
        k=2,
    )
    assert ranked.top.tolist() == [[2, 4]]


def three_like_u0(relevant: list[list[int]]) -> Fitted:
    """`fitted` with three users like u0 (factor (1, 0), history i0), each wanting `relevant`."""
    f = fitted(np.array([False, False, False, False, True]))
    f.tuned = f.items.text
    f.users = ["a", "b", "c"]
    f.user_als = np.array([[1.0, 0.0]] * 3, dtype=np.float32)
    f.user_has_als = np.ones(3, dtype=bool)
    f.histories = [np.array([0])] * 3
    f.relevant = [np.array(r) for r in relevant]
    return f


def test_tune_new_item_slots_shows_new_items_most_within_one_standard_error():
    # Users a, b want the known i2, c the new i4. Organic lists: i1, i2, i3, i4. One slot in a
    # list of 2 (i4's z 0.795 >= 0.5) gives i1, i4, i2, i3: a and b lose NDCG@20 0.631 -> 0.5,
    # c gains 0.431 -> 0.631. A threshold of 0.9 leaves the lists as without slots.
    f = three_like_u0([[2], [2], [4]])
    base = Mix(0.5, -5.0, list_length=2)
    grid = {"slots": [0, 1], "min_zs": [0.5, 0.9]}

    best, trials = tune_new_item_slots(f, "hybrid", base, **grid)
    assert trials == pytest.approx(
        {"slots=0": 0.56418, "slots=1,min_z=0.9": 0.56418, "slots=1,min_z=0.5": 0.54364}, abs=1e-5
    )
    assert best == base  # the first of the best means: no slot
    # Paired differences -0.131, -0.131, +0.2 (mean -0.021, standard error 0.110): within one
    # standard error, and it shows new items most.
    best, _ = tune_new_item_slots(f, "hybrid", base, one_standard_error=True, **grid)
    assert best == Mix(0.5, -5.0, new_item_slots=1, new_item_min_z=0.5, list_length=2)
    # A model that cannot be built keeps the given mix.
    f.tuned = None
    assert tune_new_item_slots(f, "hybrid", base, **grid) == (base, {})


def test_validation_tunes_the_hybrids_slots_only_when_asked_and_else_keeps_the_configured():
    from types import SimpleNamespace

    from llmrec_spark.evaluation.validation import _tune_new_item_slots

    f = three_like_u0([[2], [2], [4]])
    hybrid = Mix(0.5, -5.0)  # as tuned on validation: no slots, the default list length
    shipped = Mix(0.2, new_item_slots=3, new_item_min_z=2.0, list_length=2)
    keep = SimpleNamespace(
        tune_new_item_slots=[], tune_new_item_min_z=[], tune_one_standard_error=True
    )
    assert _tune_new_item_slots(f, hybrid, shipped, keep) == (
        Mix(0.5, -5.0, new_item_slots=3, new_item_min_z=2.0, list_length=2),
        {},
    )
    tune = SimpleNamespace(
        tune_new_item_slots=[0, 1], tune_new_item_min_z=[0.5], tune_one_standard_error=True
    )
    chosen, trials = _tune_new_item_slots(f, hybrid, shipped, tune)
    assert chosen == Mix(0.5, -5.0, new_item_slots=1, new_item_min_z=0.5, list_length=2)
    assert set(trials) == {"slots=0", "slots=1,min_z=0.5"}
