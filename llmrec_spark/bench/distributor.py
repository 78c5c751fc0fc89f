"""`llmrec bench distributor`: the text-tower training under TorchDistributor against torchrun.

Both sides run `tower_training.train_text_tower` in 2 gloo processes on the same petastorm
files (materialised once from the product's `training_examples` of planted events), with the
same config: TorchDistributor(local_mode=True) as the product runs it
(`distributor.CheckedTorchDistributor`), and `python -m torch.distributed.run --standalone
--nproc_per_node 2 -m llmrec_spark.bench.distributor CONFIG.json`, whose workers rebuild the
petastorm converter from the JSON (no pickles).

Run as a module, this file is that torchrun worker.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

import numpy as np

from llmrec_spark.config import Config, ContrastiveConfig
from llmrec_spark.schema import EVENT_COLUMNS

log = logging.getLogger(__name__)

# The converter is rebuilt in each torchrun worker from these.
CONVERTER_KEYS = ("cache_dir_url", "file_urls", "dataset_size")

# gloo training processes on each side.
PROCESSES = 2

# What each side runs, in the result.
SIDES = {
    "distributor": (
        "CheckedTorchDistributor(num_processes=2, local_mode=True, use_gpu=False)"
        ".run(tower_training.train_text_tower, config), as the product's _run_distributed "
        "(pyspark's TorchDistributor with torchrun's exit status checked)"
    ),
    "torchrun": (
        "python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=2 "
        "-m llmrec_spark.bench.distributor CONFIG.json: each worker rebuilds the petastorm "
        "converter from its cache dir and file list and calls train_text_tower(config)"
    ),
    "shared": (
        "the same petastorm Parquet files (materialised once, outside the timing), "
        "config, seeds and epochs; gloo on CPU; a fresh checkpoint folder per run"
    ),
}


def planted_catalog(
    n_items: int, *, dim: int, n_clusters: int, seed: int, noise: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """(item base embeddings (n_items, dim) float32 unit rows, cluster of each item).

    Each item is its cluster's centroid plus Gaussian noise of `noise` times the centroid's
    norm, so text similarity only half-reveals the cluster the behaviour follows."""
    rng = np.random.default_rng(seed)
    clusters = rng.integers(0, n_clusters, size=n_items)
    centroids = rng.standard_normal((n_clusters, dim))
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    vectors = centroids[clusters] + noise * rng.standard_normal((n_items, dim)) / math.sqrt(dim)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.astype(np.float32), clusters


def planted_histories(
    clusters: np.ndarray, *, n_users: int, items_per_user: int, seed: int
) -> list[tuple[int, int, int]]:
    """(user, item, step) events: each user touches distinct items of one cluster in order."""
    rng = np.random.default_rng(seed + 1)
    members = [np.flatnonzero(clusters == c) for c in range(int(clusters.max()) + 1)]
    events: list[tuple[int, int, int]] = []
    for user in range(n_users):
        pool = members[rng.integers(len(members))]
        picked = rng.choice(pool, size=min(items_per_user, len(pool)), replace=False)
        events.extend((user, int(item), step) for step, item in enumerate(picked))
    return events


def run(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    """`llmrec bench distributor` in a session built from `cfg`, sized by LLMREC_BENCH_USERS,
    LLMREC_BENCH_ITEMS and LLMREC_BENCH_RUNS; `options` are unused."""
    from llmrec_spark.runtime.session import build_spark

    spark = build_spark(cfg)
    try:
        return bench_distributor(
            spark,
            cfg,
            n_users=int(os.environ.get("LLMREC_BENCH_USERS", "24000")),
            n_items=int(os.environ.get("LLMREC_BENCH_ITEMS", "5000")),
            runs=int(os.environ.get("LLMREC_BENCH_RUNS", "1")),
        )
    finally:
        spark.stop()


def bench_distributor(
    spark: Any, cfg: Config, *, n_users: int, n_items: int, runs: int
) -> dict[str, Any]:
    """Wall time of `train_text_tower` under TorchDistributor / under torchrun, best of `runs`."""
    from llmrec_spark.stages import contrastive

    tower = cfg.contrastive
    scratch = tempfile.mkdtemp(prefix="llmrec-bench-distributor-")
    try:
        examples, item_matrix_path = planted_examples(
            spark, tower, scratch, n_users=n_users, n_items=n_items
        )
        converter, n_examples = _materialise(spark, tower, examples, scratch)
        log.info(
            "bench distributor: %d examples in %d files, %d items, %d epochs",
            n_examples,
            len(converter.file_urls),
            n_items,
            tower.epochs,
        )
        base = {
            "item_matrix_path": item_matrix_path,
            **contrastive.training_config(tower, "cpu"),
            "mlflow_tracking_uri": None,
            "mlflow_run_id": None,
        }
        timings, outputs = _time_both_sides(base, converter, scratch, runs=runs)
        converter.delete()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = {side: min(values) for side, values in timings.items()}
    return {
        "examples": n_examples,
        "items": n_items,
        "users": n_users,
        "epochs": tower.epochs,
        "processes": PROCESSES,
        "distributor_seconds": round(best["distributor"], 2),
        "torchrun_seconds": round(best["torchrun"], 2),
        "overhead_ratio": round(best["distributor"] / best["torchrun"], 3),
        "target_overhead_ratio": 1.15,
        "losses": {side: [round(x, 4) for x in out["losses"]] for side, out in outputs.items()},
        "steps": {side: out["steps"] for side, out in outputs.items()},
        "sides": SIDES,
        "timed": "launch to return: process start, imports, process group, training, output",
        "runs": runs,
        "timing": f"best of {runs}; the two sides alternate which goes first",
        "all_seconds": {k: [round(x, 2) for x in v] for k, v in timings.items()},
    }


def planted_examples(
    spark: Any, tower: ContrastiveConfig, scratch: str, *, n_users: int, n_items: int
) -> tuple[Any, str]:
    """(the product's `training_examples` of planted events, the item matrix's .npy path).

    The item matrix (one 384-d row per item, row = item_idx) is saved under `scratch`."""
    import datetime as dt

    import pandas as pd

    from llmrec_spark.stages import contrastive

    vectors, clusters = planted_catalog(n_items, dim=384, n_clusters=40, seed=tower.seed)
    item_ids = [f"i{j:06d}" for j in range(n_items)]
    items = contrastive.with_item_index(spark.createDataFrame(pd.DataFrame({"item_id": item_ids})))
    item_matrix_path = os.path.join(scratch, "item_matrix.npy")
    np.save(item_matrix_path, vectors, allow_pickle=False)  # item_idx = item_id order
    start = dt.datetime(2026, 11, 1)
    events = spark.createDataFrame(
        pd.DataFrame(
            [
                (f"u{u:07d}", item_ids[i], start + dt.timedelta(minutes=step), 1.0)
                for u, i, step in planted_histories(
                    clusters, n_users=n_users, items_per_user=12, seed=tower.seed
                )
            ],
            columns=list(EVENT_COLUMNS),
        )
    )
    examples = contrastive.training_examples(
        events,
        items,
        max_history=tower.max_history,
        examples=tower.examples,
        positive_min_weight=0.0,  # every planted event is a positive
        seed=tower.seed,
    )
    return examples, item_matrix_path


def _materialise(
    spark: Any, tower: ContrastiveConfig, examples: Any, scratch: str
) -> tuple[Any, int]:
    """(petastorm converter of the shuffled `examples`, files under `scratch`; their count)."""
    from llmrec_spark.stages import contrastive

    n_examples = examples.count()
    files = max(2 * PROCESSES, math.ceil(n_examples / contrastive.EXAMPLES_PER_FILE))
    spark.conf.set(contrastive.PETASTORM_CACHE_CONF, "file://" + os.path.join(scratch, "petastorm"))
    converter = contrastive.spark_converter(
        contrastive.shuffle_examples(examples, files=files, seed=tower.seed)
    )
    return converter, n_examples


def _time_both_sides(
    base: dict[str, Any], converter: Any, scratch: str, *, runs: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """(seconds of each run per side, each side's last training summary); the sides alternate
    which goes first, each run with a fresh checkpoint and output folder."""
    timings: dict[str, list[float]] = {"distributor": [], "torchrun": []}
    outputs: dict[str, dict[str, Any]] = {}
    for attempt in range(runs):
        order = ("torchrun", "distributor") if attempt % 2 == 0 else ("distributor", "torchrun")
        for side in order:
            work = os.path.join(scratch, f"{side}-{attempt}")
            config = {
                **base,
                "checkpoint_dir": os.path.join(work, "checkpoints"),
                "output_dir": os.path.join(work, "head"),
            }
            started = time.perf_counter()
            output = _train(side, config, converter, work)
            timings[side].append(time.perf_counter() - started)
            outputs[side] = output
            log.info(
                "bench distributor: run %d %s %.1fs, losses %s",
                attempt + 1,
                side,
                timings[side][-1],
                [round(x, 4) for x in output["losses"]],
            )
    return timings, outputs


def _train(side: str, config: dict[str, Any], converter: Any, work: str) -> dict[str, Any]:
    """`train_text_tower(config)` in PROCESSES processes on one side; rank 0's summary."""
    from llmrec_spark.runtime.distributor import CheckedTorchDistributor
    from llmrec_spark.stages import tower_training

    output: dict[str, Any] | None
    if side == "distributor":
        output = CheckedTorchDistributor(
            label="bench distributor",
            num_processes=PROCESSES,
            local_mode=True,
            use_gpu=False,
        ).run(tower_training.train_text_tower, {**config, "converter": converter})
    else:
        output = _torchrun(config, converter, PROCESSES, work)
    if not isinstance(output, dict):
        raise RuntimeError(f"{side} returned {type(output).__name__}, not a summary")
    return output


def _torchrun(config: dict[str, Any], converter: Any, processes: int, work: str) -> dict[str, Any]:
    """Run `train_text_tower(config)` in `processes` torchrun workers; rank 0's summary."""
    os.makedirs(work, exist_ok=True)
    config_path = os.path.join(work, "config.json")
    summary_path = os.path.join(work, "summary.json")
    payload = {
        **config,
        "converter": {key: getattr(converter, key) for key in CONVERTER_KEYS},
        "summary_path": summary_path,
    }
    with open(config_path, "w") as f:
        json.dump(payload, f)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc_per_node={processes}",
        "-m",
        "llmrec_spark.bench.distributor",
        config_path,
    ]
    subprocess.run(command, check=True, env=os.environ)
    with open(summary_path) as f:
        return dict(json.load(f))


def worker_main(argv: list[str]) -> int:
    """torchrun worker: train_text_tower on the JSON config's converter; rank 0 writes the summary."""
    from petastorm.spark.spark_dataset_converter import SparkDatasetConverter

    from llmrec_spark.stages.tower_training import train_text_tower

    with open(argv[0]) as f:
        config = json.load(f)
    config["converter"] = SparkDatasetConverter(**config["converter"])
    summary_path = config.pop("summary_path")
    output = train_text_tower(config)
    if int(os.environ.get("RANK", "0")) == 0:
        with open(summary_path, "w") as f:
            json.dump(output, f)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
