"""`llmrec bench vae`: the Mult-VAE stage's training under TorchDistributor against torchrun, and
its scoring of all users against a plain numpy forward pass of the same model.

Training: planted taste-group users become the stage's padded rows (`stages.vae.user_rows`,
`padded_rows`, `shuffle_users`) in petastorm files, once, outside the timing. Both sides then
run `vae_training.train_vae` in 2 gloo processes with the same config on those files:
TorchDistributor(local_mode=True) as `stages.contrastive.train_on_petastorm` runs it, and `python -m
torch.distributed.run --standalone --nproc_per_node 2 -m llmrec_spark.bench.vae CONFIG.json`,
whose workers rebuild the converter from the JSON. The sides alternate (d, t, d, t).

Scoring: every user's top 20, history excluded, from the trained model: the product's path
(blocks of `recommend.user_block_size` users -> `core.vae.user_vectors` -> `hybrid_top_n`
against `item_vectors`, the VAE as a factor model) against `core.vae.numpy_logits` with
seen items at -inf and an argpartition, under the same thread limits.

Run as a module, this file is the torchrun worker.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from llmrec_spark.bench.distributor import CONVERTER_KEYS, PROCESSES
from llmrec_spark.config import Config, VaeConfig
from llmrec_spark.core.hybrid import ItemMatrices, Mix, hybrid_top_n
from llmrec_spark.core.vae import MultVAE, dense_rows, item_vectors, numpy_logits, numpy_params
from llmrec_spark.core.vae import user_vectors as vae_user_vectors

log = logging.getLogger(__name__)

TARGET_OVERHEAD_RATIO = 1.15  # TorchDistributor seconds / torchrun seconds, at most
TARGET_SCORING_RATIO = 0.8  # product users/s / numpy users/s, at least
TOP_N = 20

# (option, its LLMREC_BENCH_* variable, default): the sizes of `llmrec bench vae`. On 2 cores
# each training side takes ~20-60 s at the defaults.
SETTINGS = (
    ("users", "LLMREC_BENCH_USERS", 6000),
    ("items", "LLMREC_BENCH_ITEMS", 3000),
    ("epochs", "LLMREC_BENCH_EPOCHS", 8),
    ("runs", "LLMREC_BENCH_RUNS", 2),
    ("scoring_runs", "LLMREC_BENCH_SCORING_RUNS", 3),
    ("threads", "LLMREC_BENCH_THREADS", 1),
)

# What each side runs, in the result.
SIDES = {
    "distributor": (
        "CheckedTorchDistributor(num_processes=2, local_mode=True, use_gpu=False)"
        ".run(vae_training.train_vae, config), as stages.contrastive.train_on_petastorm runs it "
        "(pyspark's TorchDistributor with torchrun's exit status checked)"
    ),
    "torchrun": (
        "python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=2 "
        "-m llmrec_spark.bench.vae CONFIG.json: each worker rebuilds the petastorm converter "
        "from its cache dir and file list and calls train_vae(config)"
    ),
    "shared": (
        "the same petastorm Parquet files of stages.vae's padded user rows (materialised once, "
        "outside the timing), config, seeds and epochs; gloo on CPU, each process's torch "
        "threads set by training_place (cpu_count // processes); a fresh checkpoint and "
        "model folder per run; timed from launch to return"
    ),
    "scoring_product": (
        "per block of recommend.user_block_size users: dense_rows -> core.vae.user_vectors "
        "(torch, eval mode) -> hybrid_top_n(user vectors, ItemMatrices(als=item_vectors), "
        "mix=Mix(0.0), exclude_seen=True), as the product scores the VAE"
    ),
    "scoring_numpy": (
        "per block of the same size: dense_rows -> core.vae.numpy_logits (plain numpy "
        "forward pass), seen items set to -inf, np.argpartition then a sort of the top 20"
    ),
}


def run(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    """`llmrec bench vae` in a session built from `cfg`, sized by `bench_settings(options)`."""
    from llmrec_spark.runtime.session import build_spark

    spark = build_spark(cfg)
    try:
        return bench_vae(spark, cfg, **bench_settings(options))
    finally:
        spark.stop()


def bench_settings(options: dict[str, Any]) -> dict[str, int]:
    """Each of SETTINGS from `options` when there, else its LLMREC_BENCH_* variable, else the
    default."""
    settings = {}
    for key, variable, default in SETTINGS:
        value = options.get(key)
        settings[key] = int(value if value is not None else os.environ.get(variable, default))
    return settings


def bench_vae(
    spark: Any,
    cfg: Config,
    *,
    users: int,
    items: int,
    epochs: int,
    runs: int = 2,
    scoring_runs: int = 3,
    threads: int = 1,
) -> dict[str, Any]:
    """Both comparisons on planted data: training (cfg.vae's model, `epochs` epochs, `runs` runs
    per side) and scoring (the last TorchDistributor run's model, `scoring_runs` per side)."""
    load_at_start = [round(load, 2) for load in os.getloadavg()]
    vae = dataclasses.replace(cfg.vae, epochs=epochs, device="cpu")
    histories, weights = planted_taste_histories(users, items, seed=vae.seed)
    scratch = tempfile.mkdtemp(prefix="llmrec-bench-vae-")
    try:
        training, model = bench_training(
            spark, vae, histories, weights, n_items=items, scratch=scratch, runs=runs
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    scoring = bench_scoring(
        model,
        histories,
        weights,
        block_size=cfg.recommend.user_block_size,
        runs=scoring_runs,
        threads=threads,
    )
    return {
        "users": users,
        "items": items,
        "pairs": int(sum(len(h) for h in histories)),
        "processes": PROCESSES,
        "model": {k: getattr(vae, k) for k in ("hidden_dim", "latent_dim", "batch_size", "epochs")},
        "overhead_ratio": training["overhead_ratio"],
        "overhead_ratio_met": training["overhead_ratio_met"],
        "scoring_ratio": scoring["scoring_ratio"],
        "scoring_ratio_met": scoring["scoring_ratio_met"],
        "training": training,
        "scoring": scoring,
        "sides": SIDES,
        "load_average_at_start": load_at_start,
    }


def planted_taste_histories(
    n_users: int,
    n_items: int,
    *,
    seed: int,
    groups: int = 30,
    items_per_user: int = 30,
    in_group: float = 0.9,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(each user's distinct item indices, ascending; their weights, integers 1-5 as float32).

    Items fall into `groups` taste groups; a user draws between half and 1.5x
    `items_per_user` distinct items, `in_group` of them from one group (as many as it has)
    and the rest from the other items."""
    rng = np.random.default_rng(seed)
    group_of = rng.integers(0, groups, size=n_items)
    members = [np.flatnonzero(group_of == g) for g in range(groups)]
    histories, weights = [], []
    for _ in range(n_users):
        pool = members[rng.integers(groups)]
        size = int(rng.integers(items_per_user // 2, items_per_user * 3 // 2 + 1))
        own = rng.choice(pool, size=min(len(pool), round(size * in_group)), replace=False)
        others = np.setdiff1d(np.arange(n_items), own, assume_unique=True)
        anywhere = rng.choice(others, size=min(len(others), size - len(own)), replace=False)
        items = np.sort(np.concatenate([own, anywhere])).astype(np.int64)
        histories.append(items)
        weights.append(rng.integers(1, 6, size=len(items)).astype(np.float32))
    return histories, weights


# ---------------------------------------------------------------------------------------------
# Training: TorchDistributor against torchrun


def bench_training(
    spark: Any,
    vae: VaeConfig,
    histories: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    n_items: int,
    scratch: str,
    runs: int,
) -> tuple[dict[str, Any], MultVAE]:
    """(the training comparison's figures, the model of the last TorchDistributor run).

    The rows are materialised once under `scratch`; each side trains `runs` times, alternating."""
    from llmrec_spark.stages import vae as stage
    from llmrec_spark.stages.vae_training import load_vae, write_item_ids

    converter = materialise_rows(
        spark, histories, weights, max_items=vae.max_items, seed=vae.seed, scratch=scratch
    )
    try:
        base = {
            **stage.training_config(vae, "cpu", n_items),
            "fingerprint": "bench-vae",
            "model_metadata": {"kind": "bench-vae"},
            "mlflow_tracking_uri": None,
            "mlflow_run_id": None,
        }
        timings, outputs = time_sides(base, converter, scratch, runs=runs)
    finally:
        converter.delete()
    model_dir = outputs["distributor"]["model_path"]
    write_item_ids(model_dir, [str(i) for i in range(n_items)])
    model, _ = load_vae(model_dir)
    medians = {side: statistics.median(seconds) for side, seconds in timings.items()}
    ratio = medians["distributor"] / medians["torchrun"]
    figures = {
        "files": len(converter.file_urls),
        "seconds": {side: [round(s, 2) for s in seconds] for side, seconds in timings.items()},
        "median_seconds": {side: round(s, 2) for side, s in medians.items()},
        "overhead_ratio": round(ratio, 3),
        "target_overhead_ratio": TARGET_OVERHEAD_RATIO,
        "overhead_ratio_met": ratio <= TARGET_OVERHEAD_RATIO,
        "losses": {side: [round(x, 5) for x in out["losses"]] for side, out in outputs.items()},
        "final_loss": {side: out["losses"][-1] for side, out in outputs.items()},
        "steps": {side: out["steps"] for side, out in outputs.items()},
        "runs": runs,
        "order": "distributor, torchrun, distributor, ... (alternating); median per side",
    }
    return figures, model


def materialise_rows(
    spark: Any,
    histories: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    max_items: int,
    seed: int,
    scratch: str,
) -> Any:
    """The petastorm converter of the stage's padded, shuffled rows of these users, each cut to
    its `max_items` heaviest (files under `scratch`: two per training process at least)."""
    import pandas as pd

    from llmrec_spark.stages import vae as stage
    from llmrec_spark.stages.contrastive import PETASTORM_CACHE_CONF, cache_dir_url, spark_converter

    lengths = [len(h) for h in histories]
    pairs = spark.createDataFrame(
        pd.DataFrame(
            {
                "user_id": np.repeat([f"u{u:07d}" for u in range(len(histories))], lengths),
                "item_idx": np.concatenate(histories).astype(np.int32),
                "weight": np.concatenate(weights).astype(np.float64),
            }
        )
    )
    files = max(2 * PROCESSES, math.ceil(len(histories) / stage.USERS_PER_FILE))
    width = min(max(lengths), max_items)
    rows = stage.user_rows(pairs, max_items=width)
    shuffled = stage.shuffle_users(stage.padded_rows(rows, width), files=files, seed=seed)
    spark.conf.set(PETASTORM_CACHE_CONF, cache_dir_url(os.path.join(scratch, "petastorm")))
    return spark_converter(shuffled)


def time_sides(
    base: dict[str, Any], converter: Any, scratch: str, *, runs: int
) -> tuple[dict[str, list[float]], dict[str, dict[str, Any]]]:
    """(seconds of each run per side, each side's last training summary): distributor, torchrun,
    distributor, ... each run with fresh checkpoint and model folders under `scratch`."""
    timings: dict[str, list[float]] = {"distributor": [], "torchrun": []}
    outputs: dict[str, dict[str, Any]] = {}
    for attempt in range(runs):
        for side in ("distributor", "torchrun"):
            work = os.path.join(scratch, f"{side}-{attempt}")
            config = {
                **base,
                "checkpoint_dir": os.path.join(work, "checkpoints"),
                "output_dir": os.path.join(work, "model"),
            }
            started = time.perf_counter()
            outputs[side] = train_side(side, config, converter, work)
            timings[side].append(time.perf_counter() - started)
            log.info(
                "bench vae: run %d/%d %s %.1fs, losses %s",
                attempt + 1,
                runs,
                side,
                timings[side][-1],
                [round(x, 4) for x in outputs[side]["losses"]],
            )
    return timings, outputs


def train_side(side: str, config: dict[str, Any], converter: Any, work: str) -> dict[str, Any]:
    """`train_vae(config)` in PROCESSES processes under `side`; rank 0's summary."""
    from llmrec_spark.runtime.distributor import CheckedTorchDistributor
    from llmrec_spark.stages.vae_training import train_vae

    if side == "torchrun":
        return torchrun_module(
            __name__,
            {**config, "converter": {key: getattr(converter, key) for key in CONVERTER_KEYS}},
            work,
        )
    output = CheckedTorchDistributor(
        label="bench vae", num_processes=PROCESSES, local_mode=True, use_gpu=False
    ).run(train_vae, {**config, "converter": converter})
    if not isinstance(output, dict):
        raise RuntimeError(f"TorchDistributor returned {type(output).__name__}, not a summary")
    return output


def torchrun_module(module: str, payload: dict[str, Any], work: str) -> dict[str, Any]:
    """`python -m torch.distributed.run ... -m module CONFIG.json` in PROCESSES processes on the
    JSON `payload` (plus the summary's path); the summary rank 0 wrote."""
    os.makedirs(work, exist_ok=True)
    config_path, summary_path = (os.path.join(work, name) for name in ("config.json", "out.json"))
    with open(config_path, "w") as f:
        json.dump({**payload, "summary_path": summary_path}, f)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1"]
    subprocess.run(
        [*launcher, f"--nproc_per_node={PROCESSES}", "-m", module, config_path],
        check=True,
        env=os.environ,
    )
    with open(summary_path) as f:
        return dict(json.load(f))


def worker_main(argv: list[str]) -> int:
    """torchrun worker: `train_vae` on the JSON config's converter; rank 0 writes the summary."""
    from petastorm.spark.spark_dataset_converter import SparkDatasetConverter

    from llmrec_spark.stages.vae_training import train_vae

    with open(argv[0]) as f:
        config = json.load(f)
    summary_path = config.pop("summary_path")
    output = train_vae({**config, "converter": SparkDatasetConverter(**config["converter"])})
    if int(os.environ.get("RANK", "0")) == 0:
        with open(summary_path, "w") as f:
            json.dump(output, f)
    return 0


# ---------------------------------------------------------------------------------------------
# Scoring: the product's factor-model path against a numpy forward pass


def bench_scoring(
    model: MultVAE,
    histories: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    block_size: int,
    runs: int,
    threads: int,
    n: int = TOP_N,
) -> dict[str, Any]:
    """Users/s of `product_top_n` and `numpy_top_n` over all users (median of `runs` each,
    alternating), their ratio, and the share of users whose top-n sets agree."""
    items = vae_item_matrices(model)
    params = numpy_params(model)
    sides: dict[str, Callable[[], np.ndarray]] = {
        "product": lambda: product_top_n(model, items, histories, weights, n=n, block=block_size),
        "numpy": lambda: numpy_top_n(
            params, histories, weights, n_items=model.n_items, n=n, block=block_size
        ),
    }
    seconds: dict[str, list[float]] = {side: [] for side in sides}
    tops: dict[str, np.ndarray] = {}
    with thread_limits(threads) as pools:
        for _ in range(runs):
            for side, score in sides.items():
                started = time.perf_counter()
                tops[side] = score()
                seconds[side].append(time.perf_counter() - started)
    rate = {side: len(histories) / statistics.median(s) for side, s in seconds.items()}
    ratio = rate["product"] / rate["numpy"]
    log.info(
        "bench vae scoring: product %.0f users/s, numpy %.0f users/s (ratio %.3f)",
        rate["product"],
        rate["numpy"],
        ratio,
    )
    return {
        "users_per_second": {side: round(r, 1) for side, r in rate.items()},
        "seconds": {side: [round(x, 3) for x in s] for side, s in seconds.items()},
        "scoring_ratio": round(ratio, 3),
        "target_scoring_ratio": TARGET_SCORING_RATIO,
        "scoring_ratio_met": ratio >= TARGET_SCORING_RATIO,
        "top_n_agreement": top_n_agreement(tops["product"], tops["numpy"]),
        "n": n,
        "block_size": block_size,
        "runs": runs,
        "threads": {"torch": threads, "blas": pools},
    }


def vae_item_matrices(model: MultVAE) -> ItemMatrices:
    """The model's items as the product's scorer sees them: `item_vectors` as the factors, all
    eligible, one category, no popularity and no text."""
    n_items = model.n_items
    return ItemMatrices(
        item_ids=np.array([f"i{j:07d}" for j in range(n_items)]),
        eligible=np.ones(n_items, dtype=bool),
        popularity=np.zeros(n_items, dtype=np.float32),
        categories=np.zeros(n_items, dtype=np.int32),
        als=item_vectors(model),
        has_als=np.ones(n_items, dtype=bool),
    )


def product_top_n(
    model: MultVAE,
    items: ItemMatrices,
    histories: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    n: int,
    block: int,
) -> np.ndarray:
    """(users, n) item indices, best first: each block's `user_vectors` through `hybrid_top_n`
    with its history excluded."""
    tops = []
    for start in range(0, len(histories), block):
        block_histories = histories[start : start + block]
        x = dense_rows(block_histories, weights[start : start + block], model.n_items)
        users = vae_user_vectors(model, x)  # (b, hidden + 1)
        indices, _, _ = hybrid_top_n(
            users,
            np.ones(len(users), dtype=bool),
            block_histories,
            items,
            n=n,
            mix=Mix(0.0),
            exclude_seen=True,
            out=items.score_buffer(block),
        )
        tops.append(indices)
    return np.concatenate(tops)


def numpy_top_n(
    params: dict[str, np.ndarray],
    histories: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    n_items: int,
    n: int,
    block: int,
) -> np.ndarray:
    """(users, n) item indices, best first: each block's `numpy_logits`, seen items at -inf,
    argpartition then a sort of the top n."""
    tops = []
    for start in range(0, len(histories), block):
        x = dense_rows(histories[start : start + block], weights[start : start + block], n_items)
        logits = numpy_logits(params, x)  # (b, n_items)
        logits[x > 0] = -np.inf
        candidates = np.argpartition(-logits, n - 1, axis=1)[:, :n]  # (b, n), unordered
        order = np.argsort(-np.take_along_axis(logits, candidates, axis=1), axis=1, kind="stable")
        tops.append(np.take_along_axis(candidates, order, axis=1))
    return np.concatenate(tops)


def top_n_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """The share of rows of `a` and `b` (users, n) that hold the same set of items."""
    if len(a) == 0:
        return 1.0
    return float((np.sort(a, axis=1) == np.sort(b, axis=1)).all(axis=1).mean())


@contextlib.contextmanager
def thread_limits(threads: int) -> Iterator[list[dict[str, Any]]]:
    """torch and every BLAS pool at `threads` threads for the block; yields the BLAS pools
    (library, threads) as limited."""
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(threads, "blas"):
            yield [
                {"library": p["internal_api"], "num_threads": p["num_threads"]}
                for p in threadpool_info()
                if p["user_api"] == "blas"
            ]
    finally:
        torch.set_num_threads(before)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
