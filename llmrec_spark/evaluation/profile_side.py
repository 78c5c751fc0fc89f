"""The user tower in the evaluation: `profile_text` ranks the cold_user protocol's users, who
have no training history, by their own profile text.

The tower's score is a user row times an item row (`core.profile_tower.user_factors`,
`item_factors`: the item's vector and bias), so it ranks through the same scorer as ALS; a
test user without a profile gets a zero row and the popularity list, as `recommend` gives a
brand-new user.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame

from llmrec_spark.core.hybrid import ItemMatrices
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.stages import profiles as profile_stage

if TYPE_CHECKING:
    from llmrec_spark.evaluation.refit import SideFactors

log = logging.getLogger(__name__)

# The protocol the user tower is fitted for, and the models ranked on it.
PROTOCOL = "cold_user"
MODELS = ("popularity", "profile_text")


def fit_profile_model(
    ctx: RunContext, train: DataFrame, profiles: DataFrame, frame: DataFrame, work_dir: str
) -> str | None:
    """Train the user tower (ctx.cfg.profile) on a split's training events; its model folder,
    or None when no training user has both a profile and a positive (logged)."""
    cfg = ctx.cfg.profile
    examples = profile_stage.profile_examples(
        train,
        profiles,
        frame.select("item_id", "item_idx"),
        positive_min_weight=cfg.positive_min_weight,
    )
    first = profiles.select("embedding").limit(1).collect()
    if not first or examples.limit(1).count() == 0:
        log.warning("evaluate: no training user has a profile and a positive; profile_text skipped")
        return None
    fit = profile_stage.fit_profile_tower(
        ctx,
        cfg,
        examples,
        n_items=frame.count(),
        in_dim=len(first[0]["embedding"]),
        work_dir=os.path.join(work_dir, "profile"),
        metadata={"kind": "evaluation"},
    )
    return fit.model_dir


def profile_factors(
    model_dir: str, profiles: DataFrame, items: ItemMatrices, users: list[str]
) -> SideFactors:
    """The tower's item rows (item index order, the split's items) and the `users`' rows from
    their profiles (zero rows and has_user False without one)."""
    from llmrec_spark.evaluation.refit import SideFactors

    wanted = profiles.sparkSession.createDataFrame([(u,) for u in users], "user_id string")
    found: pd.DataFrame = profiles.join(wanted, "user_id").toPandas()
    row = {user: k for k, user in enumerate(users)}
    at = found["user_id"].map(row).to_numpy(np.int64)
    matrix = (
        np.stack(found["embedding"].to_numpy()).astype(np.float32) if len(found) else np.zeros(0)
    )
    own_users, item_rows = profile_stage.profile_factors(model_dir, matrix)
    if item_rows.shape[0] != items.size:
        raise ValueError(f"{model_dir}: {item_rows.shape[0]} item rows for {items.size} items")
    user_rows = np.zeros((len(users), item_rows.shape[1]), dtype=np.float32)
    has_user = np.zeros(len(users), dtype=bool)
    if len(found):
        user_rows[at] = own_users
        has_user[at] = True
    return SideFactors(
        params={},
        item_factors=item_rows,
        has_item=np.ones(items.size, dtype=bool),
        user_factors=user_rows,
        has_user=has_user,
    )
