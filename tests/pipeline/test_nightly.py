"""End to end: tiny generated data through every real stage, then the published table's content."""

from __future__ import annotations

import json
import os

import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from llmrec_spark.io.demo import generate_demo
from llmrec_spark.pipeline.runner import make_context, run_nightly
from llmrec_spark.stages.als import training_window
from tests.conftest import make_config

pytestmark = pytest.mark.spark

DS = "2026-11-23"
TOP_N = 5
TINY = [
    "demo.n_users=60",
    "demo.n_items=80",
    "demo.n_topics=4",
    "demo.days=3",
    "demo.events_per_day=600",
    "demo.n_bots=1",
    "demo.bot_events_per_day=700",
    "demo.new_items=5",
    "clean.bot_max_events_per_day=300",
    "als.rank=8",
    "als.max_iter=4",
    "contrastive.epochs=1",
    "contrastive.batch_size=64",
    "contrastive.num_sampled_negatives=32",
    "contrastive.hidden_dim=64",
    "contrastive.out_dim=32",
    f"recommend.top_n={TOP_N}",
    "evaluate.bootstrap_samples=20",
    # The Mult-VAE on (off by default): trained, measured and mixed into the scores.
    "vae.enabled=true",
    "vae.hidden_dim=32",
    "vae.latent_dim=8",
    "vae.epochs=3",
    "vae.batch_size=16",
    # The user tower: enough steps on a few hundred examples to learn the demo's topics.
    "profile.epochs=20",
    "profile.learning_rate=0.01",
]


