"""Ranking a fitted split: each model's full candidate ranking per view, and per-user metrics.

Every model is ranked with the product's own scorer (`core.hybrid.hybrid_scores`) against the
same candidates, training items excluded; metrics are Spark RankingMetrics definitions
(`core.metrics`) over that ranking. The test users are scored on the driver in blocks.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llmrec_spark.core.hybrid import ItemMatrices, Mix, NewItems, hybrid_scores_with_new_items
from llmrec_spark.core.metrics import (
    auc_from_scores,
    average_recommendation_popularity,
    catalog_coverage,
    novelty,
    per_user_metrics,
)
from llmrec_spark.core.topn import reserve_new_item_slots, select_top_n
from llmrec_spark.evaluation.refit import ALS_ONLY, UNSLOTTED, Fitted
from llmrec_spark.evaluation.report import MODEL_ORDER, ModelResult, ProtocolResult, ViewResult

DESCRIPTIONS = {
    "holdout": "the models trained tonight, on the users whose last share of events training left out",
    "user_temporal": "each user's last share of events by time is held out; the warm bar",
    "cold_item": "a seeded share of items with enough positives lose all training events",
    "global_temporal": "the last share of all events by time is held out (few test users)",
    "cold_user": "a seeded share of users lose their whole history; only their profile text is known",
}
BLOCK = 512  # users per score matrix on the driver
TIE_ORDER_SEED = 20261203


@dataclass
class Ranked:
    """Top-k item indices per user (-1 padded) and each user's positive ranks among candidates."""

    top: np.ndarray  # (u, k)
    auc: np.ndarray  # (u,) NaN where undefined


def tie_order(n_items: int) -> np.ndarray:
    """The seeded permutation of item indices in which `rank_view` lists tied scores."""
    return np.random.default_rng(TIE_ORDER_SEED).permutation(n_items)


def rank_view(
    fitted: Fitted,
    matrices: ItemMatrices,
    params: Mix,
    *,
    rows: np.ndarray,
    relevant: Sequence[np.ndarray],
    candidates: np.ndarray | None,
    k: int,
) -> Ranked:
    """Rank the candidates (None: every item) for the users at `rows`, training items excluded.

    Tied scores are listed in a fixed pseudo-random item order (`tie_order`), not by index:
    popularity scores every cold item 0, and index order would make its cold-only list the
    first item ids, a baseline below random order. With `params.new_item_slots` the list is
    the published one (`reserve_new_item_slots` over its `params.list_length` places), cut
    at k or continued past it in score order.
    """
    order = tie_order(fitted.items.size)
    top = np.full((len(rows), k), -1, dtype=np.int64)
    auc = np.full(len(rows), np.nan)
    for start in range(0, len(rows), BLOCK):
        block = rows[start : start + BLOCK]
        scores, _, _, new = hybrid_scores_with_new_items(
            None if fitted.user_als is None else fitted.user_als[block],
            fitted.user_has_als[block],
            [fitted.histories[r] for r in block],
            matrices,
            mix=params,
        )
        in_view = np.ones(scores.shape, dtype=bool)
        for j, r in enumerate(block):
            in_view[j, fitted.histories[r]] = False
        if candidates is not None:
            in_view[:, ~candidates] = False
        scores = np.where(in_view, scores, -np.inf).astype(np.float32)
        depth = max(k, params.list_length) if len(new.columns) else k
        indices, best = select_top_n(scores[:, order], depth)
        indices = order[indices]
        if len(new.columns):
            indices, best = _with_new_item_slots(indices, best, scores, new, params, order)
        for j in range(len(block)):
            keep = np.isfinite(best[j, :k])
            top[start + j, : int(keep.sum())] = indices[j, :k][keep]
            auc[start + j] = _auc(scores[j], in_view[j], relevant[start + j])
    return Ranked(top=top, auc=auc)


