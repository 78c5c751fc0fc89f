"""`als.solver: cg`: implicit ALS as Spark jobs, a few conjugate-gradient steps per row.

The pairs are packed once into CSR blocks, by user and by item (`als.num_blocks` row ranges
of each, cached). Each half-sweep is one Spark job: every block's rows are solved
(`core.als_cg.solve_rows`, torch sparse kernels, one thread per task core) against both
sides' broadcast factors, and the new rows come back to the driver, which holds both factor
matrices. That is the limit of this solver (`als.cg_max_factor_mb` per side; beyond it use
`solver: mllib`, which keeps factors distributed). Nothing grows from sweep to sweep, so
there is no lineage to checkpoint; a crashed fit is rerun, like MLlib's. Up to
`als.cg_local_max_pairs` pairs the sweeps run on the driver instead (the same solve, without
a Spark job per half-sweep). Warm start: rows whose id has a factor in `init` (yesterday's)
start from it.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable

import numpy as np
import pandas as pd
from pyspark import RDD, StorageLevel
from pyspark.broadcast import Broadcast
from pyspark.sql import DataFrame, Row, SparkSession
from pyspark.sql import functions as F

from llmrec_spark.config import AlsConfig
from llmrec_spark.core.als_cg import CgParams, RowBlock, initial_factors, solve_rows, tile_size
from llmrec_spark.errors import InputError

log = logging.getLogger(__name__)

BLOCK_SCHEMA = "rows binary, indptr binary, cols binary, weights binary, tile_size long"


def cg_params(cfg: AlsConfig) -> CgParams:
    """The solve's settings from `als`."""
    return CgParams(
        alpha=cfg.alpha, reg=cfg.reg_param, reg_scaling=cfg.reg_scaling, steps=cfg.cg_steps
    )


