"""The recommend stage: score every known user for a run date, gate the rows, publish them.

`run_recommend` reads its inputs (`read_inputs`: the catalog with ALS factors and text
embeddings as item matrices broadcast once, the users with their histories), scores and
gates (`score_and_gate`), then publishes (`stages.publish`). The scoring is numpy
(`core.hybrid`, `core.topn`): `score_block_frame` scores one block of users, and a pandas
UDF (`score_users`, mapInPandas) runs it per block of `recommend.user_block_size` users on
the executors -- no user x item cross join is ever built in Spark -- unless the problem is
small enough for the driver (`score_on_driver`, `scoring_path`). The gate's checks are in
`stages.gate`; the evaluation stage builds its item and user frames with the functions here.
`llmrec bench topn` (`bench.topn`) measures the scoring against MLlib's recommendForAllUsers.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.core.hybrid import ALS, HYBRID, POPULAR, TEXT, ItemMatrices, Mix, hybrid_top_n
from llmrec_spark.errors import InputError
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.indexing import dense_index
from llmrec_spark.schema import (
    SCORED_SCHEMA,
    SOURCE_ALS,
    SOURCE_HYBRID,
    SOURCE_POPULAR,
    SOURCE_PROFILE,
    SOURCE_TEXT,
    SOURCE_VAE,
    SOURCE_VAE_HYBRID,
)
from llmrec_spark.stages.gate import check_gate, count_gate, metric_gate
from llmrec_spark.stages.publish import publish_run

log = logging.getLogger(__name__)

# The `source` column's value of each code `hybrid_top_n` returns: SOURCES[code].
SOURCE_OF_CODE = {
    HYBRID: SOURCE_HYBRID,
    ALS: SOURCE_ALS,
    TEXT: SOURCE_TEXT,
    POPULAR: SOURCE_POPULAR,
}
SOURCES = tuple(SOURCE_OF_CODE[code] for code in range(len(SOURCE_OF_CODE)))
# Every value the `source` column takes: the codes' sources, the VAE's two for users
# without an ALS factor scored by the Mult-VAE (`stages.vae_scoring`), and the user tower's
# for users without history scored by their profile (`stages.profile_scoring`).
ALL_SOURCES = (*SOURCES, SOURCE_VAE, SOURCE_VAE_HYBRID, SOURCE_PROFILE)
_UNAVAILABLE = ("false", "0", "no", "n", "f")


# ---------------------------------------------------------------------------------------
# The stage


def run_recommend(ctx: RunContext) -> StageResult:
    """Score every known user for ctx.ds, gate the rows, publish them (`publish_run`)."""
    cfg = ctx.cfg.recommend
    started = time.perf_counter()
    inputs = read_inputs(ctx, started)
    model_version = ctx.parent_run_id or ctx.stage_run_id or "local"
    recs, report, scoring_s = score_and_gate(ctx, inputs, model_version)
    check_gate(report, top_n=cfg.top_n)
    metric_value, metric_verdict = metric_gate(ctx)
    published = publish_run(
        ctx,
        recs,
        model_version=model_version,
        text_model=inputs.text_model,
        metric_value=metric_value,
    )
    n_rows, shares = source_shares(recs)
    samples = sample_lists(recs, inputs.catalog, inputs.window, n_users=3)
    if isinstance(recs, DataFrame):
        recs.unpersist()
    inputs.release()
    log.info(
        "recommend: %d users x top-%d from %d items, sources %s, text model %s (%.1fs)",
        inputs.n_users,
        cfg.top_n,
        inputs.matrices.size,
        shares,
        inputs.text_model,
        time.perf_counter() - started,
    )
    return StageResult(
        rows_in=inputs.n_users,
        rows_out=n_rows,
        params={f"recommend.{k}": v for k, v in vars(cfg).items()}
        | {"recommend.text_model": inputs.text_model},
        metrics={"recommend_users": float(inputs.n_users), "scoring_seconds": scoring_s}
        | {f"share_{s}": v for s, v in shares.items()}
        | {f"gate_{k}": float(v) for k, v in report.items()},
        summary={
            "users": inputs.n_users,
            "items": inputs.matrices.size,
            "share_by_source": shares,
            "text_model": inputs.text_model,
            "model_version": model_version,
            "metric_gate": metric_verdict,
            "published": published,
            "samples": samples,
        },
    )


@dataclass(frozen=True)
class StageInputs:
    """What the stage reads for ctx.ds (`read_inputs`); `release` frees what it cached."""

    catalog: DataFrame  # the items table
    window: DataFrame  # events_clean in the ALS training window
    seen: DataFrame  # distinct (user_id, item_id) pairs of the window
    items: DataFrame  # `item_frame`, cached
    matrices: ItemMatrices  # its matrices, collected to the driver
    items_bc: Broadcast  # and broadcast
    text_model: str  # the model of the item embeddings
    users: DataFrame  # (user_id) of every known user, cached
    n_users: int
    user_rows: DataFrame  # `user_frame` of those users

    def release(self) -> None:
        self.users.unpersist()
        self.items.unpersist()
        self.items_bc.unpersist()


def read_inputs(ctx: RunContext, started: float) -> StageInputs:
    """The stage's inputs for ctx.ds: the item matrices broadcast, the known users counted.

    Raises InputError naming the stage to run first when the ALS factors, the catalog or the
    users are missing. `started`: when the stage started (for the log).
    """
    from llmrec_spark.stages import (
        als,  # here, not at the top: pandas UDF workers import this module
    )

    cfg = ctx.cfg.recommend
    window = als.training_window(ctx.store.read("events_clean"), ctx.ds, ctx.cfg.als.train_days)
    factors, catalog = read_factors_and_catalog(ctx)
    embeddings, text_model = embedding_frame(ctx)
    items = item_frame(
        catalog,
        popularity=popularity_frame(window),
        item_factors=factors.where(F.col("kind") == "item"),
        embeddings=embeddings,
        exclude_categories=cfg.exclude_categories,
    ).cache()
    items_bc, matrices = broadcast_items(ctx, items)
    if ctx.cfg.vae.enabled:  # the Mult-VAE beside ALS (`stages.vae_scoring`)
        from llmrec_spark.stages import vae_scoring

        items_bc.unpersist()
        model_dir = vae_scoring.vae_model_dir(ctx)
        matrices = vae_scoring.with_vae(matrices, model_dir, weight=ctx.cfg.vae.hybrid_weight)
        items_bc = ctx.spark.sparkContext.broadcast(matrices)
    log.info(
        "recommend: %d items (%d eligible, %s ALS, %s text) broadcast after %.1fs",
        matrices.size,
        int(matrices.eligible.sum()),
        0 if matrices.has_als is None else int(matrices.has_als.sum()),
        0 if matrices.has_text is None else int(matrices.has_text.sum()),
        time.perf_counter() - started,
    )
    profiles = None
    if ctx.cfg.profile.enabled:  # the user tower beside the items (`stages.profile_scoring`)
        from llmrec_spark.stages.profile_scoring import saved_profile_dir

        if (profile_dir := saved_profile_dir(ctx)) is not None:
            matrices, items_bc, profiles = _with_user_tower(ctx, matrices, items_bc, profile_dir)
    users, n_users = known_users(ctx, factors, profiles)
    user_rows = user_frame(
        users,
        history=window.select("user_id", "item_id", "event_ts"),
        item_index=items.select("item_id", "item_idx"),
        user_factors=factors.where(F.col("kind") == "user"),
    )
    if profiles is not None:
        from llmrec_spark.stages.profile_scoring import with_profile_column

        user_rows = with_profile_column(user_rows, profiles)
    if matrices.second is not None:
        user_rows = user_rows.join(
            vae_scoring.vae_pairs(
                window,
                items.select("item_id", "item_idx"),
                min_weight=ctx.cfg.als.min_weight,
            ),
            "user_id",
            "left",
        )
    seen = window.select("user_id", "item_id").distinct()
    return StageInputs(
        catalog, window, seen, items, matrices, items_bc, text_model, users, n_users, user_rows
    )


def read_factors_and_catalog(ctx: RunContext) -> tuple[DataFrame, DataFrame]:
    """The ALS factors of ctx.ds and the items table; InputError when either is empty."""
    factors = ctx.store.read("als_factors", where={"ds": ctx.ds})
    if factors.limit(1).count() == 0:
        raise InputError(
            f"no ALS factors for ds={ctx.ds}; run `llmrec train-als --ds {ctx.ds}` first"
        )
    catalog = ctx.store.read("items")
    if catalog.limit(1).count() == 0:
        raise InputError(
            "the items table is empty; run `llmrec clean` (it loads the catalog) first"
        )
    return factors, catalog


def _with_user_tower(
    ctx: RunContext, matrices: ItemMatrices, items_bc: Broadcast, profile_dir: str
) -> tuple[ItemMatrices, Broadcast, DataFrame]:
    """The items with the user tower saved in `profile_dir` beside them (broadcast again) and
    the current profile embeddings (user_id, embedding) of the base model."""
    from llmrec_spark.core import encoder
    from llmrec_spark.stages import profile_scoring
    from llmrec_spark.stages.profiles import current_profiles

    items_bc.unpersist()
    matrices = profile_scoring.with_profile(matrices, profile_dir)
    profiles = current_profiles(ctx.store, ctx.cfg.embed, encoder.base_model_id(ctx.cfg.embed))
    return matrices, ctx.spark.sparkContext.broadcast(matrices), profiles


def known_users(
    ctx: RunContext, factors: DataFrame, profiles: DataFrame | None = None
) -> tuple[DataFrame, int]:
    """Every user with events up to ctx.ds, an ALS factor or (with `profiles`) an embedded
    profile: ((user_id) cached, how many). Raises InputError when there are none."""
    users = (
        ctx.store.read("events_clean")
        .where(F.col("ds") <= ctx.ds)
        .select("user_id")
        .unionByName(factors.where(F.col("kind") == "user").select(F.col("id").alias("user_id")))
    )
    if profiles is not None:
        users = users.unionByName(profiles.select("user_id"))
    users = users.distinct().cache()
    n_users = users.count()
    if n_users == 0:
        raise InputError(f"no users in events_clean up to {ctx.ds}; run `llmrec clean` first")
    return users, n_users


def score_and_gate(
    ctx: RunContext, inputs: StageInputs, model_version: str
) -> tuple[DataFrame | pd.DataFrame, dict[str, int], float]:
    """Score every user on the path `scoring_path` picks and count the gate's checks.

    Returns (the rows with model_version and ds: a pandas frame on the driver path, a cached
    DataFrame on the executors; the gate's counts; the seconds both took).
    """
    cfg = ctx.cfg.recommend
    path = scoring_path(inputs.n_users, inputs.matrices.size, cfg.driver_max_cells)
    started = time.perf_counter()
    recs = score_stage(
        path,
        inputs.user_rows,
        inputs.matrices,
        inputs.items_bc,
        partitions=scoring_partitions(
            inputs.n_users, cfg.user_block_size, ctx.spark.sparkContext.defaultParallelism
        ),
        n=cfg.top_n,
        mix=Mix.configured(cfg),
        exclude_seen=cfg.exclude_seen,
        max_per_category=cfg.max_per_category,
        block_size=cfg.user_block_size,
    )
    if isinstance(recs, pd.DataFrame):
        # Rows held by the driver from here to the Delta commit: gated in pandas, written
        # with pyarrow by the embedded engine (no Spark job per step).
        recs = recs.assign(model_version=model_version, ds=ctx.ds)
    else:
        recs = (
            recs.withColumn("model_version", F.lit(model_version))
            .withColumn("ds", F.lit(ctx.ds))
            .cache()
        )
    seen = inputs.seen if cfg.exclude_seen else None
    report = count_gate(recs, inputs.users, seen, top_n=cfg.top_n)
    scoring_s = time.perf_counter() - started
    log.info(
        "recommend: scored (on the %s) and gated %d users in %.1fs (%.0f users/s)",
        path,
        inputs.n_users,
        scoring_s,
        inputs.n_users / max(scoring_s, 1e-9),
    )
    return recs, report, scoring_s


def source_shares(recs: DataFrame | pd.DataFrame) -> tuple[int, dict[str, float]]:
    """(rows, share of the rows per source present, in ALL_SOURCES order)."""
    if isinstance(recs, pd.DataFrame):
        by_source = {k: int(v) for k, v in recs["source"].value_counts().items()}
    else:
        by_source = {
            row["source"]: row["count"] for row in recs.groupBy("source").count().collect()
        }
    n_rows = sum(by_source.values())
    return n_rows, {
        s: round(by_source.get(s, 0) / n_rows, 4) for s in ALL_SOURCES if by_source.get(s)
    }


# ---------------------------------------------------------------------------------------
# Inputs: item and user frames (the evaluation stage builds its own with these)


def embedding_frame(ctx: RunContext) -> tuple[DataFrame, str]:
    """Current item embeddings (item_id, embedding) of the fine-tuned model, else the base model."""
    from llmrec_spark.core import encoder
    from llmrec_spark.stages import embed

    base_id = encoder.base_model_id(ctx.cfg.embed)
    if ctx.cfg.contrastive.enabled:
        from llmrec_spark.stages.contrastive import tuned_model_id
        from llmrec_spark.stages.encoder_fit import saved_encoder_model_id

        if ctx.cfg.contrastive.mode == "encoder":
            tuned_id = saved_encoder_model_id(ctx, base_id) or f"{base_id}+lora (none for {ctx.ds})"
        else:
            tuned_id = tuned_model_id(base_id, ctx.ds)
        tuned = embed.latest_embeddings(ctx.store, tuned_id, ctx.cfg.embed)
        if tuned.limit(1).count():
            return tuned.select("item_id", "embedding"), tuned_id
        log.info("recommend: no embeddings under %s; using the base model", tuned_id)
    base = embed.latest_embeddings(ctx.store, base_id, ctx.cfg.embed)
    return base.select("item_id", "embedding"), base_id


def popularity_frame(events: DataFrame) -> DataFrame:
    """Weighted interaction count per item: (item_id, popularity)."""
    return events.groupBy("item_id").agg(F.sum("weight").alias("popularity"))


def item_frame(
    catalog: DataFrame,
    *,
    popularity: DataFrame,
    item_factors: DataFrame | None,
    embeddings: DataFrame | None,
    exclude_categories: Sequence[str] = (),
    apply_rules: bool = True,
) -> DataFrame:
    """One row per catalog item: item_idx, item_id, category, eligible, popularity, als, text.

    `popularity` has (item_id, popularity); `item_factors` (id, features); `embeddings`
    (item_id, embedding). With apply_rules False every item is eligible (offline evaluation).
    Runs the small jobs of `dense_index`.
    """
    base = catalog.select("item_id", "category", "available").dropDuplicates(["item_id"])
    if apply_rules:
        unavailable = F.lower(F.trim(F.coalesce(F.col("available"), F.lit("true")))).isin(
            list(_UNAVAILABLE)
        )
        banned = F.coalesce(F.col("category").isin(list(exclude_categories)), F.lit(False))
        eligible = ~unavailable & ~banned
    else:
        eligible = F.lit(True)
    frame = base.withColumn("eligible", eligible).join(popularity, "item_id", "left")
    if item_factors is not None:
        frame = frame.join(
            item_factors.select(F.col("id").alias("item_id"), F.col("features").alias("als")),
            "item_id",
            "left",
        )
    else:
        frame = frame.withColumn("als", F.lit(None).cast("array<float>"))
    if embeddings is not None:
        frame = frame.join(
            embeddings.select("item_id", F.col("embedding").alias("text")), "item_id", "left"
        )
    else:
        frame = frame.withColumn("text", F.lit(None).cast("array<float>"))
    index = dense_index(base.select("item_id"), "item_idx", "item_id")
    return frame.join(index, "item_id").select(
        "item_idx",
        "item_id",
        "category",
        "eligible",
        F.coalesce(F.col("popularity"), F.lit(0.0)).cast("double").alias("popularity"),
        "als",
        "text",
    )


def item_matrices(items: pd.DataFrame) -> ItemMatrices:
    """The collected `item_frame` (pandas) as numpy matrices in item_idx order."""
    items = items.sort_values("item_idx").reset_index(drop=True)
    if not (items["item_idx"].to_numpy() == np.arange(len(items))).all():
        raise ValueError("item_idx must be 0..n-1")
    als_matrix, has_als = _dense(items["als"])
    text_matrix, has_text = _unit_rows(*_dense(items["text"]))
    return ItemMatrices(
        item_ids=items["item_id"].to_numpy(dtype=object),
        eligible=items["eligible"].to_numpy(dtype=bool),
        popularity=items["popularity"].to_numpy(dtype=np.float32),
        categories=pd.factorize(items["category"].fillna(""))[0].astype(np.int32),
        als=als_matrix,
        has_als=has_als,
        text=text_matrix,
        has_text=has_text,
    )


def aligned_text(item_ids: np.ndarray, embeddings: pd.DataFrame) -> np.ndarray | None:
    """The (item_id, embedding) rows of `embeddings` in the order of `item_ids` as unit rows,
    zero rows for items without one (as `item_matrices` builds its text); None for none."""
    by_id = dict(zip(embeddings["item_id"], embeddings["embedding"], strict=True))
    text, _ = _unit_rows(*_dense(pd.Series([by_id.get(i) for i in item_ids], dtype=object)))
    return text


def _unit_rows(
    matrix: np.ndarray | None, has: np.ndarray | None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """`matrix`'s rows scaled to unit length (zero rows stay zero, and lose their `has`)."""
    if matrix is None or has is None:
        return matrix, has
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    unit = np.divide(matrix, norms, out=np.zeros_like(matrix), where=norms > 0)
    return unit, has & (norms[:, 0] > 0)


def _dense(column: pd.Series) -> tuple[np.ndarray | None, np.ndarray | None]:
    has = np.array([v is not None and len(v) > 0 for v in column], dtype=bool)
    if not has.any():
        return None, None
    dims = {len(v) for v in column[has]}
    if len(dims) != 1:
        raise InputError(f"vectors of mixed dimensions {sorted(dims)} in one item matrix")
    out = np.zeros((len(column), dims.pop()), dtype=np.float32)
    out[has] = np.stack([np.asarray(v, dtype=np.float32) for v in column[has]])
    return out, has


def broadcast_items(ctx: RunContext, frame: DataFrame) -> tuple[Broadcast, ItemMatrices]:
    """Collect an `item_frame` to the driver and broadcast its matrices."""
    matrices = item_matrices(frame.toPandas())
    return ctx.spark.sparkContext.broadcast(matrices), matrices


def user_frame(
    users: DataFrame,
    *,
    history: DataFrame,
    item_index: DataFrame,
    user_factors: DataFrame | None,
) -> DataFrame:
    """One row per user: user_id, als_features (null without a factor), history (item indices).

    `history` has (user_id, item_id, event_ts) events; `item_index` (item_id, item_idx). A
    history lists each item once, oldest last touch first (ties in item_idx order).
    """
    last_touch = (
        history.join(item_index, "item_id")
        .groupBy("user_id", "item_idx")
        .agg(F.max("event_ts").alias("last_ts"))
    )
    seen = last_touch.groupBy("user_id").agg(
        F.transform(
            F.array_sort(F.collect_list(F.struct("last_ts", "item_idx"))), lambda x: x["item_idx"]
        ).alias("history")
    )
    frame = users.select("user_id").distinct().join(seen, "user_id", "left")
    if user_factors is not None:
        frame = frame.join(
            user_factors.select(
                F.col("id").alias("user_id"), F.col("features").alias("als_features")
            ),
            "user_id",
            "left",
        )
    else:
        frame = frame.withColumn("als_features", F.lit(None).cast("array<float>"))
    return frame


# ---------------------------------------------------------------------------------------
# Scoring: on the driver or blockwise on the executors


def scoring_path(n_users: int, n_items: int, driver_max_cells: int) -> str:
    """Where the stage scores: "driver" (`score_on_driver`) or "executors" (`score_users`).

    "driver" when users x items is at most `driver_max_cells`; a threshold of 0 means never.
    """
    if driver_max_cells > 0 and n_users * n_items <= driver_max_cells:
        return "driver"
    return "executors"


def scoring_partitions(n_users: int, block_size: int, parallelism: int) -> int:
    """Tasks for scoring: two per core, never more than there are blocks of `block_size` users.

    Each task scores its blocks one after the other; more, smaller tasks only add per-task
    overhead (measured at 50k users x 20k items on 2 cores: 25 tasks 7.8 s, 4 tasks 4.8 s).
    """
    blocks = max(1, math.ceil(n_users / max(1, block_size)))
    return min(blocks, 2 * max(1, parallelism))


def score_stage(
    path: str,
    users: DataFrame,
    items: ItemMatrices,
    items_bc: Broadcast,
    *,
    partitions: int,
    **scoring: Any,
) -> DataFrame | pd.DataFrame:
    """The stage's top-n rows on `path` (`scoring_path`): the driver's pandas frame from
    `score_on_driver`, or `score_users`'s DataFrame over `partitions` tasks.

    `scoring`: the keywords both take (n, mix, exclude_seen, max_per_category, block_size).
    """
    if path == "driver":
        return score_on_driver(users, items, **scoring)
    return score_users(users, items_bc, partitions=partitions, **scoring)


def score_on_driver(
    users: DataFrame,
    items: ItemMatrices,
    *,
    n: int,
    mix: Mix,
    exclude_seen: bool = True,
    max_per_category: int = 0,
    block_size: int = 2048,
) -> pd.DataFrame:
    """`score_users` in the driver process: collect the user frame, score it block by block.

    Returns the rows (SCORED_SCHEMA columns) as a pandas frame, held by the driver: the gate
    (`gate_counts`) and the embedded table engine take them from there without another Spark
    job. For problems small enough that one Spark job with Python workers costs more than
    the scoring itself.
    """
    columns = scoring_columns(users)
    # A projection is one more round of analysis on the driver (~30 ms on 2 busy cores).
    frame = users if set(users.columns) == set(columns) else users.select(*columns)
    collected: pd.DataFrame = frame.toPandas()
    if collected.empty:
        return empty_scored_rows()
    scratch = np.empty((min(block_size, len(collected)), items.size), dtype=np.float32)
    # One BLAS thread, as in a task: the product is a small share of the scoring, and in
    # local mode the driver shares its cores with the executors' JVM threads.
    with task_blas_threads():
        blocks = [
            score_block_frame(
                collected.iloc[start : start + block_size],
                items,
                n=n,
                mix=mix,
                exclude_seen=exclude_seen,
                max_per_category=max_per_category,
                scratch=scratch,
            )
            for start in range(0, len(collected), block_size)
        ]
    return pd.concat(blocks, ignore_index=True)


def score_users(
    users: DataFrame,
    items: Broadcast,
    *,
    n: int,
    mix: Mix,
    exclude_seen: bool = True,
    max_per_category: int = 0,
    block_size: int = 2048,
    partitions: int | None = None,
) -> DataFrame:
    """Top-n rows (SCORED_SCHEMA) for every row of `user_frame`, scored `block_size` users at a time.

    `items` is a broadcast `ItemMatrices` (deserialized once per Python worker). With
    `partitions`, users are first spread evenly (round robin) over that many tasks.
    """

    def score(batches: Iterable[pd.DataFrame]) -> Iterable[pd.DataFrame]:
        matrices = items.value
        for batch in batches:
            for start in range(0, len(batch), block_size):
                with task_blas_threads():
                    frame = score_block_frame(
                        batch.iloc[start : start + block_size],
                        matrices,
                        n=n,
                        mix=mix,
                        exclude_seen=exclude_seen,
                        max_per_category=max_per_category,
                        scratch=matrices.score_buffer(block_size),
                    )
                yield frame

    frame = users.select(*scoring_columns(users))
    if partitions:
        frame = frame.repartition(partitions)
    return frame.mapInPandas(score, schema=SCORED_SCHEMA)


def scoring_columns(users: DataFrame) -> list[str]:
    """The user frame's columns the scoring reads (the VAE's input too when it has it)."""
    columns = ["user_id", "als_features", "history"]
    extra = ("vae_items", "vae_weights", "profile_embedding")
    return columns + [c for c in extra if c in users.columns]


def score_block_frame(
    users: pd.DataFrame,
    items: ItemMatrices,
    *,
    n: int,
    mix: Mix,
    exclude_seen: bool = True,
    max_per_category: int = 0,
    scratch: np.ndarray | None = None,
) -> pd.DataFrame:
    """One block of users (user_id, als_features, history) -> rows of SCORED_SCHEMA.

    `scratch`: an optional reusable (block size, items) float32 buffer for the scores. With
    the user tower beside the items, the block's users with a profile embedding (and no
    history) are scored by it (`score_profile_block`).
    """
    if items.profile is not None:
        from llmrec_spark.stages.profile_scoring import profile_users, score_profile_block

        by_profile = profile_users(users)
        if by_profile.any():
            rules: dict[str, Any] = {
                "n": n,
                "exclude_seen": exclude_seen,
                "max_per_category": max_per_category,
            }
            rest = users[~by_profile]
            frames = [score_profile_block(users[by_profile], items, **rules)]
            if len(rest):
                frames.insert(0, score_block_frame(rest, items, mix=mix, scratch=scratch, **rules))
            return pd.concat(frames, ignore_index=True)
    histories = [
        np.asarray(h, dtype=np.int64) if h is not None else np.zeros(0, dtype=np.int64)
        for h in users["history"]
    ]
    vae_only = None
    user_als: np.ndarray | None
    if items.second is not None:  # the Mult-VAE beside ALS: mixed rows, the VAE's alone
        from llmrec_spark.stages.vae_scoring import block_factors

        user_als, has_als, vae_only = block_factors(users, items)
    else:
        user_als, has_als = _stack_factors(users["als_features"], items)
    indices, scores, codes = hybrid_top_n(
        user_als,
        has_als,
        histories,
        items,
        n=n,
        mix=mix,
        exclude_seen=exclude_seen,
        max_per_category=max_per_category,
        out=scratch,
    )
    rows, cols = np.nonzero(np.isfinite(scores))
    sources = np.asarray(SOURCES, dtype=object)[codes[rows, cols]]
    if vae_only is not None:  # a user without an ALS factor: the collaborative score is the VAE's
        by_vae = vae_only[rows]
        sources[by_vae & (codes[rows, cols] == ALS)] = SOURCE_VAE
        sources[by_vae & (codes[rows, cols] == HYBRID)] = SOURCE_VAE_HYBRID
    return scored_rows(users, items, indices, scores, sources)


def scored_rows(
    users: pd.DataFrame,
    items: ItemMatrices,
    indices: np.ndarray,
    scores: np.ndarray,
    sources: np.ndarray | str,
) -> pd.DataFrame:
    """Rows of SCORED_SCHEMA from a block's top-n (indices, scores: (b, n), -inf past a short
    list's end) and each kept row's source (or one source for all)."""
    rows, cols = np.nonzero(np.isfinite(scores))
    return pd.DataFrame(
        {
            "user_id": users["user_id"].to_numpy()[rows],
            "rank": (cols + 1).astype(np.int32),
            "item_id": items.item_ids[indices[rows, cols]],
            "score": scores[rows, cols].astype(np.float32),
            "source": sources,
        }
    )


def _stack_factors(
    features: pd.Series, items: ItemMatrices
) -> tuple[np.ndarray | None, np.ndarray]:
    has = np.array([f is not None and len(f) > 0 for f in features], dtype=bool)
    if items.als is None:
        return None, np.zeros(len(features), dtype=bool)
    out = np.zeros((len(features), items.als.shape[1]), dtype=np.float32)
    if has.any():
        out[has] = np.stack([np.asarray(f, dtype=np.float32) for f in features[has]])
    return out, has


def empty_scored_rows() -> pd.DataFrame:
    """No rows, with the column dtypes `score_block_frame` gives."""
    return pd.DataFrame(
        {
            "user_id": pd.Series(dtype=object),
            "rank": pd.Series(dtype=np.int32),
            "item_id": pd.Series(dtype=object),
            "score": pd.Series(dtype=np.float32),
            "source": pd.Series(dtype=object),
        }
    )


def task_blas_threads() -> contextlib.AbstractContextManager[Any]:
    """Limit numpy's BLAS to the running Spark task's cores (spark.task.cpus).

    Spark already runs one task per core; BLAS threads on top oversubscribe the cores, and
    OpenBLAS's spinning threads then slow every task down.
    """
    from pyspark import TaskContext
    from threadpoolctl import threadpool_limits

    task = TaskContext.get()
    return threadpool_limits(limits=task.cpus() if task else 1, user_api="blas")


# ---------------------------------------------------------------------------------------
# What the nightly prints


def sample_lists(
    recs: DataFrame | pd.DataFrame,
    catalog: DataFrame,
    events: DataFrame,
    *,
    n_users: int = 3,
    n_items: int = 10,
) -> list[dict[str, Any]]:
    """Top items with titles for a few users (one per top-1 source first): the nightly prints them.

    `recs` is the stage's rows, as a DataFrame or as the pandas frame the driver path holds.
    """
    chosen = sample_users(recs, n_users)
    if isinstance(recs, DataFrame):
        rows = recs.where(F.col("user_id").isin(chosen) & (F.col("rank") <= n_items)).collect()
    else:
        rows = recs[recs["user_id"].isin(chosen) & (recs["rank"] <= n_items)].to_dict("records")
    touched = (
        events.where(F.col("user_id").isin(chosen))
        .groupBy("user_id", "item_id")
        .agg(F.max("event_ts").alias("last_ts"))
        .collect()
    )
    wanted = {r["item_id"] for r in rows} | {r["item_id"] for r in touched}
    titles = {
        r["item_id"]: (r["title"], r["category"])
        for r in catalog.where(F.col("item_id").isin(sorted(wanted)))
        .select("item_id", "title", "category")
        .collect()
    }
    out = []
    for user in chosen:
        recent = sorted(
            (r for r in touched if r["user_id"] == user), key=lambda r: r["last_ts"], reverse=True
        )
        items = sorted((r for r in rows if r["user_id"] == user), key=lambda r: r["rank"])
        out.append(
            {
                "user_id": user,
                "history": [
                    titles.get(r["item_id"], (r["item_id"],))[0] or r["item_id"] for r in recent[:5]
                ],
                "items": [
                    {
                        "rank": int(r["rank"]),
                        "item_id": r["item_id"],
                        "title": titles.get(r["item_id"], (None, None))[0],
                        "category": titles.get(r["item_id"], (None, None))[1],
                        "score": float(r["score"]),
                        "source": r["source"],
                    }
                    for r in items
                ],
            }
        )
    return out


def sample_users(recs: DataFrame | pd.DataFrame, n_users: int) -> list[str]:
    """`n_users` users of `recs`: the lowest id whose top-1 item has each source (in ALL_SOURCES
    order), then the lowest ids."""
    order = {s: i for i, s in enumerate(ALL_SOURCES)}
    if isinstance(recs, DataFrame):
        firsts = recs.where(F.col("rank") == 1)
        by_source = {
            r["source"]: r["user_id"]
            for r in firsts.groupBy("source").agg(F.min("user_id").alias("user_id")).collect()
        }
    else:
        top_rows = recs[recs["rank"] == 1]
        by_source = top_rows.groupby("source")["user_id"].min().to_dict()
    chosen = [by_source[s] for s in sorted(by_source, key=lambda s: order.get(s, len(order)))]
    chosen = chosen[:n_users]
    if len(chosen) < n_users:  # then the users first by id: n_users of them leave enough
        if isinstance(recs, DataFrame):
            lowest = [
                r["user_id"]
                for r in firsts.select("user_id").orderBy("user_id").limit(n_users).collect()
            ]
        else:
            lowest = top_rows["user_id"].sort_values().head(n_users).tolist()
        chosen += [u for u in lowest if u not in chosen][: n_users - len(chosen)]
    return chosen