def _with_new_item_slots(
    indices: np.ndarray,
    best: np.ndarray,
    scores: np.ndarray,
    new: NewItems,
    params: Mix,
    order: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """`rank_view`'s lists (item indices, scores) with the new-item slots of `params`, the
    new items' ties in `order` (`tie_order`) as every other tie."""
    place = np.empty(len(order), dtype=np.int64)
    place[order] = np.arange(len(order))
    by_tie = np.argsort(place[new.columns], kind="stable")
    columns = new.columns[by_tie]
    return reserve_new_item_slots(
        indices,
        best,
        columns,
        scores[:, columns],
        new.z[:, by_tie],
        n=params.list_length,
        slots=params.new_item_slots,
        min_z=params.new_item_min_z,
    )


def _auc(scores: np.ndarray, candidates: np.ndarray, positives: np.ndarray) -> float:
    """AUC over the candidates (bool mask): positives against the other candidates, ties half."""
    positive = np.zeros(len(candidates), dtype=bool)
    positive[positives] = True
    positive &= candidates
    values = np.where(np.isfinite(scores), scores, -np.inf)
    return auc_from_scores(values[positive], values[candidates & ~positive])


def view_result(
    fitted: Fitted,
    *,
    name: str,
    description: str,
    models: Mapping[str, tuple[ItemMatrices, Mix]],
    relevant: Sequence[np.ndarray],
    candidates: np.ndarray | None,
    ks: Sequence[int],
    cold_share: bool = False,
) -> ViewResult:
    """Every model ranked for the users with a relevant item in this view, metrics per user."""
    rows = np.array([r for r, rel in enumerate(relevant) if len(rel)], dtype=np.int64)
    relevant_sets = {int(r): set(relevant[r].tolist()) for r in rows}
    n_candidates = int(candidates.sum()) if candidates is not None else fitted.items.size
    out: dict[str, ModelResult] = {}
    for model, (matrices, params) in models.items():
        ranked = rank_view(
            fitted.for_model(model),
            matrices,
            params,
            rows=rows,
            relevant=[relevant[r] for r in rows],
            candidates=candidates,
            k=max([*ks, 20]) if cold_share else max(ks),
        )
        lists = {int(r): [i for i in ranked.top[j] if i >= 0] for j, r in enumerate(rows)}
        per_user = per_user_metrics(lists, relevant_sets, ks)
        if cold_share and fitted.cold is not None:
            # NaN for users without cold positives (a partial metric: its mean and interval
            # are over the users with some); users in per_user_metrics' (ascending) order.
            per_user["cold_recall@20"] = cold_shares(fitted, lists, 20)
        scalars = _scalars(fitted, ranked, lists, n_candidates, ks)
        out[model] = ModelResult(per_user=per_user, scalars=scalars)
    return ViewResult(name=name, description=description, users=len(rows), models=out)


def _scalars(
    fitted: Fitted,
    ranked: Ranked,
    lists: Mapping[int, list[int]],
    n_candidates: int,
    ks: Sequence[int],
) -> dict[str, float]:
    """One model's numbers over the whole view: AUC, coverage@k, novelty and ARP at the headline k."""
    popularity: dict[Hashable, float] = dict(enumerate(fitted.train_users_per_item.tolist()))
    scalars = {"auc": float(np.nanmean(ranked.auc)) if np.isfinite(ranked.auc).any() else math.nan}
    for k in ks:
        scalars[f"coverage@{k}"] = catalog_coverage(lists, max(n_candidates, 1), k)
    headline = 20 if 20 in ks else max(ks)
    scalars[f"novelty@{headline}"] = novelty(lists, popularity, fitted.n_train_users, headline)
    scalars[f"arp@{headline}"] = average_recommendation_popularity(lists, popularity, headline)
    return scalars


def protocol_result(
    fitted: Fitted,
    protocol: str,
    *,
    params: Mapping[str, Mix],
    ks: Sequence[int],
    models: Sequence[str] = MODEL_ORDER,
) -> ProtocolResult:
    """The protocol's views (warm; or cold-only and mixed for cold_item) for every buildable model."""
    built = {}
    for model in models:
        if model == UNSLOTTED and model not in params:  # ranked only beside a slotted hybrid
            continue
        matrices, mix = fitted.variant(model), params.get(model, Mix(0.0))
        if same_as_text_frozen(model, mix):
            continue
        if matrices is not None:
            built[model] = (matrices, mix)
    description = DESCRIPTIONS.get(protocol, protocol)
    if fitted.cold is None:
        view = view_result(
            fitted,
            name="warm",
            description="candidates: every item the user has not trained on; relevant: held-out positives",
            models=built,
            relevant=fitted.relevant,
            candidates=None,
            ks=ks,
        )
        return ProtocolResult(protocol, description, [view])
    views = [
        cold_only_view(fitted, built, ks),
        view_result(
            fitted,
            name="mixed",
            description=(
                "candidates: every item the user has not trained on, cold included; relevant: "
                "all the user's test positives"
            ),
            models=built,
            relevant=fitted.relevant,
            candidates=None,
            ks=ks,
            cold_share=True,
        ),
    ]
    return ProtocolResult(protocol, description, views)


def same_as_text_frozen(model: str, mix: Mix) -> bool:
    """text_frozen_kernel without a kernel ranks exactly as text_frozen: left out."""
    return model == "text_frozen_kernel" and mix.text_kernel <= 0


def cold_only_view(
    fitted: Fitted, models: Mapping[str, tuple[ItemMatrices, Mix]], ks: Sequence[int]
) -> ViewResult:
    """cold_item's cold-only view: the cold items ranked by every model that can score them."""
    assert fitted.cold is not None
    cold = fitted.cold
    return view_result(
        fitted,
        name="cold_only",
        description=(
            "candidates: the cold items; relevant: the user's positives on them "
            "(popularity: no cold item has training events, a seeded random order)"
        ),
        models={m: v for m, v in models.items() if m not in ALS_ONLY},  # no cold item has a factor
        relevant=[rel[cold[rel]] for rel in fitted.relevant],
        candidates=cold,
        ks=ks,
    )


def cold_only_recall(fitted: Fitted, model: str, params: Mix, k: int = 20) -> float | None:
    """`model`'s mean cold-only Recall@k on a cold_item split (None: it cannot be built)."""
    matrices = fitted.variant(model)
    if matrices is None or fitted.cold is None:
        return None
    result = cold_only_view(fitted, {model: (matrices, params)}, [k]).models.get(model)
    return float(result.per_user[f"recall@{k}"].mean()) if result is not None else -1.0


def users_with_positives(fitted: Fitted) -> tuple[np.ndarray, dict[int, set[int]]]:
    """The rows of the users with a test positive, and each one's positives as a set."""
    rows = np.array([r for r, rel in enumerate(fitted.relevant) if len(rel)], dtype=np.int64)
    return rows, {int(r): set(fitted.relevant[r].tolist()) for r in rows}


def top_lists(
    fitted: Fitted, matrices: ItemMatrices, params: Mix, rows: np.ndarray, k: int
) -> dict[int, list[int]]:
    """Each user's (row in `fitted`) top-k item indices over every unseen item."""
    ranked = rank_view(
        fitted,
        matrices,
        params,
        rows=rows,
        relevant=[fitted.relevant[r] for r in rows],
        candidates=None,
        k=k,
    )
    return {int(r): [i for i in ranked.top[j] if i >= 0] for j, r in enumerate(rows)}


def ndcg_per_user(fitted: Fitted, model: str, params: Mix, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of `model` under `params` over every unseen item, for the users with
    a test positive (in row order); empty when the model cannot be built."""
    matrices = fitted.variant(model)
    rows, relevant = users_with_positives(fitted)
    if matrices is None or len(rows) == 0:
        return np.zeros(0)
    lists = top_lists(fitted.for_model(model), matrices, params, rows, k)
    return per_user_metrics(lists, relevant, [k])[f"ndcg@{k}"]


def cold_shares(fitted: Fitted, lists: Mapping[int, Sequence[int]], k: int) -> np.ndarray:
    """Per user (row of `fitted`, ascending): the share of their cold test positives in
    their top k; NaN for a user with none."""
    assert fitted.cold is not None
    shares = []
    for row in sorted(lists):
        cold_positives = fitted.relevant[row][fitted.cold[fitted.relevant[row]]]
        hits = np.intersect1d(list(lists[row])[:k], cold_positives)
        shares.append(len(hits) / len(cold_positives) if len(cold_positives) else math.nan)
    return np.array(shares, dtype=np.float64)
