"""`llmrec bench quality`: its options, its config, and one tiny MovieLens-100K run end to end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from llmrec_spark.bench.quality import measure_quality, quality_config, run
from llmrec_spark.errors import InputError
from llmrec_spark.io.datasets import ML_100K_GENRES, RatingScale
from tests.conftest import make_config

N_USERS, N_ITEMS, RATED_PER_USER = 40, 20, 12
FIRST_TS = 1_700_000_000  # 2023-11-14T22:13:20Z


def write_ml100k(folder: Path, *, seed: int = 0) -> int:
    """A seeded MovieLens-100K folder: u.data (user, item, rating, epoch seconds; tabs) and
    u.item (latin-1, `|`, 19 genre flags). Returns the number of ratings."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for user in range(1, N_USERS + 1):
        items = rng.choice(np.arange(1, N_ITEMS + 1), RATED_PER_USER, replace=False)
        ratings = rng.choice([2, 3, 4, 5], RATED_PER_USER, p=[0.1, 0.15, 0.35, 0.4])
        for k, (item, rating) in enumerate(zip(items, ratings, strict=True)):
            ts = FIRST_TS + k * 86_400 + user * 60  # one rating a day, 12 days
            rows.append(f"{user}\t{item}\t{rating}\t{ts}\n")
    (folder / "u.data").write_text("".join(rows))
    lines = []
    for item in range(1, N_ITEMS + 1):
        flags = ["0"] * len(ML_100K_GENRES)
        flags[1 + item % 6] = "1"  # Action .. Crime, by item
        flags[8 + item % 3] = "1"  # Drama, Fantasy or Film-Noir
        lines.append(
            f"{item}|Film {item} (1995)|01-Jan-1995||http://films/{item}|{'|'.join(flags)}\n"
        )
    (folder / "u.item").write_text("".join(lines), encoding="latin-1")
    return len(rows)


def test_run_needs_a_dataset_folder_and_a_known_dataset(tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(InputError, match="needs the dataset folder"):
        run(cfg, {})
    with pytest.raises(InputError, match="unknown dataset 'netflix'"):
        run(cfg, {"path": str(tmp_path), "dataset": "netflix"})
    with pytest.raises(InputError, match="is not a folder"):
        run(cfg, {"path": str(tmp_path / "missing")})


def test_quality_config_moves_storage_and_widens_clean_for_ratings(tmp_path):
    cfg = make_config(tmp_path)
    root = str(tmp_path / "scratch")
    q = quality_config(cfg, root, span_days=30, ratings=RatingScale(0.5, 5.0, 0.5))
    assert q.storage.lakehouse == os.path.join(root, "lakehouse")
    assert q.storage.landing == os.path.join(root, "landing")
    assert (q.clean.rating_min, q.clean.rating_max, q.clean.rating_step) == (0.5, 5.0, 0.5)
    assert q.clean.max_late_days == 32 and q.clean.bot_max_events_per_day == 10**9
    assert (q.als.rank, q.als.max_iter, q.als.train_days, q.contrastive.train_days) == (
        64,
        15,
        32,
        32,
    )
    # Unset grids get the bench's own; a rating of 4 is the least positive.
    assert q.evaluate.tune_als_reg_params == [0.1, 0.3]
    assert q.evaluate.tune_tower_temperatures == [0.05, 0.1, 0.2]
    assert q.evaluate.cold_item_draws == 2
    assert q.evaluate.positive_min_weight == 4.0 * cfg.clean.rating_weight_scale


@pytest.mark.spark
@pytest.mark.slow
def test_quality_bench_on_a_tiny_movielens_reports_every_protocol(spark, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREC_QUALITY_GLOBAL", "0")  # the two bar protocols only
    folder = tmp_path / "ml-100k"
    n_ratings = write_ml100k(folder)
    cfg = make_config(
        tmp_path,
        "evaluate.ks=[10, 20]",
        "evaluate.bootstrap_samples=20",
        "evaluate.tune_als_reg_params=[0.1]",
        "evaluate.tune_als_alphas=[1.0]",
        "evaluate.tune_tower_temperatures=[0.1]",
        "evaluate.tune_text_kernels=[0.0]",
        "evaluate.tune_neighbour_factors=[0]",
        "evaluate.tune_text_weights=[0.0, 0.5]",
        "evaluate.tune_text_half_lives=[0.0]",
        "evaluate.tune_recent_weights=[0.0]",
        "evaluate.tune_recent_half_lives=[1.0]",
        "evaluate.tune_cold_offsets=[0.0, 1.0]",
        "evaluate.cold_item_draws=1",
        "contrastive.epochs=1",
        "contrastive.members=1",
        "contrastive.num_processes=1",
        "contrastive.hidden_dim=32",
        "contrastive.out_dim=16",
        "contrastive.num_sampled_negatives=8",
    )

    result = measure_quality(spark, cfg, dataset="movielens", path=str(folder))

    assert (result["dataset"], result["layout"], result["path"]) == (
        "movielens",
        "ml-100k",
        str(folder),
    )
    clean = result["stages"]["clean"]
    assert clean["rows_in"] == n_ratings and clean["rows_out"] == n_ratings
    assert clean["rows_quarantined"] == 0
    assert set(result["users"]) == {"user_temporal", "cold_item"}
    assert set(result["users"]["cold_item"]) == {"cold_only", "mixed"}
    assert 0 < result["users"]["user_temporal"]["warm"] <= N_USERS
    assert result["global_temporal"] is None
    # The single-value grids were the ones searched.
    assert result["als"] | {"trials": None} == {
        "rank": 64,
        "max_iter": 15,
        "reg_param": 0.1,
        "alpha": 1.0,
        "trials": None,
    }
    assert list(result["als"]["trials"]) == ["reg=0.1,alpha=1"]
    assert result["validation"]["tower"]["temperature"] == 0.1
    assert 0 < result["validation"]["development_events"] < n_ratings
    assert set(result["hybrid_params"]) == {
        "text_finetuned",
        "text_frozen_kernel",
        "als_recent",
        "hybrid",
        "hybrid_frozen",
    }
    assert result["hybrid_params"]["hybrid"]["text_weight"] in (0.0, 0.5)
    assert result["hybrid_params"]["hybrid"]["cold_offset"] in (0.0, 1.0)
    assert Path(result["report"]) == Path(cfg.path(cfg.storage.reports_dir)) / (
        "quality-movielens-ml-100k.html"
    )
    assert Path(result["report"]).is_file()

    warm = result["user_temporal"]
    assert {"popularity", "als", "hybrid", "text_finetuned"} <= set(warm)
    assert all(0.0 <= warm[m]["ndcg@10"] <= 1.0 for m in warm)
    cold = result["cold_item"]
    # ALS cannot rank a cold item: it has only the mixed view's numbers.
    assert set(cold["als"]) == {"mixed_ndcg@10", "mixed_cold_recall@20"}
    assert {"recall@20", "ndcg@20", "mixed_ndcg@10"} <= set(cold["text_finetuned"])

    draws = result["cold_item_draws"]
    assert draws["seeds"] == [5, 105]  # evaluate.seed, then seed + 100
    assert all(n > 0 for n in draws["cold_items"])
    for model, recalls in draws["recall@20"].items():
        # The first draw is the split the cold_item numbers above come from.
        assert recalls[0] == cold[model]["recall@20"]
        # The mean is over the draws' values (each rounded to 4 places, so within 1e-4).
        values = [r for r in recalls if r is not None]
        assert draws["mean_recall@20"][model] == pytest.approx(np.mean(values), abs=1e-4)
    assert result["seconds"] > 0
