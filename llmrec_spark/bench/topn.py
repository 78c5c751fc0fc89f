"""`llmrec bench topn`: the recommend stage against MLlib's recommendForAllUsers, then the Delta write.

Both sides score the same seeded random factors (rank 64) in the same session: MLlib's
`recommendForAllUsers(n + max seen)` with the seen items removed, and the stage's scoring
(`score_stage`, on the path `run_recommend` would take: the driver for small sizes, the
executors otherwise). Each size reports the best-of-runs seconds of both sides and their
ratio, the share of MLlib's lists the stage reproduces, and on the driver path the collect
alone (the floor of any driver-side stage). The stage's rows of the first size are then
written as a Delta table against a plain Parquet write (`measure_delta_write`).
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from llmrec_spark.bench.delta_write import measure_delta_write
from llmrec_spark.config import Config, RecommendConfig
from llmrec_spark.core.hybrid import ItemMatrices, Mix
from llmrec_spark.schema import SCORED_SCHEMA
from llmrec_spark.stages.als import als_model_from_factors
from llmrec_spark.stages.recommend import score_stage, scoring_partitions, scoring_path

log = logging.getLogger(__name__)

# (name, users, items): the large size and MovieLens-100K's shape (generated).
BENCH_SIZES = (("50k_x_20k", 50_000, 20_000), ("movielens_100k", 943, 1_682))
SMALL_SIZE_RUNS = 7  # at least this many runs per side at sizes scored on the driver
WRITE_RUNS = 5  # runs per side of the Delta write comparison


def run(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    """The benchmark at its full sizes in a session built from `cfg`, LLMREC_BENCH_RUNS runs per
    side (2 by default); `options` are unused."""
    from llmrec_spark.runtime.session import build_spark

    spark = build_spark(cfg)
    try:
        return bench_topn_and_write(
            spark,
            block_size=cfg.recommend.user_block_size,
            runs=int(os.environ.get("LLMREC_BENCH_RUNS", "2")),
        )
    finally:
        spark.stop()


def bench_topn_and_write(
    spark: Any, *, write_runs: int = WRITE_RUNS, **topn: Any
) -> dict[str, Any]:
    """`bench_topn` (with `topn`'s keywords), then `measure_delta_write` on its first size's rows:
    the benchmark's JSON object."""
    sizes, rows = bench_topn(spark, **topn)
    try:
        write = measure_delta_write(spark, rows, runs=write_runs)
        write["rows"] = rows.count()
    finally:
        rows.unpersist()
    return {
        "sizes": sizes,
        "speedup_vs_recommend_for_all": {
            name: size["speedup_vs_recommend_for_all"] for name, size in sizes.items()
        },
        "delta_write_ratio": write["delta_write_ratio"],
        "delta_write": write,
    }


def bench_factors(
    n_users: int, n_items: int, *, rank: int, seen_per_user: tuple[int, int], seed: int
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Seeded random factors and seen-item sets: (users (u, rank), items (i, rank), histories)."""
    rng = np.random.default_rng(seed)
    users = (rng.standard_normal((n_users, rank)) / math.sqrt(rank)).astype(np.float32)
    items = rng.standard_normal((n_items, rank)).astype(np.float32)
    low, high = seen_per_user
    sizes = rng.integers(low, high + 1, size=n_users)
    histories = [np.sort(rng.choice(n_items, size=int(k), replace=False)) for k in sizes]
    return users, items, histories


def mllib_top_n_unseen(model: Any, seen: DataFrame, *, n: int, max_seen: int) -> DataFrame:
    """MLlib's reference: recommendForAllUsers(n + max_seen), seen items removed, first n kept.

    `seen` has (user, item) int ids. Returns (user, rank, item, score).
    """
    ranked = model.recommendForAllUsers(n + max_seen).select(
        "user", F.posexplode("recommendations").alias("pos", "rec")
    )
    unseen = ranked.select(
        "user", "pos", F.col("rec.item").alias("item"), F.col("rec.rating").alias("score")
    ).join(seen, ["user", "item"], "left_anti")
    by_score = Window.partitionBy("user").orderBy("pos")
    return (
        unseen.withColumn("rank", F.row_number().over(by_score))
        .where(F.col("rank") <= n)
        .select("user", "rank", "item", "score")
    )


def bench_topn(
    spark: Any,
    *,
    sizes: Sequence[tuple[str, int, int]] = BENCH_SIZES,
    rank: int = 64,
    n: int = 20,
    seen_per_user: tuple[int, int] = (5, 50),
    block_size: int = 2048,
    driver_max_cells: int = RecommendConfig.driver_max_cells,
    runs: int = 2,
    min_driver_runs: int = SMALL_SIZE_RUNS,
    seed: int = 17,
) -> tuple[dict[str, Any], DataFrame]:
    """Time MLlib's top-n + seen filtering against `score_stage` per size, on the same factors.

    The stage is called as `run_recommend` calls it, so a size of at most `driver_max_cells`
    scores on the driver (`score_on_driver`: collecting the cached user frame is part of its
    time, and its rows end in a pandas frame, from which `run_recommend` gates and publishes
    them), with at least `min_driver_runs` runs per side; a larger size's DataFrame is written
    to the noop sink, as MLlib's is. Returns (results per size, this stage's rows for the first
    size as a cached DataFrame of the `recommendations` shape, for the Delta write comparison).
    """
    results: dict[str, Any] = {}
    first_rows: DataFrame | None = None
    for name, n_users, n_items in sizes:
        problem = bench_problem(
            spark, n_users, n_items, rank=rank, seen_per_user=seen_per_user, seed=seed
        )
        items_bc = spark.sparkContext.broadcast(problem.matrices)
        path = scoring_path(n_users, n_items, driver_max_cells)
        stage = functools.partial(
            score_stage,
            path,
            problem.users,
            problem.matrices,
            items_bc,
            partitions=scoring_partitions(
                n_users, block_size, spark.sparkContext.defaultParallelism
            ),
            n=n,
            mix=Mix(0.0),
            block_size=block_size,
        )
        model = als_model_from_factors(
            spark,
            problem.user_factors,
            problem.item_factors,
            rank,
            user_col="user",
            item_col="item",
        )
        reference = functools.partial(
            mllib_top_n_unseen, model, problem.seen, n=n, max_seen=problem.max_seen
        )
        size_runs = max(runs, min_driver_runs) if path == "driver" else runs
        results[name] = {
            "users": n_users,
            "items": n_items,
            "rank": rank,
            "top_n": n,
            "seen_per_user": list(seen_per_user),
            "path": path,
            "driver_max_cells": driver_max_cells,
            **measure_size(name, stage, reference, problem, path=path, runs=size_runs, seed=seed),
        }
        log.info("bench topn %s: %s", name, results[name])
        if first_rows is None:
            first_rows = published_rows(spark, stage())
        else:
            items_bc.unpersist()
        problem.unpersist()
    assert first_rows is not None
    return results, first_rows


@dataclass(frozen=True)
class BenchProblem:
    """One size's inputs, cached: MLlib's factor frames (id, features) and seen (user, item)
    pairs; the stage's `user_frame` rows and item matrices, over the same factors."""

    user_factors: DataFrame
    item_factors: DataFrame
    seen: DataFrame
    users: DataFrame
    matrices: ItemMatrices
    n_users: int
    max_seen: int  # the longest history

    def unpersist(self) -> None:
        for frame in (self.user_factors, self.item_factors, self.seen, self.users):
            frame.unpersist()


def bench_problem(
    spark: Any,
    n_users: int,
    n_items: int,
    *,
    rank: int,
    seen_per_user: tuple[int, int],
    seed: int,
) -> BenchProblem:
    """`bench_factors` as both sides' inputs, cached and counted (outside the timing)."""
    user_vecs, item_vecs, histories = bench_factors(
        n_users, n_items, rank=rank, seen_per_user=seen_per_user, seed=seed
    )
    factor_schema = "id int, features array<float>"
    user_ids = np.arange(n_users, dtype=np.int32)
    item_ids = np.arange(n_items, dtype=np.int32)
    seen_pairs = pd.DataFrame(
        {
            "user": np.repeat(user_ids, [len(h) for h in histories]),
            "item": np.concatenate(histories).astype(np.int32),
        }
    )
    users = pd.DataFrame(
        {
            "user_id": [f"u{u:06d}" for u in range(n_users)],
            "als_features": list(user_vecs),
            "history": [h.astype(np.int32) for h in histories],
        }
    )
    problem = BenchProblem(
        user_factors=spark.createDataFrame(
            pd.DataFrame({"id": user_ids, "features": list(user_vecs)}), factor_schema
        ).cache(),
        item_factors=spark.createDataFrame(
            pd.DataFrame({"id": item_ids, "features": list(item_vecs)}), factor_schema
        ).cache(),
        seen=spark.createDataFrame(seen_pairs, "user int, item int").cache(),
        users=spark.createDataFrame(
            users, "user_id string, als_features array<float>, history array<int>"
        ).cache(),
        matrices=ItemMatrices(
            item_ids=np.array([f"i{j:05d}" for j in range(n_items)], dtype=object),
            eligible=np.ones(n_items, dtype=bool),
            popularity=np.zeros(n_items, dtype=np.float32),
            categories=np.zeros(n_items, dtype=np.int32),
            als=item_vecs,
            has_als=np.ones(n_items, dtype=bool),
        ),
        n_users=n_users,
        max_seen=max(len(h) for h in histories),
    )
    for frame in (problem.user_factors, problem.item_factors, problem.seen, problem.users):
        frame.count()
    return problem


def measure_size(
    name: str,
    stage: Callable[[], DataFrame | pd.DataFrame],
    reference: Callable[[], DataFrame],
    problem: BenchProblem,
    *,
    path: str,
    runs: int,
    seed: int,
) -> dict[str, Any]:
    """Best of `runs` of each side (alternating), their ratio, the driver path's floor (on
    `path` "driver"), and the lists' agreement.

    The ratios are computed from the seconds reported (rounded to the ms).
    """
    timings: dict[str, list[float]] = {"mllib": [], "stage": []}
    for attempt in range(runs):
        for label, job in (("mllib", reference), ("stage", stage)):
            started = time.perf_counter()
            _materialize(job())
            timings[label].append(time.perf_counter() - started)
            log.info("bench topn %s: run %d %s %.2fs", name, attempt + 1, label, timings[label][-1])
    floor = None
    if path == "driver":
        floor = round(min(_driver_path_floor(problem.users) for _ in range(runs)), 3)
    agreement = _bench_agreement(
        stage(), reference(), n_users=problem.n_users, sample=200, seed=seed
    )
    mllib_s, stage_s = round(min(timings["mllib"]), 3), round(min(timings["stage"]), 3)
    return {
        "recommend_for_all_seconds": mllib_s,
        "stage_seconds": stage_s,
        "speedup_vs_recommend_for_all": round(mllib_s / stage_s, 2),
        "target_speedup": 10,
        # The Spark job alone of a driver-side stage: collect the users (no scoring);
        # MLlib's time over it bounds any such stage's speedup on this machine.
        "driver_path_floor_seconds": floor,
        "speedup_ceiling_on_driver_path": None if floor is None else round(mllib_s / floor, 2),
        "top_n_agreement_with_mllib": agreement,
        "runs": runs,
        "timing": f"best of {runs}, noop sink",
    }


def published_rows(spark: Any, rows: DataFrame | pd.DataFrame) -> DataFrame:
    """The stage's rows as a cached DataFrame of the `recommendations` shape (one ds)."""
    if isinstance(rows, pd.DataFrame):
        rows = spark.createDataFrame(rows, SCORED_SCHEMA)
    out = rows.withColumn("model_version", F.lit("bench")).withColumn("ds", F.lit("2026-01-01"))
    out = out.cache()
    out.count()
    return out


def _materialize(rows: DataFrame | pd.DataFrame) -> None:
    """Compute every row: a DataFrame is written to the noop sink; driver-held rows already are."""
    if isinstance(rows, DataFrame):
        rows.write.format("noop").mode("overwrite").save()


def _driver_path_floor(users: DataFrame) -> float:
    """Seconds of what `score_on_driver` does besides scoring: collect the users."""
    started = time.perf_counter()
    users.toPandas()
    return time.perf_counter() - started


def _bench_agreement(
    stage: DataFrame | pd.DataFrame, reference: DataFrame, *, n_users: int, sample: int, seed: int
) -> float:
    """Share of (user, item) pairs in the stage's lists also in MLlib's, over sampled users."""
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(n_users, size=min(sample, n_users), replace=False).tolist())
    wanted = [f"u{u:06d}" for u in picked]
    pairs: pd.DataFrame
    if isinstance(stage, DataFrame):
        pairs = stage.where(F.col("user_id").isin(wanted)).select("user_id", "item_id").toPandas()
    else:
        pairs = stage.loc[stage["user_id"].isin(wanted), ["user_id", "item_id"]]
    mine = set(pairs.itertuples(index=False, name=None))
    theirs = {
        (f"u{r['user']:06d}", f"i{r['item']:05d}")
        for r in reference.where(F.col("user").isin(picked)).collect()
    }
    return round(len(mine & theirs) / max(len(theirs), 1), 4)
