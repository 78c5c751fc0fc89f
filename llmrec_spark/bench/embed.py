"""`llmrec bench embed`: the embed stage's items/s against sentence-transformers `encode`.

The stage runs twice on a fresh store each time: cold (Python workers load the model) and
warm (they already hold it). The reference encodes the same texts in this process with as
many torch threads as Spark has cores, its model loaded and warmed up before the clock starts.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from pyspark.sql import DataFrame, SparkSession

from llmrec_spark.config import Config, EmbedConfig
from llmrec_spark.core.encoder import resolve_model
from llmrec_spark.io.tables import open_store
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.runtime.session import build_spark
from llmrec_spark.schema import CATALOG
from llmrec_spark.stages.embed import item_text, run_embed

log = logging.getLogger(__name__)

BENCH_DS = "2026-11-23"
BENCH_WORDS = (
    "wireless noise cancelling headphones with long battery life and soft ear cushions "
    "organic cotton t-shirt slim fit crew neck breathable fabric everyday wear "
    "stainless steel chef knife forged blade ergonomic handle dishwasher safe "
    "ultralight hiking backpack waterproof zipper padded laptop sleeve hydration port "
    "smart fitness tracker heart rate monitor sleep analysis water resistant"
).split()


def run(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    """`llmrec bench embed`: a catalog of LLMREC_BENCH_ITEMS items (default 4000)."""
    spark = build_spark(cfg)
    try:
        return bench_embed(spark, cfg, n_items=int(os.environ.get("LLMREC_BENCH_ITEMS", "4000")))
    finally:
        spark.stop()


def bench_embed(spark: SparkSession, cfg: Config, n_items: int) -> dict[str, Any]:
    """Items/s of the Spark stage (cold and warm workers) vs SentenceTransformer.encode on the same cores."""
    scratch = tempfile.mkdtemp(prefix="llmrec-bench-embed-")
    try:
        items = bench_items(spark, n_items).cache()
        try:
            texts = [
                row.text
                for row in item_text(
                    items, template=cfg.embed.text_template, max_chars=cfg.embed.max_text_chars
                )
                .select("text")
                .collect()
            ]
            # Warm: the Python workers already hold the model from the cold run.
            cold, warm = [
                _stage_metrics(spark, cfg, items, os.path.join(scratch, attempt))
                for attempt in ("cold", "warm")
            ]
        finally:
            items.unpersist()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    model_path, model_id = resolve_model(cfg.embed.model)
    cores = spark.sparkContext.defaultParallelism
    st_seconds = sentence_transformers_seconds(model_path, texts, cfg.embed, threads=cores)
    st_rate = len(texts) / st_seconds
    return {
        "n_items": n_items,
        "model_id": model_id,
        "cores": cores,
        "batch_size": cfg.embed.batch_size,
        "max_length": cfg.embed.max_length,
        "items_per_s": round(warm["items_per_s"], 1),
        "items_per_s_cold": round(cold["items_per_s"], 1),
        "st_items_per_s": round(st_rate, 1),
        "ratio_vs_sentence_transformers": round(warm["items_per_s"] / st_rate, 3),
        "ratio_cold_vs_sentence_transformers": round(cold["items_per_s"] / st_rate, 3),
        "embed_seconds": round(warm["embed_seconds"], 3),
        "embed_seconds_cold": round(cold["embed_seconds"], 3),
        "st_seconds": round(st_seconds, 3),
        "timing": "Spark: stage write incl. UDF; ST: encode only, model loaded, same cores",
    }


def bench_items(spark: SparkSession, n_items: int, seed: int = 11) -> DataFrame:
    """A synthetic catalog of `n_items` rows with varied text lengths (seeded)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_items):
        title = " ".join(rng.choice(BENCH_WORDS, size=int(rng.integers(2, 8))))
        description = " ".join(rng.choice(BENCH_WORDS, size=int(rng.integers(5, 120))))
        rows.append(
            (
                f"i{i:06d}",
                title.title(),
                description,
                f"cat{i % 17}",
                f"brand{i % 31}",
                "true",
                "2026-11-01",
            )
        )
    return spark.createDataFrame(rows, CATALOG)


def _stage_metrics(
    spark: SparkSession, cfg: Config, items: DataFrame, root: str
) -> dict[str, float]:
    """The embed stage's metrics (items_per_s, embed_seconds, ...) on a new store at `root`."""
    store = open_store(spark, root, "embedded")
    store.overwrite("items", items)
    result = run_embed(RunContext(cfg=cfg, spark=spark, store=store, ds=BENCH_DS))
    log.info("bench embed: stage %.1f items/s", result.metrics["items_per_s"])
    return result.metrics


def sentence_transformers_seconds(
    model_path: str, texts: list[str], cfg: EmbedConfig, *, threads: int
) -> float:
    """Seconds SentenceTransformer.encode takes for `texts` on the CPU with `threads` torch
    threads, the model loaded and warmed up on the first 32 texts beforehand."""
    import torch
    from sentence_transformers import SentenceTransformer

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = SentenceTransformer(model_path, device="cpu")
        model.max_seq_length = cfg.max_length
        model.encode(texts[:32], batch_size=cfg.batch_size, show_progress_bar=False)
        started = time.perf_counter()
        model.encode(
            texts, batch_size=cfg.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous_threads)
    log.info("bench embed: sentence-transformers %.1f items/s", len(texts) / seconds)
    return seconds
