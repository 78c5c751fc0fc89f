"""Users described by their own text: the current profile embeddings, the user tower's
training examples and its fit under TorchDistributor.

A profile (`landing/users/`, snapshotted into `user_profiles` and embedded into
`user_embeddings` by the embed stage) is what a user without history has. The user tower
(`core.profile_tower`) learns, from the users who do have history, which items people who
describe themselves alike consume; `profile_factors` turns it into factors the hybrid scorer
reads like ALS's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.config import EmbedConfig, ProfileConfig
from llmrec_spark.core.profile_tower import item_factors, user_factors
from llmrec_spark.errors import InputError
from llmrec_spark.io.tables import TableStore
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.stages.contrastive import (
    cache_dir_url,
    example_files,
    process_count,
    train_on_petastorm,
    training_device,
)
from llmrec_spark.stages.embed import template_text
from llmrec_spark.stages.profile_training import load_profile_tower, train_profile_tower

log = logging.getLogger(__name__)


def current_profiles(store: TableStore, embed_cfg: EmbedConfig, model_id: str) -> DataFrame:
    """(user_id, embedding): each profiled user's embedding of their current profile text
    under `model_id` (empty when no profile was ever embedded)."""
    texts = template_text(
        store.read("user_profiles"),
        template=embed_cfg.user_text_template,
        max_chars=embed_cfg.max_text_chars,
        setting="embed.user_text_template",
    )
    current = texts.where(F.col("text") != "").select("user_id", "text_hash")
    return (
        store.read("user_embeddings")
        .where(F.col("model_id") == model_id)
        .join(current, ["user_id", "text_hash"], "left_semi")
        .dropDuplicates(["user_id"])
        .select("user_id", "embedding")
    )


def profile_examples(
    events: DataFrame, profiles: DataFrame, item_index: DataFrame, *, positive_min_weight: float
) -> DataFrame:
    """One row per (profiled user, item they have a positive on): `profile` (the user's
    embedding) and `pos` (the item's index in `item_index`: item_id, item_idx)."""
    positives = (
        events.where(F.col("weight") >= positive_min_weight)
        .select("user_id", "item_id")
        .distinct()
        .join(item_index, "item_id")
    )
    return positives.join(profiles, "user_id").select(
        F.col("embedding").cast("array<float>").alias("profile"),
        F.col("item_idx").cast("int").alias("pos"),
    )


@dataclass(frozen=True)
class ProfileFit:
    """A trained user tower: its folder, the training summary and the examples it saw."""

    model_dir: str
    output: dict[str, Any]
    examples: int


def fit_profile_tower(
    ctx: RunContext,
    cfg: ProfileConfig,
    examples: DataFrame,
    *,
    n_items: int,
    in_dim: int,
    work_dir: str,
    metadata: dict[str, Any],
) -> ProfileFit:
    """Train the user tower on `examples` (`profile_examples`) under TorchDistributor; the
    tower lands in work_dir/model, checkpoints and the petastorm cache under work_dir."""
    device = training_device(ctx, cfg.device, "profile")
    num_processes = process_count(cfg.num_processes, device)
    examples = examples.cache()
    n_examples, signature = _signature(examples)
    if n_examples < num_processes:
        raise InputError(
            f"profile: {n_examples} (profile, consumed item) examples; the user tower needs "
            f"at least {num_processes}: users with a profile and a positive event"
        )
    key = F.xxhash64("profile", "pos", F.lit(cfg.seed))
    files = example_files(n_examples, num_processes)
    shuffled = examples.repartition(files, key).sortWithinPartitions(key)
    config = {
        "n_items": n_items,
        "in_dim": in_dim,
        "hidden_dim": cfg.hidden_dim,
        "out_dim": cfg.out_dim,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "num_negatives": cfg.num_negatives,
        "seed": cfg.seed,
        "device": device,
        "reader_workers": 1,
    }
    fingerprint = hashlib.sha256(
        json.dumps([config, n_examples, signature], sort_keys=True).encode()
    ).hexdigest()
    model_dir = os.path.join(work_dir, "model")
    prior_path = os.path.join(work_dir, "item_prior.npy")
    write_item_prior(examples, n_items, prior_path)
    try:
        output = train_on_petastorm(
            ctx,
            shuffled,
            train_profile_tower,
            {
                **config,
                "checkpoint_dir": os.path.join(work_dir, "checkpoints"),
                "output_dir": model_dir,
                "fingerprint": fingerprint,
                "model_metadata": metadata,
                "item_prior_path": prior_path,
            },
            label="profile tower",
            num_processes=num_processes,
            device=device,
            cache_url=cache_dir_url(os.path.join(work_dir, "petastorm")),
        )
    finally:
        examples.unpersist()
    return ProfileFit(model_dir=model_dir, output=output, examples=n_examples)


def write_item_prior(examples: DataFrame, n_items: int, path: str) -> None:
    """(n_items,) log item frequencies over the examples, add-one smoothed, as a .npy file:
    where the user tower's item biases start."""
    counts = np.ones(n_items, dtype=np.float64)
    for row in examples.groupBy("pos").count().collect():
        counts[int(row["pos"])] += int(row["count"])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, np.log(counts / counts.sum()).astype(np.float32), allow_pickle=False)


