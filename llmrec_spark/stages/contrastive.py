"""Contrastive fine-tuning of the text tower: a trainable head on frozen base item embeddings.

Training examples come from user histories: by default one per (user, positive item), the
anchor being the user's other items (`contrastive.examples=next_item`: the items touched before
-> the next new item). The head is trained with InfoNCE (in-batch plus sampled negatives, the user's own
history masked out) under TorchDistributor, fed by petastorm. The trained head then maps
every item's base embedding -- items with no interactions included -- to a tuned embedding
appended to `item_embeddings` under its own model_id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType

from llmrec_spark.config import EXAMPLE_KINDS, ContrastiveConfig, check_contrastive
from llmrec_spark.core.tower import PAD
from llmrec_spark.errors import ConfigError, InputError
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.indexing import dense_index
from llmrec_spark.stages.als import training_events
from llmrec_spark.stages.torch_process import quiet_petastorm
from llmrec_spark.stages.tower_training import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    file_digest,
    head_embedder,
    train_text_tower,
)

log = logging.getLogger(__name__)

PETASTORM_CACHE_CONF = "petastorm.spark.converter.parentCacheDirUrl"
# Rows per training-data file; petastorm shards files/row groups across ranks.
EXAMPLES_PER_FILE = 50_000
# Hash buckets of `sample_examples` (its fractions' resolution).
SAMPLE_BUCKETS = 1_000_000
# The run-date folders under storage.models_dir.
DATE_FOLDER = re.compile(r"\d{4}-\d{2}-\d{2}")


def tuned_model_id(base_model_id: str, ds: str) -> str:
    """model_id of the tuned embeddings trained on run date `ds` from `base_model_id`."""
    return f"{base_model_id}+tower@{ds}"


# ---------------------------------------------------------------------------------------------
# Spark transformations


def with_item_index(current: DataFrame) -> DataFrame:
    """Add a dense `item_idx` (0..n-1 in item_id order) to one-row-per-item embeddings.

    Runs the small jobs of `dense_index`."""
    index = dense_index(current.select("item_id"), "item_idx", "item_id")
    return current.join(index, "item_id").select(*current.columns, "item_idx")


def training_examples(
    events: DataFrame,
    items: DataFrame,
    *,
    max_history: int,
    examples: str = "user_item",
    positive_min_weight: float = 0.0,
    seed: int = 0,
) -> DataFrame:
    """Training rows `history` (item indices, PAD-filled to max_history) and `pos`; see EXAMPLE_KINDS.

    Events on items without a base embedding are ignored.
    """
    if examples == "user_item":
        return user_item_examples(
            events,
            items,
            max_history=max_history,
            positive_min_weight=positive_min_weight,
            seed=seed,
        )
    if examples == "next_item":
        return next_item_examples(events, items, max_history=max_history)
    raise ValueError(f"examples must be one of {', '.join(EXAMPLE_KINDS)}, got {examples!r}")


def user_item_examples(
    events: DataFrame, items: DataFrame, *, max_history: int, positive_min_weight: float, seed: int
) -> DataFrame:
    """One row per (user, positive item): `pos`, and the user's other items as `history`.

    A positive is an item the user has an event of weight >= positive_min_weight on. The
    history is every other item the user touched, in a seeded hash order cut at max_history
    (the same order for each of the user's rows), so the anchor is the whole user, as it is
    when the tuned embeddings are scored, not the prefix before one event.
    """
    touched = (
        events.join(items.select("item_id", "item_idx"), "item_id")
        .groupBy("user_id", "item_idx")
        .agg(F.max("weight").alias("weight"))
    )
    per_user = touched.groupBy("user_id").agg(
        F.array_sort(
            F.collect_list(
                F.struct(F.xxhash64("user_id", "item_idx", F.lit(seed)).alias("h"), "item_idx")
            )
        ).alias("ordered"),
        F.collect_list(F.when(F.col("weight") >= positive_min_weight, F.col("item_idx"))).alias(
            "positives"
        ),
    )
    pairs = per_user.select(
        F.transform("ordered", lambda x: x["item_idx"]).alias("touched"),
        F.explode("positives").alias("pos"),
    )
    others = F.slice(F.filter("touched", lambda x: x != F.col("pos")), 1, max_history)
    with_history = pairs.select(others.alias("h"), "pos").where(F.size("h") > 0)
    return _padded(with_history, max_history)


def next_item_examples(events: DataFrame, items: DataFrame, *, max_history: int) -> DataFrame:
    """One row per (user, next new item): the items touched before it, oldest first, as `history`.

    A user's sequence is their distinct items in order of first interaction.
    """
    first_touch = (
        events.join(items.select("item_id", "item_idx"), "item_id")
        .groupBy("user_id", "item_idx")
        .agg(F.min("event_ts").alias("first_ts"))
    )
    previous = (
        Window.partitionBy("user_id").orderBy("first_ts", "item_idx").rowsBetween(-max_history, -1)
    )
    with_history = first_touch.select(
        F.collect_list("item_idx").over(previous).alias("h"), F.col("item_idx").alias("pos")
    ).where(F.size("h") > 0)
    return _padded(with_history, max_history)


def _padded(with_history: DataFrame, max_history: int) -> DataFrame:
    padding = F.array_repeat(F.lit(PAD), F.lit(max_history) - F.size("h"))
    return with_history.select(
        F.concat("h", padding).cast("array<int>").alias("history"),
        F.col("pos").cast("int").alias("pos"),
    )


def shuffle_examples(examples: DataFrame, *, files: int, seed: int) -> DataFrame:
    """Spread examples over `files` partitions in a seeded order that depends on content only.

    Partition and in-partition order come from a seeded hash of each row, not from the order
    rows arrive in after a shuffle, so the same examples give the same files on every run.
    """
    key = F.xxhash64("history", "pos", F.lit(seed))
    return examples.repartition(files, key).sortWithinPartitions(key, "pos")


def sample_examples(examples: DataFrame, *, fraction: float, seed: int, salt: str) -> DataFrame:
    """A seeded `fraction` of the examples, chosen by a hash of each row's content and `salt`
    (the run date): the same rows on a rerun of the date, another share on the next."""
    if fraction >= 1.0:
        return examples
    key = F.pmod(F.xxhash64("history", "pos", F.lit(seed), F.lit(salt)), F.lit(SAMPLE_BUCKETS))
    return examples.where(key < int(round(fraction * SAMPLE_BUCKETS)))


def tuned_embeddings(
    current: DataFrame, *, head_dir: str, head_digest: str, model_id: str, ds: str, out_dim: int
) -> DataFrame:
    """item_embeddings rows of the tuned model: the head applied to each item's base embedding."""

    @F.pandas_udf(ArrayType(FloatType(), containsNull=False))  # type: ignore[call-overload]
    def apply_head(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        embed = head_embedder(head_dir, head_digest)
        for base in batches:
            tuned = (
                embed(np.stack(base.to_numpy()))
                if len(base)
                else np.zeros((0, out_dim), np.float32)
            )
            yield pd.Series(list(tuned))

    return current.select(
        "item_id",
        "text_hash",
        F.lit(model_id).alias("model_id"),
        F.lit(out_dim).cast("int").alias("dim"),
        apply_head("embedding").alias("embedding"),
        F.lit(ds).alias("ds"),
    )


# ---------------------------------------------------------------------------------------------
# Stage


def run_train_contrastive(ctx: RunContext) -> StageResult:
    """Fine-tune the text tower on ctx.ds's training window and append the tuned item
    embeddings; with profile.enabled, train the user tower beside it (`with_user_tower`)."""
    from llmrec_spark.core import encoder

    cfg = ctx.cfg.contrastive
    base_id = encoder.base_model_id(ctx.cfg.embed)
    if not cfg.enabled:
        log.info("contrastive: text tower skipped (contrastive.enabled=false)")
        result = StageResult(summary={"skipped": "contrastive.enabled=false"})
    elif cfg.mode == "encoder":
        check_contrastive(cfg)
        from llmrec_spark.stages.encoder_fit import run_encoder_mode

        # encoder_start head: the adapters learn under the head mode's head, trained first.
        head = _train_head(ctx, base_id) if cfg.encoder_start == "head" else None
        result = run_encoder_mode(ctx, base_id, head)
    else:
        check_contrastive(cfg)
        result = _train_head(ctx, base_id)
    return with_user_tower(ctx, result, base_id)


def _train_head(ctx: RunContext, base_id: str) -> StageResult:
    """The head on frozen base embeddings (contrastive.mode head): trained, applied to every
    item's base embedding, appended under `tuned_model_id`."""
    from llmrec_spark.stages import embed

    cfg = ctx.cfg.contrastive
    model_id = tuned_model_id(base_id, ctx.ds)
    device = training_device(ctx, cfg.device, "contrastive")

    # The same "current embedding per item" as the recommend stage reads (catalog's current text).
    current = with_item_index(embed.latest_embeddings(ctx.store, base_id, ctx.cfg.embed)).cache()
    events = training_events(ctx, cfg.train_days)
    warm = previous_head(ctx.cfg.path(ctx.cfg.storage.models_dir), ctx.ds, cfg, base_id)
    started = time.perf_counter()
    fit = fit_text_tower(
        ctx,
        cfg,
        events,
        current,
        work_dir=ctx.model_dir("text_tower"),
        head_metadata={"base_model_id": base_id, "model_id": model_id, "ds": ctx.ds}
        | _warm_metadata(warm),
        warm=warm,
    )
    train_seconds = time.perf_counter() - started
    output, n_examples, n_items, head_dir = fit.output, fit.examples, fit.items, fit.head_dir

    tuned = tuned_embeddings(
        current,
        head_dir=head_dir,
        head_digest=file_digest(os.path.join(head_dir, HEAD_WEIGHTS)),
        model_id=model_id,
        ds=ctx.ds,
        out_dim=cfg.out_dim * cfg.members,
    )
    replaced = _write_tuned(ctx, tuned, model_id)
    current.unpersist()

    losses = output["losses"]
    log.info(
        "contrastive: loss %.4f -> %.4f over %d epochs (%d run now, %.1fs); %d tuned embeddings %s",
        losses[0],
        losses[-1],
        len(losses),
        output["epochs_run"],
        train_seconds,
        n_items,
        "replaced" if replaced else "appended",
    )
    return StageResult(
        rows_in=n_examples,
        rows_out=n_items,
        metrics={
            "contrastive_first_epoch_loss": losses[0],
            "contrastive_last_epoch_loss": losses[-1],
            "contrastive_train_seconds": train_seconds,
            "contrastive_examples": float(n_examples),
            "contrastive_items": float(n_items),
        },
        params={
            **{f"contrastive.{k}": v for k, v in vars(cfg).items()},
            "contrastive.device": device,
            "contrastive.model_id": model_id,
            "contrastive.warm_from": warm.ds if warm is not None else None,
        },
        artifacts={"text_tower": head_dir},
        summary={
            "model_id": model_id,
            "examples": n_examples,
            "items": n_items,
            "loss": [round(x, 4) for x in losses],
            "resumed_from": output["resumed_from"],
            "warm_from": warm.ds if warm is not None else None,
        },
    )


def with_user_tower(ctx: RunContext, result: StageResult, base_id: str) -> StageResult:
    """`result` with the user tower trained beside the text tower when profile.enabled
    (`profiles.run_profile_fit`): its folder as the `profile_tower` artifact, its record in
    the summary."""
    if not ctx.cfg.profile.enabled:
        return result
    from llmrec_spark.stages.profiles import run_profile_fit

    record = run_profile_fit(ctx, base_id)
    result.summary["profile_tower"] = record
    if "model_dir" in record:
        result.artifacts["profile_tower"] = record["model_dir"]
        result.metrics["profile_tower_last_epoch_loss"] = record["loss"][-1]
    return result


@dataclass(frozen=True)
class WarmStart:
    """An earlier date's head a date's training starts from: its folder, its date, its
    weights' digest, and the warm dates in a row with this one."""

    head_dir: str
    ds: str
    digest: str
    nights: int


def previous_head(
    models_dir: str, ds: str, cfg: ContrastiveConfig, base_id: str
) -> WarmStart | None:
    """The warm start from the latest earlier date's head under `models_dir`, or None (train
    from scratch; the log says why): no earlier head, warm starts off, another base model or
    shape, or `warm_max_nights` warm dates in a row already."""
    if cfg.warm_epochs == 0:
        return None
    found = _latest_head_before(models_dir, ds)
    if found is None:
        return None
    head_ds, head_dir = found
    with open(os.path.join(head_dir, HEAD_CONFIG)) as f:
        meta = json.load(f)
    shape = (
        meta.get("members", 1),
        meta.get("member_out_dim", meta["out_dim"]),
        meta["hidden_dim"],
    )
    if meta.get("base_model_id") != base_id or shape != (cfg.members, cfg.out_dim, cfg.hidden_dim):
        log.info(
            "contrastive: from scratch: %s's head has base model %s and (members, out_dim, "
            "hidden_dim) %s; this date wants %s and %s",
            head_ds,
            meta.get("base_model_id"),
            shape,
            base_id,
            (cfg.members, cfg.out_dim, cfg.hidden_dim),
        )
        return None
    nights = int(meta.get("warm_nights", 0)) + 1
    if nights > cfg.warm_max_nights:
        log.info(
            "contrastive: from scratch: %s's head ends %d warm dates in a row "
            "(contrastive.warm_max_nights=%d)",
            head_ds,
            nights - 1,
            cfg.warm_max_nights,
        )
        return None
    digest = file_digest(os.path.join(head_dir, HEAD_WEIGHTS))
    return WarmStart(head_dir=head_dir, ds=head_ds, digest=digest, nights=nights)


def _too_few_examples(
    cfg: ContrastiveConfig, n_examples: int, num_processes: int, ds: str
) -> InputError:
    """The error for fewer training examples than training processes."""
    return InputError(
        f"contrastive: {n_examples} training examples in the {cfg.train_days} days up to {ds} "
        f"(need at least {num_processes}); users need two or more items with base embeddings"
        + (
            f", one of them with an event of weight >= {cfg.positive_min_weight}"
            if cfg.examples == "user_item"
            else ""
        )
    )


def _warm_metadata(warm: WarmStart | None) -> dict[str, Any]:
    """The head config's record of its start: the date it started from, warm dates in a row."""
    return {
        "warm_from": warm.ds if warm is not None else None,
        "warm_nights": warm.nights if warm is not None else 0,
    }


def _warm_job(
    examples: DataFrame,
    n_examples: int,
    cfg: ContrastiveConfig,
    warm: WarmStart,
    ds: str,
    num_processes: int,
) -> tuple[DataFrame, ContrastiveConfig]:
    """A warm date's examples (a seeded share, at least one batch per process) and settings
    (warm_epochs at warm_learning_rate)."""
    share = max(cfg.warm_fraction, min(1.0, cfg.batch_size * num_processes / n_examples))
    cfg = dataclasses.replace(cfg, epochs=cfg.warm_epochs, learning_rate=cfg.warm_learning_rate)
    log.info(
        "contrastive: warm start from %s's head (warm date %d in a row): %d epoch(s) "
        "over %.0f%% of the examples at learning rate %g",
        warm.ds,
        warm.nights,
        cfg.epochs,
        100 * share,
        cfg.learning_rate,
    )
    return sample_examples(examples, fraction=share, seed=cfg.seed, salt=ds), cfg


def _latest_head_before(models_dir: str, ds: str) -> tuple[str, str] | None:
    """(date, head folder) of the latest date before `ds` with a saved text-tower head."""
    if not os.path.isdir(models_dir):
        return None
    dates = sorted(d for d in os.listdir(models_dir) if DATE_FOLDER.fullmatch(d) and d < ds)
    for head_ds in reversed(dates):
        head_dir = os.path.join(models_dir, head_ds, "text_tower", "head")
        if all(os.path.exists(os.path.join(head_dir, f)) for f in (HEAD_WEIGHTS, HEAD_CONFIG)):
            return head_ds, head_dir
    return None


@dataclass(frozen=True)
class TowerFit:
    """A trained head: its folder, the training summary, and the examples and items it saw."""

    head_dir: str
    output: dict[str, Any]
    examples: int
    items: int


def fit_text_tower(
    ctx: RunContext,
    cfg: ContrastiveConfig,
    events: DataFrame,
    current: DataFrame,
    *,
    work_dir: str,
    head_metadata: dict[str, Any],
    warm: WarmStart | None = None,
) -> TowerFit:
    """Train the head on `events` under TorchDistributor; the head lands in work_dir/head.

    `current` has one base embedding per item with a dense `item_idx` (`with_item_index`);
    the item matrix, checkpoints and petastorm cache live under `work_dir`. With `warm`, the
    members start from its head and train cfg.warm_epochs passes over a seeded
    cfg.warm_fraction of the examples (at least one batch per process).
    """
    check_contrastive(cfg)
    head_dir = os.path.join(work_dir, "head")
    device = training_device(ctx, cfg.device, "contrastive")
    num_processes = process_count(cfg.num_processes, device)
    item_matrix_path = os.path.join(work_dir, "item_matrix.npy")
    n_items, in_dim = _write_item_matrix(
        current, item_matrix_path, str(head_metadata.get("base_model_id", ""))
    )
    examples = training_examples(
        events,
        current,
        max_history=cfg.max_history,
        examples=cfg.examples,
        positive_min_weight=cfg.positive_min_weight,
        seed=cfg.seed,
    ).cache()
    n_examples, signature = _examples_signature(examples)
    if n_examples < num_processes:
        raise _too_few_examples(cfg, n_examples, num_processes, ctx.ds)
    trained, paths, warm_digest = examples, {}, ""
    if warm is not None:
        trained, cfg = _warm_job(examples, n_examples, cfg, warm, ctx.ds, num_processes)
        n_examples, signature = _examples_signature(trained)
        paths["init_head_dir"], warm_digest = warm.head_dir, warm.digest
    shuffled = shuffle_examples(
        trained, files=example_files(n_examples, num_processes), seed=cfg.seed
    )
    matrix_digest = file_digest(item_matrix_path)
    fingerprint = _fingerprint(cfg, n_items, in_dim, signature, matrix_digest, warm_digest)
    log.info(
        "contrastive: %d examples, %d items, %d processes on %s, fingerprint %s",
        n_examples,
        n_items,
        num_processes,
        device,
        fingerprint[:12],
    )
    cache_url = cache_dir_url(os.path.join(work_dir, "petastorm"))
    try:
        output = _run_distributed(
            ctx,
            cfg,
            shuffled,
            device,
            num_processes,
            cache_url,
            {
                "item_matrix_path": item_matrix_path,
                "checkpoint_dir": os.path.join(work_dir, "checkpoints"),
                "output_dir": head_dir,
                "fingerprint": fingerprint,
                "head_metadata": head_metadata,
                **paths,
            },
        )
    finally:
        examples.unpersist()
    return TowerFit(head_dir=head_dir, output=output, examples=n_examples, items=n_items)


def example_files(n_examples: int, num_processes: int) -> int:
    """How many files petastorm gets for `n_examples` rows: EXAMPLES_PER_FILE each, at least
    two per process (it shards by file), at most one per row."""
    return min(n_examples, max(2 * num_processes, math.ceil(n_examples / EXAMPLES_PER_FILE)))


def training_device(ctx: RunContext, requested: str, section: str) -> str:
    """The training device for `<section>.device` = `requested` (auto, cpu or cuda): "cuda" or
    "cpu"; local-mode GPU training needs GPUs in the driver's resources."""
    driver_gpus = "gpu" in ctx.spark.sparkContext.resources
    if requested == "cpu":
        return "cpu"
    if requested == "cuda":
        if not (torch.cuda.is_available() and driver_gpus):
            raise ConfigError(
                f"{section}.device=cuda but torch sees no GPU or the Spark driver has no GPU "
                "resources (set spark.driver.resource.gpu.amount and a discovery script)"
            )
        return "cuda"
    if torch.cuda.is_available() and not driver_gpus:
        log.warning(
            "%s: a GPU is visible but the Spark driver has no GPU resources; training on CPU",
            section,
        )
    return "cuda" if torch.cuda.is_available() and driver_gpus else "cpu"


def process_count(num_processes: int, device: str) -> int:
    """Training processes: as configured on CPU, at most one per visible GPU on cuda."""
    if device == "cuda":
        return max(1, min(num_processes, torch.cuda.device_count()))
    return num_processes


def _write_item_matrix(current: DataFrame, path: str, base_id: str) -> tuple[int, int]:
    """Collect base embeddings in item_idx order into an (n_items, dim) float32 .npy file."""
    rows: pd.DataFrame = (
        current.select("item_idx", "dim", "embedding").orderBy("item_idx").toPandas()
    )
    if rows.empty:
        raise InputError(
            f"item_embeddings has no rows of model {base_id!r}; run `llmrec embed` first"
        )
    dims = sorted(rows["dim"].unique())
    if len(dims) != 1:
        raise InputError(f"item_embeddings rows of model {base_id!r} mix dimensions {dims}")
    matrix = np.stack(rows["embedding"].to_numpy()).astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, matrix, allow_pickle=False)
    return int(matrix.shape[0]), int(matrix.shape[1])


def _examples_signature(examples: DataFrame) -> tuple[int, int]:
    """(row count, order-independent content hash) of the training examples, in one pass."""
    row = examples.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.xxhash64("history", "pos") % (1 << 31)).alias("h"),
    ).collect()[0]
    return int(row["n"]), int(row["h"] or 0)


