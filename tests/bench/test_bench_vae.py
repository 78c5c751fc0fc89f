"""`llmrec bench vae`: the planted users, the settings, the alternating timed runs, the scoring
comparison on a tiny model, and a tiny real run of both training sides (two gloo processes each)."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch

from llmrec_spark.bench import vae as bench
from llmrec_spark.bench.vae import (
    SIDES,
    bench_scoring,
    bench_settings,
    bench_vae,
    numpy_top_n,
    planted_taste_histories,
    product_top_n,
    top_n_agreement,
    vae_item_matrices,
)
from llmrec_spark.core.vae import MultVAE, numpy_params
from tests.conftest import make_config


def test_planted_users_have_distinct_items_weighted_one_to_five_and_are_seeded():
    histories, weights = planted_taste_histories(50, 200, seed=3, groups=4, items_per_user=10)
    again, same_weights = planted_taste_histories(50, 200, seed=3, groups=4, items_per_user=10)
    for items, w, items_again, w_again in zip(histories, weights, again, same_weights, strict=True):
        np.testing.assert_array_equal(items, items_again)
        np.testing.assert_array_equal(w, w_again)
        assert 5 <= len(items) <= 15 and len(w) == len(items)
        assert np.all(np.diff(items) > 0) and items.min() >= 0 and items.max() < 200
        assert set(w.tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    other, _ = planted_taste_histories(50, 200, seed=4, groups=4, items_per_user=10)
    assert any(not np.array_equal(a, b) for a, b in zip(histories, other, strict=True))


def test_a_user_all_in_group_draws_from_one_taste_group_only():
    # Two groups over 40 items: joining users who share an item leaves the two groups'
    # disjoint item pools, never one pool (a user across groups would join them).
    histories, _ = planted_taste_histories(30, 40, seed=1, groups=2, items_per_user=4, in_group=1.0)
    pools: list[set[int]] = []
    for items in histories:
        mine = set(items.tolist())
        for pool in [p for p in pools if p & mine]:
            pools.remove(pool)
            mine |= pool
        pools.append(mine)
    assert len(pools) == 2 and not pools[0] & pools[1]
    assert len(pools[0] | pools[1]) > 30  # the users cover most of both groups


def test_settings_come_from_options_then_the_environment_then_the_defaults(monkeypatch):
    monkeypatch.setenv("LLMREC_BENCH_USERS", "900")
    monkeypatch.delenv("LLMREC_BENCH_ITEMS", raising=False)
    monkeypatch.setenv("LLMREC_BENCH_EPOCHS", "7")
    settings = bench_settings({"epochs": 2, "dataset": None, "path": None})
    assert settings == {
        "users": 900,
        "items": 3000,
        "epochs": 2,
        "runs": 2,
        "scoring_runs": 3,
        "threads": 1,
    }


def test_the_sides_alternate_distributor_first_and_each_run_is_timed(monkeypatch, tmp_path):
    calls = []

    def fake_train(side, config, converter, work):
        calls.append((side, config["checkpoint_dir"].removeprefix(str(tmp_path))))
        return {"losses": [0.5], "steps": 3, "side": side}

    # perf_counter readings: a start and an end per run: 4, 1 | 3, 2 seconds.
    clock = iter([0.0, 4.0, 10.0, 11.0, 20.0, 23.0, 30.0, 32.0])
    monkeypatch.setattr(bench, "train_side", fake_train)
    monkeypatch.setattr(bench, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    timings, outputs = bench.time_sides({"epochs": 1}, None, str(tmp_path), runs=2)
    assert calls == [
        ("distributor", "/distributor-0/checkpoints"),
        ("torchrun", "/torchrun-0/checkpoints"),
        ("distributor", "/distributor-1/checkpoints"),
        ("torchrun", "/torchrun-1/checkpoints"),
    ]
    assert timings == {"distributor": [4.0, 3.0], "torchrun": [1.0, 2.0]}
    assert outputs["torchrun"]["side"] == "torchrun"


def test_top_n_agreement_compares_sets_per_user():
    product = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    reference = np.array([[3, 2, 1], [4, 5, 0], [7, 8, 9]])
    assert top_n_agreement(product, reference) == pytest.approx(2 / 3)
    assert top_n_agreement(product[:0], reference[:0]) == 1.0


def _tiny_model(n_items: int = 60) -> MultVAE:
    torch.manual_seed(11)
    return MultVAE(n_items, (16,), 8).eval()


def test_the_numpy_reference_is_the_best_unseen_logits_in_order():
    model = _tiny_model()
    histories, weights = planted_taste_histories(30, 60, seed=2, groups=3, items_per_user=8)
    top = numpy_top_n(numpy_params(model), histories, weights, n_items=60, n=5, block=7)
    with torch.inference_mode():
        x = torch.zeros(30, 60)
        for u, (items, w) in enumerate(zip(histories, weights, strict=True)):
            x[u, torch.as_tensor(items)] = torch.as_tensor(w)
        logits = model(x)[0].numpy()
    for u, items in enumerate(histories):
        unseen = np.setdiff1d(np.arange(60), items)
        expected = unseen[np.argsort(-logits[u, unseen], kind="stable")[:5]]
        np.testing.assert_array_equal(top[u], expected)


def test_the_product_path_finds_the_numpy_reference_lists():
    model = _tiny_model()
    histories, weights = planted_taste_histories(40, 60, seed=5, groups=3, items_per_user=8)
    product = product_top_n(model, vae_item_matrices(model), histories, weights, n=10, block=16)
    reference = numpy_top_n(numpy_params(model), histories, weights, n_items=60, n=10, block=16)
    assert product.shape == reference.shape == (40, 10)
    np.testing.assert_array_equal(product[:, 0], reference[:, 0])
    assert top_n_agreement(product, reference) == 1.0
    seen = [set(h.tolist()) & set(p.tolist()) for h, p in zip(histories, product, strict=True)]
    assert seen == [set()] * 40


def test_the_scoring_comparison_reports_both_rates_their_ratio_and_full_agreement():
    model = _tiny_model()
    histories, weights = planted_taste_histories(40, 60, seed=5, groups=3, items_per_user=8)
    threads_before = torch.get_num_threads()
    result = bench_scoring(model, histories, weights, block_size=16, runs=2, threads=1, n=10)
    assert result["top_n_agreement"] == 1.0
    assert (result["n"], result["block_size"], result["runs"]) == (10, 16, 2)
    assert len(result["seconds"]["product"]) == len(result["seconds"]["numpy"]) == 2
    rates = result["users_per_second"]
    assert rates["product"] > 0 and rates["numpy"] > 0
    assert result["scoring_ratio"] == pytest.approx(rates["product"] / rates["numpy"], rel=0.01)
    assert result["scoring_ratio_met"] == (result["scoring_ratio"] >= 0.8)
    assert result["threads"]["torch"] == 1
    assert all(pool["num_threads"] == 1 for pool in result["threads"]["blas"])
    assert torch.get_num_threads() == threads_before


@pytest.mark.spark
@pytest.mark.slow
def test_a_tiny_run_of_both_sides_trains_the_same_model_and_scores_like_numpy(spark, tmp_path):
    cfg = make_config(
        tmp_path,
        "vae.hidden_dim=16",
        "vae.latent_dim=8",
        "vae.batch_size=32",
        "recommend.user_block_size=64",
    )
    threads_before = torch.get_num_threads()
    result = bench_vae(
        spark, cfg, users=200, items=100, epochs=2, runs=1, scoring_runs=1, threads=1
    )
    assert torch.get_num_threads() == threads_before
    assert (result["users"], result["items"], result["processes"]) == (200, 100, 2)
    assert result["model"] == {"hidden_dim": 16, "latent_dim": 8, "batch_size": 32, "epochs": 2}
    training = result["training"]
    seconds = training["seconds"]
    assert len(seconds["distributor"]) == len(seconds["torchrun"]) == 1
    assert training["median_seconds"]["distributor"] == seconds["distributor"][0] > 0
    assert training["median_seconds"]["torchrun"] == seconds["torchrun"][0] > 0
    assert (
        result["overhead_ratio"]
        == training["overhead_ratio"]
        == pytest.approx(seconds["distributor"][0] / seconds["torchrun"][0], rel=0.01)
    )
    assert result["overhead_ratio_met"] == (result["overhead_ratio"] <= 1.15)
    # The same files, config and seeds: both sides take the same steps to the same losses.
    assert training["steps"]["distributor"] == training["steps"]["torchrun"] > 0
    assert len(training["losses"]["torchrun"]) == 2
    assert training["final_loss"]["distributor"] == pytest.approx(
        training["final_loss"]["torchrun"], rel=1e-4
    )
    assert training["files"] >= 4
    scoring = result["scoring"]
    assert scoring["top_n_agreement"] >= 0.99
    assert scoring["block_size"] == 64 and scoring["n"] == 20
    assert result["scoring_ratio"] == scoring["scoring_ratio"] > 0
    assert result["sides"] == SIDES
    assert json.loads(json.dumps(result)) == result
