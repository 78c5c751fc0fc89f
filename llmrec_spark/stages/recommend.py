"""Top-N scoring: hybrid ALS + text scores per user block, a quality gate, then publishing.

The core is numpy (`top_n_block`, `select_top_n`, `hybrid_top_n`, `score_block_frame`):
it is what a pandas UDF (`mapInPandas`) runs per block of users, with the item matrices
broadcast once (`ItemMatrices`). No user x item cross join is ever built in Spark: users are
spread over tasks, each task scores blocks of `recommend.user_block_size` users, and each
block is one matrix product plus an exact partial sort. The evaluation stage scores its
holdout users with the same functions.

Where the time goes at 50k users x 20k items (rank 64): the matrix product is the floor; the
z-score calibration is affine, so it is folded into the product's operands (item-side Gram
totals give each user's mean and std without a pass over the score matrix), and the top-n
choice sorts only the columns above a per-row lower bound (`_select_prefiltered`).
`bench_topn` measures all of it against MLlib's recommendForAllUsers (`llmrec bench topn`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
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
from pyspark.sql.types import FloatType, IntegerType, StringType, StructField, StructType

from llmrec_spark.config import RecommendConfig
from llmrec_spark.errors import GateError, InputError
from llmrec_spark.io.tables import TableStore
from llmrec_spark.runtime import registry
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.indexing import dense_index
from llmrec_spark.schema import SOURCE_ALS, SOURCE_HYBRID, SOURCE_POPULAR, SOURCE_TEXT

log = logging.getLogger(__name__)

# Index = the code `hybrid_top_n` returns per recommended item.
SOURCES = (SOURCE_HYBRID, SOURCE_ALS, SOURCE_TEXT, SOURCE_POPULAR)
_HYBRID, _ALS, _TEXT, _POPULAR = range(4)

# A StructType, not DDL: parsing DDL is a JVM round trip (~10 ms) per small driver-path call.
SCORED_SCHEMA = StructType(
    [
        StructField("user_id", StringType()),
        StructField("rank", IntegerType()),
        StructField("item_id", StringType()),
        StructField("score", FloatType()),
        StructField("source", StringType()),
    ]
)
# Below this many scores per block the torch import costs more than argpartition.
_TORCH_MIN_CELLS = 200_000
# Bound prefilter (`_select_prefiltered`): used when there are at least ITEMS_PER_N * n items;
# rows keeping more than 1 / MAX_SHARE of the items as candidates fall back to a partial sort.
_PREFILTER_ITEMS_PER_N = 32
_PREFILTER_GROUPS_PER_N = 4
_PREFILTER_MAX_SHARE = 8
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
    if 0 < n < scores.shape[1] and scores.shape[1] >= _PREFILTER_ITEMS_PER_N * n:
        return _select_prefiltered(scores, n, backend)
    return _select_partial(scores, n, backend)


def _select_prefiltered(scores: np.ndarray, n: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-n (ties to the lower index) that sorts only the columns above a per-row bound.

    Cut a row into `_PREFILTER_GROUPS_PER_N * n` groups of columns: the n-th largest group
    maximum is n distinct columns' scores, so at most the row's n-th best score. Every column
    at least that bound (ties at the cut included) is a candidate -- a few times n per row --
    and only candidates are sorted. Rows the bound does not thin out (mostly -inf, ties, NaN)
    take the partial-sort path.
    """
    b, n_items = scores.shape
    groups = _PREFILTER_GROUPS_PER_N * n
    size = n_items // groups
    maxima = scores[:, : groups * size].reshape(b, groups, size).max(axis=2)
    bound = np.partition(maxima, groups - n, axis=1)[:, groups - n]
    flat = np.flatnonzero(scores >= bound[:, None])
    rows = flat // n_items
    counts = np.bincount(rows, minlength=b)
    heavy = (counts < n) | (counts * _PREFILTER_MAX_SHARE > n_items)
    if heavy.any():
        keep = ~heavy[rows]
        flat, rows = flat[keep], rows[keep]
        counts[heavy] = 0
    width = max(int(counts.max()), n)
    starts = np.cumsum(counts) - counts
    slots = np.arange(flat.size) - starts[rows]
    cols = np.full((b, width), n_items, dtype=np.int64)  # padding sorts after every real column
    cols[rows, slots] = flat - rows * n_items
    values = np.full((b, width), -np.inf, dtype=np.float32)
    values[rows, slots] = scores.ravel()[flat]
    # Candidates are in column order per row and padding trails, so a stable sort by score
    # breaks ties by the lower column index.
    order = np.argsort(-values, axis=1, kind="stable")[:, :n]
    indices = np.take_along_axis(cols, order, axis=1)
    top = np.take_along_axis(values, order, axis=1)
    if heavy.any():
        indices[heavy], top[heavy] = _select_partial(scores[heavy], n, backend)
    return indices, top


def _select_partial(scores: np.ndarray, n: int, backend: str) -> tuple[np.ndarray, np.ndarray]:
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
class Mix:
    """How `hybrid_scores` mixes: the text weight for items with both scores, the offset for
    items scored by text alone, the recency half-life (history items; 0 = plain mean) of the
    user's text vector; the weight and half-life of the recent-items term in the
    collaborative score (the user's recent items' ALS factors; weight 0 = ALS alone); and the
    kernel width of the text-only items' match against the history (0 = the mean vector's
    cosine, see `history_kernel_scores`)."""

    text_weight: float
    cold_offset: float = 0.0
    text_half_life: float = 0.0
    recent_weight: float = 0.0
    recent_half_life: float = 0.0
    text_kernel: float = 0.0
    neighbour_factors: int = 0
    neighbour_temperature: float = 0.05

    @classmethod
    def configured(cls, cfg: RecommendConfig) -> Mix:
        """The mix `recommend` ships with (recommend.text_weight, cold_offset, text_half_life,
        recent_weight, recent_half_life, text_kernel, neighbour_factors and temperature)."""
        return cls(
            cfg.text_weight,
            cfg.cold_offset,
            cfg.text_half_life,
            cfg.recent_weight,
            cfg.recent_half_life,
            cfg.text_kernel,
            cfg.neighbour_factors,
            cfg.neighbour_temperature,
        )


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
    # (n,) bool: the ALS factor is borrowed from text neighbours (`with_neighbour_factors`)
    borrowed: np.ndarray | None = None

    @property
    def size(self) -> int:
        return len(self.item_ids)

    def with_neighbour_factors(self, k: int, temperature: float) -> ItemMatrices:
        """These items with a borrowed ALS factor for every item that has text and no factor
        (`neighbour_factors`); `self` when k is 0 or nothing can borrow. Cached per (k,
        temperature): the broadcast value computes it once per Python worker."""
        if k <= 0 or self.als is None or self.has_als is None or self.text is None:
            return self
        assert self.has_text is not None
        cache = self.__dict__.setdefault("_with_neighbours", {})
        if (k, temperature) not in cache:
            als, borrowed = neighbour_factors(
                self.als, self.has_als, self.text, self.has_text, k=k, temperature=temperature
            )
            cache[(k, temperature)] = (
                dataclasses.replace(
                    self, als=als, has_als=self.has_als | borrowed, borrowed=borrowed
                )
                if borrowed.any()
                else self
            )
        return cache[(k, temperature)]

    # Computed once per Python worker (the broadcast value lives as long as the worker).
    def score_buffer(self, rows: int) -> np.ndarray:
        """A (rows, items) float32 buffer that every block scored in this process reuses.

        A cache, not state: fresh (b, items) matrices per block cost page faults that are a
        sizeable share of the matrix product itself.
        """
        buffer = self.__dict__.get("_score_buffer")
        if buffer is None or buffer.shape[0] < rows:
            buffer = np.empty((rows, self.size), dtype=np.float32)
            self.__dict__["_score_buffer"] = buffer
        return buffer[:rows]

    @functools.cached_property
    def als_totals(self) -> ItemTotals | None:
        if self.als is None or self.has_als is None:
            return None
        return item_totals(self.als, self.eligible & self.has_als)

    @functools.cached_property
    def als_unit(self) -> np.ndarray | None:
        """The ALS factors L2-normalised (zero rows stay zero): the recent-items term's items."""
        if self.als is None:
            return None
        norms = np.linalg.norm(self.als, axis=1, keepdims=True)
        return (self.als / np.maximum(norms, 1e-12)).astype(np.float32)

    @functools.cached_property
    def als_unit_totals(self) -> ItemTotals | None:
        if self.als_unit is None or self.has_als is None:
            return None
        return item_totals(self.als_unit, self.eligible & self.has_als)

    @functools.cached_property
    def text_totals(self) -> ItemTotals | None:
        if self.text is None or self.has_text is None:
            return None
        return item_totals(self.text, self.eligible & self.has_text)