def _fingerprint(
    cfg: ContrastiveConfig,
    n_items: int,
    in_dim: int,
    signature: int,
    matrix_digest: str,
    warm_digest: str,
) -> str:
    """Identity of one training job: a checkpoint is resumed only by a job with the same
    identity (settings, examples, item matrix and the head it starts from)."""
    keys = {k: v for k, v in vars(cfg).items() if k not in ("enabled", "reader_workers")}
    payload = json.dumps(
        [keys, n_items, in_dim, signature, matrix_digest, warm_digest], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_dir_url(path: str) -> str:
    """`path` as the URL petastorm's cache setting wants (file:// for a local folder)."""
    return path if "://" in path or path.startswith("dbfs:") else "file://" + os.path.abspath(path)


def spark_converter(examples: DataFrame) -> Any:
    """petastorm's Spark converter for `examples`, its files in part-number order.

    petastorm numbers row groups in the order of `converter.file_urls`, which comes from
    `Dataset.inputFiles()`, a set: its order changes with the files' random names on every
    run, and with it the seeded row-group shuffle and each process's shard. Sorted by name
    (`part-NNNNN-...`), the same examples train the same model on every run.
    """
    from petastorm.spark import make_spark_converter

    quiet_petastorm()  # the driver's converter warns about pyarrow.localfs as the workers do
    converter = make_spark_converter(examples)
    converter.file_urls = sorted(converter.file_urls)
    return converter


def training_config(cfg: ContrastiveConfig, device: str) -> dict[str, Any]:
    """The hyperparameters `train_text_tower` reads from its config dict, taken from `cfg`."""
    return {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "temperature": cfg.temperature,
        "num_sampled_negatives": cfg.num_sampled_negatives,
        "hidden_dim": cfg.hidden_dim,
        "out_dim": cfg.out_dim,
        "members": cfg.members,
        "seed": cfg.seed,
        "anchor_pooling": cfg.anchor_pooling,
        "input_dropout": cfg.input_dropout,
        "device": device,
        "reader_workers": cfg.reader_workers,
    }


def _run_distributed(
    ctx: RunContext,
    cfg: ContrastiveConfig,
    examples: DataFrame,
    device: str,
    num_processes: int,
    cache_url: str,
    paths: dict[str, Any],
) -> dict[str, Any]:
    """`train_text_tower` on the examples under TorchDistributor (`train_on_petastorm`)."""
    return train_on_petastorm(
        ctx,
        examples,
        train_text_tower,
        {**paths, **training_config(cfg, device)},
        label="text tower",
        num_processes=num_processes,
        device=device,
        cache_url=cache_url,
    )


def train_on_petastorm(
    ctx: RunContext,
    rows: DataFrame,
    train_fn: Callable[[dict[str, Any]], Any],
    config: dict[str, Any],
    *,
    label: str,
    num_processes: int,
    device: str,
    cache_url: str,
    extra_rows: dict[str, DataFrame] | None = None,
) -> dict[str, Any]:
    """Materialise `rows` with petastorm and run `train_fn` under TorchDistributor on `config`
    plus the converter (`converter`; each of `extra_rows` under its own key, read whole by
    every process) and the stage's MLflow run; returns the training summary.

    A training process that exits non-zero raises TrainingProcessError (CheckedTorchDistributor).
    """
    from llmrec_spark.runtime.distributor import CheckedTorchDistributor
    from llmrec_spark.runtime.tracking import tracking_uri

    ctx.spark.conf.set(PETASTORM_CACHE_CONF, cache_url)
    extra = {key: spark_converter(df) for key, df in (extra_rows or {}).items()}
    converter = spark_converter(rows)
    try:
        # petastorm shards by file/row group: every process needs at least one.
        if len(converter.file_urls) < num_processes:
            log.warning(
                "%s: %d data files for %d processes; training with %d",
                label,
                len(converter.file_urls),
                num_processes,
                len(converter.file_urls),
            )
            num_processes = len(converter.file_urls)
        config = {
            **config,
            **extra,
            "converter": converter,
            "mlflow_tracking_uri": tracking_uri(ctx.cfg) if ctx.cfg.mlflow.enabled else None,
            "mlflow_run_id": ctx.stage_run_id,
        }
        distributor = CheckedTorchDistributor(
            label=label, num_processes=num_processes, local_mode=True, use_gpu=device == "cuda"
        )
        output = distributor.run(train_fn, config)
        if not isinstance(output, dict):
            raise RuntimeError(
                f"TorchDistributor returned {type(output).__name__}, not the training summary"
            )
        return output
    finally:
        for held in (converter, *extra.values()):
            held.delete()


def _write_tuned(ctx: RunContext, tuned: DataFrame, model_id: str) -> bool:
    """Append the tuned rows; on a rerun (model_id present) rewrite the table without the old ones."""
    table = ctx.store.read("item_embeddings")
    if table.where(F.col("model_id") == model_id).limit(1).count() == 0:
        ctx.store.append(
            "item_embeddings", tuned, metadata={"stage": "train-contrastive", "ds": ctx.ds}
        )
        return False
    kept = table.where(F.col("model_id") != model_id)
    ctx.store.overwrite(
        "item_embeddings",
        kept.unionByName(tuned),
        metadata={"stage": "train-contrastive", "ds": ctx.ds},
    )
    return True
