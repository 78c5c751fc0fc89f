"""`llmrec bench clean` at a tiny size: the lines it plants, and the JSON it reports."""

from __future__ import annotations

import json

import pytest

from llmrec_spark.bench import clean as bench
from llmrec_spark.bench.clean import (
    BENCH_DS,
    bench_item_ids,
    generate_bench_lines,
    plain_sql_clean,
)
from llmrec_spark.io.sources import read_landing_lines
from llmrec_spark.stages.clean import clean_events

BROKEN = "ERROR 502 upstream timed out"


@pytest.mark.spark
def test_bench_lines_plant_a_duplicate_a_retry_an_unknown_item_and_a_broken_line(spark):
    def lines(seed: int) -> list[str]:
        generated = generate_bench_lines(spark, n_events=10, ds=BENCH_DS, seed=seed)
        return [row.value for row in generated.collect()]

    raw = lines(seed=7)
    assert raw == lines(seed=7)
    assert raw != lines(seed=8)
    assert raw[1] == raw[0]  # line 1 repeats line 0: an exact duplicate
    assert raw[7] == BROKEN
    events = [json.loads(line) for i, line in enumerate(raw) if i != 7]
    first, retry = events[0], events[2]
    # Line 2 is a client retry of line 0: a new event_id, the same event 3 s later.
    assert retry == first | {"event_id": "e0000000002", "event_ts": "2026-11-23T04:21:22Z"}
    assert first["event_ts"] == "2026-11-23T04:21:19Z"
    assert events[4]["item_id"] == "i-unknown"
    assert [e["event_id"] for e in events] == [
        "e0000000000",
        "e0000000000",
        "e0000000002",
        "e0000000003",
        "e0000000004",
        "e0000000005",
        "e0000000006",
        "e0000000008",
        "e0000000009",
    ]
    assert all(e["event_ts"].startswith(BENCH_DS) and e["source"] == "web" for e in events)


@pytest.mark.spark
def test_the_stage_and_the_plain_sql_job_clean_the_bench_lines_as_planted(spark, cfg, tmp_path):
    landing = str(tmp_path / "events")
    generate_bench_lines(spark, n_events=10, ds=BENCH_DS, seed=7).write.text(landing)
    lines = read_landing_lines(spark, landing)
    items = bench_item_ids(spark)
    outcomes = clean_events(lines, ds=BENCH_DS, known_items=items, prior=None, cfg=cfg.clean)
    by_event = {
        (row.event_id, row.outcome, row.duplicate, tuple(row.reasons))
        for row in outcomes.collect()
        if row.raw != BROKEN
    }
    clean = {(f"e{i:010d}", "clean", None, ()) for i in (0, 3, 5, 6, 8, 9)}
    assert by_event == clean | {
        ("e0000000000", "duplicate", "exact", ()),
        ("e0000000002", "duplicate", "near", ()),
        ("e0000000004", "quarantined", None, ("unknown_item",)),
    }
    broken = [row for row in outcomes.collect() if row.raw == BROKEN]
    assert [(row.outcome, row.reasons) for row in broken] == [("quarantined", ["malformed"])]
    # The reference keeps the retry (it knows no near duplicates) and drops the rest.
    plain = plain_sql_clean(lines, ds=BENCH_DS, known_items=items, cfg=cfg.clean)
    assert sorted(row.event_id for row in plain.collect()) == [
        f"e{i:010d}" for i in (0, 2, 3, 5, 6, 8, 9)
    ]


def _rate_of(count: float, seconds: float) -> object:
    """count / seconds, within what rounding seconds to 3 decimals and the rate to 1 allows."""
    expected = count / seconds
    return pytest.approx(expected, abs=expected * 0.0006 / seconds + 0.051)


def _ratio_of(top: float, bottom: float) -> object:
    """top / bottom, within what rounding both to 3 decimals and the ratio to 3 allows."""
    expected = top / bottom
    return pytest.approx(expected, abs=expected * (0.0006 / top + 0.0006 / bottom) + 0.0006)


@pytest.mark.spark
def test_bench_clean_reports_the_best_runs_and_the_ratios_they_give(spark, cfg, monkeypatch):
    monkeypatch.setenv("LLMREC_BENCH_EVENTS", "3000")
    monkeypatch.setenv("LLMREC_BENCH_RUNS", "1")
    # The test session stands in for the one `run` builds, and outlives it.
    monkeypatch.setattr(bench, "build_spark", lambda _cfg: spark)
    monkeypatch.setattr(spark, "stop", lambda: None)
    result = bench.run(cfg, {})
    assert set(result) == {
        "events",
        "events_per_s",
        "stage_seconds",
        "plain_sql_seconds",
        "ratio_vs_plain_sql",
        "target_ratio_vs_plain_sql",
        "cores",
        "runs",
        "timing",
        "all_seconds",
    }
    assert (result["events"], result["runs"], result["cores"]) == (
        3000,
        1,
        spark.sparkContext.defaultParallelism,
    )
    assert result["target_ratio_vs_plain_sql"] == 1.3
    assert result["timing"].startswith("best of 1;")
    stage_s, plain_s = result["stage_seconds"], result["plain_sql_seconds"]
    assert result["all_seconds"] == {
        "stage": [pytest.approx(stage_s, abs=0.0051)],
        "plain": [pytest.approx(plain_s, abs=0.0051)],
    }
    assert result["events_per_s"] == _rate_of(3000, stage_s)
    assert result["ratio_vs_plain_sql"] == _ratio_of(stage_s, plain_s)
    assert json.loads(json.dumps(result)) == result