def fit_cg_factors(
    spark: SparkSession,
    indexed: DataFrame,
    *,
    n_users: int,
    n_items: int,
    cfg: AlsConfig,
    num_blocks: int,
    init: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> tuple[np.ndarray, np.ndarray]:
    """User (n_users, rank) and item (n_items, rank) factors from (user_idx, item_idx, weight)
    rows with dense indices, solved per partition; `init` rows (NaN = none) replace the
    seeded random start."""
    params = cg_params(cfg)
    users, items = _starting_factors(n_users, n_items, cfg, init)
    by_user = _blocks(indexed, "user_idx", "item_idx", num_blocks, tile_size(cfg.rank))
    by_item = _blocks(indexed, "item_idx", "user_idx", num_blocks, tile_size(cfg.rank))
    # Each matrix is broadcast once per sweep: the side just solved is the other side of the
    # next half-sweep and the warm start of its own next solve.
    sc = spark.sparkContext
    shared = {"users": sc.broadcast(users), "items": sc.broadcast(items)}
    try:
        for sweep in range(cfg.max_iter):
            started = time.perf_counter()
            users = _half_sweep(by_user, users, shared["users"], shared["items"], params)
            shared["users"].destroy()
            shared["users"] = sc.broadcast(users)
            items = _half_sweep(by_item, items, shared["items"], shared["users"], params)
            shared["items"].destroy()
            shared["items"] = sc.broadcast(items)
            log.info(
                "als cg: sweep %d/%d in %.1f s",
                sweep + 1,
                cfg.max_iter,
                time.perf_counter() - started,
            )
    finally:
        for handle in shared.values():
            handle.destroy()
        by_user.unpersist()
        by_item.unpersist()
    return users, items


def fit_on_driver(
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    weights: np.ndarray,
    *,
    cfg: AlsConfig,
    init: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> tuple[np.ndarray, np.ndarray]:
    """The same sweeps as `fit_cg_factors` on pairs the driver holds (dense indices from 0):
    a Spark job per half-sweep would cost more than the solve of a small fit."""
    n_users, n_items = int(user_idx.max()) + 1, int(item_idx.max()) + 1
    params = cg_params(cfg)
    users, items = _starting_factors(n_users, n_items, cfg, init)
    tiles = tile_size(cfg.rank)
    by_user = RowBlock.from_pairs(user_idx, item_idx, weights, tile_size=tiles)
    by_item = RowBlock.from_pairs(item_idx, user_idx, weights, tile_size=tiles)
    for _ in range(cfg.max_iter):
        users[by_user.rows] = solve_rows(by_user, users, items, params)
        items[by_item.rows] = solve_rows(by_item, items, users, params)
    return users, items


def _starting_factors(
    n_users: int,
    n_items: int,
    cfg: AlsConfig,
    init: tuple[np.ndarray | None, np.ndarray | None],
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random factors, with the rows `init` knows (NaN = unknown) taken from it."""
    _check_size(max(n_users, n_items), cfg)
    users = _start(initial_factors(n_users, cfg.rank, cfg.seed), init[0])
    items = _start(initial_factors(n_items, cfg.rank, cfg.seed + 1), init[1])
    return users, items


def _check_size(rows: int, cfg: AlsConfig) -> None:
    megabytes = rows * cfg.rank * 4 / 2**20
    if megabytes > cfg.cg_max_factor_mb:
        raise InputError(
            f"als.solver cg: {rows:,} rows x rank {cfg.rank} is {megabytes:,.0f} MB of factors, "
            f"over als.cg_max_factor_mb={cfg.cg_max_factor_mb:g} (they are broadcast every "
            "sweep); set als.solver: mllib, which keeps factors distributed"
        )


def _start(seeded: np.ndarray, known: np.ndarray | None) -> np.ndarray:
    if known is None:
        return seeded
    has = ~np.isnan(known).any(axis=1)
    seeded[has] = known[has]
    return seeded


def _blocks(indexed: DataFrame, row: str, col: str, num_blocks: int, tiles: int) -> RDD[RowBlock]:
    """The pair matrix's rows in up to `num_blocks` CSR blocks (contiguous row ranges, one per
    partition: one shuffle, then each partition packs its own pairs, in column tiles of
    `tiles`), cached."""
    pairs = indexed.select(
        F.col(row).alias("row"), F.col(col).alias("col"), F.col("weight").cast("float")
    ).repartitionByRange(num_blocks, "row")
    blocks = (
        pairs.mapInPandas(functools.partial(_pack, tiles=tiles), schema=BLOCK_SCHEMA)
        .rdd.map(_unpack)
        .persist(StorageLevel.MEMORY_AND_DISK)
    )
    blocks.count()
    return blocks


def _pack(batches: Iterable[pd.DataFrame], tiles: int) -> Iterable[pd.DataFrame]:
    """One row per partition: all of its pairs as a RowBlock's arrays (nothing when empty)."""
    pairs = [batch for batch in batches if len(batch)]
    if not pairs:
        return
    frame = pd.concat(pairs, ignore_index=True)
    block = RowBlock.from_pairs(
        frame["row"].to_numpy(np.int64),
        frame["col"].to_numpy(np.int64),
        frame["weight"].to_numpy(np.float32),
        tile_size=tiles,
    )
    yield pd.DataFrame(
        {
            "rows": [block.rows.tobytes()],
            "indptr": [block.indptr.tobytes()],
            "cols": [block.cols.tobytes()],
            "weights": [block.weights.tobytes()],
            "tile_size": [block.tile_size],
        }
    )


def _unpack(packed: Row) -> RowBlock:
    rows = np.frombuffer(packed["rows"], np.int64).copy()
    return RowBlock(
        rows=rows,
        indptr=np.frombuffer(packed["indptr"], np.int64).reshape(-1, len(rows) + 1).copy(),
        cols=np.frombuffer(packed["cols"], np.int64).copy(),
        weights=np.frombuffer(packed["weights"], np.float32).copy(),
        tile_size=packed["tile_size"],
    )


def _half_sweep(
    blocks: RDD[RowBlock],
    current: np.ndarray,
    current_bc: Broadcast[np.ndarray],
    other_bc: Broadcast[np.ndarray],
    params: CgParams,
) -> np.ndarray:
    """`current` (broadcast as `current_bc`) with every block's rows solved against the
    broadcast other side."""

    def solve(block: RowBlock) -> tuple[np.ndarray, np.ndarray]:
        import torch
        from pyspark import TaskContext

        context = TaskContext.get()
        torch.set_num_threads(max(1, context.cpus() if context is not None else 1))
        return block.rows, solve_rows(block, current_bc.value, other_bc.value, params)

    updated = current.copy()
    for rows, factors in blocks.map(solve).collect():
        updated[rows] = factors
    return updated
