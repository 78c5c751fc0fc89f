"""ALS hyper-parameter search (`llmrec tune-als`): one ALS fit per trial on a temporal
validation split of the training window, scored by full-ranking metrics on the driver, one
nested MLflow run per trial under a parent run. Writes no table."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from pyspark.ml.recommendation import ALSModel
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.config import AlsConfig, AlsSearchConfig, check_als
from llmrec_spark.core.metrics import mean_metrics
from llmrec_spark.core.topn import top_n_block
from llmrec_spark.errors import InputError
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.stages.als import (
    als_blocks,
    als_estimator,
    index_ids,
    interactions,
    model_from_arrays,
    training_window,
)
from llmrec_spark.stages.als_cg import fit_cg_factors, fit_on_driver
from llmrec_spark.stages.splits import user_temporal_split

if TYPE_CHECKING:
    from llmrec_spark.runtime.tracking import Tracker

log = logging.getLogger(__name__)

SEARCHED = ("rank", "reg_param", "alpha", "max_iter")


def tune_als(
    ctx: RunContext, *, trials: int | None = None, tracker: Tracker | None = None
) -> dict[str, Any]:
    """Search ALS settings (`als.search`) on a temporal validation split of the training window
    ending at ctx.ds; one nested MLflow run per trial under a parent run. Returns the trials and
    the best one (by `als.search.metric`); writes no table."""
    from llmrec_spark.runtime.tracking import Tracker, metric_key

    cfg = ctx.cfg
    search = cfg.als.search if trials is None else replace(cfg.als.search, trials=trials)
    # load_config checked the conf; a config built in code, or --trials, was not.
    check_als(replace(cfg.als, search=search))
    ks = sorted({*cfg.evaluate.ks, int(search.metric.partition("@")[2])})
    split = _tuning_split(ctx)
    try:
        results, best, parent = _run_trials(ctx, split, search, ks, tracker or Tracker(cfg))
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


# ---------------------------------------------------------------------------------------------
# The trials


def _run_trials(
    ctx: RunContext,
    split: ValidationSplit,
    search: AlsSearchConfig,
    ks: Sequence[int],
    tracker: Tracker,
) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """Fit and score every trial under one parent MLflow run (a nested run each), then log the
    best to the parent. Returns (trials, best trial, parent run id)."""
    settings = search_trials(search)
    blocks = als_blocks(ctx.spark, ctx.cfg.als)
    log.info(
        "tune-als: %d trials, %d training pairs, %d validation users, metric %s",
        len(settings),
        split.train_pairs,
        len(split.user_ids),
        search.metric,
    )
    results: list[dict[str, Any]] = []
    with tracker.run(f"tune-als {ctx.ds}", tags={"stage": "tune-als", "ds": ctx.ds}) as parent:
        tracker.log_params(
            {f"search.{k}": v for k, v in vars(search).items()}
            | {"validation_users": len(split.user_ids), "train_pairs": split.train_pairs}
        )
        for number, params in enumerate(settings, start=1):
            metrics, seconds = _fit_and_score(replace(ctx.cfg.als, **params), split, blocks, ks)
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
    return results, best, parent


def _fit_and_score(
    trial: AlsConfig, split: ValidationSplit, blocks: int, ks: Sequence[int]
) -> tuple[dict[str, float], float]:
    """(ranking metrics, seconds) of one ALS fit with the `trial` settings on `split`."""
    started = time.perf_counter()
    metrics = score_trial(_fit_model(trial, split, blocks), split, ks)
    return metrics, time.perf_counter() - started


def _fit_model(trial: AlsConfig, split: ValidationSplit, blocks: int) -> ALSModel:
    """The trial's fit on the split's indexed pairs with its `als.solver`, as an ALSModel."""
    if trial.solver != "cg":
        return als_estimator(trial, num_blocks=blocks).fit(split.indexed)
    spark = split.indexed.sparkSession
    if split.train_pairs <= trial.cg_local_max_pairs:
        local: pd.DataFrame = split.indexed.toPandas()
        users, items = fit_on_driver(
            local["user_idx"].to_numpy(np.int64),
            local["item_idx"].to_numpy(np.int64),
            local["weight"].to_numpy(np.float32),
            cfg=trial,
        )
    else:
        users, items = fit_cg_factors(
            spark,
            split.indexed,
            n_users=split.n_users,
            n_items=len(split.item_ids),
            cfg=trial,
            num_blocks=blocks,
        )
    return model_from_arrays(spark, users, items)


# ---------------------------------------------------------------------------------------------
# The validation split and its scoring


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
    n_users: int  # users with a training pair (user_idx 0..n_users-1)


def _tuning_split(ctx: RunContext) -> ValidationSplit:
    """`validation_split` of the ALS training window ending at ctx.ds, with evaluate's split
    settings; InputError when it has no validation users."""
    cfg = ctx.cfg
    events = training_window(ctx.store.read("events_clean"), ctx.ds, cfg.als.train_days)
    split = validation_split(
        events,
        test_fraction=cfg.evaluate.test_fraction,
        positive_min_weight=cfg.evaluate.positive_min_weight,
        min_weight=cfg.als.min_weight,
    )
    if not split.user_ids:
        split.indexed.unpersist()
        raise InputError(
            f"tune-als: no validation users in the {cfg.als.train_days} days up to {ctx.ds} "
            "(users need 3+ training items and a held-out positive); run `llmrec clean` first"
        )
    return split


def validation_split(
    events: DataFrame, *, test_fraction: float, positive_min_weight: float, min_weight: float = 0.0
) -> ValidationSplit:
    """Per-user temporal split of `events` (evaluate's), the training pairs (`als.min_weight`)
    indexed and cached; collects the test users' training items and held-out items to the driver."""
    train, test = user_temporal_split(
        events, test_fraction=test_fraction, positive_min_weight=positive_min_weight
    )
    indexed, users, items = index_ids(interactions(train, min_weight))
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
        n_users=users.count(),
    )


def score_trial(model: ALSModel, split: ValidationSplit, ks: Sequence[int]) -> dict[str, float]:
    """Mean ranking metrics of `model` on `split`'s test users (top max(ks), seen excluded)."""
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
    product, best first, ties to the lower index, the row's `seen` item indices excluded (so
    fewer than k where fewer remain)."""
    out: list[np.ndarray] = []
    for start in range(0, users.shape[0], block_size):
        block = slice(start, start + block_size)
        top, scores = top_n_block(users[block], items, k, exclude=seen[block])  # (block, k)
        out.extend(
            row[np.isfinite(row_scores)] for row, row_scores in zip(top, scores, strict=True)
        )
    return out
