"""The recommend gate: row checks counted the same on both scoring paths, the metric gate."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llmrec_spark.errors import GateError
from llmrec_spark.schema import RECOMMENDATIONS, SCORED_SCHEMA
from llmrec_spark.stages.gate import (
    check_gate,
    check_metric_gate,
    gate_counts,
    gate_report,
    metric_gate,
)
from llmrec_spark.stages.publish import PROP_GATE_METRIC, PROP_GATE_METRIC_VALUE
from tests.conftest import make_config
from tests.stages.test_publish import publish, publish_ctx, recs

pytestmark = pytest.mark.spark


@pytest.mark.parametrize("engine", ["spark", "pandas"])
def test_gate_report_counts_every_check(spark, engine):
    rows = [
        # u1: fine. u2: duplicate item and a rising score. u3: NaN score, seen item at rank 2.
        # u5: ranks 2..3, not 1..N.
        ("u1", 1, "a", 3.0, "als", "m", "d"),
        ("u1", 2, "b", 2.0, "als", "m", "d"),
        ("u2", 1, "a", 1.0, "als", "m", "d"),
        ("u2", 2, "a", 1.5, "als", "m", "d"),
        ("u3", 1, "c", float("nan"), "als", "m", "d"),
        ("u3", 2, "s", 0.5, "als", "m", "d"),
        ("stranger", 1, "a", 1.0, "als", "m", "d"),
        ("u5", 3, "e", 1.0, "als", "m", "d"),
        ("u5", 2, "d", 2.0, "als", "m", "d"),
    ]
    users = [("u1",), ("u2",), ("u3",), ("u4",), ("u5",)]
    seen = [("u3", "s"), ("u1", "z"), ("u3", "s")]

    if engine == "spark":
        report = gate_report(
            recs(spark, rows),
            spark.createDataFrame(users, "user_id string"),
            spark.createDataFrame(seen, "user_id string, item_id string"),
            top_n=2,
        )
        report = report.collect()[0].asDict()
    else:  # the driver path's gate, over the rows it holds in pandas
        report = gate_counts(
            pd.DataFrame(rows, columns=RECOMMENDATIONS.fieldNames()),
            [u for (u,) in users],
            pd.DataFrame(seen, columns=["user_id", "item_id"]),
            top_n=2,
        )

    assert report == {
        "users": 5,
        "missing_users": 1,  # u4
        "unexpected_users": 1,  # stranger
        "duplicate_items": 1,  # u2's second "a"
        "short_lists": 2,  # u2 (1 distinct item), stranger (1 row)
        "bad_ranks": 1,  # u5
        "non_finite_scores": 1,  # u3 rank 1
        "score_increases": 1,  # u2 rank 2 > rank 1
        "seen_items": 1,  # (u3, s)
    }
    with pytest.raises(GateError, match=r"'missing_users' failed: 1 users without .*of 5"):
        check_gate(report, top_n=2)
    clean = dict.fromkeys(report, 0) | {"users": 5, "non_finite_scores": 1}
    with pytest.raises(GateError, match=r"'non_finite_scores' failed: 1 rows whose score"):
        check_gate(clean, top_n=2)


def test_driver_gate_counts_nan_and_null_as_spark_sees_them():
    # Rows scored in pandas reach Spark with NaN as null: non-finite, never an increase; a
    # null seen pair never matches (a join on null keys matches nothing).
    rows = pd.DataFrame(
        {"user_id": ["u", "u"], "rank": [1, 2], "item_id": ["a", None], "score": [1.0, np.nan]}
    )
    seen = pd.DataFrame({"user_id": ["u"], "item_id": [None]})

    report = gate_counts(rows, ["u"], seen, top_n=2)

    assert report["non_finite_scores"] == 1
    assert report["score_increases"] == 0
    assert report["seen_items"] == 0
    assert report["short_lists"] == 1  # one distinct item (the null one does not count)


def test_metric_gate_compares_with_the_last_published_value():
    assert "skipped" in check_metric_gate("hybrid.ndcg@10", None, 0.5, max_drop=0.1)
    assert "nothing published" in check_metric_gate("hybrid.ndcg@10", 0.2, None, max_drop=0.1)
    # floor = 0.5 * (1 - 0.1) = 0.45
    assert "ok" in check_metric_gate("hybrid.ndcg@10", 0.45, 0.5, max_drop=0.1)
    with pytest.raises(
        GateError,
        match=r"'offline_metric' failed: hybrid.ndcg@10 0.4400 is below 0.4500 "
        r"\(last published 0.5000 minus the allowed 10%\)",
    ):
        check_metric_gate("hybrid.ndcg@10", 0.44, 0.5, max_drop=0.1)


def test_metric_gate_reads_mlflow_and_the_served_publish(spark, store, tmp_path, monkeypatch):
    from llmrec_spark.runtime import tracking

    ctx = publish_ctx(spark, store, tmp_path)
    publish(
        ctx,
        "2026-11-23",
        "m3",
        **{PROP_GATE_METRIC: "hybrid.ndcg@10", PROP_GATE_METRIC_VALUE: "0.5"},
    )
    asked = []

    def metrics(cfg, *, stage, ds):
        asked.append((stage, ds))
        return {"hybrid.ndcg_10": 0.3, "als.ndcg_10": 0.9}

    monkeypatch.setattr(tracking, "latest_stage_metrics", metrics)
    ctx.stage_run_id = "stage-run"
    with pytest.raises(GateError, match=r"hybrid.ndcg@10 0.3000 is below 0.4500"):
        metric_gate(ctx)
    assert asked == [("evaluate", "2026-11-23")]

    ctx.cfg = make_config(tmp_path, "recommend.gate_metric=als.ndcg@10")
    assert metric_gate(ctx) == (
        0.9,
        "als.ndcg@10=0.9000: nothing published with this metric before",
    )


def test_both_paths_count_the_same_nulls_nans_and_missing_rows(spark):
    # The executor path (`gate_counts` per partition of rows repartitioned by user, summed)
    # and the driver path (`gate_counts` over all rows) on the same bad rows.
    nan = float("nan")
    rows = [
        ("u1", 1, "a", 2.0, "als"),
        ("u1", 2, "b", nan, "als"),  # NaN after a finite score: non-finite, no increase
        ("u2", 1, None, None, "als"),  # a null item and a null score
        ("u2", 2, "c", 1.0, "als"),  # no increase over the null before it
        ("u2", 3, "d", 1.5, "als"),  # an increase
        ("u3", 1, "a", 1.0, "als"),
        ("u3", 1, "b", 1.0, "als"),  # rank 1 twice
        ("stranger", 1, "a", 1.0, "als"),
    ]
    users = ["u1", "u2", "u3", "u4"]
    seen = [("u1", "b"), ("u2", None), (None, "a")]  # pairs with a null never match
    scored = SCORED_SCHEMA.fieldNames()

    def both(rows, seen):
        on_executors = gate_report(
            spark.createDataFrame(rows, SCORED_SCHEMA),
            spark.createDataFrame([(u,) for u in users], "user_id string"),
            None if seen is None else spark.createDataFrame(seen, "user_id string, item_id string"),
            top_n=2,
        )
        on_driver = gate_counts(
            pd.DataFrame(rows, columns=scored).astype({"score": "float32"}),
            users,
            None if seen is None else pd.DataFrame(seen, columns=["user_id", "item_id"]),
            top_n=2,
        )
        return on_executors.collect()[0].asDict(), on_driver

    on_executors, on_driver = both(rows, seen)
    assert (
        on_executors
        == on_driver
        == {
            "users": 4,
            "missing_users": 1,  # u4
            "unexpected_users": 1,  # stranger
            "duplicate_items": 1,  # u2's null item is not a distinct item
            "short_lists": 2,  # u2 (3 rows), stranger (1 row)
            "bad_ranks": 1,  # u3
            "non_finite_scores": 2,  # u1's NaN, u2's null
            "score_increases": 1,  # u2 rank 3
            "seen_items": 1,  # (u1, b)
        }
    )
    on_executors, on_driver = both(rows, None)
    assert on_executors == on_driver and on_driver["seen_items"] == 0
    # No rows at all: every expected user is missing, nothing else counts.
    on_executors, on_driver = both([], seen)
    assert (
        on_executors
        == on_driver
        == dict.fromkeys(on_driver, 0)
        | {
            "users": 4,
            "missing_users": 4,
        }
    )
