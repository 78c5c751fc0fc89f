"""Collaborative model: Spark MLlib ALS on implicit feedback from the cleaned, weighted events."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from pyspark.ml.recommendation import ALS, ALSModel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from llmrec_spark.config import AlsConfig, AlsSearchConfig
from llmrec_spark.errors import ConfigError, InputError
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.indexing import dense_index

if TYPE_CHECKING:
    from llmrec_spark.runtime.tracking import Tracker

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


def fit_als(pairs: DataFrame, cfg: AlsConfig) -> AlsFactors:
    """Fit implicit ALS on (user_id, item_id, weight) rows; factors come back with string ids.

    The SparkContext must have a checkpoint directory (the session factory sets one), so
    long lineages are cut every `checkpoint_interval` iterations.
    """
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
        params={f"als.{k}": v for k, v in vars(cfg).items() if k != "search"},
        metrics={"als_users": n_users, "als_items": n_items},
        artifacts={"als_model": model_path},
        summary={"users": n_users, "items": n_items, "pairs": n_pairs},
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


# ---------------------------------------------------------------------------------------------
# Top-k on the driver (small data: tuning, benchmarks)


def top_k_unseen(
    users: np.ndarray,
    items: np.ndarray,
    seen: Sequence[np.ndarray],
    k: int,
    *,
    block_size: int = 1024,
) -> list[np.ndarray]:
    """Per row of `users` (n, rank), the indices of the k best rows of `items` (m, rank) by dot
    product, best first, ties to the lower index, the row's `seen` item indices excluded."""
    out: list[np.ndarray] = []
    n_items = items.shape[0]
    k = min(k, n_items)
    for start in range(0, users.shape[0], block_size):
        scores = users[start : start + block_size] @ items.T  # (block, n_items)
        for row, excluded in enumerate(seen[start : start + block_size]):
            scores[row, excluded] = -np.inf
        if k < n_items:
            candidates = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (block, k), unordered
        else:
            candidates = np.broadcast_to(np.arange(n_items), scores.shape)
        # A tie at the k-th score may be cut at any index by argpartition; rank ties exactly
        # by widening to every item scoring at least the k-th best.
        for row in range(scores.shape[0]):
            row_scores = scores[row]
            kth = row_scores[candidates[row]].min()
            pool = np.flatnonzero(row_scores >= kth) if np.isfinite(kth) else candidates[row]
            pool = pool[np.isfinite(row_scores[pool])]
            order = np.lexsort((pool, -row_scores[pool]))[:k]
            out.append(pool[order])
    return out


# ---------------------------------------------------------------------------------------------
# Benchmark: the product's ALS fit against the `implicit` library's CPU ALS


BENCH_RANK = 64


@dataclass(frozen=True)
class PlantedInteractions:
    """Distinct (user, item) pairs with a repeat-count weight, from a topic model of rank n_topics."""

    users: np.ndarray  # (n,) int32
    items: np.ndarray  # (n,) int32
    weights: np.ndarray  # (n,) float32, times the pair was drawn
    n_users: int
    n_items: int
    n_topics: int
    item_topics: np.ndarray  # (n_items,) the planted topic of each item


