"""Two collaborative models' z-scores mixed as one factor product (numpy only).

A z-score is affine in the score, so a user's mean and std over the candidate items (from
the items' sum and Gram matrix, `core.hybrid.ItemTotals`) fold into the user row and a 0/1
column on the items: `z_user_rows(u) @ z_item_rows(items).T` is each user's z-scored score,
0 for items without a factor. Two models' rows side by side then score ALS's z + w x the
second model's z in one product; the hybrid scorer takes that product as its collaborative
score (`SecondFactors`: the Mult-VAE beside ALS in `recommend`, `hybrid_vae` in evaluation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llmrec_spark.core.hybrid import ItemTotals, item_totals


def z_item_rows(item: np.ndarray, has_item: np.ndarray) -> np.ndarray:
    """Item rows (n, d + 1): the factor (zero where the item has none), then has_item as 0/1."""
    rows = np.where(has_item[:, None], item, 0.0)
    return np.concatenate([rows, has_item[:, None]], axis=1).astype(np.float32)


def z_user_rows(user: np.ndarray, totals: ItemTotals) -> np.ndarray:
    """User rows (u, d + 1) whose products with `z_item_rows` are the users' z-scores over the
    items `totals` sums (a user whose scores are all equal gets zeros, not NaN)."""
    rows = user.astype(np.float64)  # (u, d)
    count = max(totals.count, 1)
    mean = rows @ totals.total / count  # (u,)
    second = np.einsum("ij,jk,ik->i", rows, totals.gram, rows) / count  # (u,)
    std = np.sqrt(np.maximum(second - mean**2, 0.0))
    std = np.where(std > 1e-12, std, 1.0)
    return np.concatenate([rows / std[:, None], (-mean / std)[:, None]], axis=1).astype(np.float32)


def z_scored_factors(
    user: np.ndarray, item: np.ndarray, has_item: np.ndarray, candidates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(user (u, d + 1), item (n, d + 1)) rows whose products are each user's score z-scored
    over the candidate items with a factor (`candidates & has_item`), 0 for the others."""
    totals = item_totals(item.astype(np.float32), candidates & has_item)
    return z_user_rows(user, totals), z_item_rows(item, has_item)


@dataclass(frozen=True)
class SecondFactors:
    """A second collaborative model beside ALS in the scorer's items (the Mult-VAE): where
    each item is among its columns, its item rows, and the sums the z-scores need.

    The items' `als` then holds [ALS z rows | second z rows] (`mixed_item_rows`); a user's
    row is [ALS z | weight x second z] (`mixed_user_rows`), the second model's alone for a
    user without an ALS factor.
    """

    model_dir: str  # where the model is saved (loaded once per worker by its digest)
    digest: str
    column: np.ndarray  # (n,) int64: the item's column in the model, -1 for none
    n_columns: int
    has_item: np.ndarray  # (n,) bool: column >= 0
    als_totals: ItemTotals  # ALS's item factors over the eligible items with one
    second_totals: ItemTotals  # the second model's item rows over the eligible items with one
    weight: float


def mixed_item_rows(
    als: np.ndarray, has_als: np.ndarray, second: np.ndarray, has_second: np.ndarray
) -> np.ndarray:
    """(n, rank + 1 + d + 1): ALS's z item rows, then the second model's."""
    return np.concatenate([z_item_rows(als, has_als), z_item_rows(second, has_second)], axis=1)


def mixed_user_rows(
    user_als: np.ndarray,
    has_als: np.ndarray,
    user_second: np.ndarray,
    has_second: np.ndarray,
    *,
    als_totals: ItemTotals,
    second_totals: ItemTotals,
    weight: float,
) -> tuple[np.ndarray, np.ndarray]:
    """(user rows, has a row): [ALS z | weight x second z] per user (zeros for a model the user
    has no row of; the second model at weight 1 for a user without ALS)."""
    als_rows = np.where(has_als[:, None], z_user_rows(user_als, als_totals), 0.0)
    second_rows = np.where(has_second[:, None], z_user_rows(user_second, second_totals), 0.0)
    scale = np.where(has_als, weight, 1.0)[:, None]
    rows = np.concatenate([als_rows, scale * second_rows], axis=1).astype(np.float32)
    return rows, has_als | has_second
