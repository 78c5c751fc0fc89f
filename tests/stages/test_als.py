"""ALS: dense ids, native BLAS, checkpointing."""

from __future__ import annotations

import ctypes.util
import os

import pytest
from pyspark.testing import assertDataFrameEqual

from llmrec_spark.config import AlsConfig
from llmrec_spark.runtime.indexing import dense_index
from llmrec_spark.stages import als


@pytest.mark.spark
def test_mllib_loads_native_blas_when_the_system_has_it(spark):
    if not (ctypes.util.find_library("blas") and ctypes.util.find_library("lapack")):
        pytest.skip("no libblas.so.3/liblapack.so.3 here (make native-blas installs OpenBLAS)")
    assert als.blas_implementation(spark) == "JNIBLAS"
    assert als.lapack_implementation(spark) == "JNILAPACK"


@pytest.mark.spark
def test_index_ids_numbers_users_and_items_from_0_in_id_order(spark):
    pairs = spark.createDataFrame(
        [("u2", "b", 1.0), ("u10", "a", 2.0), ("u2", "c", 3.0), ("u1", "b", 4.0)],
        "user_id string, item_id string, weight double",
    ).repartition(3)  # numbering runs on across partitions

    indexed, users, items = als.index_ids(pairs)

    # Strings sort by their bytes: u1 < u10 < u2.
    assertDataFrameEqual(
        users,
        spark.createDataFrame([("u1", 0), ("u10", 1), ("u2", 2)], "user_id string, user_idx int"),
    )
    assertDataFrameEqual(
        items,
        spark.createDataFrame([("a", 0), ("b", 1), ("c", 2)], "item_id string, item_idx int"),
    )
    assert sorted((r["user_idx"], r["item_idx"], r["weight"]) for r in indexed.collect()) == [
        (0, 1, 4.0),
        (1, 0, 2.0),
        (2, 1, 1.0),
        (2, 2, 3.0),
    ]


@pytest.mark.spark
def test_dense_index_orders_by_every_order_column_across_partitions(spark):
    rows = spark.createDataFrame(
        [("d", 1), ("a", 2), ("c", 1), ("b", 0), ("e", 2)], "item_id string, _hash long"
    ).repartition(4)

    ranked = dense_index(rows, "rank", "_hash", "item_id")

    assert [(r["item_id"], r["rank"]) for r in ranked.orderBy("rank").collect()] == [
        ("b", 0),
        ("c", 1),
        ("d", 2),
        ("a", 3),
        ("e", 4),
    ]
    assert ranked.schema["rank"].dataType.simpleString() == "int"


@pytest.mark.spark
def test_als_writes_checkpoints_under_the_session_checkpoint_dir(spark):
    checkpoint_dir = spark.sparkContext.getCheckpointDir()
    assert checkpoint_dir is not None
    root = checkpoint_dir.removeprefix("file:")

    def rdd_folders() -> set[str]:
        return {name for name in os.listdir(root) if name.startswith("rdd-")}

    before = rdd_folders()
    indexed = spark.createDataFrame(
        [(u, (u + j) % 6, 1.0) for u in range(6) for j in range(3)],
        "user_idx int, item_idx int, weight double",
    )
    # fit_als's estimator; iteration 1 is a multiple of the interval, so it checkpoints.
    cfg = AlsConfig(rank=2, max_iter=1, checkpoint_interval=1)
    model = als.als_estimator(cfg, num_blocks=als.als_blocks(spark, cfg)).fit(indexed)
    written = rdd_folders() - before
    assert written, f"no checkpoint written under {root}"
    assert any(
        name.startswith("part-") for folder in written for name in os.listdir(f"{root}/{folder}")
    )
    assert sorted(r["id"] for r in model.itemFactors.collect()) == list(range(6))