@dataclass(frozen=True)
class ItemTotals:
    """Sum (d,) and Gram matrix (d, d) in float64 of some items' vectors, and how many."""

    total: np.ndarray
    gram: np.ndarray
    count: int


def item_totals(vectors: np.ndarray, columns: np.ndarray) -> ItemTotals:
    chosen = vectors[columns].astype(np.float64)  # (m, d)
    return ItemTotals(chosen.sum(axis=0), chosen.T @ chosen, int(columns.sum()))


def history_vectors(
    histories: Sequence[np.ndarray],
    vectors: np.ndarray,
    has_vector: np.ndarray,
    half_life: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of each user's history item vectors, L2-normalised: ((b, dim), has (b,) bool).

    The vectors are the items' text embeddings, or their unit ALS factors for the recent-items
    term. Histories are oldest first. With `half_life` h > 0 the item k places from the newest
    weighs 0.5 ** (k / h) (recent taste counts more); 0 is the plain mean.
    """
    out = np.zeros((len(histories), vectors.shape[1]), dtype=np.float32)
    has = np.zeros(len(histories), dtype=bool)
    for u, history in enumerate(histories):
        history = np.asarray(history, dtype=np.int64)
        if len(history) == 0:
            continue
        known = has_vector[history]
        if not known.any():
            continue
        if half_life > 0:
            age = np.arange(len(history) - 1, -1, -1, dtype=np.float64)[known]  # (k,)
            weights = 0.5 ** (age / half_life)
            mean = (vectors[history[known]] * weights[:, None]).sum(axis=0)
        else:
            mean = vectors[history[known]].mean(axis=0)
        norm = float(np.linalg.norm(mean))
        if norm > 0:
            out[u] = mean / norm
            has[u] = True
    return out, has


def history_kernel_scores(
    histories: Sequence[np.ndarray],
    vectors: np.ndarray,
    has_vector: np.ndarray,
    columns: np.ndarray,
    *,
    kernel: float,
    max_cells: int = 1 << 22,
) -> tuple[np.ndarray, np.ndarray]:
    """Each user's soft best match of the items at `columns` against their history:
    ((b, len(columns)) float32, has (b,) bool).

    The score of item c is kernel * log(mean_h exp(cos(h, c) / kernel)) over the user's
    history items h with a vector (unit rows). A small kernel follows the closest history
    item (its limit is the maximum cosine), a large one the mean (its limit ranks as the mean
    vector does): one film close to a new one counts for more than many loosely related
    ones. `max_cells` bounds the (history items, columns) block held at once (one user's
    history is never split).
    """
    if kernel <= 0:
        raise ValueError(f"kernel must be positive, got {kernel}")
    b = len(histories)
    out = np.zeros((b, len(columns)), dtype=np.float32)
    as_indices = [np.asarray(h, dtype=np.int64) for h in histories]
    known = [h[has_vector[h]] for h in as_indices]  # the history items with a vector
    lengths = np.array([len(h) for h in known], dtype=np.int64)
    candidates = np.ascontiguousarray(vectors[columns], dtype=np.float32)  # (c, d)
    per_block = max(1, max_cells // max(len(columns), 1))
    user = 0
    while user < b:
        stop, rows = user, 0
        while stop < b and (stop == user or rows + lengths[stop] <= per_block):
            rows += int(lengths[stop])
            stop += 1
        block = [u for u in range(user, stop) if lengths[u]]
        user = stop
        if not block or not len(columns):
            continue
        items = np.concatenate([known[u] for u in block])
        starts = np.concatenate([[0], np.cumsum(lengths[block])[:-1]])
        sims = vectors[items].astype(np.float32) @ candidates.T  # (rows, c) cosines
        # Shifted by each user's best cosine: the largest term is exp(0) = 1, the sum >= 1.
        best = np.maximum.reduceat(sims, starts, axis=0)  # (users, c)
        sims -= np.repeat(best, lengths[block], axis=0)
        np.exp(sims / kernel, out=sims)
        means = np.add.reduceat(sims, starts, axis=0) / lengths[block][:, None]
        out[block] = best + kernel * np.log(means)
    return out, lengths > 0


def masked_moments(
    users: np.ndarray,
    items: np.ndarray,
    columns: np.ndarray,
    seen_rows: np.ndarray,
    seen_cols: np.ndarray,
    totals: ItemTotals | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of `users @ items.T` per row over `columns` minus that row's seen columns.

    Without the score matrix: sums come from the items' sum and Gram matrix (`totals`, float64,
    computed when not given), the seen cells' scores are subtracted. Returns ((b,), (b,))
    float64; a std below 1e-12 is 1.
    """
    totals = totals or item_totals(items, columns)
    users64 = users.astype(np.float64)  # (b, d)
    total = users64 @ totals.total
    squares = ((users64 @ totals.gram) * users64).sum(axis=1)
    count = np.full(len(users), float(totals.count))
    keep = columns[seen_cols]
    if keep.any():
        rows, cols = seen_rows[keep], seen_cols[keep]
        dots = np.einsum("ij,ij->i", users64[rows], items[cols])
        total -= np.bincount(rows, dots, minlength=len(users))
        squares -= np.bincount(rows, dots * dots, minlength=len(users))
        count -= np.bincount(rows, minlength=len(users))
    count = np.maximum(count, 1.0)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    std[std < 1e-12] = 1.0
    return mean, std


def hybrid_top_n(
    user_als: np.ndarray | None,
    user_has_als: np.ndarray,
    histories: Sequence[np.ndarray],
    items: ItemMatrices,
    *,
    n: int,
    mix: Mix,
    exclude_seen: bool = True,
    max_per_category: int = 0,
    backend: str = "auto",
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-n per user of the calibrated ALS/text mix: (indices, scores, source codes), each (b, n).

    See `hybrid_scores` for the score; this selects the top n (category cap applied).
    """
    scores, has_als, has_text = hybrid_scores(
        user_als,
        user_has_als,
        histories,
        items,
        mix=mix,
        exclude_seen=exclude_seen,
        out=out,
    )
    indices, top = select_top_n(
        scores,
        n,
        categories=items.categories,
        max_per_category=max_per_category,
        backend=backend,
    )
    borrowing = items.with_neighbour_factors(mix.neighbour_factors, mix.neighbour_temperature)
    return indices, top, _source_codes(indices, has_als, has_text, borrowing)


def hybrid_scores(
    user_als: np.ndarray | None,
    user_has_als: np.ndarray,
    histories: Sequence[np.ndarray],
    items: ItemMatrices,
    *,
    mix: Mix,
    exclude_seen: bool = True,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(b, items) scores of the calibrated ALS/text mix, -inf where not a candidate; and
    has_collaborative, has_text (b,).

    Each source is z-scored per user over that user's candidate items (eligible, unseen, with
    that source's vector). The collaborative score of an item with an ALS factor is the ALS
    z-score, or with `mix.recent_weight` r > 0, (1 - r) * als_z + r * recent_z: recent_z
    scores the item's unit ALS factor against the (`mix.recent_half_life`) recency-weighted
    mean of the unit factors of the user's history -- what the user did last, which the ALS
    user factor does not know (a user with no factor of their own but factored history items
    gets recent_z alone). Items with both a collaborative and a text score get
    (1 - w) * collaborative + w * text_z, items with one get that one, plus
    `mix.cold_offset` for items scored by text alone (no ALS factor: the calibration of a
    text-only score against the mixed ones); users with neither get popularity.
    Non-candidates (ineligible, seen, no vector) score -inf. The user's text vector is the
    (recency-weighted, `mix.text_half_life`) mean of their history's (`history_vectors`).
    With `mix.text_kernel` > 0 the text-only items are scored instead by their kernel match
    against each history item (`history_kernel_scores`, every history item weighing the same:
    `text_half_life` shapes the mean vector only), z-scored over the user's unseen text-only
    items and a spaced sample of the other text items (`_kernel_z`).

    A z-score is affine in the raw score, so each item group (both vectors, ALS only, text
    only) is one matrix product of per-user scaled vectors with [als | unit als | text | 1]:
    the (b, items) matrix is written once, never rescaled in place -- into `out` when given
    (float32, C-contiguous, at least (b, items); reusing it saves page faults per block).
    """
    items = items.with_neighbour_factors(mix.neighbour_factors, mix.neighbour_temperature)
    b = len(histories)
    none = np.zeros(b, dtype=bool)
    seen_rows, seen_cols = _seen_pairs(histories) if exclude_seen else (_NO_PAIRS, _NO_PAIRS)
    eligible = np.asarray(items.eligible, dtype=bool)

    # Per score source present: (source, user vectors (b, d), item matrix (items, d), the
    # z-score's per-user scale and shift (b,), 0 for users without that source).
    parts: list[tuple[str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add_part(
        source: str,
        users: np.ndarray,
        has: np.ndarray,
        matrix: np.ndarray,
        columns: np.ndarray,
        totals: ItemTotals | None,
    ) -> None:
        mean, std = masked_moments(users, matrix, columns, seen_rows, seen_cols, totals)
        scale, shift = np.where(has, 1.0 / std, 0.0), np.where(has, -mean / std, 0.0)
        parts.append((source, users, matrix, scale, shift))

    item_a = np.zeros(items.size, dtype=bool)
    has_als, has_recent = none, none
    if items.als is not None and items.has_als is not None:
        item_a = eligible & items.has_als
        if user_als is not None:
            has_als = np.asarray(user_has_als, dtype=bool)
            user_a = np.asarray(user_als, dtype=np.float32)
            add_part("als", user_a, has_als, items.als, item_a, items.als_totals)
        if mix.recent_weight > 0 and items.als_unit is not None:
            user_r, has_recent = history_vectors(
                histories, items.als_unit, items.has_als, mix.recent_half_life
            )
            if has_recent.any():
                add_part(
                    "recent", user_r, has_recent, items.als_unit, item_a, items.als_unit_totals
                )
    has_text, item_t = none, np.zeros(items.size, dtype=bool)
    if items.text is not None and items.has_text is not None:
        user_t, has_text = history_vectors(
            histories, items.text, items.has_text, mix.text_half_life
        )
        if has_text.any():
            item_t = eligible & items.has_text
            add_part("text", user_t, has_text, items.text, item_t, items.text_totals)

    # Per item group: each source's per-user weight, who may use the group, and an offset.
    has_collab = has_als | has_recent
    r = float(mix.recent_weight)
    collab = {
        "als": np.where(has_recent, 1.0 - r, 1.0) * has_als,
        "recent": np.where(has_als, r, 1.0) * has_recent,
    }
    w = float(mix.text_weight)
    collab_share = np.where(has_text, 1.0 - w, 1.0)
    both_weights = {
        "als": collab["als"] * collab_share,
        "recent": collab["recent"] * collab_share,
        "text": np.where(has_collab, w, 1.0) * has_text,
    }
    # Text-only items are offset only for users whose other candidates carry an ALS score.
    offset_t = np.where(has_collab & has_text, float(mix.cold_offset), 0.0)
    zeros = np.zeros(b)
    # Items with a borrowed factor are new items too: scored as known ones, offset as new
    # for every user with a collaborative score (their score is one).
    borrowed = items.borrowed if items.borrowed is not None else np.zeros(items.size, bool)
    offset_b = np.where(has_collab, float(mix.cold_offset), 0.0)
    groups = [
        (item_a & item_t & ~borrowed, both_weights, has_collab | has_text, zeros),
        (item_a & ~item_t & ~borrowed, collab, has_collab, zeros),
        (item_t & ~item_a, {"text": has_text * 1.0}, has_text, offset_t),
        (item_a & borrowed, both_weights, has_collab | has_text, offset_b),
    ]
    features = np.hstack(
        [matrix for _, _, matrix, _, _ in parts] + [np.ones((items.size, 1), dtype=np.float32)]
    ).astype(np.float32, copy=False)  # (items, sum of dims + 1)

    def user_side(weights: dict[str, np.ndarray], offset: np.ndarray) -> np.ndarray:
        # (b, sum of dims + 1)
        columns, constant = [], offset.copy()
        for source, users, _, scale, shift in parts:
            weight = weights.get(source, zeros)
            columns.append(users * (weight * scale)[:, None].astype(np.float32))
            constant += weight * shift
        columns.append(constant[:, None].astype(np.float32))
        return np.hstack(columns).astype(np.float32, copy=False)

    counts = [int(g[0].sum()) for g in groups]
    main = int(np.argmax(counts))
    _, weights, _, offset = groups[main]
    # (b, items): the main group's formula everywhere, then the other groups' columns
    scores = np.matmul(user_side(weights, offset), features.T, out=None if out is None else out[:b])
    text_only = 2  # groups[2]: the items scored by text alone
    kernel_text = mix.text_kernel > 0 and has_text.any()
    for k, (columns, weights, users_ok, offset) in enumerate(groups):
        cols = np.flatnonzero(columns)
        if k == text_only and kernel_text and len(cols):
            scores[:, cols] = _kernel_z(
                histories, items, cols, item_t, mix, seen_rows, seen_cols, offset
            )
        elif k != main and len(cols):
            scores[:, cols] = user_side(weights, offset) @ features[cols].T
        bad_rows = np.flatnonzero(~users_ok)
        if len(cols) and len(bad_rows):
            scores[np.ix_(bad_rows, cols)] = -np.inf
    scores[:, ~(item_a | item_t)] = -np.inf
    popular = ~(has_collab | has_text)
    if popular.any():
        scores[popular] = np.where(eligible, items.popularity, -np.inf)[None, :]
    if len(seen_rows):
        scores[seen_rows, seen_cols] = -np.inf
    return scores, has_collab, has_text


KERNEL_REFERENCE_ITEMS = 512  # other text items a kernel z-score is calibrated on, at most


def _kernel_z(
    histories: Sequence[np.ndarray],
    items: ItemMatrices,
    cols: np.ndarray,
    text_items: np.ndarray,
    mix: Mix,
    seen_rows: np.ndarray,
    seen_cols: np.ndarray,
    offset: np.ndarray,
) -> np.ndarray:
    """(b, len(cols)): the text-only items' kernel scores (`history_kernel_scores`) as
    z-scores per user, plus `offset`.

    The mean and std are taken over the user's unseen items among `cols` and up to
    `KERNEL_REFERENCE_ITEMS` evenly spaced other items of `text_items` (bool, the text
    candidates): with three new items, the best of them must not get a high z-score just
    for being the best of three.
    """
    assert items.text is not None and items.has_text is not None
    pool = np.flatnonzero(text_items)
    spaced = pool[np.unique(np.linspace(0, len(pool) - 1, KERNEL_REFERENCE_ITEMS).astype(np.int64))]
    reference = np.union1d(cols, spaced)
    raw, _ = history_kernel_scores(
        histories, items.text, items.has_text, reference, kernel=mix.text_kernel
    )
    unseen = np.ones(raw.shape, dtype=bool)
    position = np.full(items.size, -1, dtype=np.int64)
    position[reference] = np.arange(len(reference))
    hit = position[seen_cols] >= 0
    unseen[seen_rows[hit], position[seen_cols[hit]]] = False
    count = np.maximum(unseen.sum(axis=1), 1)
    mean = np.where(unseen, raw, 0.0).sum(axis=1) / count
    centred = np.where(unseen, raw - mean[:, None], 0.0)
    std = np.sqrt((centred * centred).sum(axis=1) / count)
    std[std < 1e-12] = 1.0
    picked = raw[:, position[cols]]
    return ((picked - mean[:, None]) / std[:, None] + offset[:, None]).astype(np.float32)


_NO_PAIRS = np.zeros(0, dtype=np.int64)


def _seen_pairs(histories: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of every distinct (user position, history item index) pair."""
    lengths = np.fromiter((len(h) for h in histories), dtype=np.int64, count=len(histories))
    if not lengths.any():
        return _NO_PAIRS, _NO_PAIRS
    # One repeat, not an array per user: at ~1k users the per-user arrays cost more than the sort.
    rows = np.repeat(np.arange(len(histories), dtype=np.int64), lengths)
    cols = np.concatenate([np.asarray(h, dtype=np.int64) for h in histories])
    width = int(cols.max()) + 1
    pairs = np.unique(rows * width + cols)
    return pairs // width, pairs % width


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
    if items.borrowed is not None:  # a new item with a borrowed factor: its text placed it
        codes[items.borrowed[indices] & (als_on | text_on)] = _TEXT
    return codes


def score_block_frame(
    users: pd.DataFrame,
    items: ItemMatrices,
    *,
    n: int,
    mix: Mix,
    exclude_seen: bool = True,
    max_per_category: int = 0,
    scratch: np.ndarray | None = None,
) -> pd.DataFrame:
    """One block of users (user_id, als_features, history) -> rows of SCORED_SCHEMA.

    `scratch`: an optional reusable (block size, items) float32 buffer for the scores.
    """
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
        mix=mix,
        exclude_seen=exclude_seen,
        max_per_category=max_per_category,
        out=scratch,
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
    if has.any():
        out[has] = np.stack([np.asarray(f, dtype=np.float32) for f in features[has]])
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
    Runs the small jobs of `dense_index`.
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
    index = dense_index(base.select("item_id"), "item_idx", "item_id")
    return frame.join(index, "item_id").select(
        "item_idx",
        "item_id",
        "category",
        "eligible",
        F.coalesce(F.col("popularity"), F.lit(0.0)).cast("double").alias("popularity"),
        "als",
        "text",
    )


def neighbour_factors(
    als: np.ndarray,
    has_als: np.ndarray,
    text: np.ndarray,
    has_text: np.ndarray,
    *,
    k: int,
    temperature: float,
    block: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """(factors, borrowed): every item with text and no ALS factor gets the weighted mean of
    the ALS factors of its `k` most text-similar items that have both, weights
    softmax(cosine / temperature); other rows are `als` as given.

    Why: a new item's text places it among the known items, and their factors carry what
    text alone cannot -- how widely each kind of item is taken up and by whom -- on the same
    scale as every known item's score. Rows are unit text vectors; (items, rank) float32.
    """
    donors = np.flatnonzero(has_als & has_text)
    targets = np.flatnonzero(has_text & ~has_als)
    borrowed = np.zeros(len(als), dtype=bool)
    if len(donors) == 0 or len(targets) == 0 or k <= 0:
        return als, borrowed
    k = min(k, len(donors))
    out = als.copy()
    donor_text, donor_als = text[donors], als[donors]
    # At most ~16M cosines per block: (block, donors) floats plus the argpartition indices.
    block = max(1, min(block, (1 << 24) // len(donors)))
    for start in range(0, len(targets), block):
        rows = targets[start : start + block]
        cosines = text[rows] @ donor_text.T  # (b, donors)
        top = np.argpartition(-cosines, k - 1, axis=1)[:, :k]  # (b, k)
        logits = np.take_along_axis(cosines, top, axis=1) / temperature
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)  # (b, k)
        out[rows] = np.einsum("bk,bkr->br", weights, donor_als[top]).astype(np.float32)
    borrowed[targets] = True
    return out, borrowed


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

    `history` has (user_id, item_id, event_ts) events; `item_index` (item_id, item_idx). A
    history lists each item once, oldest last touch first (ties in item_idx order).
    """
    last_touch = (
        history.join(item_index, "item_id")
        .groupBy("user_id", "item_idx")
        .agg(F.max("event_ts").alias("last_ts"))
    )
    seen = last_touch.groupBy("user_id").agg(
        F.transform(
            F.array_sort(F.collect_list(F.struct("last_ts", "item_idx"))), lambda x: x["item_idx"]
        ).alias("history")
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
    mix: Mix,
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
                with task_blas_threads():
                    frame = score_block_frame(
                        batch.iloc[start : start + block_size],
                        matrices,
                        n=n,
                        mix=mix,
                        exclude_seen=exclude_seen,
                        max_per_category=max_per_category,
                        scratch=matrices.score_buffer(block_size),
                    )
                yield frame

    frame = users.select("user_id", "als_features", "history")
    if partitions:
        frame = frame.repartition(partitions)
    return frame.mapInPandas(score, schema=SCORED_SCHEMA)


def scoring_path(n_users: int, n_items: int, driver_max_cells: int) -> str:
    """Where the stage scores: "driver" (`score_on_driver`) or "executors" (`score_users`).

    "driver" when users x items is at most `driver_max_cells`; a threshold of 0 means never.
    """
    if driver_max_cells > 0 and n_users * n_items <= driver_max_cells:
        return "driver"
    return "executors"


def score_on_driver(
    users: DataFrame,
    items: ItemMatrices,
    *,
    n: int,
    mix: Mix,
    exclude_seen: bool = True,
    max_per_category: int = 0,
    block_size: int = 2048,
) -> pd.DataFrame:
    """`score_users` in the driver process: collect the user frame, score it block by block.

    Returns the rows (SCORED_SCHEMA columns) as a pandas frame, held by the driver: the gate
    (`gate_counts`) and the embedded table engine take them from there without another Spark
    job. For problems small enough that one Spark job with Python workers costs more than
    the scoring itself.
    """
    columns = ["user_id", "als_features", "history"]
    # A projection is one more round of analysis on the driver (~30 ms on 2 busy cores).
    frame = users if set(users.columns) == set(columns) else users.select(*columns)
    collected: pd.DataFrame = frame.toPandas()
    if collected.empty:
        return empty_scored_rows()
    scratch = np.empty((min(block_size, len(collected)), items.size), dtype=np.float32)
    # One BLAS thread, as in a task: the product is a small share of the scoring, and in
    # local mode the driver shares its cores with the executors' JVM threads.
    with task_blas_threads():
        blocks = [
            score_block_frame(
                collected.iloc[start : start + block_size],
                items,
                n=n,
                mix=mix,
                exclude_seen=exclude_seen,
                max_per_category=max_per_category,
                scratch=scratch,
            )
            for start in range(0, len(collected), block_size)
        ]
    return pd.concat(blocks, ignore_index=True)


def score_stage(
    path: str,
    users: DataFrame,
    items: ItemMatrices,
    items_bc: Broadcast,
    *,
    partitions: int,
    **scoring: Any,
) -> DataFrame | pd.DataFrame:
    """The stage's top-n rows on `path` (`scoring_path`): the driver's pandas frame from
    `score_on_driver`, or `score_users`'s DataFrame over `partitions` tasks.

    `scoring`: the keywords both take (n, mix, exclude_seen, max_per_category, block_size).
    """
    if path == "driver":
        return score_on_driver(users, items, **scoring)
    return score_users(users, items_bc, partitions=partitions, **scoring)


def empty_scored_rows() -> pd.DataFrame:
    """No rows, with the column dtypes `score_block_frame` gives."""
    return pd.DataFrame(
        {
            "user_id": pd.Series(dtype=object),
            "rank": pd.Series(dtype=np.int32),
            "item_id": pd.Series(dtype=object),
            "score": pd.Series(dtype=np.float32),
            "source": pd.Series(dtype=object),
        }
    )


def task_blas_threads() -> contextlib.AbstractContextManager[Any]:
    """Limit numpy's BLAS to the running Spark task's cores (spark.task.cpus).

    Spark already runs one task per core; BLAS threads on top oversubscribe the cores, and
    OpenBLAS's spinning threads then slow every task down.
    """
    from pyspark import TaskContext
    from threadpoolctl import threadpool_limits

    task = TaskContext.get()
    return threadpool_limits(limits=task.cpus() if task else 1, user_api="blas")


def scoring_partitions(n_users: int, block_size: int, parallelism: int) -> int:
    """Tasks for scoring: two per core, never more than there are blocks of `block_size` users.

    Each task scores its blocks one after the other; more, smaller tasks only add per-task
    overhead (measured at 50k users x 20k items on 2 cores: 25 tasks 7.8 s, 4 tasks 4.8 s).
    """
    blocks = max(1, math.ceil(n_users / max(1, block_size)))
    return min(blocks, 2 * max(1, parallelism))


def gate_report(
    recs: DataFrame, users: DataFrame, seen: DataFrame | None, *, top_n: int
) -> DataFrame:
    """One row of gate counts over `recs` (SCORED_SCHEMA rows) against the expected `users`.

    Columns: users, missing_users, unexpected_users, duplicate_items, short_lists, bad_ranks,
    non_finite_scores, score_increases, seen_items. One pass: each recommendation is flagged
    (seen pair, score not finite, score above the previous rank's), folded per user, then
    joined to the expected users.
    """
    flagged = recs.select("user_id", "item_id", "rank", "score")
    if seen is not None:
        marks = seen.select("user_id", "item_id").distinct().withColumn("_seen", F.lit(1))
        flagged = flagged.join(marks, ["user_id", "item_id"], "left")
    else:
        flagged = flagged.withColumn("_seen", F.lit(None).cast("int"))
    by_rank = Window.partitionBy("user_id").orderBy("rank")
    score = F.col("score")
    flagged = flagged.withColumn(
        "_up", (score > F.lag("score").over(by_rank)).cast("int")
    ).withColumn(
        "_bad", (score.isNull() | F.isnan(score) | (F.abs(score) == float("inf"))).cast("int")
    )
    per_user = flagged.groupBy("user_id").agg(
        F.count("*").alias("rows"),
        F.countDistinct("item_id").alias("items"),
        F.countDistinct("rank").alias("ranks"),
        F.min("rank").alias("min_rank"),
        F.max("rank").alias("max_rank"),
        F.sum(F.coalesce("_up", F.lit(0))).alias("increases"),
        F.sum("_bad").alias("bad_scores"),
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
        F.coalesce(F.sum(F.col("rows") - F.col("items")), F.lit(0))
        .cast("long")
        .alias("duplicate_items"),
        F.sum(short.cast("long")).alias("short_lists"),
        F.sum(bad_ranks.cast("long")).alias("bad_ranks"),
        F.coalesce(F.sum("bad_scores"), F.lit(0)).cast("long").alias("non_finite_scores"),
        F.coalesce(F.sum("increases"), F.lit(0)).cast("long").alias("score_increases"),
        F.coalesce(F.sum("seen"), F.lit(0)).cast("long").alias("seen_items"),
    )


def gate_counts(
    recs: pd.DataFrame, users: Iterable[str], seen: pd.DataFrame | None, *, top_n: int
) -> dict[str, int]:
    """`gate_report` over rows the driver holds (the driver scoring path): the same counts.

    `recs` has SCORED_SCHEMA columns, `users` the expected user ids, `seen` (user_id, item_id)
    pairs or None. A NaN score is what a null is in Spark (pandas UDF and pandas rows reach
    Spark with NaN as null): non-finite, and never an increase; a null seen pair never matches.
    """
    expected = pd.Index(pd.unique(pd.Series(list(users), dtype=object)))
    ordered = recs[["user_id", "item_id", "rank", "score"]].sort_values(
        ["user_id", "rank"], kind="stable"
    )
    user = ordered["user_id"].to_numpy()
    score = ordered["score"].to_numpy(dtype=np.float64)
    nan = np.isnan(score)
    same_user = np.zeros(len(score), dtype=bool)
    same_user[1:] = user[1:] == user[:-1]
    prev, prev_nan = np.roll(score, 1), np.roll(nan, 1)
    with np.errstate(invalid="ignore"):
        up = same_user & ~prev_nan & ~nan & (score > prev)
    if seen is not None:
        seen = seen[["user_id", "item_id"]].dropna()
    if seen is not None and len(seen):
        pairs = pd.MultiIndex.from_frame(seen)
        marked = pd.MultiIndex.from_frame(ordered[["user_id", "item_id"]]).isin(pairs)
    else:
        marked = np.zeros(len(score), dtype=bool)
    per_user = ordered.groupby("user_id", sort=False, dropna=False).agg(
        rows=("item_id", "size"),
        items=("item_id", "nunique"),
        ranks=("rank", "nunique"),
        min_rank=("rank", "min"),
        max_rank=("rank", "max"),
    )
    rows, items = per_user["rows"], per_user["items"]
    short = (rows != top_n) | (items != top_n)
    bad_ranks = (
        (per_user["ranks"] != rows) | (per_user["min_rank"] != 1) | (per_user["max_rank"] != rows)
    )
    return {
        "users": len(expected),
        "missing_users": int((~expected.isin(per_user.index)).sum()),
        "unexpected_users": int((~per_user.index.isin(expected)).sum()),
        "duplicate_items": int((rows - items).sum()),
        "short_lists": int(short.sum()),
        "bad_ranks": int(bad_ranks.sum()),
        "non_finite_scores": int((~np.isfinite(score)).sum()),
        "score_increases": int(up.sum()),
        "seen_items": int(np.count_nonzero(marked)),
    }


def check_gate(report: dict[str, int], *, top_n: int) -> None:
    """Raise GateError naming the first failed check of the gate's counts, with its count.

    `report`: the dict of `gate_counts`, or of the row `gate_report` returns.
    """
    users = report["users"]
    checks = [
        ("missing_users", f"users without recommendations (threshold 0 of {users})"),
        ("unexpected_users", "users with recommendations who are not known users (threshold 0)"),
        ("duplicate_items", "repeated items within users' lists (threshold 0)"),
        ("short_lists", f"users with fewer than {top_n} distinct items (threshold 0 of {users})"),
        ("bad_ranks", "users whose ranks are not 1..N (threshold 0)"),
        ("non_finite_scores", "rows whose score is null, NaN or infinite (threshold 0)"),
        ("score_increases", "rows whose score exceeds the previous rank's (threshold 0)"),
        ("seen_items", "recommended items the user already interacted with (threshold 0)"),
    ]
    for key, what in checks:
        if report.get(key):
            raise GateError(f"recommend gate '{key}' failed: {report[key]} {what}")


def check_metric_gate(
    metric: str, current: float | None, previous: float | None, *, max_drop: float
) -> str:
    """Raise GateError when `current` < `previous` * (1 - max_drop); else return a verdict line.

    `current` is the evaluate stage's value for this run date, `previous` the value recorded
    when the table was last published; either may be missing (then the check passes).
    """
    if current is None:
        return f"{metric}: no evaluation of this run date found; metric check skipped"
    if previous is None:
        return f"{metric}={current:.4f}: nothing published with this metric before"
    floor = previous * (1.0 - max_drop)
    if current < floor:
        raise GateError(
            f"recommend gate 'offline_metric' failed: {metric} {current:.4f} is below "
            f"{floor:.4f} (last published {previous:.4f} minus the allowed {max_drop:.0%})"
        )
    return f"{metric}={current:.4f} vs last published {previous:.4f} (floor {floor:.4f}): ok"


# ---------------------------------------------------------------------------------------
# Stage


def embedding_frame(ctx: RunContext) -> tuple[DataFrame, str]:
    """Current item embeddings (item_id, embedding) of the fine-tuned model, else the base model."""
    from llmrec_spark.core import encoder
    from llmrec_spark.stages import embed

    base_id = encoder.base_model_id(ctx.cfg.embed)
    if ctx.cfg.contrastive.enabled:
        from llmrec_spark.stages.contrastive import tuned_model_id

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
    """Score every known user for ctx.ds, gate the rows, publish them (`publish_recommendations`)."""
    from llmrec_spark.stages import (
        als,  # here, not at the top: pandas UDF workers import this module
    )

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
        history=window.select("user_id", "item_id", "event_ts"),
        item_index=items.select("item_id", "item_idx"),
        user_factors=factors.where(F.col("kind") == "user"),
    )
    model_version = ctx.parent_run_id or ctx.stage_run_id or "local"
    path = scoring_path(n_users, matrices.size, cfg.driver_max_cells)
    scoring_started = time.perf_counter()
    recs = score_stage(
        path,
        user_rows,
        matrices,
        items_bc,
        partitions=scoring_partitions(
            n_users, cfg.user_block_size, ctx.spark.sparkContext.defaultParallelism
        ),
        n=cfg.top_n,
        mix=Mix.configured(cfg),
        exclude_seen=cfg.exclude_seen,
        max_per_category=cfg.max_per_category,
        block_size=cfg.user_block_size,
    )
    if isinstance(recs, pd.DataFrame):
        # Rows held by the driver from here to the Delta commit: gated in pandas, written
        # with pyarrow by the embedded engine (no Spark job per step).
        recs = recs.assign(model_version=model_version, ds=ctx.ds)
        expected: pd.DataFrame = users.toPandas()
        report = gate_counts(
            recs,
            expected["user_id"],
            seen.toPandas() if cfg.exclude_seen else None,
            top_n=cfg.top_n,
        )
    else:
        recs = (
            recs.withColumn("model_version", F.lit(model_version))
            .withColumn("ds", F.lit(ctx.ds))
            .cache()
        )
        report = (
            gate_report(recs, users, seen if cfg.exclude_seen else None, top_n=cfg.top_n)
            .collect()[0]
            .asDict()
        )
    scoring_s = time.perf_counter() - scoring_started
    log.info(
        "recommend: scored (on the %s) and gated %d users in %.1fs (%.0f users/s)",
        path,
        n_users,
        scoring_s,
        n_users / max(scoring_s, 1e-9),
    )
    check_gate(report, top_n=cfg.top_n)
    metric_value, metric_verdict = metric_gate(ctx)

    models = registry.versions_for(ctx.cfg, ctx.ds)
    published = publish_recommendations(
        ctx,
        recs,
        metadata={
            PROP_MODEL_VERSION: model_version,
            PROP_MLFLOW_RUN_ID: ctx.stage_run_id or "",
            PROP_TEXT_MODEL: text_model,
            PROP_EVENTS_THROUGH: ctx.events_through or "",
            PROP_STALE_INPUTS: ",".join(ctx.stale_inputs),
        }
        | {PROP_REGISTERED[artifact]: version for artifact, version in models.items()}
        | (
            {PROP_GATE_METRIC: cfg.gate_metric, PROP_GATE_METRIC_VALUE: repr(metric_value)}
            if metric_value is not None
            else {}
        ),
    )
    if published["latest_ds"] == ctx.ds:  # the alias follows what is served
        registry.set_champions(ctx.cfg, models)
    if isinstance(recs, pd.DataFrame):
        by_source = {k: int(v) for k, v in recs["source"].value_counts().items()}
    else:
        by_source = {
            row["source"]: row["count"] for row in recs.groupBy("source").count().collect()
        }
    n_rows = sum(by_source.values())
    shares = {s: round(by_source.get(s, 0) / n_rows, 4) for s in SOURCES if by_source.get(s)}
    samples = sample_lists(recs, catalog, window, n_users=3)
    if isinstance(recs, DataFrame):
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
        | {f"share_{s}": v for s, v in shares.items()}
        | {f"gate_{k}": float(v) for k, v in report.items()},
        summary={
            "users": n_users,
            "items": matrices.size,
            "share_by_source": shares,
            "text_model": text_model,
            "model_version": model_version,
            "metric_gate": metric_verdict,
            "published": published,
            "samples": samples,
        },
    )


# The metadata each publish commit carries (`published_metadata` reads it back): what its rows
# are, so the data and the metadata naming it are one commit.
PROP_DS = "llmrec.ds"
PROP_MODEL_VERSION = "llmrec.model_version"
PROP_MLFLOW_RUN_ID = "llmrec.mlflow_run_id"
PROP_TEXT_MODEL = "llmrec.text_model"
PROP_GATE_METRIC = "llmrec.gate_metric"
PROP_GATE_METRIC_VALUE = "llmrec.gate_metric_value"
PROP_EVENTS_THROUGH = "llmrec.events_through"
PROP_STALE_INPUTS = "llmrec.stale_inputs"
# registered artifact -> key of its registered model version ("llmrec-als/3")
PROP_REGISTERED = {"als_model": "llmrec.als_model", "text_tower": "llmrec.text_tower_model"}


def metric_gate(ctx: RunContext) -> tuple[float | None, str]:
    """Compare this run date's evaluate metric with the last published one: (value, verdict).

    Raises GateError on a regression beyond `recommend.max_metric_drop`. The current value is
    read from MLflow (the evaluate stage runs before recommend in the nightly), the previous
    from the metadata of the publish that `recommendations_latest` serves.
    """
    from llmrec_spark.runtime.tracking import latest_stage_metrics, metric_key

    cfg = ctx.cfg.recommend
    if not cfg.gate_metric:
        return None, "metric gate off (recommend.gate_metric is empty)"
    metrics = (
        latest_stage_metrics(ctx.cfg, stage="evaluate", ds=ctx.ds) if ctx.stage_run_id else None
    )
    current = (metrics or {}).get(metric_key(cfg.gate_metric))
    served = published_metadata(ctx.store, "recommendations_latest")
    previous = None
    if served.get(PROP_GATE_METRIC) == cfg.gate_metric and served.get(PROP_GATE_METRIC_VALUE):
        previous = float(served[PROP_GATE_METRIC_VALUE])
    verdict = check_metric_gate(cfg.gate_metric, current, previous, max_drop=cfg.max_metric_drop)
    log.info("recommend: metric gate: %s", verdict)
    return current, verdict


def published_metadata(store: TableStore, name: str, ds: str | None = None) -> dict[str, str]:
    """The metadata of the newest publish commit of table `name` (of run date `ds` if given).

    For `recommendations_latest` this names what is served now; for `recommendations` with a
    `ds`, what that partition was built from. Empty when nothing was published.
    """
    for metadata in store.commit_metadata(name):
        if PROP_DS in metadata and (ds is None or metadata[PROP_DS] == ds):
            return metadata
    return {}


def publish_recommendations(
    ctx: RunContext, recs: DataFrame | pd.DataFrame, *, metadata: dict[str, str]
) -> dict[str, Any]:
    """Publish gated rows for ctx.ds: one commit per table, each naming its rows in its metadata.

    1. `recommendations`: one commit replaces the ds partition, with `metadata` (+ llmrec.ds).
    2. When ctx.ds is the newest published date, `recommendations_latest`: one commit replaces
       all its rows by the same rows, with the same metadata.
    A reader between 1 and 2 sees the new partition in `recommendations` while
    `recommendations_latest` still serves the previous complete date. Rerunning the date
    repeats both commits (each replaces what it wrote), so it repairs a publish cut short
    between them; so does the next date's publish.
    3. Partitions older than `recommend.retention_days` are dropped (one commit), then files
       no version within `recommend.vacuum_retention_hours` uses are vacuumed.
    """
    cfg = ctx.cfg.recommend
    store = ctx.store
    metadata = {**metadata, PROP_DS: ctx.ds}
    version = store.overwrite("recommendations", recs, partitions={"ds": ctx.ds}, metadata=metadata)
    newest = max(store.partition_values("recommendations", "ds"))
    out: dict[str, Any] = {"version": version, "latest_ds": newest}
    if newest == ctx.ds:
        out["latest_version"] = store.overwrite("recommendations_latest", recs, metadata=metadata)
    else:
        log.info("recommend: %s is older than %s; recommendations_latest unchanged", ctx.ds, newest)
    if cfg.retention_days > 0:
        cutoff = (dt.date.fromisoformat(ctx.ds) - dt.timedelta(days=cfg.retention_days)).isoformat()
        out["dropped_partitions"] = store.drop_partitions_before("recommendations", "ds", cutoff)
    removed = []
    for name in ("recommendations", "recommendations_latest"):
        removed += store.vacuum(name, retention_hours=cfg.vacuum_retention_hours)
    out["vacuumed_files"] = len(removed)
    log.info("recommend: published %s", out)
    return out


def sample_lists(
    recs: DataFrame | pd.DataFrame,
    catalog: DataFrame,
    events: DataFrame,
    *,
    n_users: int = 3,
    n_items: int = 10,
) -> list[dict[str, Any]]:
    """Top items with titles for a few users (one per top-1 source first): the nightly prints them.

    `recs` is the stage's rows, as a DataFrame or as the pandas frame the driver path holds.
    """
    order = {s: i for i, s in enumerate(SOURCES)}
    if isinstance(recs, DataFrame):
        firsts = recs.where(F.col("rank") == 1)
        by_source = {
            r["source"]: r["user_id"]
            for r in firsts.groupBy("source").agg(F.min("user_id").alias("user_id")).collect()
        }
    else:
        top_rows = recs[recs["rank"] == 1]
        by_source = top_rows.groupby("source")["user_id"].min().to_dict()
    chosen = [by_source[s] for s in sorted(by_source, key=lambda s: order.get(s, len(order)))]
    chosen = chosen[:n_users]
    if len(chosen) < n_users:  # then the users first by id: n_users of them leave enough
        if isinstance(recs, DataFrame):
            lowest = [
                r["user_id"]
                for r in firsts.select("user_id").orderBy("user_id").limit(n_users).collect()
            ]
        else:
            lowest = top_rows["user_id"].sort_values().head(n_users).tolist()
        chosen += [u for u in lowest if u not in chosen][: n_users - len(chosen)]
    if isinstance(recs, DataFrame):
        rows = recs.where(F.col("user_id").isin(chosen) & (F.col("rank") <= n_items)).collect()
    else:
        rows = recs[recs["user_id"].isin(chosen) & (recs["rank"] <= n_items)].to_dict("records")
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
                        "rank": int(r["rank"]),
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


# ---------------------------------------------------------------------------------------
# Benchmark: this stage against MLlib's recommendForAllUsers on the same factors

# (name, users, items): the large size and MovieLens-100K's shape (generated).
BENCH_SIZES = (("50k_x_20k", 50_000, 20_000), ("movielens_100k", 943, 1_682))


def bench_factors(
    n_users: int, n_items: int, *, rank: int, seen_per_user: tuple[int, int], seed: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Seeded random factors and seen-item sets: (users (u, rank), items (i, rank), histories)."""
    rng = np.random.default_rng(seed)
    users = (rng.standard_normal((n_users, rank)) / math.sqrt(rank)).astype(np.float32)
    items = rng.standard_normal((n_items, rank)).astype(np.float32)
    low, high = seen_per_user
    sizes = rng.integers(low, high + 1, size=n_users)
    histories = [np.sort(rng.choice(n_items, size=int(k), replace=False)) for k in sizes]
    return users, items, histories


def mllib_top_n_unseen(model: Any, seen: DataFrame, *, n: int, max_seen: int) -> DataFrame:
    """MLlib's reference: recommendForAllUsers(n + max_seen), seen items removed, first n kept.

    `seen` has (user, item) int ids. Returns (user, rank, item, score).
    """
    ranked = model.recommendForAllUsers(n + max_seen).select(
        "user", F.posexplode("recommendations").alias("pos", "rec")
    )
    unseen = ranked.select(
        "user", "pos", F.col("rec.item").alias("item"), F.col("rec.rating").alias("score")
    ).join(seen, ["user", "item"], "left_anti")
    by_score = Window.partitionBy("user").orderBy("pos")
    return (
        unseen.withColumn("rank", F.row_number().over(by_score))
        .where(F.col("rank") <= n)
        .select("user", "rank", "item", "score")
    )


def als_model_from_factors(spark: Any, users: DataFrame, items: DataFrame, rank: int) -> Any:
    """An MLlib ALSModel over given (id int, features array<float>) factor frames.

    ALSModel's constructor is `private[ml]` in Scala, which is public in the JVM; this is how
    MLlib's own tests build models from known factors.
    """
    from pyspark.ml.recommendation import ALSModel

    java_model = spark.sparkContext._jvm.org.apache.spark.ml.recommendation.ALSModel(
        "als_bench", rank, users._jdf, items._jdf
    )
    java_model.setUserCol("user").setItemCol("item")  # the output's column names
    return ALSModel(java_model)


SMALL_SIZE_RUNS = 7  # at least this many runs per side at sizes scored on the driver


def bench_topn(
    spark: Any,
    *,
    sizes: Sequence[tuple[str, int, int]] = BENCH_SIZES,
    rank: int = 64,
    n: int = 20,
    seen_per_user: tuple[int, int] = (5, 50),
    block_size: int = 2048,
    driver_max_cells: int = RecommendConfig.driver_max_cells,
    runs: int = 2,
    seed: int = 17,
) -> tuple[dict[str, Any], DataFrame]:
    """Time MLlib's top-n + seen filtering against `score_users` per size, on the same factors.

    The stage is called as `run_recommend` calls it, so a size of at most `driver_max_cells`
    scores on the driver (`score_on_driver`: collecting the cached user frame is part of its
    time, and its rows end in a pandas frame, from which `run_recommend` gates and publishes
    them); a larger size's DataFrame is written to the noop sink, as MLlib's is. Returns
    (results per size, this stage's rows for the first size as a cached DataFrame of the
    `recommendations` shape, for the Delta write comparison).
    """
    results: dict[str, Any] = {}
    first_rows: DataFrame | None = None
    for name, n_users, n_items in sizes:
        user_vecs, item_vecs, histories = bench_factors(
            n_users, n_items, rank=rank, seen_per_user=seen_per_user, seed=seed
        )
        factor_schema = "id int, features array<float>"
        user_df = spark.createDataFrame(
            pd.DataFrame({"id": np.arange(n_users, dtype=np.int32), "features": list(user_vecs)}),
            factor_schema,
        ).cache()
        item_df = spark.createDataFrame(
            pd.DataFrame({"id": np.arange(n_items, dtype=np.int32), "features": list(item_vecs)}),
            factor_schema,
        ).cache()
        seen_pairs = pd.DataFrame(
            {
                "user": np.repeat(np.arange(n_users, dtype=np.int32), [len(h) for h in histories]),
                "item": np.concatenate(histories).astype(np.int32),
            }
        )
        seen = spark.createDataFrame(seen_pairs, "user int, item int").cache()
        item_ids = np.array([f"i{j:05d}" for j in range(n_items)], dtype=object)
        matrices = ItemMatrices(
            item_ids=item_ids,
            eligible=np.ones(n_items, dtype=bool),
            popularity=np.zeros(n_items, dtype=np.float32),
            categories=np.zeros(n_items, dtype=np.int32),
            als=item_vecs,
            has_als=np.ones(n_items, dtype=bool),
        )
        users = spark.createDataFrame(
            pd.DataFrame(
                {
                    "user_id": [f"u{u:06d}" for u in range(n_users)],
                    "als_features": list(user_vecs),
                    "history": [h.astype(np.int32) for h in histories],
                }
            ),
            "user_id string, als_features array<float>, history array<int>",
        ).cache()
        for frame in (user_df, item_df, seen, users):
            frame.count()
        model = als_model_from_factors(spark, user_df, item_df, rank)
        items_bc = spark.sparkContext.broadcast(matrices)

        path = scoring_path(n_users, n_items, driver_max_cells)
        stage = functools.partial(
            score_stage,
            path,
            users,
            matrices,
            items_bc,
            partitions=scoring_partitions(
                n_users, block_size, spark.sparkContext.defaultParallelism
            ),
            n=n,
            mix=Mix(0.0),
            block_size=block_size,
        )
        reference = functools.partial(
            mllib_top_n_unseen, model, seen, n=n, max_seen=max(len(h) for h in histories)
        )

        # A driver-path size takes ~1 s a run, and its ~0.1 s stage varies by tens of ms
        # between runs on 2 busy cores: more runs for the best-of.
        size_runs = max(runs, SMALL_SIZE_RUNS) if path == "driver" else runs
        timings: dict[str, list[float]] = {"mllib": [], "stage": []}
        for attempt in range(size_runs):
            for label, job in (("mllib", reference), ("stage", stage)):
                started = time.perf_counter()
                _materialize(job())
                timings[label].append(time.perf_counter() - started)
                log.info(
                    "bench topn %s: run %d %s %.2fs", name, attempt + 1, label, timings[label][-1]
                )

        floor = None
        if path == "driver":
            floor = min(_driver_path_floor(users) for _ in range(size_runs))
        agreement = _bench_agreement(stage(), reference(), n_users=n_users, sample=200, seed=seed)
        mllib_s, stage_s = min(timings["mllib"]), min(timings["stage"])
        results[name] = {
            "users": n_users,
            "items": n_items,
            "rank": rank,
            "top_n": n,
            "seen_per_user": list(seen_per_user),
            "recommend_for_all_seconds": round(mllib_s, 3),
            "stage_seconds": round(stage_s, 3),
            "speedup_vs_recommend_for_all": round(mllib_s / stage_s, 2),
            "target_speedup": 10,
            "path": path,
            "driver_max_cells": driver_max_cells,
            # The Spark job alone of a driver-side stage: collect the users (no scoring);
            # MLlib's time over it bounds any such stage's speedup on this machine.
            "driver_path_floor_seconds": None if floor is None else round(floor, 3),
            "speedup_ceiling_on_driver_path": None if floor is None else round(mllib_s / floor, 2),
            "top_n_agreement_with_mllib": agreement,
            "runs": size_runs,
            "timing": f"best of {size_runs}, noop sink",
        }
        log.info("bench topn %s: %s", name, results[name])
        if first_rows is None:
            rows = stage()
            if isinstance(rows, pd.DataFrame):
                rows = spark.createDataFrame(rows, SCORED_SCHEMA)
            first_rows = (
                rows.withColumn("model_version", F.lit("bench"))
                .withColumn("ds", F.lit("2026-01-01"))
                .cache()
            )
            first_rows.count()
        else:
            items_bc.unpersist()
        for frame in (user_df, item_df, seen, users):
            frame.unpersist()
    assert first_rows is not None
    return results, first_rows


def _materialize(rows: DataFrame | pd.DataFrame) -> None:
    """Compute every row: a DataFrame is written to the noop sink; driver-held rows already are."""
    if isinstance(rows, DataFrame):
        rows.write.format("noop").mode("overwrite").save()


def _driver_path_floor(users: DataFrame) -> float:
    """Seconds of what `score_on_driver` does besides scoring: collect the users."""
    started = time.perf_counter()
    users.toPandas()
    return time.perf_counter() - started


def _bench_agreement(
    stage: DataFrame | pd.DataFrame, reference: DataFrame, *, n_users: int, sample: int, seed: int
) -> float:
    """Share of (user, item) pairs in the stage's lists also in MLlib's, over sampled users."""
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(n_users, size=min(sample, n_users), replace=False).tolist())
    wanted = [f"u{u:06d}" for u in picked]
    pairs: pd.DataFrame
    if isinstance(stage, DataFrame):
        pairs = stage.where(F.col("user_id").isin(wanted)).select("user_id", "item_id").toPandas()
    else:
        pairs = stage.loc[stage["user_id"].isin(wanted), ["user_id", "item_id"]]
    mine = set(pairs.itertuples(index=False, name=None))
    theirs = {
        (f"u{r['user']:06d}", f"i{r['item']:05d}")
        for r in reference.where(F.col("user").isin(picked)).collect()
    }
    return round(len(mine & theirs) / max(len(theirs), 1), 4)
