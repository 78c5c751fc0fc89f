"""The recommend stage's gates: checks over the scored rows, and the offline metric.

The row checks are written once, in pandas (`gate_counts`). The driver scoring path calls it
on the rows it holds. The executor path (`gate_report`) repartitions the rows, the seen
pairs and the expected users by user_id, so each user's rows meet in one partition; runs
`gate_counts` per partition (mapInPandas); and sums the partitions' counts: each count is a
sum over users. `check_gate` turns the counts into a verdict; `metric_gate` compares this
run date's offline metric with the one of what is served.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.errors import GateError
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.stages.publish import PROP_GATE_METRIC, PROP_GATE_METRIC_VALUE, published_metadata

log = logging.getLogger(__name__)

# The gate's counts, in `check_gate`'s order after `users` (the expected users).
GATE_COUNTS = (
    "users",
    "missing_users",
    "unexpected_users",
    "duplicate_items",
    "short_lists",
    "bad_ranks",
    "non_finite_scores",
    "score_increases",
    "seen_items",
)
# What a row of `gate_report`'s repartitioned input is (its `part` column).
_RECOMMENDATION, _SEEN, _EXPECTED = range(3)


def count_gate(
    recs: DataFrame | pd.DataFrame, users: DataFrame, seen: DataFrame | None, *, top_n: int
) -> dict[str, int]:
    """The gate's counts over the stage's rows on either scoring path.

    Rows the driver holds (pandas) are counted in the driver (`gate_counts`, with the users and
    seen pairs collected); a DataFrame's by `gate_report` on the executors.
    """
    if isinstance(recs, pd.DataFrame):
        expected: pd.DataFrame = users.toPandas()
        pairs = seen.toPandas() if seen is not None else None
        return gate_counts(recs, expected["user_id"], pairs, top_n=top_n)
    return gate_report(recs, users, seen, top_n=top_n).collect()[0].asDict()


def gate_counts(
    recs: pd.DataFrame, users: Iterable[str], seen: pd.DataFrame | None, *, top_n: int
) -> dict[str, int]:
    """The gate's counts (GATE_COUNTS) over `recs` against the expected `users`.

    `recs` has SCORED_SCHEMA columns, `users` the expected user ids, `seen` (user_id, item_id)
    pairs or None. A NaN score is what a null is in Spark (pandas UDF and pandas rows reach
    Spark with NaN as null): non-finite, and never an increase; a null seen pair never matches.
    """
    expected = pd.Index(pd.unique(pd.Series(list(users), dtype=object)))
    ordered = recs[["user_id", "item_id", "rank", "score"]].sort_values(
        ["user_id", "rank"], kind="stable"
    )
    score = ordered["score"].to_numpy(dtype=np.float64)
    per_user = ordered.groupby("user_id", sort=False, dropna=False).agg(
        rows=("item_id", "size"),
        items=("item_id", "nunique"),
        ranks=("rank", "nunique"),
        min_rank=("rank", "min"),
        max_rank=("rank", "max"),
    )
    rows, items = per_user["rows"], per_user["items"]
    short = (rows != top_n) | (items != top_n)
    bad_ranks = (
        (per_user["ranks"] != rows) | (per_user["min_rank"] != 1) | (per_user["max_rank"] != rows)
    )
    return {
        "users": len(expected),
        "missing_users": int((~expected.isin(per_user.index)).sum()),
        "unexpected_users": int((~per_user.index.isin(expected)).sum()),
        "duplicate_items": int((rows - items).sum()),
        "short_lists": int(short.sum()),
        "bad_ranks": int(bad_ranks.sum()),
        "non_finite_scores": int((~np.isfinite(score)).sum()),
        "score_increases": _score_increases(ordered["user_id"].to_numpy(), score),
        "seen_items": _seen_rows(ordered, seen),
    }


def _score_increases(user: np.ndarray, score: np.ndarray) -> int:
    """Rows whose score exceeds the previous row's of the same user (rows in rank order);
    a NaN on either side is no increase."""
    nan = np.isnan(score)
    same_user = np.zeros(len(score), dtype=bool)
    same_user[1:] = user[1:] == user[:-1]
    prev, prev_nan = np.roll(score, 1), np.roll(nan, 1)
    with np.errstate(invalid="ignore"):
        up = same_user & ~prev_nan & ~nan & (score > prev)
    return int(up.sum())


def _seen_rows(recs: pd.DataFrame, seen: pd.DataFrame | None) -> int:
    """Rows of `recs` whose (user_id, item_id) is a `seen` pair; pairs with a null never match."""
    if seen is not None:
        seen = seen[["user_id", "item_id"]].dropna()
    if seen is None or not len(seen):
        return 0
    pairs = pd.MultiIndex.from_frame(seen)
    return int(np.count_nonzero(pd.MultiIndex.from_frame(recs[["user_id", "item_id"]]).isin(pairs)))


def gate_report(
    recs: DataFrame, users: DataFrame, seen: DataFrame | None, *, top_n: int
) -> DataFrame:
    """One row of the gate's counts (GATE_COUNTS) over `recs` (SCORED_SCHEMA rows) against the
    expected `users`: `gate_counts` per partition of the rows, users and seen pairs
    repartitioned by user_id, summed.
    """
    empty = F.lit(None)
    tagged = recs.select(
        F.lit(_RECOMMENDATION).alias("part"),
        "user_id",
        "item_id",
        F.col("rank").cast("int").alias("rank"),
        F.col("score").cast("double").alias("score"),
    )
    expected = users.select(
        F.lit(_EXPECTED).alias("part"),
        "user_id",
        empty.cast("string").alias("item_id"),
        empty.cast("int").alias("rank"),
        empty.cast("double").alias("score"),
    )
    tagged = tagged.unionByName(expected)
    if seen is not None:
        tagged = tagged.unionByName(
            seen.select(
                F.lit(_SEEN).alias("part"),
                "user_id",
                "item_id",
                empty.cast("int").alias("rank"),
                empty.cast("double").alias("score"),
            )
        )
    counts = tagged.repartition("user_id").mapInPandas(
        functools.partial(_count_partition, top_n=top_n),
        schema=", ".join(f"{name} long" for name in GATE_COUNTS),
    )
    return counts.agg(
        *(F.coalesce(F.sum(name), F.lit(0)).cast("long").alias(name) for name in GATE_COUNTS)
    )


def _count_partition(batches: Iterable[pd.DataFrame], *, top_n: int) -> Iterator[pd.DataFrame]:
    """`gate_counts` over one partition of `gate_report`'s tagged rows: one row of counts."""
    frames = list(batches)
    if not frames:
        return
    tagged = pd.concat(frames, ignore_index=True)
    part = tagged["part"]
    counts = gate_counts(
        tagged[part == _RECOMMENDATION],
        tagged.loc[part == _EXPECTED, "user_id"],
        tagged.loc[part == _SEEN, ["user_id", "item_id"]],
        top_n=top_n,
    )
    yield pd.DataFrame([counts], columns=list(GATE_COUNTS))


