"""The Databricks notebooks run as plain Python against a tiny project of their own."""

from __future__ import annotations

import runpy
import shutil
from pathlib import Path

import pytest
import yaml

from llmrec_spark.config import load_config
from llmrec_spark.demo import generate_demo

pytestmark = [pytest.mark.notebooks, pytest.mark.slow, pytest.mark.spark]

PROJECT = Path(__file__).resolve().parents[1]
DS = "2026-11-23"


@pytest.fixture
def tiny_project(tmp_path, monkeypatch, spark):
    conf = tmp_path / "conf"
    conf.mkdir()
    shutil.copy(PROJECT / "conf" / "base.yaml", conf / "base.yaml")
    overlay = {
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "2g"},
        "storage": {"engine": "embedded"},
        "demo": {
            "n_users": 40,
            "n_items": 60,
            "n_topics": 4,
            "days": 2,
            "events_per_day": 400,
            "n_bots": 1,
            "bot_events_per_day": 600,
            "new_items": 4,
        },
        "als": {"rank": 8, "max_iter": 3},
        "contrastive": {
            "epochs": 1,
            "batch_size": 64,
            "hidden_dim": 64,
            "out_dim": 32,
            "num_sampled_negatives": 32,
        },
        "recommend": {"top_n": 5},
    }
    (conf / "local.yaml").write_text(yaml.safe_dump(overlay))
    cfg = load_config(conf, env="local")
    generate_demo(cfg.demo, cfg.path(cfg.storage.landing), DS)
    monkeypatch.setenv("LLMREC_CONF_DIR", str(conf))
    monkeypatch.setenv("LLMREC_DS", DS)
    monkeypatch.setenv("LLMREC_ENV", "local")
    return cfg


def test_nightly_then_data_quality_notebooks(tiny_project, capsys):
    nightly = runpy.run_path(str(PROJECT / "notebooks" / "01_nightly.py"))
    assert nightly["summary"].ds == DS
    recs = nightly["store"].read("recommendations", where={"ds": DS})
    assert recs.select("user_id").distinct().count() > 0
    quality = runpy.run_path(str(PROJECT / "notebooks" / "02_data_quality.py"))
    reasons = {
        r["reason"]
        for r in quality["quarantine_reasons"](quality["store"].read("events_quarantine")).collect()
    }
    assert "malformed" in reasons and "bot" in reasons
    assert f"nightly {DS}: done" in capsys.readouterr().out
