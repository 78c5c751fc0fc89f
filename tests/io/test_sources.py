"""Landing sources besides JSON lines: Parquet files and a Delta table, through the clean stage."""

from __future__ import annotations

import datetime as dt
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyspark.sql import Row
from pyspark.sql import functions as F

from llmrec_spark.errors import ConfigError, InputError
from llmrec_spark.io.sources import records_to_lines
from llmrec_spark.stages.clean import parse_raw, run_clean, validate_events
from tests.conftest import make_config
from tests.stages.test_clean import DS, _ctx, _write_landing, items_df

pytestmark = pytest.mark.spark
TS = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
TS_S = 1_795_428_000  # TS as epoch seconds


def arrow_events(rows: list[dict]) -> pa.Table:
    """Events as Arrow: event_ts a real UTC timestamp, value a number, plus an extra column."""
    schema = pa.schema(
        [
            ("event_id", pa.string()),
            ("user_id", pa.string()),
            ("item_id", pa.string()),
            ("event_type", pa.string()),
            ("event_ts", pa.timestamp("us", tz="UTC")),
            ("value", pa.int32()),
            ("country", pa.string()),
        ]
    )
    base = {"user_id": "u1", "item_id": "i1", "event_type": "view", "event_ts": TS}
    full = [{name: {**base, **row}.get(name) for name in schema.names} for row in rows]
    return pa.Table.from_pylist(full, schema=schema)


def test_records_become_json_lines_that_parse_onto_the_raw_schema(spark):
    records = spark.createDataFrame(
        [Row(event_id="e1", user_id="u1", event_type="rating", event_ts=TS, value=4, country="NL")]
    ).selectExpr("*", "'file:/x.parquet' AS _source_file")
    lines = records_to_lines(records)
    row = lines.first()
    assert row["raw"] == (
        '{"event_id":"e1","user_id":"u1","event_type":"rating",'
        '"event_ts":"2026-11-23T10:00:00.000000Z","value":4,"country":"NL"}'
    )
    assert row["source_file"] == "file:/x.parquet"
    validated = lines.transform(parse_raw).transform(
        validate_events,
        ds=DS,
        known_items=items_df(spark),
        max_field_chars=256,
        max_future_skew_s=3600,
        max_late_days=30,
    )
    got = validated.select(
        "event_id", F.unix_seconds("event_ts").alias("ts"), "value", "reasons"
    ).first()
    assert tuple(got) == ("e1", TS_S, 4.0, ["missing_item"])


def test_a_column_of_a_type_its_field_may_not_have_is_a_bad_type(spark):
    records = spark.createDataFrame(
        [("e1", "u1", "i1", "rating", "2026-11-23T10:00:00Z", "four", "f")],
        "event_id string, user_id string, item_id string, event_type string, event_ts string, "
        "value string, _source_file string",
    )
    parsed = records_to_lines(records).transform(parse_raw).first()
    assert (parsed["malformed"], parsed["bad_types"], parsed["value"]) == (
        False,
        ["bad_type:value"],
        None,
    )
    # A struct id is never stringified; an integer id becomes its decimal text.
    ids = spark.createDataFrame(
        [(Row(id="u00036"), 36, "f")],
        "user_id struct<id: string>, item_id long, _source_file string",
    )
    parsed = records_to_lines(ids).transform(parse_raw).first()
    assert (parsed["user_id"], parsed["item_id"], parsed["bad_types"]) == (
        None,
        "36",
        ["bad_type:user_id"],
    )


def test_parquet_landing_source(spark, tmp_path, store):
    table = arrow_events(
        [
            {"event_id": "e1"},
            {"event_id": "e1"},  # exact duplicate
            {"event_id": "e2", "item_id": "i999"},
            {"event_id": "e3", "user_id": None, "country": "NL"},
            {"event_id": "e4", "event_type": "rating", "value": 4, "item_id": "i2"},
        ]
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _write_landing(tmp_path, DS, {"part-0.parquet": buffer.getvalue()})
    cfg = make_config(tmp_path, "clean.source_format=parquet", "clean.max_quarantine_rate=1.0")
    result = run_clean(_ctx(cfg, spark, store))
    assert (result.rows_in, result.rows_out, result.rows_duplicate, result.rows_quarantined) == (
        5,
        2,
        1,
        2,
    )
    clean_rows = sorted(
        tuple(r)
        for r in store.read("events_clean")
        .select("event_id", "item_id", "event_type", F.unix_seconds("event_ts"), "value", "weight")
        .collect()
    )
    assert clean_rows == [
        ("e1", "i1", "view", TS_S, None, 1.0),
        ("e4", "i2", "rating", TS_S, 4.0, 4.0),
    ]
    quarantine = sorted(
        (r["reasons"], r["raw"], os.path.basename(r["source_file"]))
        for r in store.read("events_quarantine").collect()
    )
    assert quarantine == [
        (
            ["missing_user"],
            '{"event_id":"e3","item_id":"i1","event_type":"view",'
            '"event_ts":"2026-11-23T10:00:00.000000Z","country":"NL"}',
            "part-0.parquet",
        ),
        (
            ["unknown_item"],
            '{"event_id":"e2","user_id":"u1","item_id":"i999","event_type":"view",'
            '"event_ts":"2026-11-23T10:00:00.000000Z"}',
            "part-0.parquet",
        ),
    ]


def test_delta_landing_source_reads_only_the_run_date(spark, tmp_path, store):
    from deltalake import write_deltalake

    today = arrow_events([{"event_id": "t1"}, {"event_id": "t2", "item_id": "i2"}])
    yesterday = arrow_events([{"event_id": "y1"}])
    landing = tmp_path / "landing" / "events"
    for day, table in ((DS, today), ("2026-11-22", yesterday)):
        table = table.append_column("ds", pa.array([day] * table.num_rows))
        write_deltalake(str(landing), table, partition_by=["ds"], mode="append")
    _write_landing(tmp_path, DS, {})
    cfg = make_config(tmp_path, "clean.source_format=delta")
    result = run_clean(_ctx(cfg, spark, store))
    assert (result.rows_in, result.rows_out) == (2, 2)
    assert sorted(r["event_id"] for r in store.read("events_clean").collect()) == ["t1", "t2"]

    with pytest.raises(InputError, match="has no partition ds=2026-11-24"):
        run_clean(_ctx(cfg, spark, store, "2026-11-24"))


def test_missing_delta_or_parquet_source_is_an_input_error(spark, tmp_path, store):
    _write_landing(tmp_path, DS, {})  # catalog, and an empty events/ds=... folder
    delta = make_config(tmp_path, "clean.source_format=delta")
    with pytest.raises(InputError, match=r"no Delta table of landing events at .*events"):
        run_clean(_ctx(delta, spark, store))
    parquet = make_config(tmp_path, "clean.source_format=parquet")
    with pytest.raises(InputError, match=r"no landing data at .*ds=2026-11-23"):
        run_clean(_ctx(parquet, spark, store))


def test_source_format_is_validated(tmp_path):
    with pytest.raises(
        ConfigError, match=r"^clean.source_format: choose json, parquet, delta, got 'csv'$"
    ):
        make_config(tmp_path, "clean.source_format=csv")
