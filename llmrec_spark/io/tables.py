"""The table layer: Delta tables under one lakehouse root, behind one interface, two engines.

* `SparkDeltaEngine` -- Delta's own Spark extension is on the classpath (Databricks, or
  `--packages io.delta:delta-spark_2.12:3.x`): `format("delta")` and `replaceWhere`.
* `EmbeddedDeltaEngine` -- no Delta jars (no Maven here, nor on many locked-down clusters):
  executors write Parquet in parallel into a staging folder (or the driver writes rows it
  already holds as a pandas frame, with pyarrow), the driver moves the files into the table
  folder and commits one Delta transaction with delta-rs. A per-partition
  overwrite is one atomic commit (`partition_filters`), so readers see the old rows or the
  new rows, never a mix. Files moved but never committed are invisible and removed by
  `vacuum`.

Both write standard Delta: either engine, delta-rs, Polars and DuckDB read the result.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.parse
import uuid
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from llmrec_spark.errors import InputError
from llmrec_spark.faults import crash_point
from llmrec_spark.schema import TABLES, TableSpec

log = logging.getLogger(__name__)

PartitionValues = Mapping[str, str | Sequence[str]]
# What a write takes: a DataFrame, or rows the driver already holds (written without a Spark job
# by the embedded engine).
Rows: TypeAlias = DataFrame | pd.DataFrame


class TableStore(ABC):
    """Read and write the product's Delta tables by name."""

    engine_name = "abstract"

    def __init__(self, spark: SparkSession, root: str) -> None:
        self.spark = spark
        self.root = root.rstrip("/")

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def spec(self, name: str) -> TableSpec:
        if name not in TABLES:
            raise KeyError(f"unknown table {name!r}; known: {', '.join(TABLES)}")
        return TABLES[name]

    @abstractmethod
    def exists(self, name: str) -> bool: ...

    @abstractmethod
    def version(self, name: str) -> int | None:
        """The table's latest Delta version, or None when it does not exist yet."""

    @abstractmethod
    def read(self, name: str, where: PartitionValues | None = None) -> DataFrame:
        """The table (optionally only some partitions) as a DataFrame; empty if it does not exist."""

    def partition_values(self, name: str, column: str) -> set[str]:
        """The values of partition column `column` that hold rows (from the Delta log if it can)."""
        rows = self.read(name).select(column).distinct().collect()
        return {row[column] for row in rows if row[column] is not None}

    @abstractmethod
    def overwrite(
        self,
        name: str,
        df: Rows,
        partitions: PartitionValues | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> int:
        """Atomically replace the given partitions (all rows when None) with `df`; returns the version."""

    @abstractmethod
    def append(self, name: str, df: Rows, metadata: Mapping[str, str] | None = None) -> int:
        """Atomically add the rows of `df`; returns the new version."""

    @abstractmethod
    def properties(self, name: str) -> dict[str, str]:
        """The table's properties (Delta `configuration`); empty when it does not exist."""

    @abstractmethod
    def set_properties(self, name: str, properties: Mapping[str, str]) -> int:
        """Set table properties in one commit; returns the new version."""

    @abstractmethod
    def commit_metadata(self, name: str) -> list[dict[str, str]]:
        """The metadata each commit was written with (`overwrite`/`append`'s `metadata`), newest first.

        Commits written without metadata (schema changes, vacuum) give empty dicts.
        """

    @abstractmethod
    def drop_partitions_before(self, name: str, column: str, value: str) -> list[str]:
        """Remove, in one commit, every partition whose `column` sorts before `value`; returns them."""

    @abstractmethod
    def vacuum(self, name: str, retention_hours: int = 168) -> list[str]:
        """Delete files that no version within `retention_hours` references; returns their paths."""

    def empty(self, name: str) -> DataFrame:
        return self.spark.createDataFrame([], self.spec(name).schema)

    def conform(self, name: str, df: DataFrame) -> DataFrame:
        """Select and cast `df`'s columns to the table schema, in order; missing columns are an error."""
        schema = self.spec(name).schema
        _check_columns(name, df.columns, schema)
        return df.select([F.col(f.name).cast(f.dataType).alias(f.name) for f in schema.fields])

    def conform_rows(self, name: str, rows: pd.DataFrame) -> pa.Table:
        """`conform` for rows held by the driver: an Arrow table of the table schema, in order."""
        from pyspark.sql.pandas.types import to_arrow_schema

        schema = self.spec(name).schema
        _check_columns(name, rows.columns, schema)
        names = [f.name for f in schema.fields]
        table = pa.Table.from_pandas(
            rows[names], schema=to_arrow_schema(schema), preserve_index=False
        )
        return table.replace_schema_metadata(None)  # no pandas metadata in the Parquet footers

    def as_dataframe(self, name: str, df: Rows) -> DataFrame:
        """`df` as a DataFrame of the table schema (driver-held rows become a local DataFrame)."""
        if isinstance(df, pd.DataFrame):
            return self.spark.createDataFrame(
                self.conform_rows(name, df).to_pandas(), self.spec(name).schema
            )
        return self.conform(name, df)


class EmbeddedDeltaEngine(TableStore):
    """Spark writes Parquet, delta-rs commits the transaction on the driver."""

    engine_name = "embedded"

    def _delta(self, name: str):
        from deltalake import DeltaTable

        path = self.path(name)
        if not DeltaTable.is_deltatable(path):
            return None
        return DeltaTable(path)

    def exists(self, name: str) -> bool:
        return self._delta(name) is not None

    def version(self, name: str) -> int | None:
        table = self._delta(name)
        return None if table is None else table.version()

    def partition_values(self, name: str, column: str) -> set[str]:
        table = self._delta(name)
        if table is None:
            return set()
        return {p[column] for p in table.partitions() if p.get(column) is not None}

    def read(self, name: str, where: PartitionValues | None = None) -> DataFrame:
        spec = self.spec(name)
        table = self._delta(name)
        if table is None:
            return self.empty(name)
        filters = _partition_filters(where) if where else None
        files = table.file_uris(file_pruning_predicate=filters)
        if not files:
            return self.empty(name)
        df = self.spark.read.schema(spec.schema).option("basePath", self.path(name)).parquet(*files)
        return df.select([f.name for f in spec.schema.fields])

    def overwrite(
        self,
        name: str,
        df: Rows,
        partitions: PartitionValues | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> int:
        return self._commit(name, df, "overwrite", partitions, metadata)

    def append(self, name: str, df: Rows, metadata: Mapping[str, str] | None = None) -> int:
        return self._commit(name, df, "append", None, metadata)

    def _commit(
        self,
        name: str,
        df: Rows,
        mode: str,
        partitions: PartitionValues | None,
        metadata: Mapping[str, str] | None,
    ) -> int:
        from deltalake import DeltaTable, Schema
        from deltalake.transaction import CommitProperties, create_table_with_add_actions

        spec = self.spec(name)
        conformed = (
            self.conform_rows(name, df) if isinstance(df, pd.DataFrame) else self.conform(name, df)
        )
        table_path = self.path(name)
        started = time.perf_counter()
        adds = self._write_files(table_path, conformed, spec.partition_by)
        if partitions:
            _check_partition_values(name, adds, partitions)
        schema = Schema.from_json(spec.schema.json())
        commit = CommitProperties(custom_metadata=_custom_metadata(metadata))
        if DeltaTable.is_deltatable(table_path):
            self._add_missing_columns(name)
        if not DeltaTable.is_deltatable(table_path):
            create_table_with_add_actions(
                table_path,
                schema,
                adds,
                mode="error",
                partition_by=list(spec.partition_by) or None,
                name=name,
                description=spec.description,
                commit_properties=commit,
            )
        else:
            DeltaTable(table_path).create_write_transaction(
                adds,
                mode=mode,
                schema=schema,
                partition_by=list(spec.partition_by) or None,
                partition_filters=_partition_filters(partitions) if partitions else None,
                commit_properties=commit,
            )
        version = DeltaTable(table_path).version()
        rows = sum(json.loads(a.stats).get("numRecords", 0) for a in adds)
        log.info(
            "%s: %s %d rows in %d files -> version %d (%.1fs, embedded engine)",
            name,
            mode,
            rows,
            len(adds),
            version,
            time.perf_counter() - started,
        )
        crash_point(f"after-commit:{name}")
        return version

    def _add_missing_columns(self, name: str) -> None:
        """Add, in one schema commit, the spec's nullable columns a table written by an older
        release lacks (a data commit with a wider schema would not widen the table's own)."""
        from deltalake import DeltaTable, Field

        table = DeltaTable(self.path(name))
        present = {f.name for f in table.schema().fields}
        missing = [f for f in self.spec(name).schema.fields if f.name not in present]
        if not missing:
            return
        if any(not f.nullable for f in missing):
            raise InputError(
                f"table {name} lacks required columns {[f.name for f in missing]}; "
                "it was written by an incompatible release"
            )
        table.alter.add_columns([Field.from_json(f.json()) for f in missing])
        log.info("%s: added columns %s", name, [f.name for f in missing])

    def _write_files(
        self, table_path: str, rows: DataFrame | pa.Table, partition_by: Sequence[str]
    ) -> list[Any]:
        """Write `rows` as Parquet under the table folder; return one AddAction per file.

        A DataFrame is written by Spark's tasks, an Arrow table (rows the driver holds) by
        pyarrow in the driver; either way into a staging folder first, in the same layout
        (hive-style partition folders, snappy Parquet, the same column types), then moved into
        the table folder. An empty Arrow table writes no files: its overwrite only removes
        what it replaces.
        """
        from deltalake.transaction import AddAction

        token = uuid.uuid4().hex
        staging_rel = f"_staging/{token}"
        fs, base = pafs.FileSystem.from_uri(_arrow_uri(table_path))
        if isinstance(rows, pa.Table):
            if rows.num_rows == 0:
                return []
            pq.write_to_dataset(
                rows,
                f"{base}/{staging_rel}",
                partition_cols=list(partition_by) or None,
                filesystem=fs,
                basename_template=f"part-{token}-{{i}}.snappy.parquet",
                compression="snappy",
            )
        else:
            writer = rows.write.mode("errorifexists")
            if partition_by:
                writer = writer.partitionBy(*partition_by)
            writer.parquet(f"{table_path}/{staging_rel}")

        staged = fs.get_file_info(pafs.FileSelector(f"{base}/{staging_rel}", recursive=True))
        adds = []
        for info in staged:
            if info.type != pafs.FileType.File or not info.base_name.endswith(".parquet"):
                continue
            rel = info.path[len(f"{base}/{staging_rel}/") :]
            target = f"{base}/{rel}"
            fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            fs.move(info.path, target)
            num_records = pq.read_metadata(target, filesystem=fs).num_rows
            adds.append(
                AddAction(
                    path=urllib.parse.quote(rel, safe="/=-_.:"),
                    size=info.size,
                    partition_values=_partition_values_from_path(rel),
                    modification_time=int(time.time() * 1000),
                    data_change=True,
                    stats=json.dumps({"numRecords": num_records}),
                )
            )
        fs.delete_dir(f"{base}/{staging_rel}")
        return adds

    def properties(self, name: str) -> dict[str, str]:
        table = self._delta(name)
        return {} if table is None else dict(table.metadata().configuration)

    def set_properties(self, name: str, properties: Mapping[str, str]) -> int:
        from deltalake import DeltaTable

        table = DeltaTable(self.path(name))
        table.alter.set_table_properties(dict(properties), raise_if_not_exists=False)
        return DeltaTable(self.path(name)).version()

    def commit_metadata(self, name: str) -> list[dict[str, str]]:
        table = self._delta(name)
        if table is None:
            return []
        return [_commit_info_metadata(info) for info in table.history()]

    def drop_partitions_before(self, name: str, column: str, value: str) -> list[str]:
        from deltalake import Schema
        from deltalake.transaction import CommitProperties

        table = self._delta(name)
        if table is None:
            return []
        old = sorted({p[column] for p in table.partitions() if p[column] < value})
        if old:
            spec = self.spec(name)
            # An overwrite with no new files: removes the matching partitions' files, atomically.
            table.create_write_transaction(
                [],
                mode="overwrite",
                schema=Schema.from_json(spec.schema.json()),
                partition_by=list(spec.partition_by) or None,
                partition_filters=[(column, "in", old)],
                commit_properties=CommitProperties(
                    custom_metadata={"llmrec.retention": f"drop {column} < {value}"}
                ),
            )
            log.info("%s: dropped %d partitions %s < %s", name, len(old), column, value)
        return old

    def vacuum(self, name: str, retention_hours: int = 168) -> list[str]:
        """Delete files no version within `retention_hours` references, and stale staging folders."""
        table = self._delta(name)
        if table is None:
            return []
        removed = table.vacuum(
            retention_hours=retention_hours,
            enforce_retention_duration=False,
            dry_run=False,
            full=True,
        )
        fs, base = pafs.FileSystem.from_uri(_arrow_uri(self.path(name)))
        staging = fs.get_file_info(pafs.FileSelector(f"{base}/_staging", allow_not_found=True))
        cutoff = time.time() - retention_hours * 3600
        for info in staging:
            if info.mtime is not None and info.mtime.timestamp() < cutoff:
                fs.delete_dir(info.path)
                removed.append(info.path)
        return list(removed)


class SparkDeltaEngine(TableStore):
    """Delta's own Spark integration (Databricks, or delta-spark jars on the classpath)."""

    engine_name = "spark"

    def exists(self, name: str) -> bool:
        jvm = self.spark.sparkContext._jvm
        assert jvm is not None  # a driver-side session always has its gateway
        return bool(
            jvm.io.delta.tables.DeltaTable.isDeltaTable(self.spark._jsparkSession, self.path(name))
        )

    def version(self, name: str) -> int | None:
        if not self.exists(name):
            return None
        history = self.spark.sql(f"DESCRIBE HISTORY delta.`{self.path(name)}` LIMIT 1")
        return int(history.collect()[0]["version"])

    def read(self, name: str, where: PartitionValues | None = None) -> DataFrame:
        if not self.exists(name):
            return self.empty(name)
        df = self.spark.read.format("delta").load(self.path(name))
        return df.where(_spark_predicate(where)) if where else df

    def overwrite(self, name, df, partitions=None, metadata=None) -> int:
        writer = self._writer(name, df, metadata).mode("overwrite")
        if partitions:
            writer = writer.option("replaceWhere", _sql_predicate(partitions))
        writer.save(self.path(name))
        crash_point(f"after-commit:{name}")
        return self.version(name) or 0

    def append(self, name, df, metadata=None) -> int:
        self._writer(name, df, metadata).mode("append").option("mergeSchema", "true").save(
            self.path(name)
        )
        crash_point(f"after-commit:{name}")
        return self.version(name) or 0

    def properties(self, name: str) -> dict[str, str]:
        if not self.exists(name):
            return {}
        rows = self.spark.sql(f"SHOW TBLPROPERTIES delta.`{self.path(name)}`").collect()
        return {r["key"]: r["value"] for r in rows}

    def set_properties(self, name: str, properties: Mapping[str, str]) -> int:
        pairs = ", ".join(f"{_sql_string(k)} = {_sql_string(v)}" for k, v in properties.items())
        self.spark.sql(f"ALTER TABLE delta.`{self.path(name)}` SET TBLPROPERTIES ({pairs})")
        return self.version(name) or 0

    def commit_metadata(self, name: str) -> list[dict[str, str]]:
        if not self.exists(name):
            return []
        history = self.spark.sql(f"DESCRIBE HISTORY delta.`{self.path(name)}`")
        rows = history.select("version", "userMetadata").orderBy(F.desc("version")).collect()
        return [_commit_info_metadata({"userMetadata": r["userMetadata"]}) for r in rows]

    def drop_partitions_before(self, name: str, column: str, value: str) -> list[str]:
        if not self.exists(name):
            return []
        old = sorted(
            r[column]
            for r in self.read(name)
            .where(F.col(column) < value)
            .select(column)
            .distinct()
            .collect()
        )
        if old:
            self.spark.sql(
                f"DELETE FROM delta.`{self.path(name)}` WHERE `{column}` < {_sql_string(value)}"
            )
        return old

    def vacuum(self, name: str, retention_hours: int = 168) -> list[str]:
        if not self.exists(name):
            return []
        self.spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
        rows = self.spark.sql(
            f"VACUUM delta.`{self.path(name)}` RETAIN {int(retention_hours)} HOURS"
        )
        return [r[0] for r in rows.collect()]

    def _writer(self, name: str, df: Rows, metadata: Mapping[str, str] | None):
        spec = self.spec(name)
        writer = self.as_dataframe(name, df).write.format("delta")
        if spec.partition_by:
            writer = writer.partitionBy(*spec.partition_by)
        if metadata:
            writer = writer.option("userMetadata", json.dumps(dict(metadata), sort_keys=True))
        return writer


def delta_extension_available(spark: SparkSession) -> bool:
    """True when Delta's Spark extension is configured and its classes load."""
    extensions = spark.conf.get("spark.sql.extensions", "") or ""
    if "DeltaSparkSessionExtension" not in extensions:
        return False
    jvm = spark.sparkContext._jvm
    if jvm is None:
        return False
    try:
        jvm.java.lang.Class.forName("io.delta.tables.DeltaTable")
    except Exception:  # py4j wraps ClassNotFoundException
        return False
    return True


def open_store(spark: SparkSession, root: str, engine: str = "auto") -> TableStore:
    """The table layer for `root`: engine "spark", "embedded", or "auto" (spark when available)."""
    if engine == "auto":
        engine = "spark" if delta_extension_available(spark) else "embedded"
    if engine == "spark":
        if not delta_extension_available(spark):
            raise InputError(
                "storage.engine=spark but Delta's Spark extension is not on the classpath; "
                "use storage.engine=embedded or add io.delta:delta-spark_2.12"
            )
        return SparkDeltaEngine(spark, root)
    if engine == "embedded":
        if "://" not in root:
            import os

            os.makedirs(root, exist_ok=True)
        return EmbeddedDeltaEngine(spark, root)
    raise InputError(f"unknown storage engine {engine!r}; choose auto, spark or embedded")


def _custom_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """delta-rs commitInfo fields for `metadata`: the keys themselves, and the same keys as the
    JSON `userMetadata` string that Spark's Delta writes and `DESCRIBE HISTORY` shows."""
    if not metadata:
        return {}
    return {**metadata, "userMetadata": json.dumps(dict(metadata), sort_keys=True)}


def _commit_info_metadata(info: Mapping[str, Any]) -> dict[str, str]:
    """The metadata a commit was written with, from its commitInfo (either engine's form)."""
    user = info.get("userMetadata")
    if isinstance(user, str) and user.startswith("{"):
        try:
            parsed = json.loads(user)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            return {str(k): str(v) for k, v in parsed.items()}
    return {}


def _arrow_uri(path: str) -> str:
    if "://" not in path:
        return path
    scheme, rest = path.split("://", 1)
    return {"s3a": "s3", "s3n": "s3", "abfss": "abfs"}.get(scheme, scheme) + "://" + rest


def _partition_values_from_path(rel: str) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for part in rel.split("/")[:-1]:
        key, _, value = part.partition("=")
        value = urllib.parse.unquote(value)
        values[urllib.parse.unquote(key)] = None if value == "__HIVE_DEFAULT_PARTITION__" else value
    return values


def _as_list(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _partition_filters(where: PartitionValues) -> list[tuple[str, str, Any]]:
    filters: list[tuple[str, str, Any]] = []
    for column, value in where.items():
        values = _as_list(value)
        filters.append((column, "=", values[0]) if len(values) == 1 else (column, "in", values))
    return filters


def _sql_string(value: str) -> str:
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def _sql_predicate(where: PartitionValues) -> str:
    clauses = []
    for column, value in where.items():
        quoted = ", ".join("'" + v.replace("'", "''") + "'" for v in _as_list(value))
        clauses.append(f"`{column}` IN ({quoted})")
    return " AND ".join(clauses)


def _spark_predicate(where: PartitionValues) -> Column:
    condition: Column | None = None
    for column, value in where.items():
        clause = F.col(column).isin(_as_list(value))
        condition = clause if condition is None else condition & clause
    assert condition is not None, "an empty partition filter selects nothing"
    return condition


def _check_columns(name: str, columns: Sequence[str], schema: Any) -> None:
    missing = [f.name for f in schema.fields if f.name not in columns]
    if missing:
        raise ValueError(f"{name}: the rows lack columns {missing}")


def _check_partition_values(name: str, adds: list[Any], partitions: PartitionValues) -> None:
    allowed = {column: set(_as_list(value)) for column, value in partitions.items()}
    for add in adds:
        for column, values in allowed.items():
            if add.partition_values.get(column) not in values:
                raise ValueError(
                    f"{name}: rows for {column}={add.partition_values.get(column)!r} fall outside "
                    f"the partitions being replaced ({column} in {sorted(values)})"
                )
