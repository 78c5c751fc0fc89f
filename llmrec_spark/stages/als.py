"""Collaborative model: Spark MLlib ALS on implicit feedback from the cleaned, weighted events.

The search over its settings (`llmrec tune-als`) is `als_search`; its benchmark against the
`implicit` library is `llmrec_spark.bench.als`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from llmrec_spark.config import AlsConfig
from llmrec_spark.errors import InputError
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.indexing import dense_index
from llmrec_spark.stages import als_cg, splits

log = logging.getLogger(__name__)


@dataclass
class FactorFrames:
    """ALS factors keyed by the original string ids."""

    users: DataFrame  # id string, features array<float>
    items: DataFrame  # id string, features array<float>


@dataclass
class FactorArrays:
    """Factors held by the driver (solver cg): row k of `users` is user `user_ids[k]`."""

    user_ids: list[str]
    users: np.ndarray  # (n_users, rank) float32
    item_ids: list[str]
    items: np.ndarray  # (n_items, rank) float32


@dataclass
class AlsFactors(FactorFrames):
    """A fit's factors and the MLlib model that holds them (both solvers save one); solver
    cg also keeps its arrays, and builds the model only when asked."""

    model: ALSModel | None
    arrays: FactorArrays | None = None

    def als_model(self) -> ALSModel:
        """The fit as an MLlib ALSModel over dense indices (`ALSModel.load` reads it back)."""
        if self.model is None:
            if self.arrays is None:
                raise ValueError("an ALS fit without a model or arrays")
            self.model = model_from_arrays(
                self.users.sparkSession, self.arrays.users, self.arrays.items
            )
        return self.model


def training_window(events: DataFrame, ds: str, days: int) -> DataFrame:
    """Events whose event date lies in (ds - days, ds]."""
    start = (dt.date.fromisoformat(ds) - dt.timedelta(days=days - 1)).isoformat()
    return events.where((F.col("ds") >= start) & (F.col("ds") <= ds))


def training_events(ctx: RunContext, days: int) -> DataFrame:
    """The events a training stage learns from: the `days` window ending at ctx.ds, less the
    rows the nightly evaluation holds out (`evaluate.holdout_fraction` of the users, their
    last `evaluate.test_fraction` of events in the ALS window; `splits.holdout_rows`)."""
    events = ctx.store.read("events_clean")
    window = training_window(events, ctx.ds, days)
    cfg = ctx.cfg.evaluate
    if cfg.holdout_fraction <= 0:
        return window
    held = splits.holdout_rows(
        training_window(events, ctx.ds, ctx.cfg.als.train_days),
        fraction=cfg.holdout_fraction,
        seed=cfg.seed,
        test_fraction=cfg.test_fraction,
        min_users=cfg.holdout_min_users,
    )
    return window.join(held, list(splits.EVENT_KEY), "left_anti")


def interactions(events: DataFrame, min_weight: float = 0.0) -> DataFrame:
    """One row per (user_id, item_id) with the summed implicit weight; with `min_weight` > 0
    only the pairs weighing at least that (`als.min_weight`: on explicit ratings, a rating
    below "liked" is no evidence of a taste the factors should reproduce)."""
    pairs = events.groupBy("user_id", "item_id").agg(F.sum("weight").alias("weight"))
    return pairs.where(F.col("weight") >= min_weight) if min_weight > 0 else pairs


def index_ids(pairs: DataFrame) -> tuple[DataFrame, DataFrame, DataFrame]:
    """Dense integer ids (0..n-1 in id order) for users and items (ALS needs ints); returns
    (indexed, users, items). Runs the small jobs of `dense_index`."""
    users = dense_index(pairs.select("user_id").distinct(), "user_idx", "user_id")
    items = dense_index(pairs.select("item_id").distinct(), "item_idx", "item_id")
    indexed = pairs.join(users, "user_id").join(items, "item_id")
    return indexed, users, items


def als_blocks(spark: SparkSession, cfg: AlsConfig) -> int:
    """User (and item) blocks for ALS: `cfg.num_blocks`, or one per core of the session."""
    return cfg.num_blocks or spark.sparkContext.defaultParallelism


def als_estimator(cfg: AlsConfig, *, num_blocks: int) -> ALS:
    """The product's implicit ALS over (user_idx, item_idx, weight) rows."""
    return ALS(
        rank=cfg.rank,
        maxIter=cfg.max_iter,
        regParam=cfg.reg_param,
        alpha=cfg.alpha,
        implicitPrefs=True,
        userCol="user_idx",
        itemCol="item_idx",
        ratingCol="weight",
        coldStartStrategy="drop",
        nonnegative=False,
        seed=cfg.seed,
        checkpointInterval=cfg.checkpoint_interval,
        numUserBlocks=num_blocks,
        numItemBlocks=num_blocks,
        intermediateStorageLevel=cfg.intermediate_storage_level,
    )


