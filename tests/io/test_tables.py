"""The embedded Delta engine: atomic per-partition overwrite, readable by delta-rs and pyarrow."""

import datetime as dt
import os

import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.testing import assertDataFrameEqual

from llmrec_spark.io.tables import open_store
from llmrec_spark.schema import RECOMMENDATIONS

pytestmark = pytest.mark.spark


def recs(spark, rows):
    return spark.createDataFrame(rows, RECOMMENDATIONS)


def test_overwrite_one_date_leaves_other_dates(spark, store):
    day1 = [
        ("u1", 1, "i1", 0.9, "als", "m1", "2026-11-22"),
        ("u1", 2, "i2", 0.5, "als", "m1", "2026-11-22"),
    ]
    day2 = [("u2", 1, "i3", 0.7, "popular", "m1", "2026-11-23")]
    assert store.overwrite("recommendations", recs(spark, day1 + day2)) == 0
    new_day2 = [
        ("u2", 1, "i9", 0.8, "hybrid", "m2", "2026-11-23"),
        ("u3", 1, "i4", 0.1, "text", "m2", "2026-11-23"),
    ]
    assert (
        store.overwrite("recommendations", recs(spark, new_day2), partitions={"ds": "2026-11-23"})
        == 1
    )
    assertDataFrameEqual(store.read("recommendations"), recs(spark, day1 + new_day2))
    assertDataFrameEqual(
        store.read("recommendations", where={"ds": "2026-11-22"}), recs(spark, day1)
    )


def test_rows_outside_the_replaced_partition_are_refused(spark, store):
    store.overwrite(
        "recommendations", recs(spark, [("u1", 1, "i1", 0.9, "als", "m1", "2026-11-22")])
    )
    stray = recs(spark, [("u1", 1, "i1", 0.9, "als", "m1", "2026-11-21")])
    with pytest.raises(ValueError, match="fall outside the partitions being replaced"):
        store.overwrite("recommendations", stray, partitions={"ds": "2026-11-22"})
    assert store.version("recommendations") == 0
    assert [r.ds for r in store.read("recommendations").collect()] == ["2026-11-22"]


def test_delta_rs_and_pyarrow_read_what_spark_wrote(spark, store):
    rows = [
        ("u1", 1, "i1", 0.5, "als", "m1", "2026-11-22"),
        ("u2", 1, "i2", 0.25, "text", "m1", "2026-11-23"),
    ]
    store.overwrite("recommendations", recs(spark, rows), metadata={"model_version": "m1"})
    table = DeltaTable(store.path("recommendations"))
    assert table.metadata().partition_columns == ["ds"]
    assert table.history(1)[0]["model_version"] == "m1"
    files = table.file_uris(file_pruning_predicate=[("ds", "=", "2026-11-23")])
    got = pads.dataset(files, format="parquet").to_table().to_pydict()
    assert got["user_id"] == ["u2"] and got["item_id"] == ["i2"] and got["score"] == [0.25]
    comments = {f.name: f.metadata.get("comment") for f in table.schema().fields}
    assert comments["rank"] == "1 = best"


def test_rows_held_by_the_driver_are_written_as_spark_writes_them(spark, store):
    day1 = [("u1", 1, "i1", 0.5, "als", "m1", "2026-11-22")]
    store.overwrite("recommendations", recs(spark, day1))
    day2 = pd.DataFrame(
        {  # columns out of order, pandas' default int64 / float64: conformed to the schema
            "ds": ["2026-11-23", "2026-11-23"],
            "user_id": ["u2", "u3"],
            "rank": [1, 1],
            "item_id": ["i2", "i3"],
            "score": [0.25, 0.75],
            "source": ["text", "hybrid"],
            "model_version": ["m2", "m2"],
        }
    )

    version = store.overwrite("recommendations", day2, partitions={"ds": "2026-11-23"})

    assert version == 1
    expected = day1 + [
        ("u2", 1, "i2", 0.25, "text", "m2", "2026-11-23"),
        ("u3", 1, "i3", 0.75, "hybrid", "m2", "2026-11-23"),
    ]
    assertDataFrameEqual(store.read("recommendations"), recs(spark, expected))
    table = DeltaTable(store.path("recommendations"))
    spark_file, pandas_file = (
        table.file_uris(file_pruning_predicate=[("ds", "=", ds)])
        for ds in ("2026-11-22", "2026-11-23")
    )
    by_delta_rs = pads.dataset(pandas_file, format="parquet").to_table().to_pydict()
    assert by_delta_rs["item_id"] == ["i2", "i3"] and by_delta_rs["score"] == [0.25, 0.75]
    assert [os.path.basename(os.path.dirname(f[0])) for f in (spark_file, pandas_file)] == [
        "ds=2026-11-22",
        "ds=2026-11-23",
    ]
    physical = [pq.read_schema(f[0].removeprefix("file://")) for f in (spark_file, pandas_file)]
    # The same columns and types as Spark's files (the partition column only in the path).
    assert [(f.name, f.type) for f in physical[1]] == [(f.name, f.type) for f in physical[0]]
    assert "ds" not in physical[1].names

    stray = day2.assign(ds="2026-11-24")
    with pytest.raises(ValueError, match="fall outside the partitions being replaced"):
        store.overwrite("recommendations", stray, partitions={"ds": "2026-11-23"})
    with pytest.raises(ValueError, match=r"lack columns \['source'\]"):
        store.overwrite("recommendations", day2.drop(columns="source"))
    assert store.version("recommendations") == 1

    # No rows: no files, and the overwrite still removes the partition it replaces.
    assert store.overwrite("recommendations", day2.iloc[:0], partitions={"ds": "2026-11-23"}) == 2
    assertDataFrameEqual(store.read("recommendations"), recs(spark, day1))


