"""The freshness contract on hand-written pipeline_runs rows (the CLI story is in
tests/test_publish_faults.py)."""

from __future__ import annotations

import datetime as dt

import pytest

from llmrec_spark.runtime.freshness import (
    StaleInput,
    StaleInputError,
    check_inputs,
    events_through,
    required_stages,
)
from llmrec_spark.schema import EVENTS_CLEAN, PIPELINE_RUNS
from tests.conftest import make_config

pytestmark = pytest.mark.spark

STARTED = dt.datetime(2026, 11, 10, 2, 30)


def runs(spark, *rows: tuple[str, str, str]):
    """pipeline_runs rows from (ds, stage, status)."""
    full = [
        (ds, stage, status, None, None, None, None, None, 1.0, STARTED, None, "", None, None)
        for ds, stage, status in rows
    ]
    return spark.createDataFrame(full, PIPELINE_RUNS)


def test_each_stage_names_the_upstream_outputs_it_reads(tmp_path):
    cfg = make_config(tmp_path)
    assert required_stages(cfg, "clean") == ()
    assert required_stages(cfg, "embed") == ("clean",)
    assert required_stages(cfg, "train-als") == ("clean",)
    assert required_stages(cfg, "train-contrastive") == ("clean", "embed")
    # The nightly's evaluate measures the models trained that night; the protocol suite (and
    # evaluate without a holdout) refits its own.
    assert required_stages(cfg, "evaluate") == ("clean", "embed", "train-als", "train-contrastive")
    assert required_stages(cfg, "evaluate-protocols") == ("clean", "embed")
    no_holdout = make_config(tmp_path, "evaluate.holdout_fraction=0")
    assert required_stages(no_holdout, "evaluate") == ("clean", "embed")
    assert required_stages(cfg, "recommend") == (
        "clean",
        "embed",
        "train-als",
        "train-contrastive",
        "evaluate",
    )
    # No tower, no metric gate: recommend reads neither the towers nor the evaluation.
    lean = make_config(
        tmp_path, "contrastive.enabled=false", "profile.enabled=false", "recommend.gate_metric=''"
    )
    assert required_stages(lean, "recommend") == ("clean", "embed", "train-als")
    # The user tower alone (trained by train-contrastive) still needs that stage's run.
    users_only = make_config(tmp_path, "contrastive.enabled=false", "recommend.gate_metric=''")
    assert required_stages(users_only, "recommend") == (
        "clean",
        "embed",
        "train-als",
        "train-contrastive",
    )
    no_mlflow = make_config(tmp_path, "mlflow.enabled=false")
    assert "evaluate" not in required_stages(no_mlflow, "recommend")


def test_missing_or_failed_upstream_runs_are_stale_inputs(spark, store, tmp_path):
    store.append(
        "pipeline_runs",
        runs(
            spark,
            ("2026-11-03", "clean", "ok"),
            ("2026-11-10", "clean", "failed"),  # a failed run produces nothing
            ("2026-11-12", "clean", "ok"),  # after the run date: not an input of 11-10
            ("2026-11-03", "embed", "ok"),
            ("2026-11-10", "embed", "ok"),
        ),
    )
    cfg = make_config(tmp_path)

    with pytest.raises(StaleInputError) as raised:
        check_inputs(store, cfg, "train-contrastive", "2026-11-10")
    assert str(raised.value) == (
        "train-contrastive 2026-11-10: input events_clean is stale: no successful `clean` for "
        "2026-11-10, its newest is 2026-11-03. Run `llmrec clean --ds 2026-11-10` first, "
        "or pass --allow-stale to use older inputs"
    )
    assert raised.value.exit_code == 2
    with pytest.raises(StaleInputError, match="input als_factors is stale: .* never produced"):
        check_inputs(
            store, make_config(tmp_path, "contrastive.enabled=false"), "recommend", "2026-11-03"
        )

    allowed = make_config(tmp_path, "pipeline.allow_stale=true")
    assert check_inputs(store, allowed, "train-contrastive", "2026-11-10") == [
        StaleInput("clean", "2026-11-03")
    ]
    assert check_inputs(store, cfg, "train-contrastive", "2026-11-03") == []
    assert check_inputs(store, cfg, "clean", "2026-11-10") == []
    assert StaleInput("evaluate", None).label() == "evaluate@never"


def test_events_through_is_the_newest_event_date_up_to_the_run_date(spark, store):
    assert events_through(store, "2026-11-10") is None
    ts = dt.datetime(2026, 11, 1, 12)
    events = [
        (f"e{k}", "u1", "i1", "view", ts, None, None, 1.0, day, "2026-11-09")
        for k, day in enumerate(["2026-11-08", "2026-11-09", "2026-11-11"])
    ]
    store.append("events_clean", spark.createDataFrame(events, EVENTS_CLEAN))
    assert events_through(store, "2026-11-10") == "2026-11-09"
    assert events_through(store, "2026-11-11") == "2026-11-11"
    assert events_through(store, "2026-11-07") is None
