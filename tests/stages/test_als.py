"""ALS: dense ids, native BLAS, checkpointing, driver-side top-k, and the `tune-als` search."""

from __future__ import annotations

import ctypes.util
import datetime as dt
import os

import mlflow
import numpy as np
import pytest
from pyspark.testing import assertDataFrameEqual

from llmrec_spark.config import AlsConfig, AlsSearchConfig
from llmrec_spark.runtime.indexing import dense_index
from llmrec_spark.stages import als

DS = "2026-11-23"


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_top_k_unseen_excludes_seen_items_and_breaks_ties_by_lower_index():
    users = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    items = np.array([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    # user 0 scores 3, 2, 0, 1 and has seen item 0; user 1 scores 0, 0, 1, 1 and has seen none.
    top = als.top_k_unseen(users, items, [np.array([0]), np.array([], dtype=int)], 3)
    assert [t.tolist() for t in top] == [[1, 3, 2], [2, 3, 0]]


def test_top_k_unseen_returns_fewer_when_the_user_has_seen_almost_everything():
    users = np.array([[1.0]], dtype=np.float32)
    items = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    assert [t.tolist() for t in als.top_k_unseen(users, items, [np.array([1, 2])], 2)] == [[0]]


def test_search_trials_is_the_grid_or_a_seeded_sample_of_it_in_grid_order():
    search = AlsSearchConfig(
        rank=[8, 16], reg_param=[0.1], alpha=[1.0, 5.0], max_iter=[3], trials=0
    )
    assert als.search_trials(search) == [
        {"rank": 8, "reg_param": 0.1, "alpha": 1.0, "max_iter": 3},
        {"rank": 8, "reg_param": 0.1, "alpha": 5.0, "max_iter": 3},
        {"rank": 16, "reg_param": 0.1, "alpha": 1.0, "max_iter": 3},
        {"rank": 16, "reg_param": 0.1, "alpha": 5.0, "max_iter": 3},
    ]
    grid = als.search_trials(search)
    sample = als.search_trials(AlsSearchConfig(**{**vars(search), "trials": 2}))
    assert len(sample) == 2 and sample[0] != sample[1]
    assert sorted(grid.index(t) for t in sample) == [grid.index(t) for t in sample]
    assert als.search_trials(AlsSearchConfig(**{**vars(search), "trials": 2})) == sample
    assert als.search_trials(AlsSearchConfig(**{**vars(search), "trials": 9})) == grid


def test_best_trial_takes_the_highest_metric_and_the_earliest_of_equals():
    trials = [
        {"trial": 1, "metrics": {"ndcg@10": 0.2}},
        {"trial": 2, "metrics": {"ndcg@10": 0.5}},
        {"trial": 3, "metrics": {"ndcg@10": 0.5}},
    ]
    assert als.best_trial(trials, "ndcg@10")["trial"] == 2


def test_implicit_mapping_of_confidence_and_regularization():
    # MLlib's confidence 1 + alpha * w is implicit's stored value (implicit's alpha stays 1).
    assert als.implicit_confidence(np.array([0.0, 1.0, 3.0]), 10.0).tolist() == [1.0, 11.0, 31.0]
    # 600 pairs over 100 users + 20 items: 10 interactions per solved row on average.
    assert als.implicit_regularization(0.05, n_pairs=600, n_users=100, n_items=20) == 0.5


def test_planted_interactions_are_distinct_seeded_and_follow_the_topics():
    data = als.planted_interactions(
        20_000, seed=3, n_topics=4, noise=0.0, pairs_per_user=10, users_per_item=25
    )
    keys = data.users.astype(np.int64) * data.n_items + data.items
    assert len(keys) == 20_000 and len(np.unique(keys)) == 20_000
    again = als.planted_interactions(
        20_000, seed=3, n_topics=4, noise=0.0, pairs_per_user=10, users_per_item=25
    )
    assert np.array_equal(data.items, again.items) and np.array_equal(data.weights, again.weights)
    # Without noise, a user's items come from the topics of their (sparse) mixture: the
    # user's top topic holds most of them, far above the 1/4 of a structureless draw.
    counts = np.zeros((data.n_users, 4))
    np.add.at(counts, (data.users, data.item_topics[data.items]), 1)
    busy = counts.sum(axis=1) >= 5
    assert (counts[busy].max(axis=1) / counts[busy].sum(axis=1)).mean() > 0.6


# ---------------------------------------------------------------------------------------------
# Spark


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


def _grouped_events(spark, store):
    """4 groups of 10 users; each user touches 6 of their group's 8 items, one a day."""
    rng = np.random.default_rng(21)
    start = dt.datetime(2026, 11, 10, 9, 0, 0)
    rows = []
    for group in range(4):
        items = [f"g{group}i{j}" for j in range(8)]
        for member in range(10):
            user = f"g{group}u{member}"
            for day, item in enumerate(rng.permutation(items)[:6]):
                ts = start + dt.timedelta(days=day, minutes=member)
                ds = ts.date().isoformat()
                rows.append(
                    (f"{user}-{day}", user, str(item), "click", ts, None, None, 2.0, ds, ds)
                )
    store.append("events_clean", spark.createDataFrame(rows, store.spec("events_clean").schema))


@pytest.mark.spark
@pytest.mark.slow  # three ALS fits
def test_tune_als_picks_the_best_trial_and_logs_one_mlflow_run_per_trial(spark, tmp_path, store):
    from llmrec_spark.pipeline.runner import make_context
    from llmrec_spark.runtime.tracking import tracking_uri
    from tests.conftest import make_config

    cfg = make_config(
        tmp_path,
        "als.search.rank=[1, 4, 8]",
        "als.search.reg_param=[0.05]",
        "als.search.alpha=[10.0]",
        "als.search.max_iter=[4]",
        "als.search.trials=0",
    )
    _grouped_events(spark, store)
    result = als.tune_als(make_context(cfg, spark, DS, store))

    trials = result["trials"]
    assert [t["params"] for t in trials] == [
        {"rank": r, "reg_param": 0.05, "alpha": 10.0, "max_iter": 4} for r in (1, 4, 8)
    ]
    scores = [t["metrics"]["ndcg@10"] for t in trials]
    assert result["best"]["trial"] == trials[int(np.argmax(scores))]["trial"]
    assert result["best"]["metrics"]["ndcg@10"] == max(scores)
    # Planted signal: four groups need more than one factor (rank 1 orders every user's
    # items along one line, so at most two groups get their own items first).
    assert min(scores[1:]) > scores[0] + 0.1
    assert result["best"]["params"]["rank"] in (4, 8)
    assert result["validation"]["users"] == 40

    client = mlflow.MlflowClient(tracking_uri=tracking_uri(cfg))
    parent = client.get_run(result["parent_run_id"])
    assert {k: parent.data.params[f"best.{k}"] for k in als.SEARCHED} == {
        k: str(v) for k, v in result["best"]["params"].items()
    }
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    by_id = {run.info.run_id: run for run in children}
    assert sorted(by_id) == sorted(t["run_id"] for t in trials)
    for trial in trials:
        run = by_id[trial["run_id"]]
        assert run.data.params == {k: str(v) for k, v in trial["params"].items()}
        assert run.data.metrics["ndcg_10"] == pytest.approx(trial["metrics"]["ndcg@10"])


@pytest.mark.spark
def test_tune_als_names_the_known_metrics_for_an_unknown_one(spark, tmp_path, store):
    from llmrec_spark.errors import ConfigError
    from llmrec_spark.pipeline.runner import make_context
    from tests.conftest import make_config

    cfg = make_config(tmp_path, "als.search.metric=ndgc@10")
    with pytest.raises(ConfigError) as error:
        als.tune_als(make_context(cfg, spark, DS, store))
    assert str(error.value) == (
        "als.search.metric: a metric@k of f1, hit_rate, map, ndcg, precision, recall, "
        "got 'ndgc@10'"
    )
