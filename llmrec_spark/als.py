"""Collaborative model: Spark MLlib ALS on implicit feedback from the cleaned, weighted events."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass

from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from llmrec_spark.config import AlsConfig
from llmrec_spark.context import RunContext, StageResult
from llmrec_spark.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class AlsFactors:
    """ALS factors keyed by the original string ids."""

    users: DataFrame  # id string, features array<float>
    items: DataFrame  # id string, features array<float>
    model: ALSModel


def training_window(events: DataFrame, ds: str, days: int) -> DataFrame:
    """Events whose event date lies in (ds - days, ds]."""
    start = (dt.date.fromisoformat(ds) - dt.timedelta(days=days - 1)).isoformat()
    return events.where((F.col("ds") >= start) & (F.col("ds") <= ds))


def interactions(events: DataFrame) -> DataFrame:
    """One row per (user_id, item_id) with the summed implicit weight."""
    return events.groupBy("user_id", "item_id").agg(F.sum("weight").alias("weight"))


def index_ids(pairs: DataFrame) -> tuple[DataFrame, DataFrame, DataFrame]:
    """Dense integer ids for users and items (ALS needs ints); returns (indexed, users, items)."""
    users = (
        pairs.select("user_id")
        .distinct()
        .withColumn("user_idx", (F.row_number().over(Window.orderBy("user_id")) - 1).cast("int"))
    )
    items = (
        pairs.select("item_id")
        .distinct()
        .withColumn("item_idx", (F.row_number().over(Window.orderBy("item_id")) - 1).cast("int"))
    )
    indexed = pairs.join(users, "user_id").join(items, "item_id")
    return indexed, users, items


def fit_als(pairs: DataFrame, cfg: AlsConfig) -> AlsFactors:
    """Fit implicit ALS on (user_id, item_id, weight) rows; factors come back with string ids.

    The SparkContext must have a checkpoint directory (the session factory sets one), so
    long lineages are cut every `checkpoint_interval` iterations.
    """
    indexed, users, items = index_ids(pairs)
    indexed = indexed.cache()
    als = ALS(
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
    )
    model = als.fit(indexed)
    indexed.unpersist()
    user_factors = model.userFactors.join(users, F.col("id") == F.col("user_idx")).select(
        F.col("user_id").alias("id"), F.col("features").cast("array<float>").alias("features")
    )
    item_factors = model.itemFactors.join(items, F.col("id") == F.col("item_idx")).select(
        F.col("item_id").alias("id"), F.col("features").cast("array<float>").alias("features")
    )
    return AlsFactors(users=user_factors, items=item_factors, model=model)


def run_train_als(ctx: RunContext) -> StageResult:
    """Fit ALS on the training window ending at ctx.ds; write `als_factors` for that date."""
    cfg = ctx.cfg.als
    events = training_window(ctx.store.read("events_clean"), ctx.ds, cfg.train_days)
    pairs = interactions(events).cache()
    n_pairs = pairs.count()
    if n_pairs == 0:
        raise InputError(
            f"no clean events in the {cfg.train_days} days up to {ctx.ds}; run `llmrec clean` first"
        )
    factors = fit_als(pairs, cfg)
    table = (
        factors.users.withColumn("kind", F.lit("user"))
        .unionByName(factors.items.withColumn("kind", F.lit("item")))
        .withColumn("ds", F.lit(ctx.ds))
    )
    ctx.store.overwrite("als_factors", table, partitions={"ds": ctx.ds})
    model_path = ctx.model_dir("als")
    factors.model.write().overwrite().save(model_path)
    n_users = factors.users.count()
    n_items = factors.items.count()
    pairs.unpersist()
    log.info("als: %d pairs, %d users, %d items, rank %d", n_pairs, n_users, n_items, cfg.rank)
    return StageResult(
        rows_in=n_pairs,
        rows_out=n_users + n_items,
        params={f"als.{k}": v for k, v in vars(cfg).items()},
        metrics={"als_users": n_users, "als_items": n_items},
        artifacts={"als_model": model_path},
        summary={"users": n_users, "items": n_items, "pairs": n_pairs},
    )
