"""Offline evaluation: user-temporal holdout, full ranking with training items excluded.

Popularity, ALS, text (frozen base embeddings) and the hybrid are scored with the same
blockwise code as the nightly recommendations (`llmrec_spark.recommend`); the metrics are
plain functions over ranked lists and relevant sets, defined as Spark's RankingMetrics.
"""

from __future__ import annotations

import dataclasses
import html
import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from functools import reduce
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F

from llmrec_spark import als, recommend
from llmrec_spark.context import RunContext, StageResult
from llmrec_spark.errors import InputError

log = logging.getLogger(__name__)

METRICS = ("precision", "recall", "ndcg", "map", "hit_rate")
MODELS = ("popularity", "als", "text", "hybrid")


# ---------------------------------------------------------------------------------------
# Metrics over one ranked list


def precision_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Hits among the first k recommendations / k (a list shorter than k still divides by k)."""
    return sum(1 for item in recommended[:k] if item in relevant) / k


def recall_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Hits among the first k / |relevant| (denominator |relevant|, not min(k, |relevant|))."""
    if not relevant:
        return 0.0
    return sum(1 for item in recommended[:k] if item in relevant) / len(relevant)


def ndcg_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Binary-gain DCG with log2(rank + 1) discount over the ideal DCG of min(k, |relevant|) hits."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(i + 2) for i, item in enumerate(recommended[:k]) if item in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal


def average_precision_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """Sum of precision at each hit position within k / min(k, |relevant|) (Spark's MAP@k)."""
    if not relevant:
        return 0.0
    hits, total = 0, 0.0
    for i, item in enumerate(recommended[:k]):
        if item in relevant:
            hits += 1
            total += hits / (i + 1)
    return total / min(k, len(relevant))


def hit_rate_at_k(recommended: Sequence[Hashable], relevant: set, k: int) -> float:
    """1.0 when any of the first k recommendations is relevant, else 0.0."""
    return 1.0 if any(item in relevant for item in recommended[:k]) else 0.0


METRIC_FUNCTIONS = {
    "precision": precision_at_k,
    "recall": recall_at_k,
    "ndcg": ndcg_at_k,
    "map": average_precision_at_k,
    "hit_rate": hit_rate_at_k,
}


def per_user_metrics(
    recommended: Mapping[Any, Sequence[Hashable]],
    relevant: Mapping[Any, set],
    ks: Sequence[int],
) -> dict[str, np.ndarray]:
    """ "metric@k" -> one value per user with a non-empty relevant set (sorted user order).

    Users missing from `recommended` count as an empty list (every metric 0).
    """
    users = sorted(u for u, rel in relevant.items() if rel)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        for name, fn in METRIC_FUNCTIONS.items():
            out[f"{name}@{k}"] = np.array(
                [fn(list(recommended.get(u, ())), relevant[u], k) for u in users], dtype=np.float64
            )
    return out


def mean_metrics(
    recommended: Mapping[Any, Sequence[Hashable]],
    relevant: Mapping[Any, set],
    ks: Sequence[int],
) -> dict[str, float]:
    """ "metric@k" -> mean over users with a non-empty relevant set (0.0 when there are none)."""
    return {
        key: float(values.mean()) if len(values) else 0.0
        for key, values in per_user_metrics(recommended, relevant, ks).items()
    }


