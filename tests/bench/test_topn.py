"""`llmrec bench topn` at a few hundred users and items: the fields, and ratios from the timings."""

from __future__ import annotations

import itertools
import json
import types

import pandas as pd
import pytest

from llmrec_spark.bench import topn
from llmrec_spark.bench.topn import bench_problem, bench_topn_and_write, measure_size

pytestmark = pytest.mark.spark


def test_the_speedup_is_the_best_mllib_run_over_the_best_stage_run(spark, monkeypatch):
    problem = bench_problem(spark, 4, 6, rank=2, seen_per_user=(1, 2), seed=1)
    # The stage's and MLlib's lists: the same two items for each of the four users.
    lists = [(u, i) for u in range(4) for i in (0, 1)]
    stage = pd.DataFrame(
        {"user_id": [f"u{u:06d}" for u, _ in lists], "item_id": [f"i{i:05d}" for _, i in lists]}
    )
    reference = spark.createDataFrame(lists, "user int, item int")
    # perf_counter readings: (start, MLlib done, start, stage done) per run. MLlib takes 2.0 s
    # then 1.5 s, the stage 0.5 s then 0.3 s: best 1.5 / best 0.3.
    clock = iter([0.0, 2.0, 2.0, 2.5, 10.0, 11.5, 11.5, 11.8])
    monkeypatch.setattr(topn, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))

    result = measure_size(
        "tiny", lambda: stage, lambda: reference, problem, path="executors", runs=2, seed=1
    )
    problem.unpersist()

    assert result == {
        "recommend_for_all_seconds": 1.5,
        "stage_seconds": 0.3,
        "speedup_vs_recommend_for_all": 5.0,
        "target_speedup": 10,
        "driver_path_floor_seconds": None,
        "speedup_ceiling_on_driver_path": None,
        "top_n_agreement_with_mllib": 1.0,
        "runs": 2,
        "timing": "best of 2, noop sink",
    }
    assert list(itertools.islice(clock, 1)) == []  # every reading was used


def test_a_small_run_reports_both_paths_and_ratios_of_its_reported_seconds(spark):
    sizes = (("on_driver", 200, 150), ("on_executors", 300, 400))
    result = bench_topn_and_write(
        spark,
        sizes=sizes,
        rank=8,
        n=5,
        seen_per_user=(2, 10),
        block_size=64,
        driver_max_cells=200 * 150,  # the first size on the driver, the second on executors
        runs=1,
        min_driver_runs=1,
        write_runs=1,
    )

    json.dumps(result)  # the benchmark's JSON object
    assert set(result) == {
        "sizes",
        "speedup_vs_recommend_for_all",
        "delta_write_ratio",
        "delta_write",
    }
    assert list(result["sizes"]) == ["on_driver", "on_executors"]
    for (name, users, items), path in zip(sizes, ("driver", "executors"), strict=True):
        size = result["sizes"][name]
        assert (size["users"], size["items"], size["rank"], size["top_n"]) == (users, items, 8, 5)
        assert size["seen_per_user"] == [2, 10] and size["path"] == path
        assert size["runs"] == 1 and size["timing"] == "best of 1, noop sink"
        mllib_s, stage_s = size["recommend_for_all_seconds"], size["stage_seconds"]
        assert mllib_s > 0 and stage_s > 0
        assert size["speedup_vs_recommend_for_all"] == round(mllib_s / stage_s, 2)
        assert result["speedup_vs_recommend_for_all"][name] == size["speedup_vs_recommend_for_all"]
        # Exact top-n on the same factors: the stage's lists are MLlib's.
        assert size["top_n_agreement_with_mllib"] == 1.0
    on_driver, on_executors = result["sizes"]["on_driver"], result["sizes"]["on_executors"]
    floor = on_driver["driver_path_floor_seconds"]
    assert floor > 0
    assert on_driver["speedup_ceiling_on_driver_path"] == round(
        on_driver["recommend_for_all_seconds"] / floor, 2
    )
    assert on_executors["driver_path_floor_seconds"] is None
    assert on_executors["speedup_ceiling_on_driver_path"] is None
    write = result["delta_write"]
    assert write["rows"] == 200 * 5  # the first size's lists: every user has 5 unseen items
    assert result["delta_write_ratio"] == write["delta_write_ratio"]
    assert write["runs"] == 1
