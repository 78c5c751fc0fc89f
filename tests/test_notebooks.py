"""The Databricks notebooks run as plain Python against one tiny project of their own.

01_nightly runs the whole pipeline once (module fixture); the other notebooks only read what
it published, so each adds seconds, not another nightly.
"""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import pytest
import yaml

from llmrec_spark.config import load_config
from llmrec_spark.io.demo import generate_demo
from llmrec_spark.pipeline.runner import NIGHTLY_AFTER_CLEAN
from tests.conftest import PROJECT, TINY_OVERLAY

pytestmark = [pytest.mark.notebooks, pytest.mark.slow, pytest.mark.spark]

NOTEBOOKS = PROJECT / "notebooks"
DS = "2026-11-23"


@pytest.fixture(scope="module")
def tiny_project(tmp_path_factory, spark):
    root = tmp_path_factory.mktemp("notebooks")
    conf = root / "conf"
    conf.mkdir()
    shutil.copy(PROJECT / "conf" / "base.yaml", conf / "base.yaml")
    overlay = {
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "2g"},
        "storage": {"engine": "embedded"},
        **TINY_OVERLAY,
    }
    (conf / "local.yaml").write_text(yaml.safe_dump(overlay))
    cfg = load_config(conf, env="local")
    generate_demo(cfg.demo, cfg.path(cfg.storage.landing), DS)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLMREC_CONF_DIR", str(conf))
        patch.setenv("LLMREC_DS", DS)
        patch.setenv("LLMREC_ENV", "local")
        nightly = runpy.run_path(str(NOTEBOOKS / "01_nightly.py"))
        yield cfg, nightly


def run_notebook(name: str) -> dict:
    return runpy.run_path(str(NOTEBOOKS / name))


def test_every_notebook_is_in_databricks_source_format_and_tested():
    tested = {
        "01_nightly.py",
        "02_data_quality.py",
        "03_embeddings.py",
        "04_training.py",
        "05_recommendations.py",
        "06_query_tables.py",
    }
    assert {p.name for p in NOTEBOOKS.glob("*.py")} == tested
    for name in tested:
        text = (NOTEBOOKS / name).read_text()
        assert text.startswith("# Databricks notebook source\n"), name
        assert "\n# COMMAND ----------\n" in text, name
        assert "def " not in text and "class " not in text, f"{name}: logic belongs in the library"


def test_nightly_notebook(tiny_project, capsys):
    _, nightly = tiny_project
    assert nightly["summary"].ds == DS
    stages = [r.stage for r in nightly["summary"].records]
    assert stages[-len(NIGHTLY_AFTER_CLEAN) :] == NIGHTLY_AFTER_CLEAN
    recs = nightly["store"].read("recommendations", where={"ds": DS})
    assert recs.select("user_id").distinct().count() > 0


def test_data_quality_notebook(tiny_project):
    quality = run_notebook("02_data_quality.py")
    reasons = {
        r["reason"]
        for r in quality["quarantine_reasons"](quality["store"].read("events_quarantine")).collect()
    }
    assert "malformed" in reasons and "bot" in reasons


def test_embeddings_notebook(tiny_project):
    cfg, _ = tiny_project
    nb = run_notebook("03_embeddings.py")
    overview = {r["model_id"]: r for r in nb["overview"].collect()}
    base = nb["base_model_id"](cfg.embed)
    assert overview[base]["items"] == 64 and overview[base]["dim"] == 384  # 60 + 4 new, MiniLM
    # the tuned tower: an ensemble of `members` heads of out_dim 32, concatenated
    tuned_dim = 32 * cfg.contrastive.members
    assert any(m != base and r["dim"] == tuned_dim for m, r in overview.items())
    neighbours = nb["neighbours"]
    assert len(neighbours) == 10 and nb["item_id"] not in set(neighbours["item_id"])
    assert neighbours["similarity"].is_monotonic_decreasing
    assert neighbours["title"].notna().all()


def test_training_notebook(tiny_project):
    _, nightly = tiny_project
    nb = run_notebook("04_training.py")
    runs = nb["runs"]
    assert runs.iloc[0]["run_id"] == nightly["summary"].mlflow_run_id
    assert runs.iloc[0]["stage"] == "nightly"
    assert {"clean", "embed", "train-als", "train-contrastive", "recommend", "evaluate"} <= set(
        runs["stage"]
    )
    assert set(runs["status"]) == {"FINISHED"}
    assert nb["als_metrics"]["als_users"] > 0
    assert nb["contrastive_metrics"]["contrastive_last_epoch_loss"] > 0


def test_recommendations_notebook(tiny_project):
    cfg, _ = tiny_project
    nb = run_notebook("05_recommendations.py")
    top = nb["top"].toPandas()
    assert list(top["rank"]) == [1, 2, 3, 4, 5]
    assert top["score"].is_monotonic_decreasing and top["title"].notna().all()
    evaluation = nb["evaluation"]
    assert {"popularity", "als"} <= set(evaluation["model"])
    assert sorted(evaluation["k"].unique()) == [5, 10, 20, 50]
    # Shares lie in [0, 1]; novelty (bits) and ARP (training users per item) do not.
    unbounded = evaluation["metric"].isin(["novelty", "arp"])
    assert {"ndcg", "recall", "novelty", "arp"} <= set(evaluation["metric"])
    outside = evaluation[~unbounded & ~evaluation["value"].between(0, 1)]
    assert outside.empty, outside.to_string()
    assert (evaluation.loc[unbounded, "value"] >= 0).all()
    assert [ax.get_title() for ax in nb["figure"].axes] == [
        "ndcg",
        "recall",
        "precision",
        "hit_rate",
    ]
    assert Path(cfg.path(cfg.storage.reports_dir), f"evaluation-{DS}.png").stat().st_size > 1000


def test_query_tables_notebook(tiny_project):
    nb = run_notebook("06_query_tables.py")
    assert "recommendations" in nb["views"]
    by_sql = nb["top"].toPandas()
    by_delta_rs = nb["without_spark"]
    mine = by_delta_rs[by_delta_rs["user_id"] == nb["user_id"]].sort_values("rank")
    assert list(by_sql["item_id"]) == list(mine["item_id"])
    assert set(by_delta_rs["ds"]) == {DS}
    per_source = {r["source"]: r["n_rows"] for r in nb["per_source"].collect()}
    assert sum(per_source.values()) == len(by_delta_rs)
