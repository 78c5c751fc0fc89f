"""Publishing recommendations: crash safety, latest table, properties, retention."""

from __future__ import annotations

import os

import pyarrow.dataset as pads
import pytest
from deltalake import DeltaTable
from pyspark.testing import assertDataFrameEqual

from llmrec_spark.runtime.context import RunContext
from llmrec_spark.schema import RECOMMENDATIONS
from llmrec_spark.stages.publish import (
    PROP_DS,
    PROP_EVENTS_THROUGH,
    PROP_MLFLOW_RUN_ID,
    PROP_MODEL_VERSION,
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


def test_every_registered_model_has_a_key_in_the_published_commit():
    # A stage that registers a model names it in the publish's metadata; a registered model
    # without a key failed the publish (KeyError) after the night's scores were computed.
    from llmrec_spark.runtime.registry import REGISTERED_ARTIFACTS
    from llmrec_spark.stages.publish import PROP_REGISTERED

    assert set(PROP_REGISTERED) == set(REGISTERED_ARTIFACTS)
    assert PROP_REGISTERED["vae_model"] == "llmrec.vae_model"
