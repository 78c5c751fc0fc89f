"""`llmrec bench distributor`: the text-tower training under TorchDistributor against torchrun.

Both sides run `contrastive.train_text_tower` in 2 gloo processes on the same petastorm
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

from llmrec_spark.config import Config

log = logging.getLogger(__name__)

# The converter is rebuilt in each torchrun worker from these.
CONVERTER_KEYS = ("cache_dir_url", "file_urls", "dataset_size")


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


def bench_distributor(
    spark: Any, cfg: Config, *, n_users: int, n_items: int, runs: int
) -> dict[str, Any]:
    """Wall time of `train_text_tower` under TorchDistributor / under torchrun, best of `runs`."""
    import datetime as dt

    import pandas as pd

    from llmrec_spark.runtime.distributor import CheckedTorchDistributor
    from llmrec_spark.stages import contrastive

    tower = cfg.contrastive
    processes = 2
    scratch = tempfile.mkdtemp(prefix="llmrec-bench-distributor-")
    try:
        vectors, clusters = planted_catalog(n_items, dim=384, n_clusters=40, seed=tower.seed)
        item_ids = [f"i{j:06d}" for j in range(n_items)]
        items = contrastive.with_item_index(
            spark.createDataFrame(pd.DataFrame({"item_id": item_ids}))
        )
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
                columns=["user_id", "item_id", "event_ts", "weight"],
            )
        )
        # Every planted event is a positive.
        examples = contrastive.training_examples(
            events,
            items,
            max_history=tower.max_history,
            examples=tower.examples,
            positive_min_weight=0.0,
            seed=tower.seed,
        )
        n_examples = examples.count()
        files = max(2 * processes, math.ceil(n_examples / contrastive.EXAMPLES_PER_FILE))
        spark.conf.set(
            contrastive.PETASTORM_CACHE_CONF, "file://" + os.path.join(scratch, "petastorm")
        )
        converter = contrastive.spark_converter(
            contrastive.shuffle_examples(examples, files=files, seed=tower.seed)
        )
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
        timings: dict[str, list[float]] = {"distributor": [], "torchrun": []}
        outputs: dict[str, dict[str, Any]] = {}
        for attempt in range(runs):
            for side in (
                ("torchrun", "distributor") if attempt % 2 == 0 else ("distributor", "torchrun")
            ):
                work = os.path.join(scratch, f"{side}-{attempt}")
                config = {
                    **base,
                    "checkpoint_dir": os.path.join(work, "checkpoints"),
                    "output_dir": os.path.join(work, "head"),
                }
                started = time.perf_counter()
                output: dict[str, Any] | None
                if side == "distributor":
                    output = CheckedTorchDistributor(
                        label="bench distributor",
                        num_processes=processes,
                        local_mode=True,
                        use_gpu=False,
                    ).run(contrastive.train_text_tower, {**config, "converter": converter})
                else:
                    output = _torchrun(config, converter, processes, work)
                timings[side].append(time.perf_counter() - started)
                if not isinstance(output, dict):
                    raise RuntimeError(f"{side} returned {type(output).__name__}, not a summary")
                outputs[side] = output
                log.info(
                    "bench distributor: run %d %s %.1fs, losses %s",
                    attempt + 1,
                    side,
                    timings[side][-1],
                    [round(x, 4) for x in output["losses"]],
                )
        converter.delete()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    best = {side: min(values) for side, values in timings.items()}
    return {
        "examples": n_examples,
        "items": n_items,
        "users": n_users,
        "epochs": tower.epochs,
        "processes": processes,
        "distributor_seconds": round(best["distributor"], 2),
        "torchrun_seconds": round(best["torchrun"], 2),
        "overhead_ratio": round(best["distributor"] / best["torchrun"], 3),
        "target_overhead_ratio": 1.15,
        "losses": {side: [round(x, 4) for x in out["losses"]] for side, out in outputs.items()},
        "steps": {side: out["steps"] for side, out in outputs.items()},
        "sides": {
            "distributor": (
                "CheckedTorchDistributor(num_processes=2, local_mode=True, use_gpu=False)"
                ".run(contrastive.train_text_tower, config), as the product's _run_distributed "
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
        },
        "timed": "launch to return: process start, imports, process group, training, output",
        "runs": runs,
        "timing": f"best of {runs}; the two sides alternate which goes first",
        "all_seconds": {k: [round(x, 2) for x in v] for k, v in timings.items()},
    }


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

    from llmrec_spark.stages.contrastive import train_text_tower

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
