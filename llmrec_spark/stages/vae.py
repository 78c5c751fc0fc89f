"""Mult-VAE (`train-vae`): a second collaborative model, trained under TorchDistributor.

Each user becomes one row: their (item, summed weight) pairs in the ALS training window
(`als.train_days`, `als.min_weight`, the nightly's held-out rows left out as for ALS), the
heaviest `vae.max_items` kept, padded to one width. Spark writes the rows as petastorm files;
`vae_training.train_vae` learns to reconstruct each row from a corrupted copy (multinomial
likelihood, annealed KL). The model scores any user from their history alone, so a user who
is new since training gets collaborative scores without a refit (`vae_training.vae_scorer`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.config import VaeConfig, check_vae
from llmrec_spark.core.vae import PAD
from llmrec_spark.errors import InputError
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.indexing import dense_index
from llmrec_spark.stages.als import interactions, training_events
from llmrec_spark.stages.contrastive import (
    cache_dir_url,
    process_count,
    train_on_petastorm,
    training_device,
)
from llmrec_spark.stages.tower_training import file_digest
from llmrec_spark.stages.vae_training import VAE_WEIGHTS, train_vae, write_item_ids

log = logging.getLogger(__name__)

# The trained model's folder under the stage's work folder (weights, config, item ids).
MODEL_FOLDER = "model"
# Users per training-data file; petastorm shards files/row groups across ranks.
USERS_PER_FILE = 20_000


# ---------------------------------------------------------------------------------------------
# Spark transformations


def user_rows(indexed_pairs: DataFrame, *, max_items: int) -> DataFrame:
    """One row per user of (user_id, item_idx, weight) pairs: `user_id`, `n_items` (pairs
    before the cut), `items` (item_idx, heaviest first, ties by index, at most max_items)
    and `weights` (theirs)."""
    ordered = F.array_sort(
        F.collect_list(F.struct((-F.col("weight")).alias("neg_weight"), "item_idx"))
    )
    per_user = indexed_pairs.groupBy("user_id").agg(ordered.alias("pairs"))
    kept = F.slice("pairs", 1, max_items)
    return per_user.select(
        "user_id",
        F.size("pairs").alias("n_items"),
        F.transform(kept, lambda p: p["item_idx"]).cast("array<int>").alias("items"),
        F.transform(kept, lambda p: -p["neg_weight"]).cast("array<float>").alias("weights"),
    )


def padded_rows(rows: DataFrame, width: int) -> DataFrame:
    """`user_rows` padded to `width` entries (items with PAD, weights with 0): the fixed-size
    columns petastorm batches."""
    pad = F.lit(width) - F.size("items")
    return rows.select(
        F.concat("items", F.array_repeat(F.lit(PAD), pad)).cast("array<int>").alias("items"),
        F.concat("weights", F.array_repeat(F.lit(0.0), pad)).cast("array<float>").alias("weights"),
    )


def shuffle_users(rows: DataFrame, *, files: int, seed: int) -> DataFrame:
    """Spread user rows over `files` partitions in a seeded order that depends on content only
    (the same users give the same files on every run)."""
    key = F.xxhash64("items", "weights", F.lit(seed))
    return rows.repartition(files, key).sortWithinPartitions(key)


# ---------------------------------------------------------------------------------------------
# Stage


def run_train_vae(ctx: RunContext) -> StageResult:
    """Train the Mult-VAE on ctx.ds's ALS training window; the model lands in the date's models."""
    cfg = ctx.cfg.vae
    if not cfg.enabled:
        log.info("vae: skipped (vae.enabled=false)")
        return StageResult(summary={"skipped": "vae.enabled=false"})
    pairs = interactions(training_events(ctx, ctx.cfg.als.train_days), ctx.cfg.als.min_weight)
    started = time.perf_counter()
    fit = fit_vae(
        ctx, cfg, pairs, work_dir=ctx.model_dir("vae"), metadata={"ds": ctx.ds, "kind": "mult-vae"}
    )
    seconds = time.perf_counter() - started
    losses = fit.output["losses"]
    log.info(
        "vae: loss %.4f -> %.4f over %d epochs (%d run now, %.1fs); %d users, %d items",
        losses[0],
        losses[-1],
        len(losses),
        fit.output["epochs_run"],
        seconds,
        fit.users,
        fit.items,
    )
    return StageResult(
        rows_in=fit.users,
        rows_out=fit.items,
        metrics={
            "vae_first_epoch_loss": losses[0],
            "vae_last_epoch_loss": losses[-1],
            "vae_train_seconds": seconds,
            "vae_users": float(fit.users),
            "vae_items": float(fit.items),
        },
        params={f"vae.{k}": v for k, v in vars(cfg).items()} | {"vae.device": fit.device},
        artifacts={"vae_model": fit.model_dir},
        summary={
            "users": fit.users,
            "items": fit.items,
            "loss": [round(x, 4) for x in losses],
            "resumed_from": fit.output["resumed_from"],
        },
    )


@dataclass(frozen=True)
class VaeFit:
    """A trained Mult-VAE: its folder, the training summary, its users, items and device."""

    model_dir: str
    output: dict[str, Any]
    users: int
    items: int
    device: str


def fit_vae(
    ctx: RunContext,
    cfg: VaeConfig,
    pairs: DataFrame,
    *,
    work_dir: str,
    metadata: dict[str, Any],
) -> VaeFit:
    """Train the Mult-VAE on (user_id, item_id, weight) `pairs` under TorchDistributor; the
    model (weights, config, item ids) lands in work_dir/model, checkpoints and the petastorm
    cache under work_dir."""
    check_vae(cfg)
    device = training_device(ctx, cfg.device, "vae")
    num_processes = process_count(cfg.num_processes, device)
    model_dir = os.path.join(work_dir, MODEL_FOLDER)
    index = dense_index(pairs.select("item_id").distinct(), "item_idx", "item_id").cache()
    item_ids = [row["item_id"] for row in index.orderBy("item_idx").collect()]
    rows = user_rows(pairs.join(index, "item_id"), max_items=cfg.max_items).cache()
    stats = rows.agg(
        F.count(F.lit(1)).alias("users"),
        F.max(F.size("items")).alias("width"),
        F.sum(F.when(F.col("n_items") > cfg.max_items, 1).otherwise(0)).alias("cut"),
        F.sum(F.xxhash64("items", "weights") % (1 << 31)).alias("signature"),
    ).collect()[0]
    n_users = int(stats["users"])
    if n_users < num_processes:
        raise InputError(
            f"vae: {n_users} users with pairs in the {ctx.cfg.als.train_days} days up to "
            f"{ctx.ds} (need at least {num_processes}, one per training process)"
        )
    if stats["cut"]:
        log.info(
            "vae: %d users have over %d items; their heaviest kept", stats["cut"], cfg.max_items
        )
    files = min(n_users, max(2 * num_processes, math.ceil(n_users / USERS_PER_FILE)))
    shuffled = shuffle_users(padded_rows(rows, int(stats["width"])), files=files, seed=cfg.seed)
    fingerprint = _fingerprint(cfg, item_ids, int(stats["signature"] or 0), n_users)
    log.info(
        "vae: %d users, %d items, %d processes on %s, fingerprint %s",
        n_users, len(item_ids), num_processes, device, fingerprint[:12],
    )  # fmt: skip
    write_item_ids(model_dir, item_ids)
    try:
        output = train_on_petastorm(
            ctx,
            shuffled,
            train_vae,
            label="vae",
            num_processes=num_processes,
            device=device,
            cache_url=cache_dir_url(os.path.join(work_dir, "petastorm")),
            config={
                **training_config(cfg, device, len(item_ids)),
                "checkpoint_dir": os.path.join(work_dir, "checkpoints"),
                "output_dir": model_dir,
                "fingerprint": fingerprint,
                "model_metadata": metadata,
            },
        )
    finally:
        rows.unpersist()
        index.unpersist()
    return VaeFit(model_dir, output, n_users, len(item_ids), device)


def training_config(cfg: VaeConfig, device: str, n_items: int) -> dict[str, Any]:
    """The settings `train_vae` reads from its config dict, taken from `cfg`."""
    keys = (
        "hidden_dim", "latent_dim", "dropout", "beta_cap", "anneal_steps", "epochs",
        "batch_size", "learning_rate", "weight_decay", "seed", "reader_workers",
    )  # fmt: skip
    return {**{k: getattr(cfg, k) for k in keys}, "device": device, "n_items": n_items}


def _fingerprint(cfg: VaeConfig, item_ids: list[str], signature: int, n_users: int) -> str:
    """Identity of one training job: a checkpoint is resumed only by a job with the same
    settings, columns and user rows."""
    keys = {k: v for k, v in vars(cfg).items() if k not in ("enabled", "reader_workers")}
    columns = hashlib.sha256("\n".join(item_ids).encode()).hexdigest()
    payload = json.dumps([keys, columns, signature, n_users], sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def saved_vae_dir(ctx: RunContext) -> str | None:
    """The folder of the Mult-VAE train-vae saved for ctx.ds, or None when there is none."""
    model_dir = os.path.join(ctx.model_dir("vae"), MODEL_FOLDER)
    return model_dir if os.path.exists(os.path.join(model_dir, VAE_WEIGHTS)) else None


def model_digest(model_dir: str) -> str:
    """The saved weights' digest: what `vae_scorer` caches a loaded model under."""
    return file_digest(os.path.join(model_dir, VAE_WEIGHTS))
