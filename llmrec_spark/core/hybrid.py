"""The hybrid scorer of one block of users: calibrated ALS, recent-items and text scores, numpy only.

Each score source is z-scored per user over that user's candidate items, then mixed
(`Mix`). A z-score is affine in the raw score, so it is folded into the matrix product's
operands: item-side Gram totals (`ItemTotals`) give each user's mean and std without a pass
over the score matrix (`masked_moments`), and each group of items is one product of scaled
user vectors with [als | unit als | text | 1]. `hybrid_top_n` then selects (`core.topn`).
The recommend stage runs this per block of users; the evaluation stage on its holdout users.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llmrec_spark.config import RecommendConfig
from llmrec_spark.core.topn import reserve_new_item_slots, select_top_n

if TYPE_CHECKING:
    from llmrec_spark.core.zmix import SecondFactors

# The source code `hybrid_top_n` returns per recommended item (stages.recommend.SOURCES
# names them in this order).
HYBRID, ALS, TEXT, POPULAR = range(4)


@dataclass(frozen=True)
class Mix:
    """How `hybrid_scores` mixes: the text weight for items with both scores, the offset for
    items scored by text alone, the recency half-life (history items; 0 = plain mean) of the
    user's text vector; the weight and half-life of the recent-items term in the
    collaborative score (the user's recent items' ALS factors; weight 0 = ALS alone); and the
    kernel width of the text-only items' match against the history (0 = the mean vector's
    cosine, see `history_kernel_scores`). And the list built from the scores: at least
    `new_item_slots` of its places hold the user's best-scoring new items whose text z-score
    is at least `new_item_min_z` (`reserve_new_item_slots`). The list is `list_length`
    (recommend.top_n) long in the evaluation's `rank_view`, whatever a metric's cut-off;
    `hybrid_top_n`'s is its n."""

    text_weight: float
    cold_offset: float = 0.0
    text_half_life: float = 0.0
    recent_weight: float = 0.0
    recent_half_life: float = 0.0
    text_kernel: float = 0.0
    neighbour_factors: int = 0
    neighbour_temperature: float = 0.05
    new_item_slots: int = 0
    new_item_min_z: float = 1.0
    list_length: int = 20

    @classmethod
    def configured(cls, cfg: RecommendConfig) -> Mix:
        """The mix `recommend` ships with (recommend.text_weight, cold_offset, text_half_life,
        recent_weight, recent_half_life, text_kernel, neighbour_factors and temperature,
        new_item_slots and new_item_min_z; top_n as the list length)."""
        return cls(
            cfg.text_weight,
            cfg.cold_offset,
            cfg.text_half_life,
            cfg.recent_weight,
            cfg.recent_half_life,
            cfg.text_kernel,
            cfg.neighbour_factors,
            cfg.neighbour_temperature,
            cfg.new_item_slots,
            cfg.new_item_min_z,
            cfg.top_n,
        )


@dataclass(frozen=True)
class ProfileItems:
    """The user tower's item rows beside the items (`stages.profile_scoring`): row i is item
    i's vector and bias (`core.profile_tower.item_factors`), and the saved model's folder
    and digest, for the per-worker scorer of profile embeddings."""

    model_dir: str
    digest: str
    rows: np.ndarray  # (n, out_dim + 1) float32


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
    # A second collaborative model (the Mult-VAE) mixed into `als` (`core.zmix`), or None.
    second: SecondFactors | None = None
    # The recent-items term's factors: the first this many columns of `als` (0: all). With a
    # second model mixed in, ALS's own factors: item-item cosines in the mixed rows measure
    # nothing (on ml-100k they took hybrid_vae's NDCG@10 from 0.20 to 0.13).
    recent_columns: int = 0
    # The user tower's rows: users without history scored by their profile text, or None.
    profile: ProfileItems | None = None

    @property
    def size(self) -> int:
        return len(self.item_ids)

    def profile_view(self) -> ItemMatrices:
        """These items as the user tower scores them: its rows as the only factors (no text,
        no second model), so a user's profile vector ranks them through the same scorer."""
        assert self.profile is not None
        return dataclasses.replace(
            self,
            als=self.profile.rows,
            has_als=np.ones(self.size, dtype=bool),
            text=None,
            has_text=None,
            borrowed=None,
            second=None,
            recent_columns=0,
            profile=None,
        )

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
        factors = self.als[:, : self.recent_columns] if self.recent_columns else self.als
        norms = np.linalg.norm(factors, axis=1, keepdims=True)
        return (factors / np.maximum(norms, 1e-12)).astype(np.float32)

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
        dots = seen_dots(users, items, rows, cols)
        total -= np.bincount(rows, dots, minlength=len(users))
        squares -= np.bincount(rows, dots * dots, minlength=len(users))
        count -= np.bincount(rows, minlength=len(users))
    count = np.maximum(count, 1.0)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    std[std < 1e-12] = 1.0
    return mean, std


