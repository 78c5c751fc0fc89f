"""Ranking metrics over plain Python and numpy data (no Spark).

Accuracy metrics follow Spark's RankingMetrics: precision@k divides by k, recall@k by
|relevant|, MAP@k by min(k, |relevant|), NDCG@k uses binary gains over the ideal DCG of
min(k, |relevant|) hits. Beyond accuracy: per-user AUC over the full candidate ranking,
catalog coverage, novelty and popularity bias of the top-k lists, and bootstrap intervals
(one model, or the paired difference of two models over the same users).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

# ---------------------------------------------------------------------------------------
# Metrics over one ranked list


def precision_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Hits among the first k recommendations / k (a list shorter than k still divides by k)."""
    return sum(1 for item in recommended[:k] if item in relevant) / k


def recall_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Hits among the first k / |relevant| (denominator |relevant|, not min(k, |relevant|))."""
    if not relevant:
        return 0.0
    return sum(1 for item in recommended[:k] if item in relevant) / len(relevant)


def f1_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Harmonic mean of precision@k and recall@k; 0.0 when both are 0."""
    precision = precision_at_k(recommended, relevant, k)
    recall = recall_at_k(recommended, relevant, k)
    if precision + recall == 0.0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


def ndcg_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Binary-gain DCG with log2(rank + 1) discount over the ideal DCG of min(k, |relevant|) hits."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(recommended[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal


