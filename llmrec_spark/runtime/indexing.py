"""Dense integer ids (0..n-1 in a sort order) without a window over the whole table."""

from __future__ import annotations

from pyspark.sql import DataFrame
from pyspark.sql.types import IntegerType, StructField, StructType


def dense_index(rows: DataFrame, name: str, *order: str) -> DataFrame:
    """`rows` plus an int column `name` numbering them 0..n-1 in the order of the `order` columns.

    The order columns must identify a row (ids), or ties are numbered in no fixed order.
    row_number() over an unpartitioned window would move every row into one partition (and
    say so in a WindowExec warning); here the sort is distributed and zipWithIndex numbers
    each sorted partition on from the sizes of those before it. Calling this runs two small
    jobs (the sort's range sample and the partition sizes); the rows travel through Python,
    so pass only the columns the index is for and join it back.
    """
    ordered = rows.orderBy(*order)
    schema = StructType([*ordered.schema.fields, StructField(name, IntegerType(), False)])
    # One RDD for both of zipWithIndex's passes: they read the same sort shuffle, so the
    # partition sizes counted in the first are those numbered in the second.
    numbered = ordered.rdd.zipWithIndex().map(lambda row_index: (*row_index[0], row_index[1]))
    return rows.sparkSession.createDataFrame(numbered, schema)
