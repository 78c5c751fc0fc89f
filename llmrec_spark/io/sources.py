"""Landing sources of raw behaviour events, read as lines for the clean stage.

Every source becomes the same three columns -- `raw` (the record as text), `source_file`,
`line_seq` -- so validation, quarantine and reconciliation are one code path whatever the
format. JSON lines are taken verbatim; Parquet and Delta records are serialised to one JSON
object per record (timestamps as ISO-8601 text), which `clean.parse_raw` maps onto
`schema.RAW_EVENT` under the same JSON type rules as a landing line: a column of a type its
field may not have (e.g. `value` as text, a struct as user_id) quarantines the record as
`bad_type:<field>`, an integer id becomes its decimal text, a missing column leaves its field
null, extra columns stay in the raw record for the quarantine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import DateType, TimestampNTZType, TimestampType
from pyspark.sql.utils import AnalysisException

from llmrec_spark.config import SOURCE_FORMATS
from llmrec_spark.errors import InputError

log = logging.getLogger(__name__)

# The landing Delta table's partition column: the landing (ingest) date.
LANDING_PARTITION = "ds"
_TS_TEXT = "yyyy-MM-dd'T'HH:mm:ss.SSSSSSXXX"


def read_event_lines(
    spark: SparkSession, source_format: str, *, events_root: str, ds: str
) -> DataFrame:
    """The landing events of date `ds` as (raw, source_file, line_seq).

    json / parquet: the files under `<events_root>/ds=<ds>`; delta: the `ds` partition of the
    Delta table at `events_root`. InputError when there is nothing to read.
    """
    if source_format == "json":
        return read_landing_lines(spark, os.path.join(events_root, f"ds={ds}"))
    if source_format == "parquet":
        path = os.path.join(events_root, f"ds={ds}")
        records = _load(
            spark, path, lambda: spark.read.option("recursiveFileLookup", "true").parquet(path)
        )
        return records_to_lines(records.withColumn("_source_file", F.input_file_name()))
    if source_format == "delta":
        return records_to_lines(read_delta_partition(spark, events_root, ds))
    raise InputError(
        f"clean.source_format: choose {', '.join(SOURCE_FORMATS)}, got {source_format!r}"
    )


def read_landing_lines(spark: SparkSession, path: str) -> DataFrame:
    """Every line under `path` (recursively) as raw, source_file, line_seq; InputError if missing."""
    text = _load(spark, path, lambda: spark.read.option("recursiveFileLookup", "true").text(path))
    # Within a file, line_seq follows line order; it breaks ties between identical timestamps.
    return text.select(
        F.col("value").alias("raw"),
        F.input_file_name().alias("source_file"),
        F.monotonically_increasing_id().alias("line_seq"),
    )


def read_delta_partition(spark: SparkSession, path: str, ds: str) -> DataFrame:
    """Rows of landing date `ds` of the Delta table at `path`, plus `_source_file`.

    Uses Delta's Spark reader when its extension is loaded, else the delta-rs snapshot's file
    list (no JVM jars needed). The table must have a `ds` column (its partition column).
    """
    from llmrec_spark.io.tables import delta_extension_available

    if delta_extension_available(spark):
        loaded = _load(spark, path, lambda: spark.read.format("delta").load(path))
        _require_partition_column(path, loaded.columns)
        rows = loaded.where(F.col(LANDING_PARTITION) == ds)
        return rows.drop(LANDING_PARTITION).withColumn("_source_file", F.input_file_name())

    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(path):
        raise InputError(f"no Delta table of landing events at {path}; check storage.landing")
    table = DeltaTable(path)
    partitions = table.metadata().partition_columns
    columns = [field.name for field in table.schema().fields]
    _require_partition_column(path, columns)
    if LANDING_PARTITION in partitions:
        files = table.file_uris(file_pruning_predicate=[(LANDING_PARTITION, "=", ds)])
        if not files:
            raise InputError(f"the Delta table at {path} has no partition ds={ds}")
        rows = spark.read.parquet(*files)
    else:
        rows = spark.read.parquet(*table.file_uris()).where(F.col(LANDING_PARTITION) == ds)
    return rows.drop(LANDING_PARTITION).withColumn("_source_file", F.input_file_name())


def records_to_lines(records: DataFrame) -> DataFrame:
    """Structured records (+ `_source_file`) -> (raw, source_file, line_seq); raw is the record as JSON."""
    fields = [f for f in records.schema.fields if f.name != "_source_file"]
    as_text = [_json_ready(F.col(f"`{f.name}`"), f.dataType).alias(f.name) for f in fields]
    return records.select(
        F.to_json(F.struct(*as_text), {"ignoreNullFields": "true"}).alias("raw"),
        F.col("_source_file").alias("source_file"),
        F.monotonically_increasing_id().alias("line_seq"),
    )


def _json_ready(col: Column, data_type: object) -> Column:
    """Timestamps and dates as ISO-8601 text (what the JSON landing zone carries)."""
    if isinstance(data_type, TimestampType | TimestampNTZType):
        return F.date_format(col, _TS_TEXT)
    if isinstance(data_type, DateType):
        return F.date_format(col, "yyyy-MM-dd")
    return col


def _require_partition_column(path: str, columns: list[str]) -> None:
    if LANDING_PARTITION not in columns:
        raise InputError(
            f"the Delta table of landing events at {path} has no {LANDING_PARTITION!r} column "
            "(the landing date it is partitioned by)"
        )


def _load(spark: SparkSession, path: str, read: Callable[[], DataFrame]) -> DataFrame:
    try:
        return read()
    except AnalysisException as exc:
        missing = ("PATH_NOT_FOUND", "does not exist", "UNABLE_TO_INFER_SCHEMA")
        if any(marker in str(exc) for marker in missing):
            raise InputError(
                f"no landing data at {path}; run `llmrec generate-demo` for demo data "
                "or check storage.landing and clean.source_format"
            ) from None
        raise
