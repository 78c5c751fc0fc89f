"""`als.solver: cg` on Spark: the same sweeps as a numpy reference, warm starts, the saved
model, and the limits a user meets as a clear error."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from pyspark.ml.recommendation import ALSModel

from llmrec_spark.config import AlsConfig, ConfigError, check_als
from llmrec_spark.core.als_cg import RowBlock, exact_rows, initial_factors
from llmrec_spark.errors import InputError
from llmrec_spark.stages import als, als_cg

# 6 users x 8 items in two tastes: u0-u2 like i0-i3, u3-u5 like i4-i7 (weights 1-3).
PAIRS = [
    (f"u{u}", f"i{i}", float(1 + (u + i) % 3))
    for u in range(6)
    for i in range(8)
    if (u < 3) == (i < 4) and (u + i) % 4 != 0
]
CG = AlsConfig(
    rank=3, reg_param=0.1, alpha=2.0, max_iter=4, seed=7, solver="cg", reg_scaling="constant"
)


def _pairs(spark):
    return spark.createDataFrame(PAIRS, "user_id string, item_id string, weight double")


def _as_matrix(frame, prefix, n):
    rows = {r["id"]: r["features"] for r in frame.collect()}
    return np.array([rows[f"{prefix}{k}"] for k in range(n)], dtype=np.float64)


def _reference(cfg: AlsConfig) -> tuple[np.ndarray, np.ndarray]:
    """Alternating exact solves from the same seeded start (ids u0..u5, i0..i7 sort as 0..n)."""
    users = np.array([int(u[1:]) for u, _, _ in PAIRS])
    items = np.array([int(i[1:]) for _, i, _ in PAIRS])
    weights = np.array([w for _, _, w in PAIRS], np.float32)
    by_user, by_item = (
        RowBlock.from_pairs(users, items, weights),
        RowBlock.from_pairs(items, users, weights),
    )
    params = als_cg.cg_params(cfg)
    y = initial_factors(8, cfg.rank, cfg.seed + 1)
    for _ in range(cfg.max_iter):
        x = exact_rows(by_user, y, params).astype(np.float32)
        y = exact_rows(by_item, x, params).astype(np.float32)
    return x, y


@pytest.mark.spark
@pytest.mark.parametrize(
    ("scaling", "local_max_pairs"),
    [("constant", 0), ("count", 0), ("constant", 1000)],
    ids=["constant-executors", "count-executors", "constant-driver"],
)
def test_cg_fit_on_spark_matches_exact_alternating_solves(spark, scaling, local_max_pairs):
    # With as many CG steps as the rank, each row's solve is exact (up to rounding); 0 pairs
    # on the driver sends the sweeps to the executors, one CSR block per partition.
    cfg = dataclasses.replace(
        CG, reg_scaling=scaling, cg_steps=6, cg_local_max_pairs=local_max_pairs
    )

    factors = als.fit_als(_pairs(spark), cfg)

    users, items = _reference(cfg)
    np.testing.assert_allclose(_as_matrix(factors.users, "u", 6), users, atol=2e-4)
    np.testing.assert_allclose(_as_matrix(factors.items, "i", 8), items, atol=2e-4)


@pytest.mark.spark
def test_cg_factors_rank_each_users_own_taste_first(spark):
    factors = als.fit_als(_pairs(spark), dataclasses.replace(CG, max_iter=10))

    users, items = _as_matrix(factors.users, "u", 6), _as_matrix(factors.items, "i", 8)
    scores = users @ items.T
    for u in range(6):
        own = range(4) if u < 3 else range(4, 8)
        other = set(range(8)) - set(own)
        assert min(scores[u, list(own)]) > max(scores[u, list(other)])


@pytest.mark.spark
def test_a_warm_start_from_converged_factors_needs_one_sweep(spark):
    converged = als.fit_als(_pairs(spark), dataclasses.replace(CG, max_iter=15))
    one_sweep = dataclasses.replace(CG, max_iter=1, cg_local_max_pairs=0)

    warm = als.fit_als(_pairs(spark), one_sweep, warm=converged)
    cold = als.fit_als(_pairs(spark), one_sweep)

    target = _as_matrix(converged.items, "i", 8)
    warm_gap = np.abs(_as_matrix(warm.items, "i", 8) - target).max()
    cold_gap = np.abs(_as_matrix(cold.items, "i", 8) - target).max()
    assert warm_gap < 0.02 < cold_gap


@pytest.mark.spark
def test_the_cg_model_saves_as_an_mllib_model_with_the_same_factors(spark, tmp_path):
    factors = als.fit_als(_pairs(spark), CG)
    factors.als_model().write().overwrite().save(str(tmp_path / "als"))

    loaded = ALSModel.load(str(tmp_path / "als"))

    assert loaded.rank == 3
    by_index = {r["id"]: r["features"] for r in loaded.itemFactors.collect()}
    by_id = {r["id"]: r["features"] for r in factors.items.collect()}
    for k in range(8):  # item ids i0..i7 are indices 0..7
        np.testing.assert_allclose(by_index[k], by_id[f"i{k}"], rtol=1e-6)


@pytest.mark.spark
def test_factors_too_large_to_broadcast_are_a_clear_error(spark):
    tiny = dataclasses.replace(CG, cg_max_factor_mb=1e-6)

    with pytest.raises(InputError, match="als.cg_max_factor_mb.*als.solver: mllib"):
        als.fit_als(_pairs(spark), tiny)


def test_constant_penalty_needs_the_cg_solver():
    with pytest.raises(ConfigError, match="reg_scaling: constant needs als.solver: cg"):
        check_als(AlsConfig(solver="mllib", reg_scaling="constant"))
    with pytest.raises(ConfigError, match="als.solver: choose mllib or cg"):
        check_als(AlsConfig(solver="lbfgs"))


@pytest.mark.spark
def test_train_als_starts_from_the_previous_dates_factors(spark, tmp_path):
    import datetime as dt

    from pyspark.sql import functions as F

    from llmrec_spark.pipeline.runner import make_context
    from llmrec_spark.schema import EVENTS_CLEAN
    from tests.conftest import make_config

    cfg = make_config(
        tmp_path,
        "als.solver=cg",
        "als.rank=3",
        "als.max_iter=12",
        "als.warm_max_iter=2",
        "evaluate.holdout_fraction=0",  # every planted pair trains
    )
    ts = dt.datetime(2026, 11, 1, 12)
    events = [
        (f"e{k}", u, i, "view", ts, None, None, w, day, day)
        for day in ("2026-11-01", "2026-11-02")
        for k, (u, i, w) in enumerate(PAIRS)
    ]
    first = make_context(cfg, spark, "2026-11-01")
    first.store.append("events_clean", spark.createDataFrame(events, EVENTS_CLEAN))

    cold = als.run_train_als(first)
    warm = als.run_train_als(make_context(cfg, spark, "2026-11-02"))

    assert (cold.summary["sweeps"], cold.summary["warm_from"]) == (12, None)
    assert (warm.summary["sweeps"], warm.summary["warm_from"]) == (2, "2026-11-01")
    # Twice the weight on the same pairs: the tastes stay, each user's own items still first.
    table = first.store.read("als_factors", where={"ds": "2026-11-02"})
    users = _as_matrix(table.where(F.col("kind") == "user"), "u", 6)
    items = _as_matrix(table.where(F.col("kind") == "item"), "i", 8)
    scores = users @ items.T
    for u in range(6):
        own = list(range(4) if u < 3 else range(4, 8))
        assert min(scores[u, own]) > max(np.delete(scores[u], own))
