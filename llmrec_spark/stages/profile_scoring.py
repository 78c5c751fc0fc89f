"""The user tower in the recommend stage (`profile.enabled`): users without history scored
by their own profile text.

A user with no event in the window and no ALS factor used to get the popularity list. With a
profile (`user_profiles`, embedded into `user_embeddings`) they get the date's user tower's
list instead: their profile embedding through the tower (loaded once per worker) against the
tower's item rows (`core.hybrid.ProfileItems`), through the same top-n scorer and the same
rules (eligibility, the category cap); the rows say `source = "profile"`. Users with history
are scored as before: validation has not shown that mixing the profile in helps them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Callable

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.core.hybrid import ItemMatrices, Mix, ProfileItems, hybrid_top_n
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.schema import SOURCE_PROFILE

# The user frame's column of a history-less user's profile embedding.
PROFILE_COLUMN = "profile_embedding"
# The model folder under the date's models folder, and its item ids file.
PROFILE_FOLDER = "profile"
ITEM_IDS = "item_ids.json"

log = logging.getLogger(__name__)


def saved_profile_dir(ctx: RunContext) -> str | None:
    """The user tower train-contrastive saved for ctx.ds, or None (logged: the users without
    history then get the popularity list, as the text tower's absence leaves the base model)."""
    model_dir = os.path.join(ctx.model_dir(PROFILE_FOLDER), "model")
    if not os.path.exists(os.path.join(model_dir, ITEM_IDS)):
        log.warning(
            "recommend: profile.enabled but no user tower for ds=%s (no profiles, or "
            "`llmrec train-contrastive --ds %s` not run); users without history get the "
            "popularity list",
            ctx.ds,
            ctx.ds,
        )
        return None
    return model_dir


def with_profile(matrices: ItemMatrices, model_dir: str) -> ItemMatrices:
    """`matrices` with the user tower saved in `model_dir` beside them: its item rows aligned
    to the items (an item it was not trained with scores below every item it knows)."""
    from llmrec_spark.core.profile_tower import item_factors
    from llmrec_spark.stages.profile_training import load_profile_tower

    tower = load_profile_tower(model_dir)
    with open(os.path.join(model_dir, ITEM_IDS)) as f:
        item_ids = json.load(f)
    own = item_factors(tower)
    position = {item: k for k, item in enumerate(item_ids)}
    column = np.array([position.get(item, -1) for item in matrices.item_ids], dtype=np.int64)
    rows = np.zeros((matrices.size, own.shape[1]), dtype=np.float32)
    rows[column >= 0] = own[column[column >= 0]]
    rows[column < 0, -1] = own[:, -1].min() - 1.0  # the bias column
    profile = ProfileItems(model_dir=model_dir, digest=model_digest(model_dir), rows=rows)
    return dataclasses.replace(matrices, profile=profile)


def model_digest(model_dir: str) -> str:
    """sha256 of the tower's weights: the per-worker scorer's cache key."""
    from llmrec_spark.stages.profile_training import PROFILE_WEIGHTS
    from llmrec_spark.stages.tower_training import file_digest

    return file_digest(os.path.join(model_dir, PROFILE_WEIGHTS))


def with_profile_column(users: DataFrame, profiles: DataFrame) -> DataFrame:
    """The user frame (user_id, als_features, history, ...) plus PROFILE_COLUMN: the profile
    embedding (`profiles`: user_id, embedding) of each user without history and without an
    ALS factor, null for everyone else."""
    history_less = F.col("history").isNull() & F.col("als_features").isNull()
    joined = users.join(
        profiles.select("user_id", F.col("embedding").alias("_profile")), "user_id", "left"
    )
    return joined.withColumn(
        PROFILE_COLUMN, F.when(history_less, F.col("_profile")).cast("array<float>")
    ).drop("_profile")


@functools.lru_cache(maxsize=2)
def profile_scorer(model_dir: str, digest: str) -> Callable[[np.ndarray], np.ndarray]:
    """numpy (users, in_dim) profile embeddings -> (users, out_dim + 1) user rows, the tower
    loaded once per process per digest."""
    from llmrec_spark.core.profile_tower import user_factors
    from llmrec_spark.stages.profile_training import load_profile_tower

    return functools.partial(user_factors, load_profile_tower(model_dir))


def profile_users(users: pd.DataFrame) -> np.ndarray:
    """(b,) bool: the block's users scored by their profile (those with PROFILE_COLUMN set)."""
    if PROFILE_COLUMN not in users.columns:
        return np.zeros(len(users), dtype=bool)
    return np.array([v is not None and len(v) > 0 for v in users[PROFILE_COLUMN]], dtype=bool)


def profile_rows(users: pd.DataFrame, items: ItemMatrices) -> np.ndarray:
    """(b, out_dim + 1) float32: the tower's user rows of the block's profiled users."""
    assert items.profile is not None
    embeddings = np.stack([np.asarray(v, dtype=np.float32) for v in users[PROFILE_COLUMN]])
    return profile_scorer(items.profile.model_dir, items.profile.digest)(embeddings)


def score_profile_block(
    users: pd.DataFrame,
    items: ItemMatrices,
    *,
    n: int,
    exclude_seen: bool,
    max_per_category: int,
) -> pd.DataFrame:
    """Rows of SCORED_SCHEMA for users without history scored by the user tower alone (their
    profile vector against its item rows, the same rules), `source` "profile"."""
    from llmrec_spark.stages.recommend import scored_rows

    histories = [np.zeros(0, dtype=np.int64)] * len(users)
    indices, scores, _ = hybrid_top_n(
        profile_rows(users, items),
        np.ones(len(users), dtype=bool),
        histories,
        items.profile_view(),
        n=n,
        mix=Mix(0.0),
        exclude_seen=exclude_seen,
        max_per_category=max_per_category,
    )
    return scored_rows(users, items, indices, scores, SOURCE_PROFILE)
