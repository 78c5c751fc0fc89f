"""Folders and files on whatever filesystem Spark reads, through Hadoop's FileSystem API.

Listing landing dates, checking that inputs exist and fetching remote artifacts use the
session's own Hadoop configuration, so they see exactly what Spark's readers see: file:,
hdfs:, s3a:, abfss:, dbfs: -- whichever connectors the cluster has. For these, a bare path
resolves as Spark resolves it (the default filesystem; file: on a local session).
`local_copy` is for files the driver's Python wrote: there a bare path is the local disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from py4j.protocol import Py4JJavaError
from pyspark.sql import SparkSession

from llmrec_spark.errors import InputError

# Hadoop's rule: a colon before the first slash ends the scheme.
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*):")


def exists(spark: SparkSession, path: str) -> bool:
    """True when a file or folder is at `path` (a URI, or a bare path as Spark resolves it)."""
    fs, hadoop_path = _hadoop(spark, path)
    return bool(fs.exists(hadoop_path))


def list_dir_names(spark: SparkSession, path: str) -> list[str]:
    """Names of the folders directly under `path`, sorted; [] when `path` does not exist."""
    fs, hadoop_path = _hadoop(spark, path)
    if not fs.exists(hadoop_path):
        return []
    return sorted(
        str(status.getPath().getName())
        for status in fs.listStatus(hadoop_path)
        if status.isDirectory()
    )


def local_path(path: str) -> str | None:
    """The OS path of a bare path or a file: URI on this machine; None for any other scheme."""
    match = _SCHEME.match(path)
    if match is None:
        return path
    if match.group(1).lower() != "file":
        return None
    rest = path[match.end() :]
    if not rest.startswith("//"):
        return rest  # file:/tmp/x, as Spark writes local paths
    authority, _, under = rest[2:].partition("/")
    return "/" + under if authority in ("", "localhost") else None


@contextlib.contextmanager
def local_copy(spark: SparkSession | None, path: str) -> Iterator[str | None]:
    """A local file or folder with the contents of `path` for the block; None if nothing is there.

    Bare paths and file: URIs are used in place; other URIs are copied through `spark`'s
    Hadoop filesystems into a temporary folder that is removed when the block ends.
    """
    local = local_path(path)
    if local is not None:
        yield local if os.path.exists(local) else None
        return
    if spark is None:
        raise InputError(f"{path} is not on this machine's disk; reading it needs a Spark session")
    fs, hadoop_path = _hadoop(spark, path)
    if not fs.exists(hadoop_path):
        yield None
        return
    scratch = tempfile.mkdtemp(prefix="llmrec-copy-")
    try:
        target = os.path.join(scratch, str(hadoop_path.getName()) or "root")
        jvm = _jvm(spark)
        # The raw local filesystem: no .crc checksum files beside the copy.
        fs.copyToLocalFile(False, hadoop_path, jvm.org.apache.hadoop.fs.Path(target), True)
        yield target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _hadoop(spark: SparkSession, path: str) -> tuple[Any, Any]:
    """(Hadoop FileSystem, Hadoop Path) of `path` under the session's Hadoop configuration."""
    hadoop_path = _jvm(spark).org.apache.hadoop.fs.Path(path)
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    try:
        return hadoop_path.getFileSystem(conf), hadoop_path
    except Py4JJavaError as exc:
        match = _SCHEME.match(path)
        scheme = match.group(1) if match else "the default filesystem"
        raise InputError(
            f"Spark cannot open {path}: no usable filesystem for {scheme} "
            f"({exc.java_exception.getMessage()}); add its connector to the cluster "
            "(e.g. hadoop-aws for s3a) or check the path"
        ) from None


def _jvm(spark: SparkSession) -> Any:
    jvm = spark.sparkContext._jvm
    assert jvm is not None  # a driver-side session always has its gateway
    return jvm
