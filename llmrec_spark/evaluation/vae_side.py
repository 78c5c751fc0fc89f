"""The Mult-VAE beside ALS in the evaluation: `vae` ranks with its factors, `hybrid_vae` with
ALS's and its z-scores mixed (`vae.hybrid_weight`) as the hybrid's collaborative score.

The VAE's logits are a user row times an item row (`core.vae.user_vectors`,
`item_vectors`), so it ranks through the same scorer as ALS: its item rows are aligned to the
split's items (zero rows for items it has no column for: cold items), its user rows come
from each test user's training pairs, weighted as it was trained.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame

from llmrec_spark.core.hybrid import ItemMatrices, item_totals
from llmrec_spark.core.vae import item_vectors, user_vectors
from llmrec_spark.core.zmix import mixed_item_rows, mixed_user_rows
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.stages import vae
from llmrec_spark.stages.vae_training import load_vae

if TYPE_CHECKING:
    from llmrec_spark.evaluation.refit import Fitted, SideFactors

# Test users per forward pass (a dense (users, items) block each).
USER_BLOCK = 1024


def fit_vae_model(ctx: RunContext, pairs: DataFrame, work_dir: str) -> str:
    """Train the Mult-VAE (ctx.cfg.vae) on a split's training `pairs`; its model folder."""
    fit = vae.fit_vae(
        ctx,
        ctx.cfg.vae,
        pairs,
        work_dir=os.path.join(work_dir, "vae"),
        metadata={"kind": "evaluation"},
    )
    return fit.model_dir


def user_pairs(pairs: DataFrame, users: list[str]) -> pd.DataFrame:
    """The (user_id, item_id, weight) pairs of `users` on the driver."""
    wanted = pairs.sparkSession.createDataFrame([(u,) for u in users], "user_id string")
    return pairs.join(wanted, "user_id").select("user_id", "item_id", "weight").toPandas()


def vae_factors(
    model_dir: str,
    items: ItemMatrices,
    users: list[str],
    pairs: pd.DataFrame,
    *,
    hybrid_weight: float,
) -> SideFactors:
    """The VAE's item rows in `items` order and the `users`' rows from their `pairs`."""
    from llmrec_spark.evaluation.refit import SideFactors

    model, item_ids = load_vae(model_dir)
    column = {item: k for k, item in enumerate(item_ids)}
    at = np.array([column.get(item, -1) for item in items.item_ids], dtype=np.int64)
    known = at >= 0
    own = item_vectors(model)
    item_rows = np.zeros((items.size, own.shape[1]), dtype=np.float32)
    item_rows[known] = own[at[known]]
    row = {user: k for k, user in enumerate(users)}
    pairs = pairs[pairs["item_id"].isin(column.keys()) & pairs["user_id"].isin(row.keys())]
    user_at = pairs["user_id"].map(row).to_numpy(np.int64)
    col_at = pairs["item_id"].map(column).to_numpy(np.int64)
    weight = pairs["weight"].to_numpy(np.float32)
    has_user = np.bincount(user_at, minlength=len(users)) > 0
    user_rows = np.zeros((len(users), own.shape[1]), dtype=np.float32)
    for start in range(0, len(users), USER_BLOCK):
        block = (user_at >= start) & (user_at < start + USER_BLOCK)
        x = np.zeros((min(USER_BLOCK, len(users) - start), len(item_ids)), dtype=np.float32)
        np.add.at(x, (user_at[block] - start, col_at[block]), weight[block])
        user_rows[start : start + len(x)] = user_vectors(model, x)
    user_rows[~has_user] = 0.0
    return SideFactors(
        params={"hybrid_weight": hybrid_weight, "model_dir": model_dir},
        item_factors=item_rows,
        has_item=known,
        user_factors=user_rows,
        has_user=has_user,
    )


def mixed_factors(fitted: Fitted, side: SideFactors) -> Fitted:
    """`fitted` with ALS's and the VAE's z-scores side by side as its collaborative factors
    (`core.zmix`), as `recommend` scores with the VAE on: ALS's z + hybrid_weight x the
    VAE's z (each over the eligible items with a factor, 0 where an item has none)."""
    m = fitted.items
    assert fitted.user_als is not None and m.als is not None and m.has_als is not None
    user_rows, has_user = mixed_user_rows(
        fitted.user_als,
        fitted.user_has_als,
        side.user_factors,
        side.has_user,
        als_totals=item_totals(m.als, m.eligible & m.has_als),
        second_totals=item_totals(side.item_factors, m.eligible & side.has_item),
        weight=float(side.params["hybrid_weight"]),
    )
    items = dataclasses.replace(
        m,
        als=mixed_item_rows(m.als, m.has_als, side.item_factors, side.has_item),
        has_als=m.has_als | side.has_item,
        text=None,
        has_text=None,
        recent_columns=m.als.shape[1],
    )
    return dataclasses.replace(fitted, items=items, user_als=user_rows, user_has_als=has_user)


def with_hybrid_weight(fitted: Fitted, weight: float) -> Fitted:
    """`fitted` with another VAE weight in hybrid_vae (a validation trial)."""
    assert fitted.vae is not None
    side = dataclasses.replace(fitted.vae, params={**fitted.vae.params, "hybrid_weight": weight})
    return dataclasses.replace(fitted, vae=side)
