"""The conjugate-gradient ALS rows: the normal equations they solve, by hand and exactly."""

from __future__ import annotations

import numpy as np
import pytest

from llmrec_spark.core.als_cg import CgParams, RowBlock, exact_rows, initial_factors, solve_rows


def _random_block(
    seed: int, n_rows: int = 40, n_cols: int = 60, pairs: int = 400, tile_size: int = 2**62
) -> RowBlock:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, n_rows, pairs) * n_cols + rng.integers(0, n_cols, pairs))
    weights = rng.integers(1, 6, len(keys)).astype(np.float32)
    return RowBlock.from_pairs(keys // n_cols, keys % n_cols, weights, tile_size=tile_size)


def test_from_pairs_packs_rows_in_order_with_their_pairs():
    block = RowBlock.from_pairs(
        np.array([7, 2, 7, 2, 2]), np.array([1, 9, 0, 3, 4]), np.array([1, 2, 3, 4, 5], np.float32)
    )

    assert block.rows.tolist() == [2, 7]
    assert block.indptr.tolist() == [[0, 3, 5]]
    assert block.cols.tolist() == [3, 4, 9, 0, 1]
    assert block.weights.tolist() == [4, 5, 2, 3, 1]


def test_from_pairs_cuts_the_columns_into_tiles_each_row_major():
    block = RowBlock.from_pairs(
        np.array([7, 2, 7, 2, 2]),
        np.array([1, 9, 0, 3, 4]),
        np.array([1, 2, 3, 4, 5], np.float32),
        tile_size=4,
    )

    # tile 0 holds columns 0-3, tile 1 columns 4-7, tile 2 columns 8-11
    assert block.indptr.tolist() == [[0, 1, 3], [3, 4, 4], [4, 5, 5]]
    assert block.cols.tolist() == [3, 0, 1, 4, 9]
    assert block.weights.tolist() == [4, 3, 1, 5, 2]
    assert block.pair_counts().tolist() == [3, 2]
    assert block.row_pairs(0)[0].tolist() == [3, 4, 9]
    assert block.row_pairs(0)[1].tolist() == [4, 5, 2]


def test_exact_rows_solves_a_one_factor_row_by_hand():
    # One row with pairs to items 0 (weight 1) and 1 (weight 2); rank 1, y = (1, 2, 3).
    block = RowBlock.from_pairs(np.array([0, 0]), np.array([0, 1]), np.array([1, 2], np.float32))
    other = np.array([[1.0], [2.0], [3.0]], np.float32)
    # Y'Y = 14; Y'(C - I)Y = alpha (1 * 1 + 2 * 4) = 9; b = (1 + 1) * 1 + (1 + 2) * 2 = 8.
    constant = exact_rows(block, other, CgParams(alpha=1.0, reg=0.5, reg_scaling="constant"))
    count = exact_rows(block, other, CgParams(alpha=1.0, reg=0.5, reg_scaling="count"))

    assert constant[0, 0] == pytest.approx(8 / (14 + 9 + 0.5))
    assert count[0, 0] == pytest.approx(8 / (14 + 9 + 0.5 * 2))


@pytest.mark.parametrize("scaling", ["constant", "count"])
def test_enough_cg_steps_reach_the_exact_solve(scaling):
    block = _random_block(seed=3)
    other = np.random.default_rng(4).normal(size=(60, 8)).astype(np.float32)
    params = CgParams(alpha=2.0, reg=0.3, reg_scaling=scaling, steps=30)

    solved = solve_rows(block, initial_factors(40, 8, seed=5), other, params)

    np.testing.assert_allclose(solved, exact_rows(block, other, params), atol=1e-4)


def test_slicing_the_rows_does_not_change_the_answer():
    block = _random_block(seed=6)
    other = np.random.default_rng(7).normal(size=(60, 6)).astype(np.float32)
    start = initial_factors(40, 6, seed=8)
    params = CgParams(alpha=1.0, reg=1.0, steps=2)

    whole = solve_rows(block, start, other, params)
    sliced = solve_rows(block, start, other, params, max_pairs=7)

    np.testing.assert_allclose(sliced, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tile_size", [1, 7, 60])
def test_column_tiles_do_not_change_the_answer(tile_size):
    untiled = _random_block(seed=12)
    tiled = _random_block(seed=12, tile_size=tile_size)
    other = np.random.default_rng(13).normal(size=(60, 6)).astype(np.float32)
    start = initial_factors(40, 6, seed=14)
    params = CgParams(alpha=1.0, reg=1.0, reg_scaling="count", steps=3)

    np.testing.assert_allclose(
        solve_rows(tiled, start, other, params, max_pairs=50),
        solve_rows(untiled, start, other, params),
        rtol=1e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(exact_rows(tiled, other, params), exact_rows(untiled, other, params))


def test_few_steps_from_a_warm_start_move_towards_the_exact_solve():
    block = _random_block(seed=9)
    other = np.random.default_rng(10).normal(size=(60, 8)).astype(np.float32)
    params = CgParams(alpha=1.0, reg=1.0, steps=3)
    exact = exact_rows(block, other, params)
    start = np.zeros((40, 8), np.float32)
    noise = np.random.default_rng(11).normal(scale=0.05, size=exact.shape)
    start[block.rows] = exact + noise  # near the answer, as after earlier sweeps

    three_steps = solve_rows(block, start, other, params)

    assert np.linalg.norm(three_steps - exact) < 0.2 * np.linalg.norm(noise)