def average_precision_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Sum of precision at each hit position within k / min(k, |relevant|) (Spark's MAP@k)."""
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for i, item in enumerate(recommended[:k]):
        if item in relevant:
            hits += 1
            total += hits / (i + 1)
    return total / min(k, len(relevant))


def hit_rate_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """1.0 when any of the first k recommendations is relevant, else 0.0."""
    return 1.0 if any(item in relevant for item in recommended[:k]) else 0.0


METRIC_FUNCTIONS = {
    "precision": precision_at_k,
    "recall": recall_at_k,
    "f1": f1_at_k,
    "ndcg": ndcg_at_k,
    "map": average_precision_at_k,
    "hit_rate": hit_rate_at_k,
}


def per_user_metrics(
    recommended: Mapping[Any, Sequence[Hashable]],
    relevant: Mapping[Any, set],
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """ "metric@k" -> one value per user with a non-empty relevant set (sorted user order).

    Users missing from `recommended` count as an empty list (every metric 0).
    """
    users = sorted(u for u, rel in relevant.items() if rel)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        for name, fn in METRIC_FUNCTIONS.items():
            out[f"{name}@{k}"] = np.array(
                [fn(list(recommended.get(u, ())), relevant[u], k) for u in users], dtype=np.float64
            )
    return out


def mean_metrics(
    recommended: Mapping[Any, Sequence[Hashable]],
    relevant: Mapping[Any, set],
    ks: Sequence[int],
) -> dict[str, float]:
    """ "metric@k" -> mean over users with a non-empty relevant set (0.0 when there are none)."""
    return {
        key: float(values.mean()) if len(values) else 0.0
        for key, values in per_user_metrics(recommended, relevant, ks).items()
    }


# ---------------------------------------------------------------------------------------
# Full-ranking AUC


def auc_from_scores(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """One user's AUC: the share of (positive, negative) pairs with the positive scored
    higher, a tied pair counting half (-inf, an unscorable candidate, ties with -inf).
    Returns NaN when there are no positives or no negatives (no pairs to compare)."""
    pos = np.asarray(positive_scores, dtype=np.float64).ravel()
    neg = np.sort(np.asarray(negative_scores, dtype=np.float64).ravel())
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    if np.isnan(pos).any() or np.isnan(neg).any():
        raise ValueError("AUC scores must not be NaN")
    below = np.searchsorted(neg, pos, side="left")  # negatives scored lower
    tied = np.searchsorted(neg, pos, side="right") - below
    return float((below + tied / 2).sum() / (len(pos) * len(neg)))


# ---------------------------------------------------------------------------------------
# Beyond accuracy: over all users' top-k lists


def catalog_coverage(
    recommended: Mapping[Any, Sequence[Hashable]], n_catalog: int, k: int
) -> float:
    """Share of the `n_catalog` catalog items that appear in at least one user's top-k list."""
    if n_catalog <= 0:
        raise ValueError(f"n_catalog must be positive, got {n_catalog}")
    shown = {item for items in recommended.values() for item in list(items)[:k]}
    return len(shown) / n_catalog


def novelty(
    recommended: Mapping[Any, Sequence[Hashable]],
    item_popularity: Mapping[Hashable, float],
    n_users: int,
    k: int,
) -> float:
    """Mean self-information -log2(p_i) of the top-k items, averaged per user, then over users.

    `item_popularity` maps an item to the number of distinct training users who interacted
    with it (the same mapping as ARP); p_i = popularity / n_users, clipped below at
    1 / n_users so unseen items (missing or 0) score log2(n_users). Users with an empty list
    are skipped; NaN when every list is empty.
    """
    if n_users <= 0:
        raise ValueError(f"n_users must be positive, got {n_users}")
    per_user = []
    for items in recommended.values():
        top = list(items)[:k]
        if top:
            shares = np.array([item_popularity.get(i, 0.0) for i in top], dtype=np.float64)
            shares = np.clip(shares / n_users, 1.0 / n_users, None)
            per_user.append(float(-np.log2(shares).mean()))
    return float(np.mean(per_user)) if per_user else float("nan")


def average_recommendation_popularity(
    recommended: Mapping[Any, Sequence[Hashable]],
    item_popularity: Mapping[Hashable, float],
    k: int,
) -> float:
    """ARP: mean training popularity of the top-k items, averaged per user, then over users.

    Popularity as in `novelty` (training users per item; missing items count 0). Higher
    means a stronger popularity bias. Users with an empty list are skipped; NaN when all are.
    """
    per_user = [
        float(np.mean([item_popularity.get(i, 0.0) for i in list(items)[:k]]))
        for items in recommended.values()
        if len(items)
    ]
    return float(np.mean(per_user)) if per_user else float("nan")


def average_popularity_percentile(
    recommended: Mapping[Any, Sequence[Hashable]],
    item_popularity: Mapping[Hashable, float],
    k: int,
) -> float:
    """Mean popularity percentile (0 = least, 1 = most popular) of the top-k items, per user then over users.

    An item's percentile is the share of the items in `item_popularity` that are less
    popular than it, plus half of those tied with it (so a catalog where every item is
    equally popular scores 0.5). Scale-free, unlike ARP. NaN when every list is empty.
    """
    catalog = np.sort(np.fromiter(item_popularity.values(), dtype=np.float64))  # (n_items,)
    if len(catalog) == 0:
        raise ValueError("item_popularity is empty")
    per_user = []
    for items in recommended.values():
        top = list(items)[:k]
        if top:
            pops = np.array([item_popularity.get(i, 0.0) for i in top], dtype=np.float64)
            below = np.searchsorted(catalog, pops, side="left")
            tied = np.searchsorted(catalog, pops, side="right") - below
            per_user.append(float(((below + tied / 2) / len(catalog)).mean()))
    return float(np.mean(per_user)) if per_user else float("nan")


# ---------------------------------------------------------------------------------------
# Uncertainty over users


def bootstrap_interval(
    values: np.ndarray, *, samples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-user `values`."""
    if len(values) == 0 or samples <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: np.ndarray, b: np.ndarray, *, samples: int, seed: int, level: float = 0.95
) -> tuple[float, float, float]:
    """(mean of a - b, low, high): percentile bootstrap of the mean difference.

    `a` and `b` hold one value per user in the same user order (two models on one view);
    users are resampled jointly, so the interval reflects the per-user difference rather
    than two independent spreads. NaN triple for no users; the interval is NaN for samples <= 0.
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need the same users: shapes {a.shape} and {b.shape}")
    if len(a) == 0:
        return (float("nan"), float("nan"), float("nan"))
    difference = a - b  # (n_users,)
    low, high = bootstrap_interval(difference, samples=samples, seed=seed, level=level)
    return float(difference.mean()), low, high
