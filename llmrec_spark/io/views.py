"""The product tables as Spark SQL views, and what they say about their rows, for querying.

`register_views` names each table's current snapshot after the table (`recommendations`,
`recommendations_latest`, `events_clean`, ...), so the same SQL runs with Delta's Spark
extension (a view over ``delta.`path` ``) and without it (a view over the snapshot's Parquet
files, listed by delta-rs as the embedded engine reads them). `table_metadata` reads what a
table says about its rows without `SHOW TBLPROPERTIES` or `DESCRIBE HISTORY`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from pyspark.sql import SparkSession

from llmrec_spark.errors import InputError
from llmrec_spark.io.tables import (
    EmbeddedDeltaEngine,
    SparkDeltaEngine,
    TableStore,
    delta_extension_available,
)
from llmrec_spark.schema import TABLES

log = logging.getLogger(__name__)


def register_views(
    spark: SparkSession, lakehouse_root: str, names: Sequence[str] | None = None
) -> list[str]:
    """Register each table under `lakehouse_root` as a temporary view of the same name.

    `names=None` takes every product table that exists there; a named table that does not
    exist is an error. Returns the names registered, in `schema.TABLES` order when None.
    Without Delta's extension a view holds the snapshot of the moment it was registered:
    register again to see later commits.
    """
    store = _store(spark, lakehouse_root)
    if names is None:
        names = [name for name in TABLES if store.exists(name)]
    else:
        _check_exist(store, names)
    for name in names:
        if isinstance(store, SparkDeltaEngine):
            path = store.path(name).replace("`", "``")
            spark.sql(f"CREATE OR REPLACE TEMPORARY VIEW `{name}` AS SELECT * FROM delta.`{path}`")
        else:
            store.read(name).createOrReplaceTempView(name)
    log.info("views over %s (%s engine): %s", store.root, store.engine_name, ", ".join(names))
    return list(names)


def table_metadata(spark: SparkSession, lakehouse_root: str, name: str) -> dict[str, str]:
    """What table `name` says about its current rows, as a dict.

    Its Delta table properties (what `SHOW TBLPROPERTIES` lists), overlaid with the metadata of
    its newest commit that carried any: for the published tables, the publish commit's
    `llmrec.ds`, `llmrec.model_version`, ... (data and metadata are one commit).
    """
    store = _store(spark, lakehouse_root)
    _check_exist(store, [name])
    newest = next((metadata for metadata in store.commit_metadata(name) if metadata), {})
    return store.properties(name) | newest


def _store(spark: SparkSession, lakehouse_root: str) -> TableStore:
    """The table layer over an existing lakehouse; unlike `open_store` it creates no folder."""
    root = lakehouse_root if "://" in lakehouse_root else os.path.abspath(lakehouse_root)
    if "://" not in root and not os.path.isdir(root):
        raise InputError(f"no lakehouse folder {root!r}")
    if delta_extension_available(spark):
        return SparkDeltaEngine(spark, root)
    return EmbeddedDeltaEngine(spark, root)


def _check_exist(store: TableStore, names: Sequence[str]) -> None:
    for name in names:
        store.spec(name)  # an unknown name: KeyError listing the known ones
    missing = [name for name in names if not store.exists(name)]
    if missing:
        raise InputError(f"no Delta table {', '.join(missing)} under {store.root}")
