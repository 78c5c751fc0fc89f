"""`llmrec bench quality`: its options, its config, and tiny MovieLens-100K and Amazon runs end to end."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest

from llmrec_spark.bench import quality
from llmrec_spark.bench.quality import DATASETS, measure_quality, quality_config, run
from llmrec_spark.errors import InputError
from llmrec_spark.io.datasets import ML_100K_GENRES, RATING_SCALES, RatingScale
from tests.conftest import make_config

N_USERS, N_ITEMS, RATED_PER_USER = 40, 20, 12
FIRST_TS = 1_700_000_000  # 2023-11-14T22:13:20Z
DAY = 86_400
FIRST_DAY = 1_699_920_000  # 2023-11-14T00:00:00Z: Amazon's unixReviewTime is a whole day
# write_amazon's planted rows beyond N_USERS * RATED_PER_USER reviews: 3 repeats of a review
# on its own day (one line verbatim, two with other stars), 2 re-ratings days later, and
# 1 review of an item the metadata lacks.
AMAZON_SAME_DAY_REPEATS, AMAZON_UNKNOWN_ITEMS = 3, 1
# Single-value grids and a one-epoch tower: a tiny end-to-end run in a few minutes.
TINY_QUALITY = (
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


def write_amazon(folder: Path, *, seed: int = 0) -> int:
    """A seeded Amazon-reviews folder: gzipped review JSON lines (two reviews a user a day, so
    timestamps tie) with the planted repeats above, and plain metadata JSON lines, half in the
    2014 style (single quotes, `categories` paths), half in the 2018 style (`category`, a list
    description). Returns the number of review lines."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def review(user: int, asin: str, stars: int, day: int) -> str:
        ts = FIRST_DAY + day * DAY
        return json.dumps(
            {
                "reviewerID": f"A{user:03d}",
                "asin": asin,
                "overall": float(stars),
                "unixReviewTime": ts,
                "reviewText": "Fine.",
                "verified": True,
            }
        )

    lines, firsts = [], {}
    for user in range(1, N_USERS + 1):
        items = rng.choice(np.arange(1, N_ITEMS + 1), RATED_PER_USER, replace=False)
        stars = rng.choice([1, 2, 3, 4, 5], RATED_PER_USER, p=[0.05, 0.05, 0.1, 0.3, 0.5])
        for k, (item, star) in enumerate(zip(items, stars, strict=True)):
            lines.append(review(user, f"B{item:09d}", int(star), k // 2))
        firsts[user] = (f"B{items[0]:09d}", int(stars[0]))
    lines.append(review(1, *firsts[1], 0))  # the same line again
    # The same day with other stars; then days after the user's last review.
    lines += [review(u, firsts[u][0], firsts[u][1] % 5 + 1, 0) for u in (2, 3)]
    lines += [review(u, firsts[u][0], 5, 8) for u in (4, 5)]
    lines.append(review(6, "B999999999", 5, 1))
    (folder / "Toys_and_Games_5.json.gz").write_bytes(gzip.compress("\n".join(lines).encode()))
    meta = []
    for item in range(1, N_ITEMS + 1):
        kind = ("puzzle", "doll", "kite", "board game")[item % 4]
        if item % 2:
            meta.append(
                f"{{'asin': 'B{item:09d}', 'title': 'Toy {item}: a {kind}', "
                f"'categories': [['Toys & Games', '{kind.title()}s']], 'brand': 'Maker {item % 3}'}}"
            )
        else:
            record = {
                "asin": f"B{item:09d}",
                "title": f"Toy {item}: a {kind}",
                "description": [f"A {kind} for all ages.", "Boxed."],
                "category": ["Toys & Games", f"{kind.title()}s"],
            }
            meta.append(json.dumps(record))
    (folder / "meta_Toys_and_Games.json").write_text("\n".join(meta) + "\n")
    return len(lines)


def test_run_needs_a_dataset_folder_and_a_known_dataset(tmp_path):
    cfg = make_config(tmp_path)
    with pytest.raises(InputError, match="needs the dataset folder"):
        run(cfg, {})
    with pytest.raises(InputError, match="unknown dataset 'netflix'"):
        run(cfg, {"path": str(tmp_path), "dataset": "netflix"})
    with pytest.raises(InputError, match="is not a folder"):
        run(cfg, {"path": str(tmp_path / "missing")})


def test_run_on_amazon_checks_the_folder_holds_the_dataset_asked_for(tmp_path, monkeypatch):
    amazon, movielens = tmp_path / "amazon", tmp_path / "ml-100k"
    write_amazon(amazon)
    write_ml100k(movielens)
    sessions: list[object] = []

    class NoSpark:
        def stop(self) -> None:
            pass

    def fake_build_spark(cfg):
        sessions.append(cfg)
        return NoSpark()

    # Validation only: no Spark session, no pipeline run.
    monkeypatch.setattr(quality, "build_spark", fake_build_spark)
    monkeypatch.setattr(
        quality, "measure_quality", lambda spark, cfg, *, dataset, path: (dataset, path)
    )
    cfg = make_config(tmp_path)

    assert run(cfg, {"dataset": "amazon", "path": str(amazon)}) == ("amazon", str(amazon))
    # Without --dataset the folder's layout names it.
    assert run(cfg, {"path": str(amazon)}) == ("amazon", str(amazon))
    assert run(cfg, {"path": str(movielens)}) == ("movielens", str(movielens))
    assert len(sessions) == 3
    with pytest.raises(
        InputError,
        match=r"--dataset movielens but .*amazon holds amazon files \(the amazon layout\)",
    ):
        run(cfg, {"dataset": "movielens", "path": str(amazon)})
    with pytest.raises(
        InputError,
        match=r"--dataset amazon but .*ml-100k holds movielens files \(the ml-100k layout\)",
    ):
        run(cfg, {"dataset": "amazon", "path": str(movielens)})
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no known dataset layout in .*empty"):
        run(cfg, {"dataset": "amazon", "path": str(tmp_path / "empty")})
    assert len(sessions) == 3  # a rejected run starts no session


def test_every_loadable_layout_belongs_to_one_dataset():
    owners = {
        layout: [d for d, layouts in DATASETS.items() if layout in layouts]
        for layout in RATING_SCALES
    }
    assert owners == {
        "ml-100k": ["movielens"],
        "ml-1m": ["movielens"],
        "ml-latest": ["movielens"],
        "amazon": ["amazon"],
    }


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
    assert (q.als.solver, q.als.reg_scaling) == ("cg", "constant")
    # Unset grids get the bench's own; a rating of 4 is the least positive, and ALS tries
    # training on every rating or only on those.
    assert q.evaluate.tune_als_reg_params == [3.0, 10.0, 30.0]
    assert q.evaluate.tune_als_alphas == [0.03, 0.1, 0.3, 1.0]
    assert q.evaluate.tune_als_min_weights == [0.0, 4.0 * cfg.clean.rating_weight_scale]
    assert q.evaluate.implicit_anchor is True
    assert q.evaluate.tune_tower_temperatures == [0.05, 0.1, 0.2]
    assert q.evaluate.cold_item_draws == 2
    assert q.evaluate.positive_min_weight == 4.0 * cfg.clean.rating_weight_scale


@pytest.mark.spark
@pytest.mark.slow
def test_quality_bench_on_a_tiny_movielens_reports_every_protocol(spark, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREC_QUALITY_GLOBAL", "0")  # the two bar protocols only
    folder = tmp_path / "ml-100k"
    n_ratings = write_ml100k(folder)
    cfg = make_config(tmp_path, *TINY_QUALITY)

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
    # The single-value grids were the ones searched (min_weight: the bench's two rules).
    als = result["als"]
    assert (als["rank"], als["max_iter"], als["reg_param"], als["alpha"]) == (64, 15, 0.1, 1.0)
    assert als["min_weight"] in (0.0, 4.0)
    assert set(als["trials"]) == {
        "min_weight=0,reg_param=0.1,alpha=1",
        "min_weight=4,reg_param=0.1,alpha=1",
    }
    assert als["score"] == max(als["trials"].values()) and als["at_edge"] == []
    # The outside anchor: tuned on the grid (widened where it chose an edge), ranked beside.
    anchor = result["validation"]["implicit_als"]
    assert anchor["values"] in ("weights", "positives")
    assert anchor["factors"] in anchor["grid"]["factors"]
    assert len(anchor["trials"]) >= 2 * 3 * 3 * 5
    assert set(anchor["grid"]["alpha"]) >= {0.1, 0.3, 1.0, 3.0, 10.0}
    assert result["validation"]["tower"]["temperature"] == 0.1
    assert 0 < result["validation"]["development_events"] < n_ratings
    hybrid = result["hybrid_params"]["hybrid"]
    assert set(result["hybrid_params"]) == {
        "text_finetuned",
        "text_frozen_kernel",
        "als_recent",
        "hybrid",
        "hybrid_frozen",
        "hybrid_vae",  # mixes as the hybrid does, with the VAE beside ALS
    } | ({"hybrid_no_slots"} if hybrid["new_item_slots"] else set())
    assert result["hybrid_params"]["hybrid_vae"] == hybrid
    # The new-item slots were chosen on the bench's grid, in a list of recommend.top_n.
    assert hybrid["new_item_slots"] in (0, 1, 2, 3, 5) and hybrid["list_length"] == 20
    assert len(result["validation"]["cold_item.new_item_slots"]) == 1 + 4 * 5
    assert result["hybrid_params"]["hybrid"]["text_weight"] in (0.0, 0.5)
    assert result["hybrid_params"]["hybrid"]["cold_offset"] in (0.0, 1.0)
    assert Path(result["report"]) == Path(cfg.path(cfg.storage.reports_dir)) / (
        "quality-movielens-ml-100k.html"
    )
    assert Path(result["report"]).is_file()

    warm = result["user_temporal"]
    assert {"popularity", "als", "implicit_als", "hybrid", "text_finetuned"} <= set(warm)
    assert all(0.0 <= warm[m]["ndcg@10"] <= 1.0 for m in warm)
    cold = result["cold_item"]
    # ALS cannot rank a cold item: it has only the mixed view's numbers; nor can the anchor.
    assert set(cold["als"]) == {"mixed_ndcg@10", "mixed_cold_recall@20"}
    assert set(cold["implicit_als"]) == {"mixed_ndcg@10", "mixed_cold_recall@20"}
    # The Mult-VAE: ranked beside ALS everywhere, alone only on warm and mixed lists; its
    # weight in hybrid_vae chosen on validation; every claim with its paired interval.
    assert {"vae", "hybrid_vae"} <= set(warm)
    assert set(cold["vae"]) == {"mixed_ndcg@10", "mixed_cold_recall@20"}
    assert "hybrid_vae" in cold and "vae" not in result["cold_item_draws"]["recall@20"]
    vae = result["validation"]["vae"]
    assert vae["hybrid_weight"] in (0.1, 0.25, 0.5, 1.0, 2.0)
    assert vae[str(vae["hybrid_weight"])] == max(vae[str(w)] for w in (0.1, 0.25, 0.5, 1.0, 2.0))
    for claim in (
        "user_temporal.warm.ndcg@10: vae - als",
        "user_temporal.warm.ndcg@10: hybrid_vae - hybrid",
    ):
        mean, low, high = result["paired"][claim]
        assert low <= mean <= high, claim
    mean, _, _ = result["paired"]["user_temporal.warm.ndcg@10: vae - als"]
    assert mean == pytest.approx(warm["vae"]["ndcg@10"] - warm["als"]["ndcg@10"], abs=2e-4)
    checks = {c["check"]: c for c in result["bar"]}
    assert checks["user_temporal vae ndcg@10 >= 1.0x als"]["value"] == warm["vae"]["ndcg@10"]
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


@pytest.mark.spark
@pytest.mark.slow
def test_quality_bench_on_a_tiny_amazon_reports_every_protocol(spark, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMREC_QUALITY_GLOBAL", "0")  # the two bar protocols only
    folder = tmp_path / "amazon"
    assert write_amazon(folder) == 486  # 40 users x 12 reviews + 3 + 2 + 1 planted
    cfg = make_config(tmp_path, *TINY_QUALITY)

    result = measure_quality(spark, cfg, dataset="amazon", path=str(folder))

    assert (result["dataset"], result["layout"], result["path"]) == (
        "amazon",
        "amazon",
        str(folder),
    )
    # Same day, same (user, item): one event_id (amazon:user:item:day), so an exact duplicate
    # whatever its stars; days apart: two events, both clean. The unknown item is quarantined.
    assert result["stages"]["clean"] | {"seconds": None} == {
        "seconds": None,
        "rows_in": 486,
        "rows_out": 486 - AMAZON_SAME_DAY_REPEATS - AMAZON_UNKNOWN_ITEMS,
        "rows_quarantined": AMAZON_UNKNOWN_ITEMS,
        "rows_excluded": 0,
    }
    embed = result["stages"]["embed"]
    assert (embed["rows_in"], embed["rows_out"], embed["rows_quarantined"]) == (N_ITEMS, N_ITEMS, 0)
    assert 0 < result["users"]["user_temporal"]["warm"] <= N_USERS
    assert 0 < result["validation"]["development_events"] < 482
    assert Path(result["report"]).name == "quality-amazon.html"
    assert Path(result["report"]).is_file()

    warm = result["user_temporal"]
    assert {"popularity", "als", "implicit_als", "hybrid", "text_finetuned"} <= set(warm)
    assert all(0.0 <= warm[m]["ndcg@10"] <= 1.0 for m in warm)
    cold = result["cold_item"]
    assert set(cold["als"]) == {"mixed_ndcg@10", "mixed_cold_recall@20"}
    for model in ("text_finetuned", "hybrid"):
        assert {"recall@20", "ndcg@20", "mixed_ndcg@10"} <= set(cold[model])
        assert 0.0 <= cold[model]["recall@20"] <= 1.0
    assert all(n > 0 for n in result["cold_item_draws"]["cold_items"])


def test_bar_and_intervals_are_computed_from_the_evaluations_figures(tmp_path):
    from llmrec_spark.bench.quality import bar_json, interval_json
    from llmrec_spark.evaluation.evaluate import Evaluation
    from llmrec_spark.evaluation.report import Draw, ModelResult, ProtocolResult, ViewResult

    def result(**per_user):
        return ModelResult(per_user={k: np.array(v) for k, v in per_user.items()}, scalars={})

    warm = ViewResult(
        "warm",
        "",
        4,
        {
            "als": result(**{"ndcg@10": [0.2, 0.2, 0.2, 0.2]}),
            "implicit_als": result(**{"ndcg@10": [0.1, 0.3, 0.2, 0.2]}),
            "hybrid": result(**{"ndcg@10": [0.3, 0.2, 0.2, 0.2]}),
        },
    )
    mixed = ViewResult(
        "mixed",
        "",
        3,
        {
            "als": result(**{"ndcg@10": [0.1, 0.1, 0.1], "cold_recall@20": [0.0, np.nan, 0.0]}),
            "text_finetuned": result(
                **{"ndcg@10": [0.0, 0.0, 0.0], "cold_recall@20": [0.5, np.nan, 0.5]}
            ),
            "hybrid": result(**{"ndcg@10": [0.1, 0.2, 0.1], "cold_recall@20": [0.5, np.nan, 0.0]}),
        },
    )
    draws = [
        Draw(seed=5, users=3, cold_items=2, recall={"text_finetuned": 0.4, "text_frozen": 0.2}),
        Draw(seed=105, users=3, cold_items=2, recall={"text_finetuned": 0.2, "text_frozen": 0.2}),
    ]
    evaluation = Evaluation(
        [ProtocolResult("user_temporal", "", [warm]), ProtocolResult("cold_item", "", [mixed])],
        {},
        {},
        "report.html",
        1.0,
        draws,
    )
    checks = {c["check"].split(" >=")[0] + f" {c.get('factor')}": c for c in bar_json(evaluation)}
    ut = checks["user_temporal hybrid ndcg@10 1.0"]
    assert (ut["value"], ut["baseline"], ut["ratio"], ut["met"]) == (0.225, 0.2, 1.125, True)
    assert checks["user_temporal hybrid ndcg@10 1.05"]["met"] is True  # 0.225 / 0.2
    cold = checks["cold_item cold-only text_finetuned recall@20 (mean over picks) 1.3"]
    assert (cold["value"], cold["baseline"], cold["ratio"]) == (0.3, 0.2, 1.5)
    shown = checks["cold_item mixed hybrid cold_recall@20 0.5"]
    # Over the users with cold positives only: hybrid 0.25, text 0.5.
    assert (shown["value"], shown["baseline"], shown["ratio"], shown["met"]) == (
        0.25,
        0.5,
        0.5,
        True,
    )
    mixed_check = checks["cold_item mixed hybrid ndcg@10 1.03"]
    assert mixed_check["ratio"] == pytest.approx(1.333, abs=1e-3) and mixed_check["met"] is True
    # The cold_user check reads the paired interval: met only when its low end is above 0.
    key = "cold_user.warm.ndcg@10: profile_text - popularity"
    paired_check = [
        c for c in bar_json(evaluation, {key: [0.014, -0.009, 0.034]}) if "cold_user" in c["check"]
    ]
    assert paired_check == [
        {
            "check": "cold_user profile_text ndcg@10 above popularity (paired 95% interval above 0)",
            "difference": [0.014, -0.009, 0.034],
            "met": False,
        }
    ]
    assert [
        c["met"]
        for c in bar_json(evaluation, {key: [0.03, 0.01, 0.05]})
        if "cold_user" in c["check"]
    ] == [True]
    assert [c["met"] for c in bar_json(evaluation) if "cold_user" in c["check"]] == [None]

    cfg = make_config(tmp_path, "evaluate.bootstrap_samples=50")
    intervals = interval_json(evaluation, cfg)
    mean, low, high = intervals["user_temporal.warm.ndcg@10"]["implicit_als"]
    assert mean == 0.2 and low <= mean <= high and low >= 0.1 and high <= 0.3
    assert intervals["user_temporal.warm.ndcg@10"]["als"] == [0.2, 0.2, 0.2]
    assert intervals["cold_item.mixed.cold_recall@20"]["hybrid"][0] == 0.25
    assert "user_temporal.warm.ndcg@20" in intervals and not intervals["user_temporal.warm.ndcg@20"]


def test_grid_edges_names_each_choice_on_the_edge_of_its_grid(tmp_path):
    from llmrec_spark.bench.quality import grid_edges
    from llmrec_spark.core.hybrid import Mix
    from llmrec_spark.evaluation.evaluate import Evaluation

    cfg = make_config(
        tmp_path,
        "evaluate.tune_text_weights=[0.1, 0.5]",
        "evaluate.tune_cold_offsets=[0.0, 1.0]",
        "evaluate.tune_new_item_slots=[0, 3, 8]",
        "evaluate.tune_new_item_min_z=[0.0, 1.0]",
    )
    params = {
        # text weight 0.1: the grid's first value; cold offset 0: the setting's own bound.
        "hybrid": Mix(0.1, cold_offset=0.0, new_item_slots=8, new_item_min_z=0.0),
        "als_recent": Mix(0.0, recent_weight=0.35, recent_half_life=3.0),
    }
    tuning = {"als": {"alpha": 0.9, "at_edge": ["alpha"]}, "tower": {"at_edge": []}}
    evaluation = Evaluation([], params, tuning, "report.html", 1.0)
    assert grid_edges(evaluation, cfg) == [
        "hybrid.text_weight=0.1",
        "hybrid.new_item_slots=8",
        "hybrid.new_item_min_z=0",
        "als.alpha=0.9",
    ]