def check_gate(report: dict[str, int], *, top_n: int) -> None:
    """Raise GateError naming the first failed check of the gate's counts, with its count.

    `report`: the dict of `gate_counts`, or of the row `gate_report` returns.
    """
    users = report["users"]
    checks = [
        ("missing_users", f"users without recommendations (threshold 0 of {users})"),
        ("unexpected_users", "users with recommendations who are not known users (threshold 0)"),
        ("duplicate_items", "repeated items within users' lists (threshold 0)"),
        ("short_lists", f"users with fewer than {top_n} distinct items (threshold 0 of {users})"),
        ("bad_ranks", "users whose ranks are not 1..N (threshold 0)"),
        ("non_finite_scores", "rows whose score is null, NaN or infinite (threshold 0)"),
        ("score_increases", "rows whose score exceeds the previous rank's (threshold 0)"),
        ("seen_items", "recommended items the user already interacted with (threshold 0)"),
    ]
    for key, what in checks:
        if report.get(key):
            raise GateError(f"recommend gate '{key}' failed: {report[key]} {what}")


def check_metric_gate(
    metric: str, current: float | None, previous: float | None, *, max_drop: float
) -> str:
    """Raise GateError when `current` < `previous` * (1 - max_drop); else return a verdict line.

    `current` is the evaluate stage's value for this run date, `previous` the value recorded
    when the table was last published; either may be missing (then the check passes).
    """
    if current is None:
        return f"{metric}: no evaluation of this run date found; metric check skipped"
    if previous is None:
        return f"{metric}={current:.4f}: nothing published with this metric before"
    floor = previous * (1.0 - max_drop)
    if current < floor:
        raise GateError(
            f"recommend gate 'offline_metric' failed: {metric} {current:.4f} is below "
            f"{floor:.4f} (last published {previous:.4f} minus the allowed {max_drop:.0%})"
        )
    return f"{metric}={current:.4f} vs last published {previous:.4f} (floor {floor:.4f}): ok"


def metric_gate(ctx: RunContext) -> tuple[float | None, str]:
    """Compare this run date's evaluate metric with the last published one: (value, verdict).

    Raises GateError on a regression beyond `recommend.max_metric_drop`. The current value is
    read from MLflow (the evaluate stage runs before recommend in the nightly), the previous
    from the metadata of the publish that `recommendations_latest` serves.
    """
    from llmrec_spark.runtime.tracking import latest_stage_metrics, metric_key

    cfg = ctx.cfg.recommend
    if not cfg.gate_metric:
        return None, "metric gate off (recommend.gate_metric is empty)"
    metrics = (
        latest_stage_metrics(ctx.cfg, stage="evaluate", ds=ctx.ds) if ctx.stage_run_id else None
    )
    current = (metrics or {}).get(metric_key(cfg.gate_metric))
    served = published_metadata(ctx.store, "recommendations_latest")
    previous = None
    if served.get(PROP_GATE_METRIC) == cfg.gate_metric and served.get(PROP_GATE_METRIC_VALUE):
        previous = float(served[PROP_GATE_METRIC_VALUE])
    verdict = check_metric_gate(cfg.gate_metric, current, previous, max_drop=cfg.max_metric_drop)
    log.info("recommend: metric gate: %s", verdict)
    return current, verdict
