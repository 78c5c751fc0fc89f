"""The benchmark registry: `list` imports no benchmark, an unknown name is a user error, and a
run writes NAME.json with the benchmark's fields, its wall time and the machine it ran on."""

from __future__ import annotations

import json
import sys
import types

import pytest

from llmrec_spark.bench import runner
from llmrec_spark.errors import InputError


def test_list_names_every_benchmark_without_importing_any(cfg, monkeypatch):
    assert runner.run_benchmark("list", cfg) == {
        "benchmarks": [
            "als",
            "clean",
            "cores",
            "delta-write",
            "distributor",
            "embed",
            "nightly",
            "quality",
            "topn",
            "tower-warm",
            "vae",
        ]
    }
    # A module that does not exist cannot break `list`: it is imported only to run.
    monkeypatch.setitem(runner.BENCHMARKS, "ghost", "llmrec_spark.bench.no_such_module")
    assert "ghost" in runner.run_benchmark("list", cfg)["benchmarks"]


def test_an_unknown_name_is_an_input_error_that_lists_the_known_ones(cfg, tmp_path):
    with pytest.raises(InputError) as error:
        runner.run_benchmark("nope", cfg, out_dir=str(tmp_path))
    assert str(error.value) == (
        "unknown benchmark 'nope'; available: "
        "als, clean, cores, delta-write, distributor, embed, nightly, quality, topn, tower-warm, vae"
    )
    assert list(tmp_path.iterdir()) == []


def test_a_run_writes_the_benchmarks_fields_wall_time_and_machine(cfg, tmp_path, monkeypatch):
    seen = []

    def run(run_cfg, options):
        seen.append((run_cfg, options))
        options["mutated"] = True  # the caller's dict is not the one the benchmark gets
        return {"product_seconds": 2.0, "reference_seconds": 3.0, "speedup": 1.5}

    tiny = types.ModuleType("tiny_bench_for_tests")
    tiny.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tiny_bench_for_tests", tiny)
    monkeypatch.setitem(runner.BENCHMARKS, "tiny", "tiny_bench_for_tests")
    options = {"dataset": "movielens", "path": None}

    result = runner.run_benchmark("tiny", cfg, out_dir=str(tmp_path / "out"), options=options)

    assert seen == [(cfg, {"dataset": "movielens", "path": None, "mutated": True})]
    assert options == {"dataset": "movielens", "path": None}
    with open(tmp_path / "out" / "tiny.json") as fh:
        written = json.load(fh)
    assert written == result
    assert list(written) == [
        "benchmark",
        "product_seconds",
        "reference_seconds",
        "speedup",
        "wall_seconds",
        "machine",
    ]
    assert written["benchmark"] == "tiny" and written["speedup"] == 1.5
    assert 0 <= written["wall_seconds"] < 5
    machine = written["machine"]
    assert set(machine) == {"cpus", "python", "platform", "load_average"}
    assert machine["cpus"] >= 1 and machine["python"].count(".") == 2
    assert len(machine["load_average"]) == 3
    assert all(load >= 0 for load in machine["load_average"])
