"""The widening grid search, and the implicit anchor fitted and tuned on a planted split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from llmrec_spark.core.hybrid import ItemMatrices, Mix
from llmrec_spark.evaluation.anchor import AnchorParams, attach_anchor, fit_anchor
from llmrec_spark.evaluation.ranking import ndcg_per_user, protocol_result
from llmrec_spark.evaluation.refit import Fitted, TrainPairs
from llmrec_spark.evaluation.search import widening_grid_search


def test_search_widens_an_axis_whose_best_is_on_the_edge():
    seen = []

    def score(p):  # best at reg 8 (beyond the grid's last value 2), alpha inside
        seen.append(dict(p))
        return -((np.log2(p["reg"]) - 3) ** 2) - (p["alpha"] - 1.0) ** 2

    result = widening_grid_search(
        {"reg": [0.5, 1.0, 2.0], "alpha": [0.5, 1.0, 2.0]}, score, widen=("reg", "alpha")
    )
    assert result.best == {"reg": 8.0, "alpha": 1.0}
    assert result.axes["reg"] == [0.5, 1.0, 2.0, 4.0, 8.0]  # two steps out: x2 each
    assert result.axes["alpha"] == [0.5, 1.0, 2.0]  # never on an edge
    assert result.at_edge == ["reg"]  # widened twice, the best is still the last value
    assert len(seen) == 9 + 2  # the grid, then one point per widening
    assert result.trials["reg=8,alpha=1"] == pytest.approx(0.0)


def test_search_stops_widening_once_the_best_is_inside():
    result = widening_grid_search(
        {"kind": ["a", "b"], "f": [32, 64]},
        lambda p: {32: 0.1, 64: 0.3, 128: 0.2, 16: 0.0}[p["f"]] + (p["kind"] == "b"),
        widen=("f",),
    )
    assert result.best == {"kind": "b", "f": 64}
    assert result.axes["f"] == [32, 64, 128]  # 64 was the edge: 128 tried, worse
    assert result.at_edge == []
    assert result.record()["score"] == pytest.approx(1.3)


def test_search_leaves_out_points_that_cannot_be_scored_and_keeps_the_first_of_equals():
    result = widening_grid_search({"x": [1.0, 2.0]}, lambda p: None if p["x"] == 2.0 else 0.5)
    assert result.best == {"x": 1.0} and result.trials == {"x=1": 0.5}
    scores = {4: 0.1234567, 8: 0.3, 16: 0.3, 32: None}  # 16 ties 8; 32 cannot be built
    tied = widening_grid_search({"rank": [4, 8, 16, 32]}, lambda p: scores[p["rank"]])
    assert tied.best == {"rank": 8}
    assert tied.trials == {"rank=4": 0.12346, "rank=8": 0.3, "rank=16": 0.3}
    with pytest.raises(ValueError, match="no trial"):
        widening_grid_search({"x": [1.0]}, lambda p: None)


def _planted_fitted(seed: int = 3) -> Fitted:
    """Two taste groups of users over 40 items; each test user's held-out positive is an
    unseen item of their group. Low ratings (2) go to the other group's items."""
    rng = np.random.default_rng(seed)
    n_users, n_items = 60, 40
    users, items, weights, relevant = [], [], [], []
    for u in range(n_users):
        group = u % 2
        own = np.arange(group * 20, group * 20 + 20)
        liked = rng.choice(own, 8, replace=False)
        disliked = rng.choice(np.arange((1 - group) * 20, (1 - group) * 20 + 20), 3, replace=False)
        users += [u] * 11
        items += [*liked, *disliked]
        weights += [5.0] * 8 + [2.0] * 3
        relevant.append(np.array([rng.choice(np.setdiff1d(own, liked))]))
    pairs = TrainPairs(
        user_ids=[f"u{u}" for u in range(n_users)],
        user_idx=np.array(users),
        item_idx=np.array(items),
        weight=np.array(weights),
    )
    histories = [np.sort(np.array(items[11 * u : 11 * u + 11])) for u in range(n_users)]
    matrices = ItemMatrices(
        item_ids=np.array([f"i{k:02d}" for k in range(n_items)]),
        eligible=np.ones(n_items, dtype=bool),
        popularity=np.bincount(items, minlength=n_items).astype(np.float32),
        categories=np.zeros(n_items, dtype=np.int32),
    )
    return Fitted(
        items=matrices,
        tuned=None,
        users=pairs.user_ids,
        user_als=None,
        user_has_als=np.zeros(n_users, dtype=bool),
        histories=histories,
        relevant=relevant,
        cold=None,
        train_users_per_item=np.bincount(items, minlength=n_items).astype(np.float64),
        n_train_users=n_users,
        train_pairs=pairs,
    )


def test_fit_anchor_positives_leave_out_light_pairs():
    fitted = _planted_fitted()
    assert fitted.train_pairs is not None
    params = AnchorParams("positives", 8, 0.1, 10.0)
    users, items = fit_anchor(fitted.train_pairs, 40, params, positive_min_weight=4.0)
    assert users.shape == (60, 8) and items.shape == (40, 8)
    # Only rated-5 pairs trained: every item someone liked has a factor.
    liked = np.unique(fitted.train_pairs.item_idx[fitted.train_pairs.weight >= 4])
    assert (np.linalg.norm(items[liked], axis=1) > 0).all()
    with pytest.raises(Exception, match="unknown values"):
        fit_anchor(
            fitted.train_pairs, 40, dataclasses.replace(params, values="x"), positive_min_weight=4.0
        )


def test_the_anchor_ranks_beside_the_models_and_finds_the_taste_groups():
    fitted = attach_anchor(
        _planted_fitted(), AnchorParams("positives", 8, 0.1, 10.0), positive_min_weight=4.0
    )
    assert fitted.anchor is not None and fitted.anchor.user_factors.shape == (60, 8)
    anchored = fitted.for_model("implicit_als")
    assert anchored.user_als is fitted.anchor.user_factors
    assert fitted.for_model("als") is fitted
    anchor_ndcg = ndcg_per_user(fitted, "implicit_als", Mix(0.0))
    popularity = ndcg_per_user(fitted, "popularity", Mix(0.0))
    # 12 unseen own-group items hold the positive: the anchor's lists stay in the group.
    assert anchor_ndcg.mean() > popularity.mean() + 0.1
    result = protocol_result(fitted, "user_temporal", params={}, ks=[10, 20])
    models = result.views[0].models
    assert "implicit_als" in models and "als" not in models  # no MLlib factors on this split
    assert models["implicit_als"].per_user["ndcg@10"].mean() == pytest.approx(anchor_ndcg.mean())
