"""Top-n selection per row of a score matrix: numpy (or torch.topk), exact, ties to the lower index.

`top_n_block` scores a block of users against the items (one matrix product) and selects;
`select_top_n` selects from scores already computed, optionally at most k items per
category. Where the time goes at 50k users x 20k items: the selection sorts only the
columns above a per-row lower bound (`_select_prefiltered`), a few times n per row.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import numpy as np

# Below this many scores per block the torch import costs more than argpartition.
_TORCH_MIN_CELLS = 200_000
# Bound prefilter (`_select_prefiltered`): used when there are at least ITEMS_PER_N * n items;
# rows keeping more than 1 / MAX_SHARE of the items as candidates fall back to a partial sort.
_PREFILTER_ITEMS_PER_N = 32
_PREFILTER_GROUPS_PER_N = 4
_PREFILTER_MAX_SHARE = 8


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


def reserve_new_item_slots(
    indices: np.ndarray,
    top: np.ndarray,
    new_items: np.ndarray,
    new_scores: np.ndarray,
    new_z: np.ndarray,
    *,
    n: int,
    slots: int,
    min_z: float,
    categories: np.ndarray | None = None,
    max_per_category: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Each ranked list with at least `slots` new items in its first n where the user has
    plausible ones: (indices, scores) (b, k), best first, -1 and -inf past a list's end.

    `indices`, `top` (b, k): each user's list by score (-inf past its end; k may exceed n).
    `new_items` (m,): the new items' indices, in the order ties among them go; `new_scores`,
    `new_z` (b, m): their scores and text z-scores per user. Plausible: a finite score and a
    z of at least `min_z`. When the first n positions hold fewer than `slots` new items, the
    best-scoring plausible new items not among them (as many as are missing, if there are)
    take the last of the n positions in score order, displacing the lowest others; the
    positions after n continue the list's order without the items placed. With
    `max_per_category` > 0 a new item is placed only if its category stays within the cap in
    the first n positions (what follows position n is not capped again).
    """
    b, k = indices.shape
    n = min(n, k)
    if slots <= 0 or n == 0 or b == 0 or len(new_items) == 0:
        return indices, top
    valid = np.isfinite(top) & (indices >= 0)
    position = np.full(max(int(indices.max()), int(new_items.max())) + 1, -1, dtype=np.int64)
    position[new_items] = np.arange(len(new_items))
    column = np.where(valid, position[np.maximum(indices, 0)], -1)  # (b, k): new item or -1
    listed = np.zeros(new_scores.shape, dtype=bool)  # (b, m): among the first n
    rows, cols = np.nonzero(column[:, :n] >= 0)
    listed[rows, column[rows, cols]] = True
    missing = np.maximum(slots - listed.sum(axis=1), 0)
    length = valid[:, :n].sum(axis=1)  # the list's items in the first n
    chosen = np.zeros((b, min(slots, len(new_items))), dtype=np.int64)  # (b, s) columns
    placed = np.zeros(b, dtype=np.int64)
    short = np.flatnonzero(missing > 0)  # only these rows' new items are looked at
    available = np.isfinite(new_scores[short]) & (new_z[short] >= min_z) & ~listed[short]
    candidates = np.where(available, new_scores[short], -np.inf).astype(np.float32)
    if max_per_category > 0 and categories is not None:
        chosen[short], placed[short] = _capped_new_items(
            indices[short, :n],
            candidates,
            new_items,
            length[short],
            missing[short],
            categories,
            max_per_category,
            width=chosen.shape[1],
        )
    elif len(short):
        # Ties to the lower column: `new_items`' order.
        chosen[short] = _select(candidates, chosen.shape[1], "numpy")[0]
        placed[short] = np.minimum(missing[short], available.sum(axis=1))
    return _splice(indices, top, column, new_items, new_scores, chosen, placed, length, n)


