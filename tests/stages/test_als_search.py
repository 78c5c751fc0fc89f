"""The `tune-als` search: its grid, the best trial, driver-side top-k, and the search end to end."""

from __future__ import annotations

import dataclasses
import datetime as dt

import mlflow
import numpy as np
import pytest

from llmrec_spark.config import AlsSearchConfig
from llmrec_spark.stages import als_search

DS = "2026-11-23"


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_top_k_unseen_excludes_seen_items_and_breaks_ties_by_lower_index():
    users = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    items = np.array([[3.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    # user 0 scores 3, 2, 0, 1 and has seen item 0; user 1 scores 0, 0, 1, 1 and has seen none.
    top = als_search.top_k_unseen(users, items, [np.array([0]), np.array([], dtype=int)], 3)
    assert [t.tolist() for t in top] == [[1, 3, 2], [2, 3, 0]]


def test_top_k_unseen_returns_fewer_when_the_user_has_seen_almost_everything():
    users = np.array([[1.0]], dtype=np.float32)
    items = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    assert [t.tolist() for t in als_search.top_k_unseen(users, items, [np.array([1, 2])], 2)] == [
        [0]
    ]


def test_search_trials_is_the_grid_or_a_seeded_sample_of_it_in_grid_order():
    search = AlsSearchConfig(
        rank=[8, 16], reg_param=[0.1], alpha=[1.0, 5.0], max_iter=[3], trials=0
    )
    assert als_search.search_trials(search) == [
        {"rank": 8, "reg_param": 0.1, "alpha": 1.0, "max_iter": 3},
        {"rank": 8, "reg_param": 0.1, "alpha": 5.0, "max_iter": 3},
        {"rank": 16, "reg_param": 0.1, "alpha": 1.0, "max_iter": 3},
        {"rank": 16, "reg_param": 0.1, "alpha": 5.0, "max_iter": 3},
    ]
    grid = als_search.search_trials(search)
    sample = als_search.search_trials(AlsSearchConfig(**{**vars(search), "trials": 2}))
    assert len(sample) == 2 and sample[0] != sample[1]
    assert sorted(grid.index(t) for t in sample) == [grid.index(t) for t in sample]
    assert als_search.search_trials(AlsSearchConfig(**{**vars(search), "trials": 2})) == sample
    assert als_search.search_trials(AlsSearchConfig(**{**vars(search), "trials": 9})) == grid


def test_best_trial_takes_the_highest_metric_and_the_earliest_of_equals():
    trials = [
        {"trial": 1, "metrics": {"ndcg@10": 0.2}},
        {"trial": 2, "metrics": {"ndcg@10": 0.5}},
        {"trial": 3, "metrics": {"ndcg@10": 0.5}},
    ]
    assert als_search.best_trial(trials, "ndcg@10")["trial"] == 2


# ---------------------------------------------------------------------------------------------
# Spark


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
    result = als_search.tune_als(make_context(cfg, spark, DS, store))

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
    assert {k: parent.data.params[f"best.{k}"] for k in als_search.SEARCHED} == {
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
@pytest.mark.parametrize("local_max_pairs", [1_000_000, 0], ids=["driver", "executors"])
def test_tune_als_with_the_cg_solver_finds_the_planted_groups(
    spark, tmp_path, store, local_max_pairs
):
    from llmrec_spark.pipeline.runner import make_context
    from tests.conftest import make_config

    cfg = make_config(
        tmp_path,
        "als.solver=cg",
        "als.reg_scaling=constant",
        f"als.cg_local_max_pairs={local_max_pairs}",
        "als.search.rank=[1, 8]",
        "als.search.reg_param=[1.0]",
        "als.search.alpha=[1.0]",
        "als.search.max_iter=[6]",
        "als.search.trials=0",
    )
    _grouped_events(spark, store)
    result = als_search.tune_als(make_context(cfg, spark, DS, store))

    scores = [t["metrics"]["ndcg@10"] for t in result["trials"]]
    assert scores[1] > scores[0] + 0.1  # rank 8 separates the four groups, rank 1 cannot
    assert result["best"]["params"]["rank"] == 8


@pytest.mark.spark
def test_tune_als_checks_a_config_built_in_code_and_names_the_known_metrics(spark, tmp_path, store):
    from llmrec_spark.errors import ConfigError
    from llmrec_spark.pipeline.runner import make_context
    from tests.conftest import make_config

    cfg = make_config(tmp_path)
    search = dataclasses.replace(cfg.als.search, metric="ndgc@10")
    cfg = dataclasses.replace(cfg, als=dataclasses.replace(cfg.als, search=search))
    with pytest.raises(ConfigError) as error:
        als_search.tune_als(make_context(cfg, spark, DS, store))
    assert str(error.value) == (
        "als.search.metric: a metric@k of f1, hit_rate, map, ndcg, precision, recall, "
        "got 'ndgc@10'"
    )


@pytest.mark.spark
def test_tune_als_without_validation_users_says_to_run_clean(spark, tmp_path, store):
    from llmrec_spark.errors import InputError
    from llmrec_spark.pipeline.runner import make_context
    from tests.conftest import make_config

    _grouped_events(spark, store)  # every event on 2026-11-10 or later
    with pytest.raises(InputError) as error:
        als_search.tune_als(make_context(make_config(tmp_path), spark, "2026-11-01", store))
    assert str(error.value) == (
        "tune-als: no validation users in the 90 days up to 2026-11-01 (users need 3+ training "
        "items and a held-out positive); run `llmrec clean` first"
    )