@pytest.fixture(scope="module")
def nightly(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("nightly")
    cfg = make_config(root, *TINY)
    generate_demo(cfg.demo, cfg.path(cfg.storage.landing), DS)
    _add_newcomers(cfg.path(cfg.storage.landing))
    first = run_nightly(cfg, spark, DS)
    return cfg, first


# Users who filled in a profile and have no event yet: the user tower scores them.
NEWCOMERS = ("newcomer-a", "newcomer-b")


def _add_newcomers(landing: str) -> None:
    """Two profiles without events, copying the interests of the first two profiled users
    whose interests differ."""
    path = os.path.join(landing, "users", "profiles.jsonl")
    with open(path, encoding="utf-8") as f:
        profiles = [json.loads(line) for line in f]
    interests = list(dict.fromkeys(p["interests"] for p in profiles))[:2]
    with open(path, "a", encoding="utf-8") as f:
        for user, text in zip(NEWCOMERS, interests, strict=True):
            f.write(json.dumps({"user_id": user, "interests": text, "bio": None}) + "\n")


def test_every_stage_ran_and_reconciled(nightly):
    cfg, summary = nightly
    stages = [r.stage for r in summary.records]
    assert stages[-6:] == [
        "embed",
        "train-als",
        "train-vae",
        "train-contrastive",
        "evaluate",
        "recommend",
    ]
    cleaned = [r.ds for r in summary.records if r.stage == "clean"]
    assert cleaned == ["2026-11-21", "2026-11-22", "2026-11-23"]
    for record in summary.records:
        if record.stage == "clean":
            r = record.result
            assert r.rows_in == r.rows_out + r.rows_duplicate + r.rows_quarantined + r.rows_excluded
            assert r.rows_duplicate > 0 and r.rows_quarantined > 0


def test_published_table_content(spark, nightly):
    cfg, summary = nightly
    ctx = make_context(cfg, spark, DS)
    recs = ctx.store.read("recommendations", where={"ds": DS}).toPandas()
    history = (
        training_window(ctx.store.read("events_clean"), DS, cfg.als.train_days)
        .select("user_id", "item_id")
        .distinct()
        .toPandas()
    )
    seen = history.groupby("user_id")["item_id"].apply(set).to_dict()
    eligible = set(seen)
    assert eligible <= set(recs["user_id"])
    for user, rows in recs.groupby("user_id"):
        rows = rows.sort_values("rank")
        assert rows["rank"].tolist() == list(range(1, TOP_N + 1)), user
        assert rows["item_id"].nunique() == TOP_N, user
        assert not (set(rows["item_id"]) & seen.get(user, set())), f"{user} got a seen item"
        scores = rows["score"].tolist()
        assert all(a >= b for a, b in zip(scores, scores[1:], strict=False)), user
    assert set(recs["source"]) <= {
        "als",
        "text",
        "hybrid",
        "popular",
        "vae",
        "hybrid_vae",
        "profile",
    }
    # The users with a profile and no event in the window (the newcomers among them) get the
    # user tower's lists, one per profile.
    by_profile = recs[recs["source"] == "profile"]
    assert set(NEWCOMERS) <= set(by_profile["user_id"])
    assert not set(by_profile["user_id"]) & set(seen)
    lists = {
        u: rows.sort_values("rank")["item_id"].tolist() for u, rows in by_profile.groupby("user_id")
    }
    assert all(len(items) == TOP_N for items in lists.values())
    assert lists[NEWCOMERS[0]] != lists[NEWCOMERS[1]]
    # The VAE's sources mark exactly the users scored without an ALS factor (a holdout user
    # whose every event was held out, say).
    factors = ctx.store.read("als_factors", where={"ds": DS}).where("kind = 'user'").toPandas()
    by_vae = set(recs.loc[recs["source"].isin(["vae", "hybrid_vae"]), "user_id"])
    assert not by_vae & set(factors["id"])
    assert not set(by_profile["user_id"]) & set(factors["id"])
    assert (recs["model_version"] == summary.mlflow_run_id).all()
    catalog = set(ctx.store.read("items").select("item_id").toPandas()["item_id"])
    assert set(recs["item_id"]) <= catalog


def test_rerun_same_date_is_idempotent(spark, nightly):
    cfg, first = nightly
    ctx = make_context(cfg, spark, DS)
    table = ctx.store.path("recommendations")
    before_version = DeltaTable(table).version()
    before = (
        ctx.store.read("recommendations", where={"ds": DS})
        .select("user_id", "rank", "item_id")
        .toPandas()
    )
    clean_before = ctx.store.read("events_clean").count()
    second = run_nightly(cfg, spark, DS)
    # The metric gate found both runs' evaluations: the first published, the rerun compared.
    gates = [
        record.result.summary["metric_gate"]
        for run in (first, second)
        for record in run.records
        if record.stage == "recommend"
    ]
    assert gates[0].startswith("hybrid.ndcg@10=") and "nothing published" in gates[0], gates
    assert "vs last published" in gates[1] and gates[1].endswith(": ok"), gates
    # One data commit replaced the date, and its metadata names what it published.
    since = [h for h in DeltaTable(table).history() if h["version"] > before_version]
    assert [h["operation"] for h in since] == ["WRITE"]
    assert since[0]["llmrec.ds"] == DS
    # ... and the models it was scored with, the Mult-VAE among them.
    assert since[0]["llmrec.vae_model"].startswith("llmrec-vae/")
    assert since[0]["llmrec.als_model"].startswith("llmrec-als/")
    after = (
        ctx.store.read("recommendations", where={"ds": DS})
        .select("user_id", "rank", "item_id")
        .toPandas()
    )
    key = ["user_id", "rank"]
    assert len(after) == len(before)
    merged = before.merge(after, on=key, suffixes=("_1", "_2"))
    assert len(merged) == len(before)
    same = (merged["item_id_1"] == merged["item_id_2"]).mean()
    assert same == 1.0, f"only {same:.1%} of the rows are the same after a rerun"
    assert ctx.store.read("events_clean").count() == clean_before


def test_pipeline_runs_recorded(spark, nightly):
    cfg, summary = nightly
    runs = (
        make_context(cfg, spark, DS).store.read("pipeline_runs").where(F.col("ds") == DS).toPandas()
    )
    assert set(runs["stage"]) >= {
        "clean",
        "embed",
        "train-als",
        "train-contrastive",
        "recommend",
        "evaluate",
    }
    assert (runs["status"] == "ok").all()
    assert runs["mlflow_run_id"].notna().all()


def test_nightly_measures_the_trained_models_on_the_events_training_left_out(spark, nightly):
    from llmrec_spark.stages import splits
    from llmrec_spark.stages.als import interactions, training_events

    cfg, summary = nightly
    ctx = make_context(cfg, spark, DS)
    records = {r.stage: r for r in summary.records}
    window = training_window(ctx.store.read("events_clean"), DS, cfg.als.train_days)
    holdout = {
        "fraction": cfg.evaluate.holdout_fraction,
        "seed": cfg.evaluate.seed,
        "test_fraction": cfg.evaluate.test_fraction,
        "min_users": cfg.evaluate.holdout_min_users,
    }
    held = splits.holdout_rows(window, **holdout).count()

    # train-als learnt from the window less the held-out rows: fewer pairs than all of it.
    trained = interactions(training_events(ctx, cfg.als.train_days)).count()
    assert held > 0
    assert records["train-als"].result.rows_in == trained < interactions(window).count()
    # evaluate ranked with those models, for the holdout users only, without refitting.
    evaluation = records["evaluate"].result
    assert evaluation.summary["protocols"] == "holdout"
    split = splits.published_holdout(
        window, positive_min_weight=cfg.evaluate.positive_min_weight, **holdout
    )
    test_users = split.test.select("user_id").distinct().count()
    assert 0 < evaluation.summary["test_users"] == test_users
    assert "hybrid.ndcg@10" in evaluation.metrics and "als.ndcg@10" in evaluation.metrics
    # The night's Mult-VAE, trained on the same pairs as ALS, ranked alone and in the hybrid.
    assert (
        records["train-vae"].result.rows_in
        == interactions(training_events(ctx, cfg.als.train_days))
        .select("user_id")
        .distinct()
        .count()
    )
    assert {"vae.ndcg@10", "hybrid_vae.ndcg@10"} <= set(evaluation.metrics)
