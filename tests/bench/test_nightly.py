"""`llmrec bench nightly`: scaled demo data, two real nightlies as their own processes, the
per-stage seconds read back from `pipeline_runs`, and issue 30's three ratios."""

from __future__ import annotations

import json

import pytest

from llmrec_spark.bench import nightly
from llmrec_spark.config import DemoConfig
from llmrec_spark.errors import InputError


def test_scales_parse_and_bad_ones_are_input_errors():
    assert nightly.parse_scales("1, 10") == [1.0, 10.0]
    assert nightly.parse_scales(" ", empty=True) == []  # the cluster's scales: none by default
    assert nightly.parse_scales("0.5") == [0.5]
    for bad in ("", "1,x", "0", "-1,2"):
        with pytest.raises(InputError, match="LLMREC_BENCH_NIGHTLY_SCALES"):
            nightly.parse_scales(bad)


def test_a_scaled_demo_multiplies_the_population_and_adds_the_second_nights_day():
    demo = DemoConfig(n_users=1200, n_items=1500, events_per_day=6000, n_bots=3, new_items=60)

    ten = nightly.scaled_demo(demo, 10)

    assert (ten.n_users, ten.n_items, ten.events_per_day, ten.n_bots, ten.new_items) == (
        12000,
        15000,
        60000,
        30,
        600,
    )
    assert ten.days == demo.days + 1
    assert ten.n_topics == demo.n_topics and ten.bot_events_per_day == demo.bot_events_per_day
    assert nightly.scaled_demo(demo, 0.001).n_bots == 1  # never fewer than one of each


def test_a_night_on_the_cluster_keeps_every_override_but_the_master():
    conf = [
        "spark.master=local[2]",
        "als.rank=8",
        "spark.master = local[*]",
        "spark.shuffle_partitions=2",
    ]
    assert nightly.cluster_overrides(conf) == ["als.rank=8", "spark.shuffle_partitions=2"]


def _night(seconds: float, stages: dict[str, float]) -> dict:
    return {"seconds": seconds, "stages": stages, "clean_lines": 1000}


def test_the_ratios_compare_the_largest_scale_with_itself_and_with_the_smallest():
    results = {
        "x1": {
            "event_lines": 2000,
            "first_night": _night(100.0, {"evaluate": 5.0}),
            "second_night": _night(50.0, {}),
        },
        "x10": {
            "event_lines": 20000,
            "first_night": _night(
                250.0, {"train-als": 20.0, "train-contrastive": 60.0, "evaluate": 30.0}
            ),
            "second_night": _night(90.0, {}),
        },
    }

    summary = nightly.summarize(results, [1.0, 10.0])

    assert summary["evaluate_vs_training"] == pytest.approx(30 / 80)
    assert summary["second_vs_first_night"] == pytest.approx(90 / 250)
    assert summary["x10_vs_x1_first_night"] == pytest.approx(2.5)
    assert summary["evaluate_vs_training_met"] and summary["second_vs_first_night_met"]
    assert summary["x10_vs_x1_first_night_met"]
    assert summary["events_per_second_first_night"] == {"x1": 10, "x10": 4}
    assert nightly.summarize({"x10": results["x10"]}, [10.0])["x10_vs_x1_first_night"] is None


@pytest.mark.slow
@pytest.mark.cluster  # its nights run in local mode and again on a loopback standalone cluster
def test_bench_nightly_runs_two_nights_and_reports_their_stages(tmp_path, monkeypatch):
    from llmrec_spark.bench.runner import run_benchmark
    from tests.conftest import PROJECT, make_config

    cfg = make_config(
        tmp_path,
        "demo.n_users=100",
        "demo.n_items=120",
        "demo.n_topics=4",
        "demo.days=2",
        "demo.events_per_day=800",
        "demo.n_bots=1",
        "demo.new_items=4",
    )
    monkeypatch.setenv("LLMREC_BENCH_NIGHTLY_SCALES", "0.5")
    monkeypatch.setenv("LLMREC_BENCH_NIGHTLY_CLUSTER_SCALES", "0.5")
    # The nightly processes get the test's small models and its local Spark, like the demo.
    conf = [
        "spark.master=local[2]",
        "spark.shuffle_partitions=2",
        "spark.driver_memory=1g",
        "als.rank=8",
        "als.max_iter=3",
        "contrastive.epochs=1",
        "contrastive.batch_size=64",
        "contrastive.hidden_dim=64",
        "contrastive.out_dim=32",
        "contrastive.num_sampled_negatives=32",
        "evaluate.bootstrap_samples=20",
        "evaluate.holdout_fraction=0.3",
        "recommend.top_n=5",
    ]
    options = {"conf_dir": str(PROJECT / "conf"), "conf": conf, "out_dir": str(tmp_path / "out")}

    result = run_benchmark("nightly", cfg, out_dir=str(tmp_path / "out"), options=options)

    assert json.loads((tmp_path / "out" / "nightly.json").read_text())["scales"].keys() == {"x0.5"}
    scale = result["scales"]["x0.5"]
    assert (scale["users"], scale["landing_days"]) == (50, 3)
    first, second = scale["first_night"], scale["second_night"]
    assert (first["ds"], second["ds"]) == (nightly.FIRST_NIGHT, nightly.SECOND_NIGHT)
    # The first night cleans the demo's two days, the second only the new one; every stage ran.
    assert (first["clean_dates"], second["clean_dates"]) == (2, 1)
    stages = [
        "clean",
        "embed",
        "train-als",
        "train-vae",  # a skip: vae.enabled is off
        "train-contrastive",
        "evaluate",
        "recommend",
    ]
    assert list(first["stages"]) == stages and list(second["stages"]) == stages
    for night in (first, second):
        assert 0 < sum(night["stages"].values()) <= night["seconds"]
        assert (
            night["peak_memory_mb"]["jvm"] > 100 and night["peak_memory_mb"]["driver_python"] > 50
        )
        assert night["peak_memory_mb"]["total"] >= night["peak_memory_mb"]["jvm"]
    evaluate_s = first["stages"]["evaluate"]
    training_s = sum(first["stages"][s] for s in ("train-als", "train-vae", "train-contrastive"))
    assert result["evaluate_vs_training"] == pytest.approx(evaluate_s / training_s, abs=2e-3)
    assert result["second_vs_first_night"] == pytest.approx(
        second["seconds"] / first["seconds"], abs=1e-3
    )
    assert result["x10_vs_x1_first_night"] is None  # one scale
    # The same two nights as spark-submits to the standalone cluster (its master in the log).
    on_cluster = result["cluster"]["x0.5"]
    for name in ("first_night", "second_night"):
        night = on_cluster[name]
        assert list(night["stages"]) == stages
        memory = night["peak_memory_mb_driver"]
        assert memory["jvm"] > 100 and memory["driver_python"] > 50
        log = tmp_path / "out" / "nightly-work" / "x0.5-cluster" / f"nightly-{night['ds']}.log"
        assert "master=spark://127.0.0.1:" in log.read_text()
        assert result["cluster_vs_local"]["x0.5"][name] == pytest.approx(
            night["seconds"] / scale[name]["seconds"], abs=1e-3
        )
    assert (
        on_cluster["first_night"]["clean_dates"],
        on_cluster["second_night"]["clean_dates"],
    ) == (2, 1)
    assert result["machine"]["load_average"]