def _capped_new_items(
    head: np.ndarray,
    candidates: np.ndarray,
    new_items: np.ndarray,
    length: np.ndarray,
    missing: np.ndarray,
    categories: np.ndarray,
    cap: int,
    *,
    width: int,
) -> tuple[np.ndarray, np.ndarray]:
    """`reserve_new_item_slots` under a category cap: per row the new items' columns placed
    (b, width), best first, and how many (b,). `candidates` (b, m): the new items' scores,
    -inf where not placeable; `head` (b, n): the lists' first n. Each row's best candidates
    are looked at first (a pool, as `_select_with_category_cap`), all of them when the pool
    cannot fill the row."""
    b, m = candidates.shape
    chosen = np.zeros((b, width), dtype=np.int64)
    placed = np.zeros(b, dtype=np.int64)
    if b == 0:
        return chosen, placed
    pool = min(m, max(4 * width, width + 50))
    columns, values = _select(candidates, pool, "numpy")
    for row in range(b):
        head_row, length_row, need = head[row], int(length[row]), int(missing[row])
        order = columns[row][np.isfinite(values[row])].tolist()
        picked = _fill_capped(head_row, length_row, order, need, new_items, categories, cap)
        if len(picked) < need and pool < m and np.isfinite(values[row, -1]):
            every, scores = _select(candidates[row : row + 1], m, "numpy")
            order = every[0][np.isfinite(scores[0])].tolist()
            picked = _fill_capped(head_row, length_row, order, need, new_items, categories, cap)
        chosen[row, : len(picked)], placed[row] = picked, len(picked)
    return chosen, placed


def _fill_capped(
    head: np.ndarray,
    length: int,
    order: list[int],
    missing: int,
    new_items: np.ndarray,
    categories: np.ndarray,
    cap: int,
) -> list[int]:
    """The most (up to `missing`) of the columns `order` (best first) that fit the category
    cap beside the items of `head` (n,) kept: placing s keeps its first min(length, n - s)."""
    for s in range(missing, 0, -1):
        counts = Counter(categories[head[: min(length, len(head) - s)]].tolist())
        picked = []
        for column in order:
            category = int(categories[new_items[column]])
            if counts[category] < cap:
                counts[category] += 1
                picked.append(column)
                if len(picked) == s:
                    return picked
    return []


def _splice(
    indices: np.ndarray,
    top: np.ndarray,
    column: np.ndarray,
    new_items: np.ndarray,
    new_scores: np.ndarray,
    chosen: np.ndarray,
    placed: np.ndarray,
    length: np.ndarray,
    n: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The lists (b, k) with the first `placed` (b,) of `chosen` (b, s: columns of
    `new_items`) after their first min(length, n - placed) items, then the rest of each list
    without them; -1 and -inf past the end. `column` (b, k): each listed item's column of
    `new_items`, -1 for the others and past the end."""
    b, k = indices.shape
    kept = np.minimum(length, n - placed)[:, None]  # (b, 1) the list's items before the new
    slot = np.arange(chosen.shape[1])[None, :]
    placing = slot < placed[:, None]  # (b, s)
    is_placed = np.zeros(new_scores.shape, dtype=bool)  # (b, m)
    rows, slots = np.nonzero(placing)
    is_placed[rows, chosen[rows, slots]] = True
    # Each entry's place in the result: the list's own items keep their order around the new
    # ones, which take places kept .. kept + placed - 1; inf drops an entry.
    position = np.arange(k)[None, :]
    own = np.where(position < kept, position, position + placed[:, None]).astype(np.float64)
    gone = ~np.isfinite(top) | (indices < 0)
    gone |= (column >= 0) & is_placed[np.arange(b)[:, None], np.maximum(column, 0)]
    own[gone] = np.inf
    keys = np.hstack([own, np.where(placing, kept + slot, np.inf)])  # (b, k + s)
    order = np.argsort(keys, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(np.hstack([indices, new_items[chosen]]), order, axis=1)
    values = np.take_along_axis(
        np.hstack([top, np.take_along_axis(new_scores, chosen, axis=1)]), order, axis=1
    )
    empty = np.isinf(np.take_along_axis(keys, order, axis=1))
    out[empty], values[empty] = -1, -np.inf
    return out.astype(np.int64, copy=False), values.astype(top.dtype, copy=False)