def fit_als(pairs: DataFrame, cfg: AlsConfig, *, warm: FactorFrames | None = None) -> AlsFactors:
    """Fit implicit ALS on (user_id, item_id, weight) rows with `cfg.solver`; factors come back
    with string ids. With solver cg, ids that have a factor in `warm` start from it.

    The SparkContext must have a checkpoint directory (the session factory sets one), so
    MLlib's long lineages are cut every `checkpoint_interval` iterations.
    """
    if cfg.solver == "cg":
        return _fit_cg(pairs, cfg, warm=warm)
    indexed, users, items = index_ids(pairs)
    indexed = indexed.cache()
    model = als_estimator(cfg, num_blocks=als_blocks(pairs.sparkSession, cfg)).fit(indexed)
    indexed.unpersist()
    user_factors = model.userFactors.join(users, F.col("id") == F.col("user_idx")).select(
        F.col("user_id").alias("id"), F.col("features").cast("array<float>").alias("features")
    )
    item_factors = model.itemFactors.join(items, F.col("id") == F.col("item_idx")).select(
        F.col("item_id").alias("id"), F.col("features").cast("array<float>").alias("features")
    )
    return AlsFactors(users=user_factors, items=item_factors, model=model)


def _fit_cg(pairs: DataFrame, cfg: AlsConfig, *, warm: FactorFrames | None) -> AlsFactors:
    """Solver cg: on the driver up to `als.cg_local_max_pairs` pairs (one collect, ids
    numbered there in the same order as `index_ids`), else as Spark jobs over CSR blocks."""
    spark = pairs.sparkSession
    n_pairs = pairs.count()
    if n_pairs == 0:
        raise InputError("als: no (user, item) pairs to fit")
    if n_pairs <= cfg.cg_local_max_pairs:
        local: pd.DataFrame = pairs.select("user_id", "item_id", "weight").toPandas()
        user_ids, user_idx = np.unique(local["user_id"].to_numpy(object), return_inverse=True)
        item_ids, item_idx = np.unique(local["item_id"].to_numpy(object), return_inverse=True)
        user_ids, item_ids = user_ids.tolist(), item_ids.tolist()
        init = _warm_rows(warm, user_ids, item_ids, cfg.rank)
        user_matrix, item_matrix = als_cg.fit_on_driver(
            user_idx, item_idx, local["weight"].to_numpy(np.float32), cfg=cfg, init=init
        )
        log.info("als cg: %d pairs solved on the driver (als.cg_local_max_pairs)", n_pairs)
    else:
        indexed, users, items = index_ids(pairs)
        indexed = indexed.cache()
        user_pd: pd.DataFrame = users.orderBy("user_idx").toPandas()
        item_pd: pd.DataFrame = items.orderBy("item_idx").toPandas()
        user_ids, item_ids = user_pd["user_id"].tolist(), item_pd["item_id"].tolist()
        user_matrix, item_matrix = als_cg.fit_cg_factors(
            spark,
            indexed,
            n_users=len(user_ids),
            n_items=len(item_ids),
            cfg=cfg,
            num_blocks=als_blocks(spark, cfg),
            init=_warm_rows(warm, user_ids, item_ids, cfg.rank),
        )
        indexed.unpersist()
    return AlsFactors(
        users=factor_frame(spark, user_ids, user_matrix),
        items=factor_frame(spark, item_ids, item_matrix),
        model=None,
        arrays=FactorArrays(user_ids, user_matrix, item_ids, item_matrix),
    )


def _warm_rows(
    warm: FactorFrames | None, user_ids: list[str], item_ids: list[str], rank: int
) -> tuple[np.ndarray | None, np.ndarray | None]:
    if warm is None:
        return None, None
    return _known_rows(warm.users, user_ids, rank), _known_rows(warm.items, item_ids, rank)


def _known_rows(previous: DataFrame, ids: list[str], rank: int) -> np.ndarray | None:
    """Rows of `previous` (id, features) in the order of `ids`, NaN where it has none; None
    when its rank is not `rank` (no warm start across a change of rank)."""
    # All of it, filtered here: one date's factors, the size of the ones being fitted (the
    # driver holds those anyway). An `isin` of every id made Spark plan a literal list of
    # 12k-15k strings: 30 s of a 10x second night's train-als against 13 s cold.
    known: pd.DataFrame = previous.select("id", "features").toPandas()
    if known.empty or len(known["features"].iloc[0]) != rank:
        return None
    rows = np.full((len(ids), rank), np.nan, dtype=np.float32)
    position = {item: k for k, item in enumerate(ids)}
    for key, vector in zip(known["id"], known["features"], strict=True):
        if key in position:
            rows[position[key]] = vector
    return rows


def factor_frame(
    spark: SparkSession, ids: list[Any], matrix: np.ndarray, id_type: str = "string"
) -> DataFrame:
    """(id, features array<float>) rows: row k of `matrix` under ids[k]."""
    frame = pd.DataFrame({"id": ids, "features": list(matrix.astype(np.float32))})
    return spark.createDataFrame(frame, schema=f"id {id_type}, features array<float>")


def model_from_arrays(spark: SparkSession, users: np.ndarray, items: np.ndarray) -> ALSModel:
    """An MLlib ALSModel over dense-index factor matrices: row k is user (item) index k."""
    return als_model_from_factors(
        spark,
        factor_frame(spark, list(range(len(users))), users, "int"),
        factor_frame(spark, list(range(len(items))), items, "int"),
        users.shape[1],
    )