def bootstrap_interval(
    values: np.ndarray, *, samples: int, seed: int, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-user `values`."""
    if len(values) == 0 or samples <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


# ---------------------------------------------------------------------------------------
# Split (Spark, pure)


def user_temporal_split(
    events: DataFrame, *, test_fraction: float, positive_min_weight: float
) -> tuple[DataFrame, DataFrame]:
    """Per user, the last `test_fraction` of events by time (at least one) form the test part.

    The cut is a timestamp, so every training event is strictly earlier than every test
    event of the same user (events tied at the cut go to test). Returns (train, test):
    train = every user's events before their cut (all users, for ALS); test = the events
    after the cut with weight >= positive_min_weight on items the user did not touch in
    train, only for users with >= 1 such event and >= 3 distinct training items.
    """
    per_user = Window.partitionBy("user_id")
    by_time = per_user.orderBy("event_ts", "item_id", "weight")
    n_test = F.greatest(F.lit(1), F.floor(F.col("_n") * F.lit(test_fraction)))
    labeled = (
        events.withColumn("_pos", F.row_number().over(by_time))
        .withColumn("_n", F.count("*").over(per_user))
        .withColumn(
            "_cut",
            F.min(F.when(F.col("_pos") > F.col("_n") - n_test, F.col("event_ts"))).over(per_user),
        )
    )
    helpers = ["_pos", "_n", "_cut"]
    train = labeled.where(F.col("event_ts") < F.col("_cut")).drop(*helpers)
    train_pairs = train.select("user_id", "item_id").distinct()
    candidates = (
        labeled.where(
            (F.col("event_ts") >= F.col("_cut")) & (F.col("weight") >= positive_min_weight)
        )
        .drop(*helpers)
        .join(train_pairs, ["user_id", "item_id"], "left_anti")
    )
    enough_history = (
        train_pairs.groupBy("user_id").count().where(F.col("count") >= 3).select("user_id")
    )
    test = candidates.join(enough_history, "user_id", "left_semi")
    return train, test


# ---------------------------------------------------------------------------------------
# Stage


def run_evaluate(ctx: RunContext) -> StageResult:
    """Hold out each user's latest events, refit ALS, score four models, write an HTML table."""
    from llmrec_spark import embed

    cfg = ctx.cfg.evaluate
    ks = sorted(set(cfg.ks))
    if not ks or ks[0] <= 0:
        raise InputError(f"evaluate.ks must be positive integers, got {cfg.ks}")
    window = als.training_window(ctx.store.read("events_clean"), ctx.ds, ctx.cfg.als.train_days)
    train, test = user_temporal_split(
        window, test_fraction=cfg.test_fraction, positive_min_weight=cfg.positive_min_weight
    )
    train = train.cache()
    relevant_rows = test.select("user_id", "item_id").distinct().collect()
    if not relevant_rows:
        raise InputError(
            f"no user has a held-out positive (weight >= {cfg.positive_min_weight}) and 3 training "
            f"items in the {ctx.cfg.als.train_days} days up to {ctx.ds}; nothing to evaluate"
        )
    relevant: dict[str, set] = {}
    for row in relevant_rows:
        relevant.setdefault(row["user_id"], set()).add(row["item_id"])

    pairs = als.interactions(train).cache()
    factors = als.fit_als(pairs, ctx.cfg.als)
    base_id = embed.base_model_id(ctx.cfg.embed)
    embeddings = embed.latest_embeddings(ctx.store, base_id, ctx.cfg.embed).select(
        "item_id", "embedding"
    )
    items = recommend.item_frame(
        ctx.store.read("items"),
        popularity=recommend.popularity_frame(train),
        item_factors=factors.items,
        embeddings=embeddings,
        apply_rules=False,
    ).cache()
    full = recommend.item_matrices(items.toPandas())
    test_users = ctx.spark.createDataFrame([(u,) for u in sorted(relevant)], "user_id string")
    users = recommend.user_frame(
        test_users,
        history=pairs.select("user_id", "item_id"),
        item_index=items.select("item_id", "item_idx"),
        user_factors=factors.users,
    ).cache()
    partitions = recommend.scoring_partitions(
        len(relevant), ctx.cfg.recommend.user_block_size, ctx.spark.sparkContext.defaultParallelism
    )

    variants = {
        "popularity": dataclasses.replace(full, als=None, has_als=None, text=None, has_text=None)
    }
    if full.als is not None:
        variants["als"] = dataclasses.replace(full, text=None, has_text=None)
    if full.text is not None:
        variants["text"] = dataclasses.replace(full, als=None, has_als=None)
    else:
        log.warning(
            "evaluate: no %s embeddings in item_embeddings; text and hybrid skipped", base_id
        )
    if full.als is not None and full.text is not None:
        variants["hybrid"] = full
    broadcasts = {model: ctx.spark.sparkContext.broadcast(m) for model, m in variants.items()}
    scored = reduce(
        DataFrame.unionByName,
        [
            recommend.score_users(
                users,
                bc,
                n=ks[-1],
                text_weight=ctx.cfg.recommend.text_weight,
                block_size=ctx.cfg.recommend.user_block_size,
                partitions=partitions,
            ).select(F.lit(model).alias("model"), "user_id", "rank", "item_id")
            for model, bc in broadcasts.items()
        ],
    )
    ranked: dict[str, dict[str, list[tuple[int, str]]]] = {model: {} for model in variants}
    for row in scored.collect():  # every model in one job
        ranked[row["model"]].setdefault(row["user_id"], []).append((row["rank"], row["item_id"]))
    for bc in broadcasts.values():
        bc.unpersist()

    per_user: dict[str, dict[str, np.ndarray]] = {}
    metrics: dict[str, float] = {}
    for model, lists in ranked.items():
        in_order = {user: [item for _, item in sorted(hits)] for user, hits in lists.items()}
        per_user[model] = per_user_metrics(in_order, relevant, ks)
        for key, values in per_user[model].items():
            metrics[f"{model}.{key}"] = float(values.mean())
        log.info("evaluate: %s ndcg@%d=%.4f", model, ks[-1], metrics[f"{model}.ndcg@{ks[-1]}"])
    for df in (users, items, pairs, train):
        df.unpersist()

    n_users = len(relevant)
    metrics["test_users"] = float(n_users)
    path = write_report(
        ctx.cfg.path(ctx.cfg.storage.reports_dir),
        ds=ctx.ds,
        per_user=per_user,
        ks=ks,
        bootstrap_samples=cfg.bootstrap_samples,
        seed=cfg.seed,
        n_users=n_users,
    )
    headline = f"ndcg@{10 if 10 in ks else ks[0]}"
    return StageResult(
        rows_in=n_users,
        metrics=metrics,
        params={f"evaluate.{k}": v for k, v in vars(cfg).items()}
        | {"evaluate.text_model": base_id},
        artifacts={"evaluation_report": path},
        summary={
            "test_users": n_users,
            "relevant_items": sum(len(r) for r in relevant.values()),
            headline: {m: round(metrics[f"{m}.{headline}"], 4) for m in per_user},
            "report": path,
        },
    )


def write_report(
    folder: str,
    *,
    ds: str,
    per_user: Mapping[str, Mapping[str, np.ndarray]],
    ks: Sequence[int],
    bootstrap_samples: int,
    seed: int,
    n_users: int,
) -> str:
    """Write evaluation-<ds>.html (mean and bootstrap 95% interval per model and metric); return its path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"evaluation-{ds}.html")
    columns = [f"{m}@{k}" for k in ks for m in METRICS]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for model, values in per_user.items():
        cells = []
        for column in columns:
            low, high = bootstrap_interval(values[column], samples=bootstrap_samples, seed=seed)
            cells.append(
                f"<td>{values[column].mean():.4f}<br><small>[{low:.4f}, {high:.4f}]</small></td>"
            )
        body.append(f"<tr><th>{html.escape(model)}</th>{''.join(cells)}</tr>")
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>llmrec evaluation {html.escape(ds)}</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px 8px;text-align:right;"
        "border-bottom:1px solid #ddd}small{color:#777}</style></head><body>"
        f"<h1>Offline evaluation, {html.escape(ds)}</h1>"
        f"<p>{n_users} test users; user-temporal holdout; full ranking over the catalog with "
        "training items excluded; relevant = held-out positives on items new to the user. "
        f"Cells: mean and bootstrap 95% interval ({bootstrap_samples} resamples of users).</p>"
        f"<table><tr><th>model</th>{head}</tr>{''.join(body)}</table></body></html>"
    )
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    return path
