"""Evaluation protocols as pure Spark transformations: events in, (train, test) out.

Events carry user_id, item_id, event_ts and weight (the cleaned events' columns). A
*positive* is an event with weight >= positive_min_weight. Every protocol returns a `Split`:
`train` holds events (all weights, for the models), `test` one row per (user_id, item_id)
held-out positive with a `cold` flag, only for users with at least `min_train_positives`
distinct positive items in train, and only on items the user did not touch in train.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from llmrec_spark.config import EVALUATE_PROTOCOLS
from llmrec_spark.runtime.indexing import dense_index

PROTOCOLS = EVALUATE_PROTOCOLS
MIN_TRAIN_POSITIVES = 3


@dataclass(frozen=True)
class Split:
    """One protocol's split: train events, test positives, and (cold_item) the cold items."""

    protocol: str
    train: DataFrame  # events
    test: DataFrame  # user_id, item_id, cold boolean
    cold_items: DataFrame | None = None  # item_id


def per_user_temporal_cut(
    events: DataFrame, *, test_fraction: float
) -> tuple[DataFrame, DataFrame]:
    """Per user, the last `test_fraction` of events by time (at least one) are held out.

    A cut by rows, not by timestamp: no training event is later than a held-out event of the
    same user, and events tied at the cut fall on either side in a fixed order hashed from
    (user, item). A timestamp cut would hold out every event tied with it, and ratings come
    in same-second batches: on MovieLens-100K it held out 20.7% instead of 20%, and up to 65%
    of one user's events. The item id is no tie-break either: on a catalog numbered by age it
    would send the newest items to test. Returns (train, held_out).
    """
    per_user = Window.partitionBy("user_id")
    by_time = per_user.orderBy("event_ts", F.xxhash64("user_id", "item_id"), "item_id", "weight")
    n_test = F.greatest(F.lit(1), F.floor(F.col("_n") * F.lit(test_fraction)))
    labeled = events.withColumn("_pos", F.row_number().over(by_time)).withColumn(
        "_n", F.count("*").over(per_user)
    )
    held = F.col("_pos") > F.col("_n") - n_test
    train = labeled.where(~held).drop("_pos", "_n")
    held_out = labeled.where(held).drop("_pos", "_n")
    return train, held_out


def eligible_users(
    train: DataFrame, *, positive_min_weight: float, min_positives: int
) -> DataFrame:
    """user_id of users with at least `min_positives` distinct positive items in `train`."""
    return (
        train.where(F.col("weight") >= positive_min_weight)
        .groupBy("user_id")
        .agg(F.countDistinct("item_id").alias("_positives"))
        .where(F.col("_positives") >= min_positives)
        .select("user_id")
    )


def test_positives(
    held_out: DataFrame,
    train: DataFrame,
    *,
    positive_min_weight: float,
    cold: Column | bool = False,
    min_train_positives: int = MIN_TRAIN_POSITIVES,
) -> DataFrame:
    """Distinct (user_id, item_id, cold) positives of `held_out` new to the user, eligible users only."""
    train_pairs = train.select("user_id", "item_id").distinct()
    cold_flag = cold if isinstance(cold, Column) else F.lit(cold)
    return (
        held_out.where(F.col("weight") >= positive_min_weight)
        .select("user_id", "item_id", cold_flag.alias("cold"))
        .join(train_pairs, ["user_id", "item_id"], "left_anti")
        .join(
            eligible_users(
                train, positive_min_weight=positive_min_weight, min_positives=min_train_positives
            ),
            "user_id",
            "left_semi",
        )
        .groupBy("user_id", "item_id")
        .agg(F.max("cold").alias("cold"))
    )


def user_temporal_split(
    events: DataFrame, *, test_fraction: float, positive_min_weight: float
) -> tuple[DataFrame, DataFrame]:
    """(train events, test events): each user's last `test_fraction` of events held out.

    Test rows are the held-out positives on items new to the user, for users with at least
    one of them and three training positives (the `user_temporal` protocol; events kept whole).
    """
    train, held_out = per_user_temporal_cut(events, test_fraction=test_fraction)
    positives = test_positives(held_out, train, positive_min_weight=positive_min_weight)
    test = held_out.join(
        positives.select("user_id", "item_id"), ["user_id", "item_id"], "left_semi"
    )
    return train, test.where(F.col("weight") >= positive_min_weight)


def user_temporal(events: DataFrame, *, test_fraction: float, positive_min_weight: float) -> Split:
    """The `user_temporal` protocol (see `user_temporal_split`)."""
    train, held_out = per_user_temporal_cut(events, test_fraction=test_fraction)
    return Split(
        "user_temporal",
        train,
        test_positives(held_out, train, positive_min_weight=positive_min_weight),
    )


# The columns that identify an event row of events_clean (held-out rows leave training by
# them; rows tied on all three leave together).
EVENT_KEY = ("user_id", "item_id", "event_ts")


def holdout_users(
    events: DataFrame, *, fraction: float, seed: int, min_users: int = 0
) -> DataFrame:
    """user_id of the first `fraction` of the users of `events` (at least `min_users`, at most
    half of them) in the order of a seeded hash of the id: about the same users every night,
    so the nightly measurements are comparable. Runs the small jobs of `dense_index`."""
    hashed = (
        events.select("user_id")
        .distinct()
        .select("user_id", F.xxhash64("user_id", F.lit(seed)).alias("_hash"))
    )
    ranked = dense_index(hashed, "_rank", "_hash", "user_id")  # 0-based
    n = F.col("_n")
    take = F.greatest(F.round(n * F.lit(fraction)), F.least(F.lit(min_users), F.floor(n / 2)))
    return (
        ranked.crossJoin(hashed.agg(F.count("*").alias("_n")))
        .where(F.col("_rank") < take)
        .select("user_id")
    )