def als_model_from_factors(
    spark: SparkSession,
    users: DataFrame,
    items: DataFrame,
    rank: int,
    *,
    user_col: str = "user_idx",
    item_col: str = "item_idx",
) -> ALSModel:
    """An MLlib ALSModel over given (id int, features array<float>) factor frames, so both
    solvers save the same artifact (`ALSModel.load` reads it).

    ALSModel's constructor is `private[ml]` in Scala, which is public in the JVM; this is how
    MLlib's own tests build models from known factors.
    """
    java_model = _jvm(spark).org.apache.spark.ml.recommendation.ALSModel(
        "als_cg", rank, users._jdf, items._jdf
    )
    java_model.setUserCol(user_col).setItemCol(item_col)
    return ALSModel(java_model)


def run_train_als(ctx: RunContext) -> StageResult:
    """Fit ALS on the training window ending at ctx.ds; write `als_factors` for that date."""
    cfg = ctx.cfg.als
    events = training_events(ctx, cfg.train_days)
    pairs = interactions(events, cfg.min_weight).cache()
    n_pairs = pairs.count()
    if n_pairs == 0:
        heavy = (
            f" weighing at least als.min_weight={cfg.min_weight:g}" if cfg.min_weight > 0 else ""
        )
        raise InputError(
            f"no clean events{heavy} in the {cfg.train_days} days up to {ctx.ds}; "
            "run `llmrec clean` first"
        )
    warm = previous_factors(ctx.store, ctx.ds) if cfg.solver == "cg" and cfg.warm_max_iter else None
    if warm is not None:
        cfg = dataclasses.replace(cfg, max_iter=cfg.warm_max_iter)
    factors = fit_als(pairs, cfg, warm=warm)
    table = (
        factors.users.withColumn("kind", F.lit("user"))
        .unionByName(factors.items.withColumn("kind", F.lit("item")))
        .withColumn("ds", F.lit(ctx.ds))
    )
    ctx.store.overwrite("als_factors", table, partitions={"ds": ctx.ds})
    model_path = ctx.model_dir("als")
    factors.als_model().write().overwrite().save(model_path)
    n_users = factors.users.count()
    n_items = factors.items.count()
    pairs.unpersist()
    log.info(
        "als: %d pairs, %d users, %d items, rank %d, %d sweeps (%s)",
        n_pairs,
        n_users,
        n_items,
        cfg.rank,
        cfg.max_iter,
        f"warm from {warm.ds}" if warm is not None else "cold start",
    )
    return StageResult(
        rows_in=n_pairs,
        rows_out=n_users + n_items,
        params={f"als.{k}": v for k, v in vars(cfg).items() if k != "search"},
        metrics={"als_users": n_users, "als_items": n_items},
        artifacts={"als_model": model_path},
        summary={
            "users": n_users,
            "items": n_items,
            "pairs": n_pairs,
            "sweeps": cfg.max_iter,
            "warm_from": warm.ds if warm is not None else None,
        },
    )


@dataclass
class PreviousFactors(FactorFrames):
    """The factors of an earlier run date, a warm start for solver cg."""

    ds: str


def previous_factors(store: Any, ds: str) -> PreviousFactors | None:
    """The latest `als_factors` partition before `ds`, or None when there is none."""
    if not store.exists("als_factors"):
        return None
    earlier = sorted(d for d in store.partition_values("als_factors", "ds") if d < ds)
    if not earlier:
        return None
    table = store.read("als_factors", where={"ds": earlier[-1]})
    pick = ["id", "features"]
    return PreviousFactors(
        users=table.where(F.col("kind") == "user").select(*pick),
        items=table.where(F.col("kind") == "item").select(*pick),
        ds=earlier[-1],
    )


# ---------------------------------------------------------------------------------------------
# Native linear algebra


def blas_implementation(spark: SparkSession) -> str:
    """Class of the BLAS MLlib calls in the driver JVM: "JNIBLAS" is native, the rest are Java.

    Java fallbacks: "VectorBLAS" (needs the incubator vector module), "Java11BLAS", "F2jBLAS".
    In local mode the executors run in that JVM; on a cluster each executor loads its own.
    """
    return str(_jvm(spark).dev.ludovic.netlib.blas.BLAS.getInstance().getClass().getSimpleName())


def lapack_implementation(spark: SparkSession) -> str:
    """Class of the LAPACK MLlib calls (ALS's Cholesky solves): "JNILAPACK" or "F2jLAPACK"."""
    return str(
        _jvm(spark).dev.ludovic.netlib.lapack.LAPACK.getInstance().getClass().getSimpleName()
    )


def jvm_env(spark: SparkSession, name: str) -> str | None:
    """Environment variable `name` as the driver JVM (local mode: the executors) sees it."""
    value = _jvm(spark).java.lang.System.getenv(name)
    return None if value is None else str(value)


def _jvm(spark: SparkSession) -> Any:
    gateway = spark.sparkContext._jvm
    if gateway is None:
        raise RuntimeError("the SparkContext has no JVM gateway (stopped?)")
    return gateway
