"""Top-N scoring: hybrid ALS + text scores per user block, a quality gate, then publishing.

The core is numpy (`top_n_block`, `select_top_n`, `hybrid_top_n`, `score_block_frame`):
it is what a pandas UDF (`mapInPandas`) runs per block of users, with the item matrices
broadcast once (`ItemMatrices`). No user x item cross join is ever built in Spark: users are
spread over tasks, each task scores blocks of `recommend.user_block_size` users, and each
block is one matrix product plus a partial sort. The evaluation stage scores its holdout
users with the same functions.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from llmrec_spark.config import RecommendConfig
from llmrec_spark.context import RunContext, StageResult
from llmrec_spark.errors import GateError, InputError
from llmrec_spark.schema import SOURCE_ALS, SOURCE_HYBRID, SOURCE_POPULAR, SOURCE_TEXT

log = logging.getLogger(__name__)

# Index = the code `hybrid_top_n` returns per recommended item.
SOURCES = (SOURCE_HYBRID, SOURCE_ALS, SOURCE_TEXT, SOURCE_POPULAR)
_HYBRID, _ALS, _TEXT, _POPULAR = range(4)

SCORED_SCHEMA = "user_id string, rank int, item_id string, score float, source string"
# Below this many scores per block the torch import costs more than argpartition.
_TORCH_MIN_CELLS = 200_000
_UNAVAILABLE = ("false", "0", "no", "n", "f")


# ---------------------------------------------------------------------------------------
# Selection (numpy / torch)


def top_n_block(
    user_vecs: np.ndarray,
    item_vecs: np.ndarray,
    n: int,
    exclude: Sequence[np.ndarray] | None = None,
    item_bias: np.ndarray | None = None,
    *,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """Top-n items per user by `user_vecs @ item_vecs.T (+ item_bias)`, `exclude[u]` item indices removed.

    Returns (indices (b, n) int64, scores (b, n) float32), best first, ties to the lower item
    index; excluded items score -inf and only appear when fewer than n items remain.
    """
    scores = np.asarray(user_vecs, dtype=np.float32) @ np.asarray(item_vecs, dtype=np.float32).T
    if item_bias is not None:
        scores += np.asarray(item_bias, dtype=np.float32)[None, :]
    if exclude is not None:
        _exclude(scores, exclude)
    return select_top_n(scores, n, backend=backend)


def select_top_n(
    scores: np.ndarray,
    n: int,
    *,
    categories: np.ndarray | None = None,
    max_per_category: int = 0,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray]:
    """The n best columns of each row of `scores` (b, items): (indices, scores), best first.

    Ties go to the lower column index. With `max_per_category` > 0 and `categories` (items,)
    integer codes, at most that many items of one category per row (fewer than n may remain;
    the missing tail scores -inf).
    """
    scores = np.ascontiguousarray(scores, dtype=np.float32)
    b, n_items = scores.shape
    n = min(n, n_items)
    if b == 0 or n == 0:
        return np.zeros((b, n), dtype=np.int64), np.zeros((b, n), dtype=np.float32)
    if max_per_category > 0 and categories is not None:
        return _select_with_category_cap(scores, n, categories, max_per_category, backend)
    return _select(scores, n, backend)


def _select(scores: np.ndarray, n: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    b, n_items = scores.shape
    if n == n_items:
        chosen = np.broadcast_to(np.arange(n_items), (b, n_items))
    else:
        # n + 1 candidates: the (n+1)-th tells whether a tie straddles the cut.
        candidates, values = _partial_top(scores, n + 1, backend)
        order = np.argsort(-values, axis=1, kind="stable")
        candidates = np.take_along_axis(candidates, order, axis=1)
        values = np.take_along_axis(values, order, axis=1)
        chosen = candidates[:, :n].copy()
        for row in np.flatnonzero(values[:, n] == values[:, n - 1]):
            chosen[row] = _lowest_index_top(scores[row], n, values[row, n - 1])
    chosen = np.sort(chosen, axis=1)  # index order first, so the stable sort breaks ties by index
    values = np.take_along_axis(scores, chosen, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(chosen, order, axis=1).astype(np.int64), np.take_along_axis(
        values, order, axis=1
    )


def _partial_top(scores: np.ndarray, k: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """k best columns per row in no particular order: torch.topk when available, else argpartition."""
    if _use_torch(backend, scores.size):
        import torch

        top = torch.topk(torch.from_numpy(scores), k, dim=1, sorted=False)
        return top.indices.numpy(), top.values.numpy()
    indices = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return indices, np.take_along_axis(scores, indices, axis=1)


def _use_torch(backend: str, cells: int) -> bool:
    if backend == "numpy":
        return False
    if backend == "torch":
        return True
    if cells < _TORCH_MIN_CELLS:
        return False
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _lowest_index_top(row: np.ndarray, n: int, threshold: float) -> np.ndarray:
    """Items above `threshold` plus the lowest-index items equal to it, n in all."""
    above = np.flatnonzero(row > threshold)
    at = np.flatnonzero(row == threshold)[: n - len(above)]
    return np.concatenate([above, at])


def _select_with_category_cap(
    scores: np.ndarray, n: int, categories: np.ndarray, cap: int, backend: str
) -> tuple[np.ndarray, np.ndarray]:
    b, n_items = scores.shape
    pool = min(n_items, max(4 * n, n + 50))
    indices, values = _select(scores, pool, backend)
    out_idx = np.zeros((b, n), dtype=np.int64)
    out_val = np.full((b, n), -np.inf, dtype=np.float32)
    for row in range(b):
        picked = _greedy_capped(indices[row], values[row], categories, cap, n)
        if len(picked) < n and pool < n_items and np.isfinite(values[row, -1]):
            full_idx, full_val = _select(scores[row : row + 1], n_items, backend)
            picked = _greedy_capped(full_idx[0], full_val[0], categories, cap, n)
        if picked:
            out_idx[row, : len(picked)] = picked
            out_val[row, : len(picked)] = scores[row, picked]
    return out_idx, out_val


def _greedy_capped(
    indices: np.ndarray, values: np.ndarray, categories: np.ndarray, cap: int, n: int
) -> list[int]:
    counts: dict[int, int] = {}
    picked: list[int] = []
    for item, value in zip(indices.tolist(), values.tolist(), strict=True):
        if not math.isfinite(value):
            break
        category = int(categories[item])
        if counts.get(category, 0) < cap:
            counts[category] = counts.get(category, 0) + 1
            picked.append(item)
            if len(picked) == n:
                break
    return picked


def _exclude(scores: np.ndarray, exclude: Sequence[np.ndarray]) -> None:
    """Set scores[u, exclude[u]] to -inf in place."""
    rows = [np.full(len(e), u, dtype=np.int64) for u, e in enumerate(exclude) if len(e)]
    if rows:
        cols = [np.asarray(e, dtype=np.int64) for e in exclude if len(e)]
        scores[np.concatenate(rows), np.concatenate(cols)] = -np.inf


# ---------------------------------------------------------------------------------------
# Hybrid scoring of one block of users


@dataclass(frozen=True)
class ItemMatrices:
    """Everything the scorer needs about the items, row i = item index i (broadcast once)."""

    item_ids: np.ndarray  # (n,) str, sorted
    eligible: np.ndarray  # (n,) bool: may be recommended (available, category allowed)
    popularity: np.ndarray  # (n,) float32: weighted interactions in the window
    categories: np.ndarray  # (n,) int32 category codes (for max_per_category)
    als: np.ndarray | None = None  # (n, rank) float32, zero rows where has_als is False
    has_als: np.ndarray | None = None  # (n,) bool
    text: np.ndarray | None = None  # (n, dim) float32 L2-normalised, zero rows where missing
    has_text: np.ndarray | None = None  # (n,) bool

    @property
    def size(self) -> int:
        return len(self.item_ids)


def user_text_vectors(
    histories: Sequence[np.ndarray], text: np.ndarray, has_text: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Mean of each user's history item embeddings, L2-normalised: ((b, dim), has (b,) bool)."""
    out = np.zeros((len(histories), text.shape[1]), dtype=np.float32)
    has = np.zeros(len(histories), dtype=bool)
    for u, history in enumerate(histories):
        known = history[has_text[history]] if len(history) else history
        if len(known) == 0:
            continue
        mean = text[known].mean(axis=0)
        norm = float(np.linalg.norm(mean))
        if norm > 0:
            out[u] = mean / norm
            has[u] = True
    return out, has