def planted_interactions(
    n_pairs: int,
    *,
    seed: int,
    n_topics: int = 32,
    pairs_per_user: int = 50,
    users_per_item: int = 250,
    noise: float = 0.1,
) -> PlantedInteractions:
    """Exactly `n_pairs` distinct pairs drawn from a planted low-rank model, seeded.

    Each user has a sparse topic mixture (Dirichlet 0.15); each item belongs to one topic and
    has a Zipf popularity inside it. A draw picks a topic from the user's mixture, then an item
    of that topic by popularity; a `noise` share of draws is a uniformly random item instead.
    So P(item | user) has rank `n_topics`, and held-out pairs are predictable from the rest.
    """
    rng = np.random.default_rng(seed)
    per_topic = max(2, n_pairs // users_per_item // n_topics)
    n_items = per_topic * n_topics
    n_users = max(10, n_pairs // pairs_per_user)
    topic_items = rng.permutation(n_items).reshape(n_topics, per_topic)
    popularity = 1.0 / np.arange(1, per_topic + 1) ** 0.9
    popularity_cdf = np.cumsum(popularity) / popularity.sum()
    mixture_cdf = np.cumsum(rng.dirichlet(np.full(n_topics, 0.15), size=n_users), axis=1)
    mixture_cdf[:, -1] = 1.0
    # Row u of the flattened CDF spans (u, u + 1]: one searchsorted draws every user's topic.
    offset_cdf = (mixture_cdf + np.arange(n_users)[:, None]).ravel()
    activity = rng.lognormal(0.0, 0.8, size=n_users)
    activity /= activity.sum()

    keys = np.zeros(0, dtype=np.int64)
    repeats = np.zeros(0, dtype=np.int64)
    while len(keys) < n_pairs:
        draws = max(n_pairs - len(keys), n_pairs // 4) * 5 // 4
        users = rng.choice(n_users, size=draws, p=activity).astype(np.int64)
        flat = np.searchsorted(offset_cdf, users + rng.random(draws), side="right")
        topics = np.minimum(flat - users * n_topics, n_topics - 1)
        ranks = np.minimum(
            np.searchsorted(popularity_cdf, rng.random(draws), side="right"), per_topic - 1
        )
        items = topic_items[topics, ranks]
        random_items = rng.random(draws) < noise
        items[random_items] = rng.integers(0, n_items, size=int(random_items.sum()))
        keys, repeats = _merge_counts(keys, repeats, users * n_items + items)
    keep = np.sort(rng.choice(len(keys), size=n_pairs, replace=False))
    keys, repeats = keys[keep], repeats[keep]
    return PlantedInteractions(
        users=(keys // n_items).astype(np.int32),
        items=(keys % n_items).astype(np.int32),
        weights=repeats.astype(np.float32),
        n_users=n_users,
        n_items=n_items,
        n_topics=n_topics,
        item_topics=np.argsort(topic_items.ravel()) // per_topic,
    )


def _merge_counts(
    keys: np.ndarray, repeats: np.ndarray, new_keys: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct keys with their total counts, after adding one occurrence per `new_keys`."""
    unique, counts = np.unique(new_keys, return_counts=True)
    merged = np.concatenate([keys, unique])
    totals = np.concatenate([repeats, counts])
    out_keys, inverse = np.unique(merged, return_inverse=True)
    return out_keys, np.bincount(inverse, weights=totals).astype(np.int64)


def implicit_regularization(reg_param: float, *, n_pairs: int, n_users: int, n_items: int) -> float:
    """`implicit`'s one regularization constant for MLlib's `reg_param`.

    MLlib weights lambda by each solved row's interaction count (ALS-WR: user u gets
    reg_param * n_u, item i gets reg_param * n_i); `implicit` adds the same constant to every
    row. This constant gives both the same total regularization per sweep over users and
    items: reg_param * 2 * n_pairs / (n_users + n_items).
    """
    return reg_param * 2.0 * n_pairs / (n_users + n_items)


def implicit_confidence(weights: np.ndarray, alpha: float) -> np.ndarray:
    """`implicit`'s matrix values for MLlib's implicit-feedback confidence 1 + alpha * weight.

    `implicit` reads a stored value c as the confidence of a positive (p = 1), and treats
    absent pairs as confidence 1, p = 0: MLlib's model exactly when c = 1 + alpha * weight
    (and `implicit`'s own alpha is 1).
    """
    return (1.0 + alpha * weights).astype(np.float32)


def bench_als(
    spark: SparkSession,
    cfg: AlsConfig,
    *,
    n_interactions: int,
    runs: int,
    rank: int = BENCH_RANK,
    holdout: float = 0.1,
    eval_users: int = 10_000,
    seed: int = 17,
    with_cholesky: bool = False,
) -> dict[str, Any]:
    """Fit time of the product's ALS against `implicit`'s CPU ALS on the same planted data.

    `n_interactions` training pairs (plus `holdout` more, held out per user at random) at
    rank `rank` with cfg's iterations, reg_param and alpha; best of `runs` fit times each,
    and NDCG@10 of both on the held-out pairs (full ranking, training items excluded).
    `with_cholesky` also times `implicit` with its exact solver (MLlib's algorithm; slow).
    """
    import pandas as pd

    from llmrec_spark.core.metrics import mean_metrics

    cfg = replace(cfg, rank=rank)
    cores = spark.sparkContext.defaultParallelism
    started = time.perf_counter()
    n_total = int(round(n_interactions / (1.0 - holdout)))
    data = planted_interactions(n_total, seed=seed)
    rng = np.random.default_rng(seed + 1)
    is_test = np.zeros(n_total, dtype=bool)
    is_test[rng.permutation(n_total)[: n_total - n_interactions]] = True
    train = PlantedInteractions(
        users=data.users[~is_test],
        items=data.items[~is_test],
        weights=data.weights[~is_test],
        n_users=data.n_users,
        n_items=data.n_items,
        n_topics=data.n_topics,
        item_topics=data.item_topics,
    )
    log.info(
        "bench als: %d training pairs (%d users x %d items, %d topics), %d held out, in %.1fs",
        len(train.users),
        data.n_users,
        data.n_items,
        data.n_topics,
        int(is_test.sum()),
        time.perf_counter() - started,
    )

    numbers = spark.createDataFrame(
        pd.DataFrame({"user": train.users, "item": train.items, "weight": train.weights})
    )
    pairs = numbers.select(
        F.format_string("u%07d", "user").alias("user_id"),
        F.format_string("i%06d", "item").alias("item_id"),
        F.col("weight").cast("double").alias("weight"),
    )
    # As fit_als does, but cached and counted before the clock starts: only the fit is timed.
    indexed, users, items = index_ids(pairs)
    indexed = indexed.repartition(cores).cache()
    indexed.count()
    estimator = als_estimator(cfg, num_blocks=als_blocks(spark, cfg))
    # A nightly job's JVM has loaded and compiled ALS's code before the fit that matters; one
    # untimed 1-iteration fit does the same here (the first fit of a JVM costs about twice).
    started = time.perf_counter()
    als_estimator(replace(cfg, max_iter=1), num_blocks=als_blocks(spark, cfg)).fit(indexed)
    warmup_s = time.perf_counter() - started
    log.info("bench als: JVM warm-up fit (1 iteration) %.1fs", warmup_s)

    lam = implicit_regularization(
        cfg.reg_param, n_pairs=len(train.users), n_users=data.n_users, n_items=data.n_items
    )
    sides = (
        ("implicit_cg", "implicit_cholesky", "spark") if with_cholesky else ("implicit_cg", "spark")
    )
    timings: dict[str, list[float]] = {name: [] for name in sides}
    spark_model = None
    implicit_models: dict[str, Any] = {}
    implicit_blas: list[dict[str, Any]] = []
    for attempt in range(runs):
        for name in sides:
            started = time.perf_counter()
            if name == "spark":
                spark_model = estimator.fit(indexed)
                timings[name].append(time.perf_counter() - started)
            else:
                model, seconds, implicit_blas = _fit_implicit(
                    train, cfg, lam, threads=cores, use_cg=name == "implicit_cg", seed=seed
                )
                implicit_models[name] = model
                timings[name].append(seconds)
            log.info("bench als: run %d %s fit %.1fs", attempt + 1, name, timings[name][-1])
    assert spark_model is not None

    spark_users = _dense_factors(
        spark_model.userFactors, users, "user_id", "user_idx", data.n_users, rank
    )
    spark_items = _dense_factors(
        spark_model.itemFactors, items, "item_id", "item_idx", data.n_items, rank
    )
    indexed.unpersist()

    eval_ids, seen, relevant = _holdout_lists(data, is_test, eval_users=eval_users, seed=seed)
    ndcg = {}
    for name, (user_f, item_f) in {
        "spark": (spark_users, spark_items),
        **{n: (m.user_factors, m.item_factors) for n, m in implicit_models.items()},
    }.items():
        top = top_k_unseen(user_f[eval_ids], item_f, seen, 10)
        recommended = {int(u): list(map(int, t)) for u, t in zip(eval_ids, top, strict=True)}
        ndcg[name] = round(mean_metrics(recommended, relevant, [10])["ndcg@10"], 4)

    popular = np.argsort(-np.bincount(train.items, minlength=data.n_items), kind="stable")
    baseline = {}
    for user, user_seen in zip(eval_ids, seen, strict=True):
        excluded = set(user_seen.tolist())
        baseline[int(user)] = [int(i) for i in popular[: 10 + len(excluded)] if i not in excluded][
            :10
        ]
    ndcg["popularity"] = round(mean_metrics(baseline, relevant, [10])["ndcg@10"], 4)

    best = {name: min(values) for name, values in timings.items()}
    return {
        "interactions": len(train.users),
        "users": data.n_users,
        "items": data.n_items,
        "planted_topics": data.n_topics,
        "rank": rank,
        "max_iter": cfg.max_iter,
        "spark_fit_seconds": round(best["spark"], 2),
        "implicit_fit_seconds": round(best["implicit_cg"], 2),
        "ratio_vs_implicit": round(best["spark"] / best["implicit_cg"], 2),
        **(
            {
                "implicit_cholesky_fit_seconds": round(best["implicit_cholesky"], 2),
                "ratio_vs_implicit_cholesky": round(best["spark"] / best["implicit_cholesky"], 2),
            }
            if with_cholesky
            else {}
        ),
        "target_ratio_vs_implicit": 6.0,
        "ndcg@10": ndcg,
        "evaluation": (
            f"{len(relevant)} users sampled from those with held-out pairs ({holdout:.0%} of "
            "pairs held out at random); full ranking of every item, the user's training items "
            "excluded; popularity = most-trained items"
        ),
        "spark": {
            "blas": blas_implementation(spark),
            "lapack": lapack_implementation(spark),
            "cores": cores,
            "num_blocks": als_blocks(spark, cfg),
            "intermediate_storage_level": cfg.intermediate_storage_level,
            "checkpoint_interval": cfg.checkpoint_interval,
            "warmup_fit_seconds": round(warmup_s, 2),
            "executor_env_OPENBLAS_NUM_THREADS": spark.conf.get(
                "spark.executorEnv.OPENBLAS_NUM_THREADS", None
            ),
            "jvm_OPENBLAS_NUM_THREADS": jvm_env(spark, "OPENBLAS_NUM_THREADS"),
            "params": {"regParam": cfg.reg_param, "alpha": cfg.alpha, "implicitPrefs": True},
            "timed": (
                "ALS.fit on the indexed pairs (fit_als's estimator), the pairs cached and "
                "counted and the JVM warmed by a 1-iteration fit beforehand"
            ),
        },
        "implicit": {
            "version": _implicit_version(),
            "num_threads": cores,
            "blas_threads_during_fit": implicit_blas,
            "params": {
                "regularization": round(lam, 4),
                "alpha": 1.0,
                "values": "1 + alpha * weight (MLlib's confidence)",
                "cg_steps": 3,
            },
            "mapping": (
                "confidence: implicit's stored value is the confidence of a positive, so it gets "
                "MLlib's 1 + alpha * weight and alpha 1; regularization: MLlib scales reg_param "
                "by each row's interaction count (ALS-WR), implicit adds one constant, set to "
                "reg_param * 2 * pairs / (users + items) (equal total per sweep); solver: "
                "implicit's default is 3 conjugate-gradient steps per row per iteration, "
                "use_cg=False is the exact Cholesky solve MLlib does"
            ),
            "timed": "AlternatingLeastSquares.fit on a prebuilt CSR matrix",
        },
        "runs": runs,
        "timing": f"best of {runs}; the fits run in the same process and session, one after another",
        "all_seconds": {k: [round(x, 2) for x in v] for k, v in timings.items()},
    }


def _fit_implicit(
    train: PlantedInteractions,
    cfg: AlsConfig,
    regularization: float,
    *,
    threads: int,
    use_cg: bool,
    seed: int,
) -> tuple[Any, float, list[dict[str, Any]]]:
    """`implicit`'s CPU ALS fitted on `train`; returns (model, fit seconds, BLAS pools in the fit)."""
    from implicit.cpu.als import AlternatingLeastSquares
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_info, threadpool_limits

    matrix = csr_matrix(
        (implicit_confidence(train.weights, cfg.alpha), (train.users, train.items)),
        shape=(train.n_users, train.n_items),
        dtype=np.float32,
    )
    model = AlternatingLeastSquares(
        factors=cfg.rank,
        regularization=regularization,
        alpha=1.0,
        iterations=cfg.max_iter,
        use_cg=use_cg,
        num_threads=threads,
        random_state=seed,
    )
    # implicit parallelises over rows itself; its BLAS calls must stay single-threaded.
    with threadpool_limits(1, "blas"):
        pools = [
            {"library": p["internal_api"], "num_threads": p["num_threads"]}
            for p in threadpool_info()
            if p["user_api"] == "blas"
        ]
        started = time.perf_counter()
        model.fit(matrix, show_progress=False)
        seconds = time.perf_counter() - started
    return model, seconds, pools


def _dense_factors(
    factors: DataFrame, ids: DataFrame, id_col: str, idx_col: str, n: int, rank: int
) -> np.ndarray:
    """(n, rank) float32 factors by the integer in the string id ("u0000042" -> row 42); rows
    without factors stay zero."""
    import pandas as pd

    rows: pd.DataFrame = (
        factors.join(ids, F.col("id") == F.col(idx_col))
        .select(F.substring(id_col, 2, 16).cast("int").alias("row"), "features")
        .toPandas()
    )
    out = np.zeros((n, rank), dtype=np.float32)
    if len(rows):
        out[rows["row"].to_numpy()] = np.stack(rows["features"].to_numpy())
    return out


def _holdout_lists(
    data: PlantedInteractions, is_test: np.ndarray, *, eval_users: int, seed: int
) -> tuple[np.ndarray, list[np.ndarray], dict[int, set[int]]]:
    """(sampled users with held-out pairs, their training items, their held-out items)."""
    order = np.argsort(data.users, kind="stable")
    users, items, test = data.users[order], data.items[order], is_test[order]
    starts = np.searchsorted(users, np.arange(data.n_users + 1))
    has_test = np.bincount(users[test], minlength=data.n_users) > 0
    has_train = np.bincount(users[~test], minlength=data.n_users) > 0
    candidates = np.flatnonzero(has_test & has_train)
    rng = np.random.default_rng(seed + 2)
    chosen = np.sort(rng.choice(candidates, size=min(eval_users, len(candidates)), replace=False))
    seen, relevant = [], {}
    for user in chosen:
        span = slice(starts[user], starts[user + 1])
        seen.append(items[span][~test[span]])
        relevant[int(user)] = set(items[span][test[span]].tolist())
    return chosen, seen, relevant


def _implicit_version() -> str:
    from importlib.metadata import version

    return version("implicit")


# ---------------------------------------------------------------------------------------------
# Hyper-parameter search (`llmrec tune-als`)

SEARCHED = ("rank", "reg_param", "alpha", "max_iter")


def search_trials(search: AlsSearchConfig) -> list[dict[str, Any]]:
    """The settings to try: every combination of the listed values (rank varying slowest), or a
    seeded sample of `search.trials` of them without replacement, kept in that grid order."""
    grid = [
        {"rank": rank, "reg_param": reg_param, "alpha": alpha, "max_iter": max_iter}
        for rank in search.rank
        for reg_param in search.reg_param
        for alpha in search.alpha
        for max_iter in search.max_iter
    ]
    if search.trials == 0 or search.trials >= len(grid):
        return grid
    picked = np.random.default_rng(search.seed).choice(len(grid), size=search.trials, replace=False)
    return [grid[i] for i in sorted(picked)]


def best_trial(trials: Sequence[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The trial with the highest `metrics[metric]`; the earliest among equals."""
    if not trials:
        raise InputError("als search: no trials to choose from")
    return max(trials, key=lambda t: (t["metrics"][metric], -t["trial"]))


@dataclass
class ValidationSplit:
    """A temporal validation split, indexed for ALS, with the driver-side lists to score."""

    indexed: DataFrame  # user_idx, item_idx, weight (cached)
    user_ids: list[str]  # test users, in the order of `user_idx`
    user_idx: np.ndarray  # (n_test_users,) their ALS ids
    item_ids: np.ndarray  # (n_items,) item_id by item_idx
    seen: list[np.ndarray]  # per test user, the item_idx of their training items
    relevant: dict[str, set[str]]  # per test user, held-out item_ids
    train_pairs: int


def validation_split(
    events: DataFrame, *, test_fraction: float, positive_min_weight: float
) -> ValidationSplit:
    """Per-user temporal split of `events` (evaluate's), the training part indexed and cached;
    collects the test users' training items and held-out items to the driver."""
    from llmrec_spark.stages.splits import user_temporal_split

    train, test = user_temporal_split(
        events, test_fraction=test_fraction, positive_min_weight=positive_min_weight
    )
    indexed, users, items = index_ids(interactions(train))
    indexed = indexed.select("user_idx", "item_idx", "weight").cache()
    train_pairs = indexed.count()
    held_out = test.select("user_id", "item_id").distinct().join(users, "user_id").collect()
    relevant: dict[str, set[str]] = {}
    idx_of: dict[str, int] = {}
    for row in held_out:
        relevant.setdefault(row["user_id"], set()).add(row["item_id"])
        idx_of[row["user_id"]] = int(row["user_idx"])
    user_ids = sorted(relevant)
    test_idx = np.array([idx_of[u] for u in user_ids], dtype=np.int64)
    seen_rows = (
        indexed.where(F.col("user_idx").isin([int(i) for i in test_idx]))
        .select("user_idx", "item_idx")
        .collect()
    )
    seen_by_user: dict[int, list[int]] = {}
    for row in seen_rows:
        seen_by_user.setdefault(int(row["user_idx"]), []).append(int(row["item_idx"]))
    item_rows = items.collect()
    item_ids = np.empty(len(item_rows), dtype=object)
    for row in item_rows:
        item_ids[int(row["item_idx"])] = row["item_id"]
    return ValidationSplit(
        indexed=indexed,
        user_ids=user_ids,
        user_idx=test_idx,
        item_ids=item_ids,
        seen=[np.array(seen_by_user.get(int(i), []), dtype=np.int64) for i in test_idx],
        relevant=relevant,
        train_pairs=train_pairs,
    )


def score_trial(model: ALSModel, split: ValidationSplit, ks: Sequence[int]) -> dict[str, float]:
    """Mean ranking metrics of `model` on `split`'s test users (top max(ks), seen excluded)."""
    from llmrec_spark.core.metrics import mean_metrics

    rank = model.rank
    users = _factor_matrix(model.userFactors, split.user_idx, rank)
    items = _factor_matrix(model.itemFactors, np.arange(len(split.item_ids)), rank)
    top = top_k_unseen(users, items, split.seen, max(ks))
    recommended = {
        user: [str(split.item_ids[i]) for i in best]
        for user, best in zip(split.user_ids, top, strict=True)
    }
    return mean_metrics(recommended, split.relevant, list(ks))


def _factor_matrix(factors: DataFrame, ids: np.ndarray, rank: int) -> np.ndarray:
    """(len(ids), rank) float32 rows of `factors` (id, features) in the order of `ids`; zero
    for ids without a factor."""
    wanted = factors.where(F.col("id").isin([int(i) for i in ids])).collect()
    position = {int(i): row for row, i in enumerate(ids)}
    out = np.zeros((len(ids), rank), dtype=np.float32)
    for row in wanted:
        out[position[int(row["id"])]] = row["features"]
    return out


def tune_als(
    ctx: RunContext, *, trials: int | None = None, tracker: Tracker | None = None
) -> dict[str, Any]:
    """Search ALS settings (`als.search`) on a temporal validation split of the training window
    ending at ctx.ds; one nested MLflow run per trial under a parent run. Returns the trials and
    the best one (by `als.search.metric`); writes no table."""
    from llmrec_spark.runtime.tracking import Tracker, metric_key

    cfg = ctx.cfg
    search = cfg.als.search if trials is None else replace(cfg.als.search, trials=trials)
    from llmrec_spark.core.metrics import mean_metrics

    _, _, k = search.metric.partition("@")
    known = sorted({m.partition("@")[0] for m in mean_metrics({}, {"u": {"i"}}, [1])})
    if search.metric.partition("@")[0] not in known or not k.isdigit():
        raise ConfigError(
            f"als.search.metric: a metric@k of {', '.join(known)}, got {search.metric!r}"
        )
    ks = sorted({*cfg.evaluate.ks, int(k)})
    events = training_window(ctx.store.read("events_clean"), ctx.ds, cfg.als.train_days)
    split = validation_split(
        events,
        test_fraction=cfg.evaluate.test_fraction,
        positive_min_weight=cfg.evaluate.positive_min_weight,
    )
    if not split.user_ids:
        split.indexed.unpersist()
        raise InputError(
            f"tune-als: no validation users in the {cfg.als.train_days} days up to {ctx.ds} "
            "(users need 3+ training items and a held-out positive); run `llmrec clean` first"
        )
    settings = search_trials(search)
    blocks = als_blocks(ctx.spark, cfg.als)
    tracker = tracker or Tracker(cfg)
    log.info(
        "tune-als: %d trials, %d training pairs, %d validation users, metric %s",
        len(settings),
        split.train_pairs,
        len(split.user_ids),
        search.metric,
    )
    results: list[dict[str, Any]] = []
    try:
        with tracker.run(f"tune-als {ctx.ds}", tags={"stage": "tune-als", "ds": ctx.ds}) as parent:
            tracker.log_params(
                {f"search.{k}": v for k, v in vars(search).items()}
                | {"validation_users": len(split.user_ids), "train_pairs": split.train_pairs}
            )
            for number, params in enumerate(settings, start=1):
                started = time.perf_counter()
                trial_cfg = replace(cfg.als, **params)
                model = als_estimator(trial_cfg, num_blocks=blocks).fit(split.indexed)
                metrics = score_trial(model, split, ks)
                seconds = time.perf_counter() - started
                with tracker.run(
                    f"trial {number}", nested=True, tags={"stage": "tune-als", "trial": str(number)}
                ) as run_id:
                    tracker.log_params(params)
                    tracker.log_metrics({**metrics, "seconds": seconds})
                results.append(
                    {
                        "trial": number,
                        "params": params,
                        "metrics": metrics,
                        "seconds": round(seconds, 2),
                        "run_id": run_id,
                    }
                )
                log.info(
                    "tune-als: trial %d/%d %s %s %.4f (%.1fs)",
                    number,
                    len(settings),
                    " ".join(f"{k}={v}" for k, v in params.items()),
                    search.metric,
                    metrics[search.metric],
                    seconds,
                )
            best = best_trial(results, search.metric)
            tracker.log_params({f"best.{k}": v for k, v in best["params"].items()})
            tracker.log_metrics({f"best.{search.metric}": best["metrics"][search.metric]})
            tracker.set_tags({"best_trial": str(best["trial"])})
    finally:
        split.indexed.unpersist()
    log.info(
        "tune-als: best trial %d: %s (%s %.4f)",
        best["trial"],
        best["params"],
        search.metric,
        best["metrics"][search.metric],
    )
    return {
        "ds": ctx.ds,
        "metric": search.metric,
        "metric_key": metric_key(search.metric),
        "best": {k: best[k] for k in ("trial", "params", "metrics", "run_id")},
        "conf": " ".join(f"--conf als.{k}={v}" for k, v in best["params"].items()),
        "trials": results,
        "validation": {"users": len(split.user_ids), "train_pairs": split.train_pairs},
        "parent_run_id": parent,
    }