def run_profile_fit(ctx: RunContext, base_id: str) -> dict[str, Any]:
    """The nightly's user tower (train-contrastive, with profile.enabled): trained on the
    contrastive window's events of the users with a profile, for every catalog item; saved
    with its item ids under the date's models folder (`profile_scoring.saved_profile_dir`).
    Returns the stage's record of it (model folder, examples, losses), or why it was skipped."""
    from llmrec_spark.runtime.indexing import dense_index
    from llmrec_spark.stages.als import training_events
    from llmrec_spark.stages.profile_scoring import ITEM_IDS, PROFILE_FOLDER

    profiles = current_profiles(ctx.store, ctx.cfg.embed, base_id).cache()
    first = profiles.select("embedding").limit(1).collect()
    if not first:
        log.info(
            "profile: no %s profile embeddings in user_embeddings; user tower skipped", base_id
        )
        return {"skipped": "no profile embeddings"}
    items = dense_index(ctx.store.read("items").select("item_id").distinct(), "item_idx", "item_id")
    item_ids = [r["item_id"] for r in items.orderBy("item_idx").collect()]
    events = training_events(ctx, ctx.cfg.contrastive.train_days)
    work_dir = ctx.model_dir(PROFILE_FOLDER)
    fit = fit_profile_tower(
        ctx,
        ctx.cfg.profile,
        profile_examples(
            events, profiles, items, positive_min_weight=ctx.cfg.profile.positive_min_weight
        ),
        n_items=len(item_ids),
        in_dim=len(first[0]["embedding"]),
        work_dir=work_dir,
        metadata={"base_model_id": base_id, "ds": ctx.ds},
    )
    profiles.unpersist()
    with open(os.path.join(fit.model_dir, ITEM_IDS), "w") as f:
        json.dump(item_ids, f)
    losses = fit.output["losses"]
    log.info(
        "profile: user tower on %d examples, loss %.4f -> %.4f", fit.examples, losses[0], losses[-1]
    )
    return {
        "model_dir": fit.model_dir,
        "examples": fit.examples,
        "loss": [round(x, 4) for x in losses],
        "resumed_from": fit.output["resumed_from"],
    }


def _signature(examples: DataFrame) -> tuple[int, int]:
    """(row count, order-independent content hash) of the examples, in one pass."""
    row = examples.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.xxhash64("profile", "pos") % (1 << 31)).alias("h"),
    ).collect()[0]
    return int(row["n"]), int(row["h"] or 0)


def profile_factors(model_dir: str, profiles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(user factors (u, out_dim + 1), item factors (n_items, out_dim + 1)) of the tower saved
    in `model_dir`: user . item is its score of the item for that profile."""
    tower = load_profile_tower(model_dir)
    if len(profiles) == 0:
        return np.zeros((0, tower.out_dim + 1), np.float32), item_factors(tower)
    return user_factors(tower, profiles), item_factors(tower)