def zscore_rows(raw: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(raw - mean) / std per row, mean and std over the row's `mask` cells (std 0 -> 1)."""
    count = np.maximum(mask.sum(axis=1, keepdims=True), 1)
    mean = np.where(mask, raw, 0.0).sum(axis=1, keepdims=True) / count
    var = np.where(mask, (raw - mean) ** 2, 0.0).sum(axis=1, keepdims=True) / count
    std = np.sqrt(var)
    std[std < 1e-12] = 1.0
    return ((raw - mean) / std).astype(np.float32)


def hybrid_top_n(
    user_als: np.ndarray | None,
    user_has_als: np.ndarray,
    histories: Sequence[np.ndarray],
    items: ItemMatrices,
    *,
    n: int,
    text_weight: float,
    exclude_seen: bool = True,
    max_per_category: int = 0,
    backend: str = "auto",
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-n per user of the calibrated ALS/text mix: (indices, scores, source codes), each (b, n).

    Each source is z-scored per user over that user's candidate items; items with both
    scores get (1 - w) * als_z + w * text_z, items with one get that one; users with
    neither get popularity. Source codes index `SOURCES`; unfilled tail cells score -inf.
    """
    b = len(histories)
    candidates = np.broadcast_to(items.eligible, (b, items.size)).copy()
    if exclude_seen:
        _exclude_mask(candidates, histories)

    item_als, item_has_als = items.als, items.has_als
    item_text, item_has_text = items.text, items.has_text
    no_user = np.zeros(b, dtype=bool)
    scores = np.full((b, items.size), -np.inf, dtype=np.float32)

    als_mask = np.zeros_like(candidates)
    if item_als is not None and item_has_als is not None and user_als is not None:
        user_has_als = np.asarray(user_has_als, dtype=bool)
        als_mask = candidates & user_has_als[:, None] & item_has_als[None, :]
        if user_has_als.any():
            als_z = zscore_rows(user_als.astype(np.float32) @ item_als.T, als_mask)
            scores = np.where(als_mask, als_z, scores)
    else:
        user_has_als = no_user

    user_has_text = no_user
    if item_text is not None and item_has_text is not None:
        user_text, user_has_text = user_text_vectors(histories, item_text, item_has_text)
        text_mask = candidates & user_has_text[:, None] & item_has_text[None, :]
        if user_has_text.any():
            text_z = zscore_rows(user_text @ item_text.T, text_mask)
            scores = np.where(text_mask & ~als_mask, text_z, scores)
            both = als_mask & text_mask
            if both.any():
                mixed = (1.0 - text_weight) * scores + text_weight * text_z
                scores = np.where(both, mixed, scores)
    popular = ~(user_has_als | user_has_text)
    if popular.any():
        scores[popular] = np.where(candidates[popular], items.popularity[None, :], -np.inf)

    indices, top = select_top_n(
        scores,
        n,
        categories=items.categories,
        max_per_category=max_per_category,
        backend=backend,
    )
    return indices, top, _source_codes(indices, user_has_als, user_has_text, items)


def _exclude_mask(mask: np.ndarray, histories: Sequence[np.ndarray]) -> None:
    rows = [np.full(len(h), u, dtype=np.int64) for u, h in enumerate(histories) if len(h)]
    if rows:
        cols = [np.asarray(h, dtype=np.int64) for h in histories if len(h)]
        mask[np.concatenate(rows), np.concatenate(cols)] = False


def _source_codes(
    indices: np.ndarray, user_has_als: np.ndarray, user_has_text: np.ndarray, items: ItemMatrices
) -> np.ndarray:
    item_als = (
        items.has_als[indices] if items.has_als is not None else np.zeros(indices.shape, dtype=bool)
    )
    item_text = (
        items.has_text[indices]
        if items.has_text is not None
        else np.zeros(indices.shape, dtype=bool)
    )
    als_on = item_als & user_has_als[:, None]
    text_on = item_text & user_has_text[:, None]
    codes = np.full(indices.shape, _POPULAR, dtype=np.int8)
    codes[als_on & text_on] = _HYBRID
    codes[als_on & ~text_on] = _ALS
    codes[~als_on & text_on] = _TEXT
    return codes


def score_block_frame(
    users: pd.DataFrame,
    items: ItemMatrices,
    *,
    n: int,
    text_weight: float,
    exclude_seen: bool = True,
    max_per_category: int = 0,
) -> pd.DataFrame:
    """One block of users (user_id, als_features, history) -> rows of SCORED_SCHEMA."""
    histories = [
        np.asarray(h, dtype=np.int64) if h is not None else np.zeros(0, dtype=np.int64)
        for h in users["history"]
    ]
    user_als, has_als = _stack_factors(users["als_features"], items)
    indices, scores, codes = hybrid_top_n(
        user_als,
        has_als,
        histories,
        items,
        n=n,
        text_weight=text_weight,
        exclude_seen=exclude_seen,
        max_per_category=max_per_category,
    )
    keep = np.isfinite(scores)
    rows, cols = np.nonzero(keep)
    return pd.DataFrame(
        {
            "user_id": users["user_id"].to_numpy()[rows],
            "rank": (cols + 1).astype(np.int32),
            "item_id": items.item_ids[indices[rows, cols]],
            "score": scores[rows, cols].astype(np.float32),
            "source": np.asarray(SOURCES, dtype=object)[codes[rows, cols]],
        }
    )


def _stack_factors(
    features: pd.Series, items: ItemMatrices
) -> tuple[np.ndarray | None, np.ndarray]:
    has = np.array([f is not None and len(f) > 0 for f in features], dtype=bool)
    if items.als is None:
        return None, np.zeros(len(features), dtype=bool)
    out = np.zeros((len(features), items.als.shape[1]), dtype=np.float32)
    for u in np.flatnonzero(has):
        out[u] = np.asarray(features.iloc[u], dtype=np.float32)
    return out, has


# ---------------------------------------------------------------------------------------
# Spark: inputs, blockwise scoring, gate


def item_frame(
    catalog: DataFrame,
    *,
    popularity: DataFrame,
    item_factors: DataFrame | None,
    embeddings: DataFrame | None,
    exclude_categories: Sequence[str] = (),
    apply_rules: bool = True,
) -> DataFrame:
    """One row per catalog item: item_idx, item_id, category, eligible, popularity, als, text.

    `popularity` has (item_id, popularity); `item_factors` (id, features); `embeddings`
    (item_id, embedding). With apply_rules False every item is eligible (offline evaluation).
    """
    base = catalog.select("item_id", "category", "available").dropDuplicates(["item_id"])
    if apply_rules:
        unavailable = F.lower(F.trim(F.coalesce(F.col("available"), F.lit("true")))).isin(
            list(_UNAVAILABLE)
        )
        banned = F.coalesce(F.col("category").isin(list(exclude_categories)), F.lit(False))
        eligible = ~unavailable & ~banned
    else:
        eligible = F.lit(True)
    frame = base.withColumn("eligible", eligible).join(popularity, "item_id", "left")
    if item_factors is not None:
        frame = frame.join(
            item_factors.select(F.col("id").alias("item_id"), F.col("features").alias("als")),
            "item_id",
            "left",
        )
    else:
        frame = frame.withColumn("als", F.lit(None).cast("array<float>"))
    if embeddings is not None:
        frame = frame.join(
            embeddings.select("item_id", F.col("embedding").alias("text")), "item_id", "left"
        )
    else:
        frame = frame.withColumn("text", F.lit(None).cast("array<float>"))
    return frame.select(
        (F.row_number().over(Window.orderBy("item_id")) - 1).cast("int").alias("item_idx"),
        "item_id",
        "category",
        "eligible",
        F.coalesce(F.col("popularity"), F.lit(0.0)).cast("double").alias("popularity"),
        "als",
        "text",
    )


def item_matrices(items: pd.DataFrame) -> ItemMatrices:
    """The collected `item_frame` (pandas) as numpy matrices in item_idx order."""
    items = items.sort_values("item_idx").reset_index(drop=True)
    if not (items["item_idx"].to_numpy() == np.arange(len(items))).all():
        raise ValueError("item_idx must be 0..n-1")
    als_matrix, has_als = _dense(items["als"])
    text_matrix, has_text = _dense(items["text"])
    if text_matrix is not None:
        norms = np.linalg.norm(text_matrix, axis=1, keepdims=True)
        text_matrix = np.divide(text_matrix, norms, out=np.zeros_like(text_matrix), where=norms > 0)
        has_text &= norms[:, 0] > 0
    return ItemMatrices(
        item_ids=items["item_id"].to_numpy(dtype=object),
        eligible=items["eligible"].to_numpy(dtype=bool),
        popularity=items["popularity"].to_numpy(dtype=np.float32),
        categories=pd.factorize(items["category"].fillna(""))[0].astype(np.int32),
        als=als_matrix,
        has_als=has_als,
        text=text_matrix,
        has_text=has_text,
    )


def _dense(column: pd.Series) -> tuple[np.ndarray | None, np.ndarray | None]:
    has = np.array([v is not None and len(v) > 0 for v in column], dtype=bool)
    if not has.any():
        return None, None
    dims = {len(v) for v in column[has]}
    if len(dims) != 1:
        raise InputError(f"vectors of mixed dimensions {sorted(dims)} in one item matrix")
    out = np.zeros((len(column), dims.pop()), dtype=np.float32)
    out[has] = np.stack([np.asarray(v, dtype=np.float32) for v in column[has]])
    return out, has


def user_frame(
    users: DataFrame,
    *,
    history: DataFrame,
    item_index: DataFrame,
    user_factors: DataFrame | None,
) -> DataFrame:
    """One row per user: user_id, als_features (null without a factor), history (item indices).

    `history` has (user_id, item_id) pairs; `item_index` (item_id, item_idx).
    """
    seen = (
        history.join(item_index, "item_id")
        .groupBy("user_id")
        .agg(F.array_sort(F.collect_set("item_idx")).alias("history"))
    )
    frame = users.select("user_id").distinct().join(seen, "user_id", "left")
    if user_factors is not None:
        frame = frame.join(
            user_factors.select(
                F.col("id").alias("user_id"), F.col("features").alias("als_features")
            ),
            "user_id",
            "left",
        )
    else:
        frame = frame.withColumn("als_features", F.lit(None).cast("array<float>"))
    return frame


def score_users(
    users: DataFrame,
    items: Broadcast,
    *,
    n: int,
    text_weight: float,
    exclude_seen: bool = True,
    max_per_category: int = 0,
    block_size: int = 2048,
    partitions: int | None = None,
) -> DataFrame:
    """Top-n rows (SCORED_SCHEMA) for every row of `user_frame`, scored `block_size` users at a time.

    `items` is a broadcast `ItemMatrices` (deserialized once per Python worker). With
    `partitions`, users are first spread evenly (round robin) over that many tasks.
    """

    def score(batches: Iterable[pd.DataFrame]) -> Iterable[pd.DataFrame]:
        matrices = items.value
        for batch in batches:
            for start in range(0, len(batch), block_size):
                yield score_block_frame(
                    batch.iloc[start : start + block_size],
                    matrices,
                    n=n,
                    text_weight=text_weight,
                    exclude_seen=exclude_seen,
                    max_per_category=max_per_category,
                )

    frame = users.select("user_id", "als_features", "history")
    if partitions:
        frame = frame.repartition(partitions)
    return frame.mapInPandas(score, schema=SCORED_SCHEMA)


def scoring_partitions(n_users: int, block_size: int, parallelism: int) -> int:
    """Tasks for scoring: one per `block_size` users, at least one per core."""
    return max(1, parallelism, math.ceil(n_users / max(1, block_size)))


def gate_report(
    recs: DataFrame, users: DataFrame, seen: DataFrame | None, *, top_n: int
) -> DataFrame:
    """One row of gate counts: users, missing_users, short_lists, bad_ranks, score_increases, seen_items.

    One pass: each recommendation is flagged (seen pair, score above the previous rank's),
    folded per user, then joined to the expected users.
    """
    flagged = recs.select("user_id", "item_id", "rank", "score")
    if seen is not None:
        marks = seen.select("user_id", "item_id").distinct().withColumn("_seen", F.lit(1))
        flagged = flagged.join(marks, ["user_id", "item_id"], "left")
    else:
        flagged = flagged.withColumn("_seen", F.lit(None).cast("int"))
    by_rank = Window.partitionBy("user_id").orderBy("rank")
    flagged = flagged.withColumn("_up", (F.col("score") > F.lag("score").over(by_rank)).cast("int"))
    per_user = flagged.groupBy("user_id").agg(
        F.count("*").alias("rows"),
        F.countDistinct("item_id").alias("items"),
        F.countDistinct("rank").alias("ranks"),
        F.min("rank").alias("min_rank"),
        F.max("rank").alias("max_rank"),
        F.sum(F.coalesce("_up", F.lit(0))).alias("increases"),
        F.count("_seen").alias("seen"),
    )
    expected = users.select("user_id").distinct().withColumn("_expected", F.lit(1))
    covered = F.col("rows").isNotNull()
    short = covered & ((F.col("rows") != top_n) | (F.col("items") != top_n))
    bad_ranks = covered & (
        (F.col("ranks") != F.col("rows"))
        | (F.col("min_rank") != 1)
        | (F.col("max_rank") != F.col("rows"))
    )
    return expected.join(per_user, "user_id", "full").agg(
        F.count("_expected").alias("users"),
        F.sum((F.col("_expected").isNotNull() & ~covered).cast("long")).alias("missing_users"),
        F.sum((F.col("_expected").isNull()).cast("long")).alias("unexpected_users"),
        F.sum(short.cast("long")).alias("short_lists"),
        F.sum(bad_ranks.cast("long")).alias("bad_ranks"),
        F.coalesce(F.sum("increases"), F.lit(0)).cast("long").alias("score_increases"),
        F.coalesce(F.sum("seen"), F.lit(0)).cast("long").alias("seen_items"),
    )


def check_gate(report: dict[str, int], *, top_n: int) -> None:
    """Raise GateError naming the first failed check of a `gate_report` row."""
    users = report["users"]
    checks = [
        ("missing_users", f"users without recommendations (threshold 0 of {users})"),
        ("unexpected_users", "users with recommendations who are not known users (threshold 0)"),
        ("short_lists", f"users with fewer than {top_n} distinct items (threshold 0 of {users})"),
        ("bad_ranks", "users whose ranks are not 1..N (threshold 0)"),
        ("score_increases", "rows whose score exceeds the previous rank's (threshold 0)"),
        ("seen_items", "recommended items the user already interacted with (threshold 0)"),
    ]
    for key, what in checks:
        if report.get(key):
            raise GateError(f"recommend gate '{key}' failed: {report[key]} {what}")


# ---------------------------------------------------------------------------------------
# Stage


def embedding_frame(ctx: RunContext) -> tuple[DataFrame, str]:
    """Current item embeddings (item_id, embedding) of the fine-tuned model, else the base model."""
    from llmrec_spark import embed

    base_id = embed.base_model_id(ctx.cfg.embed)
    if ctx.cfg.contrastive.enabled:
        from llmrec_spark.contrastive import tuned_model_id

        tuned_id = tuned_model_id(base_id, ctx.ds)
        tuned = embed.latest_embeddings(ctx.store, tuned_id, ctx.cfg.embed)
        if tuned.limit(1).count():
            return tuned.select("item_id", "embedding"), tuned_id
        log.info("recommend: no embeddings under %s; using the base model", tuned_id)
    base = embed.latest_embeddings(ctx.store, base_id, ctx.cfg.embed)
    return base.select("item_id", "embedding"), base_id


def popularity_frame(events: DataFrame) -> DataFrame:
    """Weighted interaction count per item: (item_id, popularity)."""
    return events.groupBy("item_id").agg(F.sum("weight").alias("popularity"))


def broadcast_items(ctx: RunContext, frame: DataFrame) -> tuple[Broadcast, ItemMatrices]:
    """Collect an `item_frame` to the driver and broadcast its matrices."""
    matrices = item_matrices(frame.toPandas())
    return ctx.spark.sparkContext.broadcast(matrices), matrices


def run_recommend(ctx: RunContext) -> StageResult:
    """Score every known user for ctx.ds, gate the result, overwrite its `recommendations` partition."""
    from llmrec_spark import als  # here, not at the top: pandas UDF workers import this module

    cfg: RecommendConfig = ctx.cfg.recommend
    started = time.perf_counter()
    window = als.training_window(ctx.store.read("events_clean"), ctx.ds, ctx.cfg.als.train_days)
    factors = ctx.store.read("als_factors", where={"ds": ctx.ds})
    if factors.limit(1).count() == 0:
        raise InputError(
            f"no ALS factors for ds={ctx.ds}; run `llmrec train-als --ds {ctx.ds}` first"
        )
    catalog = ctx.store.read("items")
    if catalog.limit(1).count() == 0:
        raise InputError(
            "the items table is empty; run `llmrec clean` (it loads the catalog) first"
        )
    embeddings, text_model = embedding_frame(ctx)

    items = item_frame(
        catalog,
        popularity=popularity_frame(window),
        item_factors=factors.where(F.col("kind") == "item"),
        embeddings=embeddings,
        exclude_categories=cfg.exclude_categories,
    ).cache()
    items_bc, matrices = broadcast_items(ctx, items)
    log.info(
        "recommend: %d items (%d eligible, %s ALS, %s text) broadcast after %.1fs",
        matrices.size,
        int(matrices.eligible.sum()),
        0 if matrices.has_als is None else int(matrices.has_als.sum()),
        0 if matrices.has_text is None else int(matrices.has_text.sum()),
        time.perf_counter() - started,
    )

    seen = window.select("user_id", "item_id").distinct()
    users = (
        ctx.store.read("events_clean")
        .where(F.col("ds") <= ctx.ds)
        .select("user_id")
        .unionByName(factors.where(F.col("kind") == "user").select(F.col("id").alias("user_id")))
        .distinct()
        .cache()
    )
    n_users = users.count()
    if n_users == 0:
        raise InputError(f"no users in events_clean up to {ctx.ds}; run `llmrec clean` first")
    user_rows = user_frame(
        users,
        history=seen,
        item_index=items.select("item_id", "item_idx"),
        user_factors=factors.where(F.col("kind") == "user"),
    )
    model_version = ctx.parent_run_id or ctx.stage_run_id or "local"
    recs = (
        score_users(
            user_rows,
            items_bc,
            n=cfg.top_n,
            text_weight=cfg.text_weight,
            exclude_seen=cfg.exclude_seen,
            max_per_category=cfg.max_per_category,
            block_size=cfg.user_block_size,
            partitions=scoring_partitions(
                n_users, cfg.user_block_size, ctx.spark.sparkContext.defaultParallelism
            ),
        )
        .withColumn("model_version", F.lit(model_version))
        .withColumn("ds", F.lit(ctx.ds))
        .cache()
    )
    scoring_started = time.perf_counter()
    report = gate_report(
        recs, users, seen if cfg.exclude_seen else None, top_n=cfg.top_n
    ).collect()[0]
    scoring_s = time.perf_counter() - scoring_started
    log.info(
        "recommend: scored and gated %d users in %.1fs (%.0f users/s)",
        n_users,
        scoring_s,
        n_users / max(scoring_s, 1e-9),
    )
    check_gate(report.asDict(), top_n=cfg.top_n)

    ctx.store.overwrite(
        "recommendations",
        recs,
        partitions={"ds": ctx.ds},
        metadata={
            "model_version": model_version,
            "mlflow_run_id": ctx.stage_run_id or "",
            "text_model": text_model,
        },
    )
    by_source = {row["source"]: row["count"] for row in recs.groupBy("source").count().collect()}
    n_rows = sum(by_source.values())
    shares = {s: round(by_source.get(s, 0) / n_rows, 4) for s in SOURCES if by_source.get(s)}
    samples = sample_lists(recs, catalog, window, n_users=3)
    recs.unpersist()
    users.unpersist()
    items.unpersist()
    items_bc.unpersist()
    log.info(
        "recommend: %d users x top-%d from %d items, sources %s, text model %s (%.1fs)",
        n_users,
        cfg.top_n,
        matrices.size,
        shares,
        text_model,
        time.perf_counter() - started,
    )
    return StageResult(
        rows_in=n_users,
        rows_out=n_rows,
        params={f"recommend.{k}": v for k, v in vars(cfg).items()}
        | {"recommend.text_model": text_model},
        metrics={"recommend_users": float(n_users), "scoring_seconds": scoring_s}
        | {f"share_{s}": v for s, v in shares.items()},
        summary={
            "users": n_users,
            "items": matrices.size,
            "share_by_source": shares,
            "text_model": text_model,
            "model_version": model_version,
            "samples": samples,
        },
    )


def sample_lists(
    recs: DataFrame, catalog: DataFrame, events: DataFrame, *, n_users: int = 3, n_items: int = 10
) -> list[dict[str, Any]]:
    """Top items with titles for a few users (one per top-1 source first): the nightly prints them."""
    firsts = (
        recs.where(F.col("rank") == 1)
        .groupBy("source")
        .agg(F.min("user_id").alias("user_id"))
        .collect()
    )
    order = {s: i for i, s in enumerate(SOURCES)}
    chosen = [
        r["user_id"] for r in sorted(firsts, key=lambda r: order.get(r["source"], len(order)))
    ]
    chosen = chosen[:n_users]
    if len(chosen) < n_users:
        more = (
            recs.where((F.col("rank") == 1) & ~F.col("user_id").isin(chosen))
            .select("user_id")
            .orderBy("user_id")
            .limit(n_users - len(chosen))
            .collect()
        )
        chosen += [r["user_id"] for r in more]
    rows = recs.where(F.col("user_id").isin(chosen) & (F.col("rank") <= n_items)).collect()
    touched = (
        events.where(F.col("user_id").isin(chosen))
        .groupBy("user_id", "item_id")
        .agg(F.max("event_ts").alias("last_ts"))
        .collect()
    )
    wanted = {r["item_id"] for r in rows} | {r["item_id"] for r in touched}
    titles = {
        r["item_id"]: (r["title"], r["category"])
        for r in catalog.where(F.col("item_id").isin(sorted(wanted)))
        .select("item_id", "title", "category")
        .collect()
    }
    out = []
    for user in chosen:
        recent = sorted(
            (r for r in touched if r["user_id"] == user), key=lambda r: r["last_ts"], reverse=True
        )
        items = sorted((r for r in rows if r["user_id"] == user), key=lambda r: r["rank"])
        out.append(
            {
                "user_id": user,
                "history": [
                    titles.get(r["item_id"], (r["item_id"],))[0] or r["item_id"] for r in recent[:5]
                ],
                "items": [
                    {
                        "rank": r["rank"],
                        "item_id": r["item_id"],
                        "title": titles.get(r["item_id"], (None, None))[0],
                        "category": titles.get(r["item_id"], (None, None))[1],
                        "score": float(r["score"]),
                        "source": r["source"],
                    }
                    for r in items
                ],
            }
        )
    return out
