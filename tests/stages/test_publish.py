"""Publishing recommendations: crash safety, latest table, properties, retention, gate."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
from deltalake import DeltaTable
from pyspark.testing import assertDataFrameEqual

from llmrec_spark.errors import GateError
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.schema import RECOMMENDATIONS
from llmrec_spark.stages.recommend import (
    PROP_DS,
    PROP_EVENTS_THROUGH,
    PROP_GATE_METRIC,
    PROP_GATE_METRIC_VALUE,
    PROP_MLFLOW_RUN_ID,
    PROP_MODEL_VERSION,
    check_gate,
    check_metric_gate,
    gate_counts,
    gate_report,
    metric_gate,
    publish_recommendations,
    published_metadata,
)
from tests.conftest import make_config

pytestmark = pytest.mark.spark


def recs(spark, rows):
    return spark.createDataFrame(rows, RECOMMENDATIONS)


def day(ds: str, version: str, users=("u00042", "u00043")) -> list[tuple]:
    """Two ranked items per user: (user, rank, item, score, source, model_version, ds)."""
    rows = []
    for k, user in enumerate(users):
        rows.append((user, 1, f"i{k}a", 2.0, "hybrid", version, ds))
        rows.append((user, 2, f"i{k}b", 1.5, "als", version, ds))
    return rows


def parquet_files(folder: str) -> set[str]:
    return {
        os.path.relpath(os.path.join(d, f), folder)
        for d, _, files in os.walk(folder)
        if "_delta_log" not in d
        for f in files
        if f.endswith(".parquet")
    }


def test_crash_before_commit_leaves_previous_rows_and_vacuum_removes_the_files(
    spark, store, monkeypatch
):
    before = recs(spark, day("2026-11-23", "m1"))
    version = store.overwrite("recommendations", before, partitions={"ds": "2026-11-23"})
    folder = store.path("recommendations")
    committed = parquet_files(folder)

    def crash(*args, **kwargs):
        raise RuntimeError("driver died before the Delta commit")

    # The Parquet files of the new write are in the table folder when the commit fails.
    monkeypatch.setattr(DeltaTable, "create_write_transaction", crash)
    with pytest.raises(RuntimeError, match="before the Delta commit"):
        store.overwrite(
            "recommendations",
            recs(spark, day("2026-11-23", "m2", users=("u00042", "u00043", "u00044"))),
            partitions={"ds": "2026-11-23"},
        )
    monkeypatch.undo()

    orphans = parquet_files(folder) - committed
    assert orphans, "the crashed write should have left its Parquet files behind"
    assert store.version("recommendations") == version
    assertDataFrameEqual(store.read("recommendations"), before)
    files = DeltaTable(folder).file_uris()
    got = pads.dataset(files, format="parquet").to_table().to_pydict()
    assert sorted(set(got["model_version"])) == ["m1"] and len(got["user_id"]) == 4

    removed = store.vacuum("recommendations", retention_hours=0)
    assert {os.path.relpath(r, folder) if os.path.isabs(r) else r for r in removed} == orphans
    assert parquet_files(folder) == committed
    assertDataFrameEqual(store.read("recommendations"), before)


def publish_ctx(spark, store, tmp_path, *overrides) -> RunContext:
    cfg = make_config(
        tmp_path, "recommend.retention_days=2", "recommend.vacuum_retention_hours=0", *overrides
    )
    return RunContext(cfg=cfg, spark=spark, store=store, ds="2026-11-20")


def publish(ctx: RunContext, ds: str, version: str, **extra: str) -> dict:
    ctx.ds = ds
    return publish_recommendations(
        ctx,
        recs(ctx.spark, day(ds, version)),
        metadata={
            PROP_MODEL_VERSION: version,
            PROP_MLFLOW_RUN_ID: f"run-{version}",
            PROP_EVENTS_THROUGH: ds,
            **extra,
        },
    )


def test_publish_serves_the_newest_date_and_applies_retention(spark, store, tmp_path):
    ctx = publish_ctx(spark, store, tmp_path)
    publish(ctx, "2026-11-20", "m0")
    publish(ctx, "2026-11-21", "m1")
    # 2026-11-23 with retention 2 days: partitions before 2026-11-21 are dropped and vacuumed.
    out = publish(ctx, "2026-11-23", "m3")

    assert out["latest_ds"] == "2026-11-23"
    assert out["dropped_partitions"] == ["2026-11-20"]
    assert out["vacuumed_files"] > 0
    assert not [f for f in parquet_files(store.path("recommendations")) if "2026-11-20" in f]
    assertDataFrameEqual(
        store.read("recommendations"),
        recs(spark, day("2026-11-21", "m1") + day("2026-11-23", "m3")),
    )
    assertDataFrameEqual(store.read("recommendations_latest"), recs(spark, day("2026-11-23", "m3")))
    for table in ("recommendations", "recommendations_latest"):
        served = published_metadata(store, table)
        assert served[PROP_DS] == "2026-11-23", table
        assert served[PROP_MODEL_VERSION] == "m3"
        assert served[PROP_MLFLOW_RUN_ID] == "run-m3"
    # Each partition's metadata is still found after later publishes and the retention commit.
    assert published_metadata(store, "recommendations", ds="2026-11-21")[PROP_MODEL_VERSION] == "m1"
    # One commit per table carries the rows and the metadata naming them.
    for table, version in (
        ("recommendations", out["version"]),
        ("recommendations_latest", out["latest_version"]),
    ):
        commit = next(c for c in DeltaTable(store.path(table)).history() if c["version"] == version)
        assert commit["operation"] == "WRITE", table
        assert commit[PROP_DS] == "2026-11-23" and commit[PROP_MODEL_VERSION] == "m3", table
    # Column comments from schema.py reach the Delta schema of both tables.
    latest = DeltaTable(store.path("recommendations_latest"))
    comments = {f.name: f.metadata.get("comment") for f in latest.schema().fields}
    assert comments["rank"] == "1 = best" and comments["ds"].startswith("run date")

    # Rerunning an older date replaces its partition only: the latest table stays on 11-23.
    out = publish(ctx, "2026-11-21", "m1b")
    assert out["latest_ds"] == "2026-11-23"
    assertDataFrameEqual(store.read("recommendations_latest"), recs(spark, day("2026-11-23", "m3")))
    assert published_metadata(store, "recommendations_latest")[PROP_MODEL_VERSION] == "m3"
    assert published_metadata(store, "recommendations")[PROP_MODEL_VERSION] == "m1b"
    assert sorted(
        {
            r["model_version"]
            for r in store.read("recommendations", where={"ds": "2026-11-21"}).collect()
        }
    ) == ["m1b"]


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