def holdout_rows(
    window: DataFrame, *, fraction: float, seed: int, test_fraction: float, min_users: int = 0
) -> DataFrame:
    """The events the nightly holds out of training (EVENT_KEY columns): the last
    `test_fraction` of each holdout user's events in `window` (`per_user_temporal_cut`)."""
    users = holdout_users(window, fraction=fraction, seed=seed, min_users=min_users)
    sample = window.join(users, "user_id", "left_semi")
    _, held_out = per_user_temporal_cut(sample, test_fraction=test_fraction)
    return held_out.select(*EVENT_KEY).distinct()


def published_holdout(
    window: DataFrame,
    *,
    fraction: float,
    seed: int,
    test_fraction: float,
    positive_min_weight: float,
    min_users: int = 0,
) -> Split:
    """The `holdout` protocol: what the nightly's training stages saw of `window` (every event
    but `holdout_rows`), and the held-out positives of the holdout users as test. The models
    are the ones trained that night; nothing is refitted."""
    held = holdout_rows(
        window, fraction=fraction, seed=seed, test_fraction=test_fraction, min_users=min_users
    )
    train = window.join(held, list(EVENT_KEY), "left_anti")
    held_out = window.join(held, list(EVENT_KEY), "left_semi")
    return Split(
        "holdout",
        train,
        test_positives(held_out, train, positive_min_weight=positive_min_weight),
    )


def pick_cold_items(
    events: DataFrame, *, fraction: float, min_positives: int, positive_min_weight: float, seed: int
) -> DataFrame:
    """item_id of a seeded `fraction` of the items with at least `min_positives` positive users.

    Items are ordered by a seeded hash of their id and the first share is taken, so the pick is
    the same whatever the partitioning. Runs the small jobs of `dense_index`.
    """
    counts = (
        events.where(F.col("weight") >= positive_min_weight)
        .groupBy("item_id")
        .agg(F.countDistinct("user_id").alias("_users"))
        .where(F.col("_users") >= min_positives)
    )
    hashed = counts.select("item_id", F.xxhash64("item_id", F.lit(seed)).alias("_hash"))
    ranked = dense_index(hashed, "_rank", "_hash", "item_id")  # 0-based
    n = counts.agg(F.count("*").alias("_n"))
    return (
        ranked.crossJoin(n)
        .where(F.col("_rank") < F.round(F.col("_n") * F.lit(fraction)))
        .select("item_id")
    )


def cold_item(
    events: DataFrame,
    *,
    cold_fraction: float,
    min_item_positives: int,
    test_fraction: float,
    positive_min_weight: float,
    seed: int,
) -> Split:
    """The `cold_item` protocol: cold items lose all their events from train; the rest is split per user.

    Test: every positive on a cold item (cold=True) plus each user's held-out warm positives.
    """
    cold_items = pick_cold_items(
        events,
        fraction=cold_fraction,
        min_positives=min_item_positives,
        positive_min_weight=positive_min_weight,
        seed=seed,
    )
    warm = events.join(cold_items, "item_id", "left_anti")
    on_cold = events.join(cold_items, "item_id", "left_semi")
    train, held_out = per_user_temporal_cut(warm, test_fraction=test_fraction)
    test = test_positives(
        held_out.withColumn("_cold", F.lit(False)).unionByName(
            on_cold.withColumn("_cold", F.lit(True))
        ),
        train,
        positive_min_weight=positive_min_weight,
        cold=F.col("_cold"),
    )
    return Split("cold_item", train, test, cold_items)


def cold_user(
    events: DataFrame, *, cold_fraction: float, positive_min_weight: float, seed: int
) -> Split:
    """The `cold_user` protocol: a seeded `cold_fraction` of the users with a positive lose
    their whole history from train; their test rows are every item they have a positive on.

    Users are ordered by a seeded hash of their id and the first share is taken
    (`holdout_users`), so the pick is the same whatever the partitioning. A cold user has
    no training event at all: only what they told us about themselves (their profile) can
    tell them apart from the popularity list.
    """
    with_positive = events.where(F.col("weight") >= positive_min_weight)
    cold_users = holdout_users(with_positive, fraction=cold_fraction, seed=seed)
    train = events.join(cold_users, "user_id", "left_anti")
    test = (
        with_positive.join(cold_users, "user_id", "left_semi")
        .select("user_id", "item_id")
        .distinct()
        .withColumn("cold", F.lit(False))
    )
    return Split("cold_user", train, test)


def global_temporal(
    events: DataFrame, *, test_fraction: float, positive_min_weight: float
) -> Split:
    """The `global_temporal` protocol: the last `test_fraction` of all events by time are held out."""
    ts = F.col("event_ts").cast("double")
    cut = events.agg(F.percentile_approx(ts, 1.0 - test_fraction, 10_000).alias("_cut"))
    labeled = events.crossJoin(F.broadcast(cut))
    train = labeled.where(ts < F.col("_cut")).drop("_cut")
    held_out = labeled.where(ts >= F.col("_cut")).drop("_cut")
    return Split(
        "global_temporal",
        train,
        test_positives(held_out, train, positive_min_weight=positive_min_weight),
    )