def test_timestamps_round_trip_as_int64_micros(spark, store):
    ts = dt.datetime(2026, 11, 23, 1, 2, 3, 456000)
    row = ("e1", "u1", "i1", "view", ts, None, None, 1.0, "2026-11-23", "2026-11-23")
    df = spark.createDataFrame([row], store.spec("events_clean").schema)
    store.overwrite("events_clean", df, partitions={"ingest_ds": "2026-11-23"})
    assert store.read("events_clean").first()["event_ts"] == ts
    table = DeltaTable(store.path("events_clean"))
    arrow = pads.dataset(table.file_uris(), format="parquet").to_table()
    assert str(arrow.schema.field("event_ts").type).startswith("timestamp[us")


def test_append_adds_rows_in_one_version_each(spark, store):
    assert store.read("pipeline_runs").count() == 0
    assert not store.exists("pipeline_runs")
    assert store.version("pipeline_runs") is None
    schema = store.spec("pipeline_runs").schema
    started = dt.datetime(2026, 11, 23, 2, 0, 0)
    first = (
        "2026-11-23",
        "clean",
        "ok",
        10,
        7,
        1,
        1,
        1,
        2.5,
        started,
        "run1",
        "",
        "2026-11-23",
        None,
    )
    second = (
        "2026-11-23",
        "embed",
        "failed",
        None,
        None,
        None,
        None,
        None,
        0.5,
        started,
        "run2",
        "boom",
        None,
        "clean@2026-11-22",
    )
    assert store.append("pipeline_runs", spark.createDataFrame([first], schema)) == 0
    assert store.append("pipeline_runs", spark.createDataFrame([second], schema)) == 1
    got = sorted(store.read("pipeline_runs").collect(), key=lambda r: r["stage"])
    assert [(r["stage"], r["status"], r["rows_in"], r["message"]) for r in got] == [
        ("clean", "ok", 10, ""),
        ("embed", "failed", None, "boom"),
    ]
    assert [(r["events_through"], r["stale_inputs"]) for r in got] == [
        ("2026-11-23", None),
        (None, "clean@2026-11-22"),
    ]


def test_a_table_of_an_older_release_gains_the_new_nullable_columns(spark, store):
    import pyarrow as pa
    from deltalake import write_deltalake
    from pyspark.sql.pandas.types import to_arrow_schema
    from pyspark.sql.types import StructType

    # pipeline_runs as the release before events_through / stale_inputs wrote it
    old_columns = store.spec("pipeline_runs").schema.fields[:-2]
    started = dt.datetime(2026, 11, 22, 2, 0, 0)
    old_row = ("2026-11-22", "clean", "ok", 10, 7, 1, 1, 1, 2.5, started, "run0", "")
    old_schema = StructType(old_columns)
    old = spark.createDataFrame([old_row], old_schema).toPandas()
    write_deltalake(
        store.path("pipeline_runs"),
        pa.Table.from_pandas(old, schema=to_arrow_schema(old_schema), preserve_index=False),
        partition_by=["ds"],
    )
    new_row = (*old_row[:10], "run1", "", "2026-11-23", None)
    store.append(
        "pipeline_runs", spark.createDataFrame([new_row], store.spec("pipeline_runs").schema)
    )

    got = sorted(store.read("pipeline_runs").collect(), key=lambda r: r["mlflow_run_id"])
    assert [(r["mlflow_run_id"], r["events_through"]) for r in got] == [
        ("run0", None),
        ("run1", "2026-11-23"),
    ]
    operations = [h["operation"] for h in DeltaTable(store.path("pipeline_runs")).history()]
    assert operations[:2] == ["WRITE", "ADD COLUMN"]


def test_vacuum_removes_uncommitted_and_replaced_files(spark, store):
    first = recs(spark, [("u1", 1, "i1", 0.9, "als", "m1", "2026-11-22")])
    store.overwrite("recommendations", first)
    store.overwrite("recommendations", first, partitions={"ds": "2026-11-22"})
    orphan = os.path.join(store.path("recommendations"), "ds=2026-11-22", "part-orphan.parquet")
    with open(orphan, "wb") as fh:
        fh.write(b"crash between write and commit")
    removed = store.vacuum("recommendations", retention_hours=0)
    assert any("part-orphan" in r for r in removed)
    assert len(removed) == 2  # the replaced file and the orphan
    assertDataFrameEqual(store.read("recommendations"), first)


def test_auto_engine_is_embedded_without_delta_jars(spark, tmp_path):
    assert open_store(spark, str(tmp_path / "lake")).engine_name == "embedded"
