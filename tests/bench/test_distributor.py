"""`llmrec bench distributor`: the planted data, the alternating timed runs, and a tiny real run
of both sides (two gloo processes each) whose ratio comes from the timed seconds."""

from __future__ import annotations

import types

import numpy as np
import pytest

from llmrec_spark.bench import distributor
from llmrec_spark.bench.distributor import (
    SIDES,
    bench_distributor,
    planted_catalog,
    planted_histories,
)
from tests.conftest import make_config


def test_the_planted_catalog_is_seeded_unit_rows_around_cluster_centroids():
    vectors, clusters = planted_catalog(30, dim=16, n_clusters=3, seed=5)
    again, same_clusters = planted_catalog(30, dim=16, n_clusters=3, seed=5)
    assert vectors.shape == (30, 16) and vectors.dtype == np.float32
    np.testing.assert_array_equal(vectors, again)
    np.testing.assert_array_equal(clusters, same_clusters)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    assert set(clusters.tolist()) <= {0, 1, 2}
    # Without noise an item is its centroid: items of one cluster coincide.
    exact, exact_clusters = planted_catalog(30, dim=16, n_clusters=3, seed=5, noise=0.0)
    first = np.flatnonzero(exact_clusters == exact_clusters[0])
    np.testing.assert_allclose(exact[first], np.repeat(exact[:1], len(first), axis=0), atol=1e-6)


def test_each_planted_user_touches_distinct_items_of_one_cluster_in_order():
    clusters = np.array([0, 1, 0, 1, 0, 1, 0, 1, 0])  # cluster 0: 5 items, cluster 1: 4 items
    events = planted_histories(clusters, n_users=6, items_per_user=4, seed=2)
    assert events == planted_histories(clusters, n_users=6, items_per_user=4, seed=2)
    for user in range(6):
        mine = [(item, step) for u, item, step in events if u == user]
        items = [item for item, _ in mine]
        assert [step for _, step in mine] == list(range(4))
        assert len(set(items)) == 4
        assert len({int(clusters[i]) for i in items}) == 1


def test_the_sides_alternate_which_goes_first_and_each_run_is_timed(monkeypatch, tmp_path):
    calls = []

    def fake_train(side, config, converter, work):
        calls.append((side, config["checkpoint_dir"].removeprefix(str(tmp_path))))
        return {"losses": [0.5], "steps": 3, "side": side}

    # perf_counter readings: a start and an end per run: 4, 1 | 3, 2 seconds.
    clock = iter([0.0, 4.0, 10.0, 11.0, 20.0, 23.0, 30.0, 32.0])
    monkeypatch.setattr(distributor, "_train", fake_train)
    monkeypatch.setattr(
        distributor, "time", types.SimpleNamespace(perf_counter=lambda: next(clock))
    )
    timings, outputs = distributor._time_both_sides(
        {"epochs": 1}, converter=None, scratch=str(tmp_path), runs=2
    )
    assert calls == [
        ("torchrun", "/torchrun-0/checkpoints"),
        ("distributor", "/distributor-0/checkpoints"),
        ("distributor", "/distributor-1/checkpoints"),
        ("torchrun", "/torchrun-1/checkpoints"),
    ]
    assert timings == {"torchrun": [4.0, 2.0], "distributor": [1.0, 3.0]}
    assert outputs["torchrun"]["side"] == "torchrun"
    assert outputs["distributor"]["side"] == "distributor"


@pytest.mark.spark
def test_a_tiny_run_of_both_sides_reports_the_ratio_of_their_best_seconds(spark, tmp_path):
    cfg = make_config(
        tmp_path,
        "contrastive.epochs=1",
        "contrastive.members=1",
        "contrastive.batch_size=32",
        "contrastive.hidden_dim=16",
        "contrastive.out_dim=8",
        "contrastive.num_sampled_negatives=8",
    )
    # 1200 items in 40 clusters: every cluster has the 12 items a planted user touches.
    _, clusters = planted_catalog(1200, dim=384, n_clusters=40, seed=cfg.contrastive.seed)
    assert np.bincount(clusters).min() >= 12
    result = bench_distributor(spark, cfg, n_users=20, n_items=1200, runs=1)
    # 20 users x 12 planted items each, every event a positive: one example per event.
    assert (result["users"], result["items"], result["examples"]) == (20, 1200, 240)
    assert (result["epochs"], result["processes"], result["runs"]) == (1, 2, 1)
    seconds = result["all_seconds"]
    assert len(seconds["distributor"]) == len(seconds["torchrun"]) == 1
    assert result["distributor_seconds"] == seconds["distributor"][0] > 0
    assert result["torchrun_seconds"] == seconds["torchrun"][0] > 0
    assert result["overhead_ratio"] == pytest.approx(
        result["distributor_seconds"] / result["torchrun_seconds"], rel=0.01
    )
    # The same files, config and seeds: both sides train the same steps to the same loss.
    assert result["steps"]["distributor"] == result["steps"]["torchrun"] > 0
    assert result["losses"]["distributor"] == pytest.approx(result["losses"]["torchrun"], rel=1e-3)
    assert len(result["losses"]["torchrun"]) == 1
    assert result["sides"] == SIDES
