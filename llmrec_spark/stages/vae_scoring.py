"""The Mult-VAE in the recommend stage (`vae.enabled`): its scores beside ALS's, per block.

The date's model (`train-vae`) joins the broadcast items as a second collaborative model
(`core.zmix.SecondFactors`: its item rows aligned to the catalog, mixed into `als`). Each
block of users gets its rows from the model's encoder run on their (item, weight) pairs in
the ALS window (`vae_pairs`), the model loaded once per worker (`vae_training.vae_scorer`):
a user with an ALS factor scores ALS's z + vae.hybrid_weight x the VAE's z, a user without
one (new since training) the VAE's alone, and the rows say `source = "vae"`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.core.hybrid import ItemMatrices, item_totals
from llmrec_spark.core.vae import item_vectors
from llmrec_spark.core.zmix import SecondFactors, mixed_item_rows, mixed_user_rows
from llmrec_spark.errors import InputError
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.stages.vae_training import load_vae, vae_scorer

# The user frame's columns of the VAE's input (`vae_pairs`).
VAE_COLUMNS = ("vae_items", "vae_weights")


def vae_model_dir(ctx: RunContext) -> str:
    """The Mult-VAE train-vae saved for ctx.ds; InputError naming the stage when there is none."""
    from llmrec_spark.stages.vae import saved_vae_dir

    model_dir = saved_vae_dir(ctx)
    if model_dir is None:
        raise InputError(
            f"vae.enabled but no Mult-VAE was trained for ds={ctx.ds}; run "
            f"`llmrec train-vae --ds {ctx.ds}` first (or set vae.enabled=false)"
        )
    return model_dir


def with_vae(matrices: ItemMatrices, model_dir: str, *, weight: float) -> ItemMatrices:
    """`matrices` with the VAE saved in `model_dir` beside ALS: its item rows aligned to the
    items, both models' z rows as `als` (`core.zmix.mixed_item_rows`)."""
    from llmrec_spark.stages.vae import model_digest

    model, item_ids = load_vae(model_dir)
    position = {item: k for k, item in enumerate(item_ids)}
    column = np.array([position.get(item, -1) for item in matrices.item_ids], dtype=np.int64)
    has_item = column >= 0
    rows = np.zeros((matrices.size, model.hidden_dim + 1), dtype=np.float32)
    rows[has_item] = item_vectors(model)[column[has_item]]
    als, has_als = matrices.als, matrices.has_als
    if als is None or has_als is None:  # no item has an ALS factor: the VAE alone
        als, has_als = np.zeros((matrices.size, 1), np.float32), np.zeros(matrices.size, bool)
    second = SecondFactors(
        model_dir=model_dir,
        digest=model_digest(model_dir),
        column=column,
        n_columns=len(item_ids),
        has_item=has_item,
        als_totals=item_totals(als, matrices.eligible & has_als),
        second_totals=item_totals(rows, matrices.eligible & has_item),
        weight=weight,
    )
    return dataclasses.replace(
        matrices,
        als=mixed_item_rows(als, has_als, rows, has_item),
        has_als=has_als | has_item,
        second=second,
        recent_columns=als.shape[1],
    )


def vae_pairs(window: DataFrame, item_index: DataFrame, *, min_weight: float) -> DataFrame:
    """Per user the VAE's input: (user_id, vae_items (item_idx), vae_weights), their summed
    weights per item in `window` as ALS trains on them (pairs under `min_weight` left out)."""
    from llmrec_spark.stages.als import interactions

    pairs = interactions(window, min_weight).join(item_index, "item_id")
    per_user = pairs.groupBy("user_id").agg(
        F.array_sort(F.collect_list(F.struct("item_idx", "weight"))).alias("pairs")
    )
    return per_user.select(
        "user_id",
        F.transform("pairs", lambda p: p["item_idx"]).cast("array<int>").alias("vae_items"),
        F.transform("pairs", lambda p: p["weight"]).cast("array<float>").alias("vae_weights"),
    )


def block_factors(
    users: pd.DataFrame, items: ItemMatrices
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block's collaborative rows against `items.als` (mixed): (rows, has a row, scored
    by the VAE alone: users without an ALS factor)."""
    second = items.second
    assert second is not None
    rank = second.als_totals.total.shape[0]
    features = users["als_features"]
    has_als = np.array([f is not None and len(f) > 0 for f in features], dtype=bool)
    user_als = np.zeros((len(users), rank), dtype=np.float32)
    if has_als.any():
        user_als[has_als] = np.stack([np.asarray(f, dtype=np.float32) for f in features[has_als]])
    x = vae_input(users["vae_items"], users["vae_weights"], second)
    has_vae = x.any(axis=1)
    user_vae = vae_scorer(second.model_dir, second.digest)(x)
    rows, has = mixed_user_rows(
        user_als,
        has_als,
        user_vae,
        has_vae,
        als_totals=second.als_totals,
        second_totals=second.second_totals,
        weight=second.weight,
    )
    return rows, has, has_vae & ~has_als


def vae_input(item_lists: pd.Series, weight_lists: pd.Series, second: SecondFactors) -> np.ndarray:
    """(users, model columns) float32: each user's weights at their items' model columns
    (items the model has no column for left out)."""
    x = np.zeros((len(item_lists), second.n_columns), dtype=np.float32)
    for row, (found, weights) in enumerate(zip(item_lists, weight_lists, strict=True)):
        if found is None or len(found) == 0:
            continue
        columns = second.column[np.asarray(found, dtype=np.int64)]
        known = columns >= 0
        np.add.at(x[row], columns[known], np.asarray(weights, dtype=np.float32)[known])
    return x
