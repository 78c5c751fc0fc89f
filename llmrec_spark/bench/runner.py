"""Benchmarks' one home: `llmrec bench NAME` writes bench-results/NAME.json and prints it.

Each benchmark is a module with `run(cfg, options) -> dict`: it measures this product against
the reference it must beat, in the same run and session, and returns one flat-ish JSON object.
The modules are imported only when their benchmark runs, so `llmrec bench list` imports none.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import platform
import time
from typing import Any

from llmrec_spark.config import Config
from llmrec_spark.errors import InputError

log = logging.getLogger(__name__)

# Benchmark name -> the module whose `run(cfg, options)` runs it.
BENCHMARKS: dict[str, str] = {
    "als": "llmrec_spark.bench.als",
    "clean": "llmrec_spark.bench.clean",
    "cores": "llmrec_spark.bench.cores",
    "delta-write": "llmrec_spark.bench.delta_write",
    "distributor": "llmrec_spark.bench.distributor",
    "embed": "llmrec_spark.bench.embed",
    "nightly": "llmrec_spark.bench.nightly",
    "quality": "llmrec_spark.bench.quality",
    "topn": "llmrec_spark.bench.topn",
    "tower-warm": "llmrec_spark.bench.tower_warm",
    "vae": "llmrec_spark.bench.vae",
}


def run_benchmark(
    name: str, cfg: Config, out_dir: str = "bench-results", options: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run benchmark `name`, write `<out_dir>/<name>.json`, return the result.

    `list` returns the names instead; `options` (e.g. quality's dataset and path) go to the
    benchmark's `run` as they are.
    """
    names = sorted(BENCHMARKS)
    if name == "list":
        return {"benchmarks": names}
    if name not in BENCHMARKS:
        raise InputError(f"unknown benchmark {name!r}; available: {', '.join(names)}")
    started = time.perf_counter()
    result = importlib.import_module(BENCHMARKS[name]).run(cfg, dict(options or {}))
    result = {
        "benchmark": name,
        **result,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "machine": machine_info(),
    }
    path = os.path.join(out_dir, f"{name}.json")
    os.makedirs(out_dir, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    log.info("bench %s -> %s", name, path)
    return result


def machine_info() -> dict[str, Any]:
    """This machine's CPUs, Python, platform and load average (1, 5, 15 min) after the run.

    The load shows whether something else competed with the benchmark for the CPUs.
    """
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(load, 2) for load in os.getloadavg()],
    }