# Seen (user, item) pairs per chunk of `seen_dots`: two gathered (chunk, d) float32 blocks
# stay in cache (a block's pairs gathered at once were 290 MB of float64 at d = 601).
SEEN_CHUNK = 4096


def seen_dots(
    users: np.ndarray, items: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """(pairs,) float64: users[rows[p]] . items[cols[p]], computed in float32 chunks."""
    dots = np.empty(len(rows), dtype=np.float64)
    for start in range(0, len(rows), SEEN_CHUNK):
        r, c = rows[start : start + SEEN_CHUNK], cols[start : start + SEEN_CHUNK]
        dots[start : start + SEEN_CHUNK] = np.einsum("ij,ij->i", users[r], items[c])
    return dots


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

    See `hybrid_scores` for the score; this selects the top n (category cap applied), then
    gives `mix.new_item_slots` of the n places to new items (`reserve_new_item_slots`, the
    cap kept; a placed new item's source is TEXT). Past a short list's end: score -inf.
    """
    scores, has_als, has_text, new = hybrid_scores_with_new_items(
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
    if len(new.columns):
        indices, top = reserve_new_item_slots(
            indices,
            top,
            new.columns,
            scores[:, new.columns],
            new.z,
            n=n,
            slots=mix.new_item_slots,
            min_z=mix.new_item_min_z,
            categories=items.categories,
            max_per_category=max_per_category,
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
    scores, sources, _ = _scores_and_sources(
        user_als, user_has_als, histories, items, mix, exclude_seen, out
    )
    return scores, sources.has_collab, sources.has_text


@dataclass(frozen=True)
class NewItems:
    """A block's new items -- eligible, with text, no ALS factor of their own (a borrowed
    one still counts) and no interaction in the window (an item everyone rated below
    als.min_weight has no factor, but it is no new item) -- and each user's text z-score of
    them: the score a new item's plausibility is judged by (`Mix.new_item_min_z`)."""

    columns: np.ndarray  # (m,) int64 item indices
    # (b, m) float32 text z-scores (kernel z with text_kernel); -inf where the item is no
    # candidate of the user's or the user has no text vector
    z: np.ndarray


def hybrid_scores_with_new_items(
    user_als: np.ndarray | None,
    user_has_als: np.ndarray,
    histories: Sequence[np.ndarray],
    items: ItemMatrices,
    *,
    mix: Mix,
    exclude_seen: bool = True,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, NewItems]:
    """`hybrid_scores` and the block's `NewItems` (none when `mix.new_item_slots` is 0)."""
    scores, sources, seen = _scores_and_sources(
        user_als, user_has_als, histories, items, mix, exclude_seen, out
    )
    columns = np.zeros(0, dtype=np.int64)
    if mix.new_item_slots > 0 and items.has_text is not None:
        own_factor = np.zeros(items.size, dtype=bool)
        if items.has_als is not None:
            own_factor = items.has_als & ~(items.borrowed if items.borrowed is not None else False)
        eligible = np.asarray(items.eligible, dtype=bool)
        unseen = np.asarray(items.popularity) <= 0
        columns = np.flatnonzero(eligible & items.has_text & ~own_factor & unseen)
    z = _text_z(sources, histories, items, mix, seen, columns)
    z[~np.isfinite(scores[:, columns])] = -np.inf
    return scores, sources.has_collab, sources.has_text, NewItems(columns, z)


def _scores_and_sources(
    user_als: np.ndarray | None,
    user_has_als: np.ndarray,
    histories: Sequence[np.ndarray],
    items: ItemMatrices,
    mix: Mix,
    exclude_seen: bool,
    out: np.ndarray | None,
) -> tuple[np.ndarray, _Sources, tuple[np.ndarray, np.ndarray]]:
    """`hybrid_scores`' matrix, the block's sources and its seen (rows, cols) pairs."""
    items = items.with_neighbour_factors(mix.neighbour_factors, mix.neighbour_temperature)
    seen = _seen_pairs(histories) if exclude_seen else (_NO_PAIRS, _NO_PAIRS)
    sources = _score_sources(user_als, user_has_als, histories, items, mix, seen)
    scores = _group_scores(
        sources, _item_groups(sources, items, mix), histories, items, mix, seen, out
    )
    _mask_non_candidates(scores, sources, items, seen)
    return scores, sources, seen


def _text_z(
    sources: _Sources,
    histories: Sequence[np.ndarray],
    items: ItemMatrices,
    mix: Mix,
    seen: tuple[np.ndarray, np.ndarray],
    columns: np.ndarray,
) -> np.ndarray:
    """(b, len(columns)) float32: each user's text z-score of the items at `columns` (over
    their text candidates; with `mix.text_kernel` the kernel z of `_kernel_z`), -inf for the
    users without a text vector."""
    b = len(histories)
    text = next((part for part in sources.parts if part.source == "text"), None)
    if text is None or not len(columns):
        return np.full((b, len(columns)), -np.inf, dtype=np.float32)
    if mix.text_kernel > 0:
        z = _kernel_z(histories, items, columns, sources.text_items, mix, *seen, np.zeros(b))
    else:
        z = (text.users @ text.matrix[columns].T) * text.scale[:, None] + text.shift[:, None]
    z = z.astype(np.float32)
    z[~sources.has_text] = -np.inf
    return z


@dataclass(frozen=True)
class _Part:
    """One score source of a block: user vectors (b, d) against an item matrix (items, d), and
    its z-score's per-user scale and shift (b,), 0 for users without that source."""

    source: str  # "als", "recent" or "text"
    users: np.ndarray
    matrix: np.ndarray
    scale: np.ndarray
    shift: np.ndarray


@dataclass(frozen=True)
class _Sources:
    """The score sources present in a block, the users (b,) bool who have each, and each
    kind of source's candidate items (items,) bool."""

    parts: list[_Part]
    has_als: np.ndarray
    has_recent: np.ndarray
    has_text: np.ndarray
    als_items: np.ndarray  # eligible items with an ALS factor
    text_items: np.ndarray  # eligible items with text (none when no user has a text vector)

    @property
    def has_collab(self) -> np.ndarray:
        return self.has_als | self.has_recent


@dataclass(frozen=True)
class _Group:
    """Items scored by one formula: their columns (items,) bool, each source's per-user weight
    (b,), the users (b,) bool it scores (the others get -inf), and a per-user offset (b,)."""

    columns: np.ndarray
    weights: dict[str, np.ndarray]
    users: np.ndarray
    offset: np.ndarray


_TEXT_ONLY = 2  # `_item_groups`' group of the items scored by text alone


def _z_part(
    source: str,
    users: np.ndarray,
    has: np.ndarray,
    matrix: np.ndarray,
    columns: np.ndarray,
    totals: ItemTotals | None,
    seen: tuple[np.ndarray, np.ndarray],
) -> _Part:
    """`source`'s z-score over `columns` minus each user's seen items, as a scale and shift."""
    mean, std = masked_moments(users, matrix, columns, *seen, totals)
    scale, shift = np.where(has, 1.0 / std, 0.0), np.where(has, -mean / std, 0.0)
    return _Part(source, users, matrix, scale, shift)


def _score_sources(
    user_als: np.ndarray | None,
    user_has_als: np.ndarray,
    histories: Sequence[np.ndarray],
    items: ItemMatrices,
    mix: Mix,
    seen: tuple[np.ndarray, np.ndarray],
) -> _Sources:
    """The block's ALS, recent-items and text sources, those the items and users have."""
    none = np.zeros(len(histories), dtype=bool)
    eligible = np.asarray(items.eligible, dtype=bool)
    parts: list[_Part] = []
    item_a = np.zeros(items.size, dtype=bool)
    has_als, has_recent = none, none
    if items.als is not None and items.has_als is not None:
        item_a = eligible & items.has_als
        if user_als is not None:
            has_als = np.asarray(user_has_als, dtype=bool)
            user_a = np.asarray(user_als, dtype=np.float32)
            parts.append(_z_part("als", user_a, has_als, items.als, item_a, items.als_totals, seen))
        if mix.recent_weight > 0 and items.als_unit is not None:
            user_r, has_recent = history_vectors(
                histories, items.als_unit, items.has_als, mix.recent_half_life
            )
            if has_recent.any():
                unit, totals = items.als_unit, items.als_unit_totals
                parts.append(_z_part("recent", user_r, has_recent, unit, item_a, totals, seen))
    has_text, item_t = none, np.zeros(items.size, dtype=bool)
    if items.text is not None and items.has_text is not None:
        user_t, has_text = history_vectors(
            histories, items.text, items.has_text, mix.text_half_life
        )
        if has_text.any():
            item_t = eligible & items.has_text
            totals = items.text_totals
            parts.append(_z_part("text", user_t, has_text, items.text, item_t, totals, seen))
    return _Sources(parts, has_als, has_recent, has_text, item_a, item_t)


def _item_groups(sources: _Sources, items: ItemMatrices, mix: Mix) -> list[_Group]:
    """How each group of items mixes the sources: items with an ALS factor and text, with a
    factor only, with text only (`_TEXT_ONLY`), with a borrowed factor."""
    has_als, has_recent, has_text = sources.has_als, sources.has_recent, sources.has_text
    has_collab = sources.has_collab
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
    zeros = np.zeros(len(has_text))
    # Items with a borrowed factor are new items too: scored as known ones, offset as new
    # for every user with a collaborative score (their score is one).
    borrowed = items.borrowed if items.borrowed is not None else np.zeros(items.size, bool)
    offset_b = np.where(has_collab, float(mix.cold_offset), 0.0)
    item_a, item_t = sources.als_items, sources.text_items
    return [
        _Group(item_a & item_t & ~borrowed, both_weights, has_collab | has_text, zeros),
        _Group(item_a & ~item_t & ~borrowed, collab, has_collab, zeros),
        _Group(item_t & ~item_a, {"text": has_text * 1.0}, has_text, offset_t),
        _Group(item_a & borrowed, both_weights, has_collab | has_text, offset_b),
    ]


def _user_side(parts: list[_Part], group: _Group) -> np.ndarray:
    """(b, sum of dims + 1): each user's scaled vectors and constant in `group`'s formula."""
    zeros = np.zeros(len(group.offset))
    columns, constant = [], group.offset.copy()
    for part in parts:
        weight = group.weights.get(part.source, zeros)
        columns.append(part.users * (weight * part.scale)[:, None].astype(np.float32))
        constant += weight * part.shift
    columns.append(constant[:, None].astype(np.float32))
    return np.hstack(columns).astype(np.float32, copy=False)


def _group_scores(
    sources: _Sources,
    groups: list[_Group],
    histories: Sequence[np.ndarray],
    items: ItemMatrices,
    mix: Mix,
    seen: tuple[np.ndarray, np.ndarray],
    out: np.ndarray | None,
) -> np.ndarray:
    """(b, items): the largest group's formula everywhere in one product, then each other
    group's columns (the text-only ones by kernel with `mix.text_kernel`), -inf for the users
    a group's formula does not apply to."""
    b = len(histories)
    features = np.hstack(
        [part.matrix for part in sources.parts] + [np.ones((items.size, 1), dtype=np.float32)]
    ).astype(np.float32, copy=False)  # (items, sum of dims + 1)
    main = int(np.argmax([int(group.columns.sum()) for group in groups]))
    scores = np.matmul(
        _user_side(sources.parts, groups[main]),
        features.T,
        out=None if out is None else out[:b],
    )
    kernel_text = mix.text_kernel > 0 and sources.has_text.any()
    for k, group in enumerate(groups):
        cols = np.flatnonzero(group.columns)
        if k == _TEXT_ONLY and kernel_text and len(cols):
            scores[:, cols] = _kernel_z(
                histories, items, cols, sources.text_items, mix, *seen, group.offset
            )
        elif k != main and len(cols):
            scores[:, cols] = _user_side(sources.parts, group) @ features[cols].T
        bad_rows = np.flatnonzero(~group.users)
        if len(cols) and len(bad_rows):
            scores[np.ix_(bad_rows, cols)] = -np.inf
    return scores


def _mask_non_candidates(
    scores: np.ndarray, sources: _Sources, items: ItemMatrices, seen: tuple[np.ndarray, np.ndarray]
) -> None:
    """In place: -inf for the items no source scores and the seen ones; popularity for the
    users with no source at all."""
    eligible = np.asarray(items.eligible, dtype=bool)
    scores[:, ~(sources.als_items | sources.text_items)] = -np.inf
    popular = ~(sources.has_collab | sources.has_text)
    if popular.any():
        scores[popular] = np.where(eligible, items.popularity, -np.inf)[None, :]
    seen_rows, seen_cols = seen
    if len(seen_rows):
        scores[seen_rows, seen_cols] = -np.inf


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
    codes = np.full(indices.shape, POPULAR, dtype=np.int8)
    codes[als_on & text_on] = HYBRID
    codes[als_on & ~text_on] = ALS
    codes[~als_on & text_on] = TEXT
    if items.borrowed is not None:  # a new item with a borrowed factor: its text placed it
        codes[items.borrowed[indices] & (als_on | text_on)] = TEXT
    return codes
