"""`contrastive.mode: encoder` in Spark: the text encoder itself fine-tuned (LoRA adapters plus
the head) on the same examples and InfoNCE as the head, then every item re-embedded by it.

Spark tokenizes each item's text once (`item_tokens`, a pandas UDF); the token rows reach the
training processes through petastorm beside the examples (`train_on_petastorm`'s
`item_converter`), so no process re-tokenizes a string per step. The training function is
`encoder_training.train_text_encoder` under TorchDistributor. The tuned model's id carries
its weights' digest (`encoder_model_id`): the embed stage's incremental keys (item, text
hash, model id) then re-embed exactly the items whose text or model changed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, IntegerType

from llmrec_spark.config import ContrastiveConfig
from llmrec_spark.errors import InputError
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.indexing import dense_index
from llmrec_spark.stages.contrastive import (
    cache_dir_url,
    example_files,
    process_count,
    shuffle_examples,
    train_on_petastorm,
    training_device,
    training_examples,
)
from llmrec_spark.stages.tower_training import HEAD_WEIGHTS, file_digest

log = logging.getLogger(__name__)

# The date's folder of the tuned encoder (model/, checkpoints/, petastorm/).
ENCODER_FOLDER = "text_encoder"


def encoder_model_id(base_model_id: str, digest: str) -> str:
    """model_id of the item embeddings of a tuned encoder whose weights hash to `digest`."""
    return f"{base_model_id}+lora@{digest[:12]}"


@functools.lru_cache(maxsize=2)
def _tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


def item_tokens(texts: DataFrame, *, model_path: str, max_length: int) -> DataFrame:
    """(item_idx, text) rows -> (item_idx, tokens): each text's token ids, `max_length` wide
    and padded with the tokenizer's pad id (the tokenizer loaded once per worker)."""
    from llmrec_spark.core.encoder_tuning import tokenize_texts

    @F.pandas_udf(ArrayType(IntegerType(), containsNull=False))  # type: ignore[call-overload]
    def tokenize(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        tokenizer = _tokenizer(model_path)
        for batch in batches:
            ids, _ = tokenize_texts(tokenizer, batch.to_numpy(), max_length)
            yield pd.Series(list(ids))

    return texts.select(F.col("item_idx").cast("int"), tokenize("text").alias("tokens"))


@dataclass(frozen=True)
class EncoderFit:
    """A tuned encoder: its folder, model id, the training summary, examples and items."""

    model_dir: str
    model_id: str
    output: dict[str, Any]
    examples: int
    items: int


def fit_text_encoder(
    ctx: RunContext,
    cfg: ContrastiveConfig,
    events: DataFrame,
    texts: DataFrame,
    *,
    work_dir: str,
    metadata: dict[str, Any],
    init_head_dir: str | None = None,
) -> EncoderFit:
    """Tune the encoder on `events` under TorchDistributor: examples as the head's (with
    cfg.encoder_max_history), the items' texts (`texts`: item_id, text) tokenized by Spark;
    the model lands in work_dir/model. With `init_head_dir` (a head trained on the base
    model's embeddings), the tower starts as that head, frozen, and only the adapters train."""
    from llmrec_spark.core.encoder import resolve_model
    from llmrec_spark.core.encoder_tuning import tuned_digest
    from llmrec_spark.stages.encoder_training import train_text_encoder

    model_path, base_id = resolve_model(ctx.cfg.embed.model)
    device = training_device(ctx, cfg.device, "contrastive")
    num_processes = process_count(cfg.num_processes, device)
    texts = texts.where(F.col("text") != "").dropDuplicates(["item_id"])
    items = texts.join(dense_index(texts.select("item_id"), "item_idx", "item_id"), "item_id")
    items = items.cache()
    n_items = items.count()
    examples = training_examples(
        events,
        items,
        max_history=cfg.encoder_max_history,
        examples=cfg.examples,
        positive_min_weight=cfg.positive_min_weight,
        seed=cfg.seed,
    ).cache()
    n_examples, signature = _signature(examples, items)
    if n_examples < num_processes:
        raise InputError(
            f"contrastive (encoder): {n_examples} training examples; need at least "
            f"{num_processes}: users with two or more items that have text"
        )
    config = training_config(cfg, device, model_path=model_path, n_items=n_items)
    if init_head_dir is not None:  # the head's weights are part of the job's identity
        head_digest = file_digest(os.path.join(init_head_dir, HEAD_WEIGHTS))
        config |= {"init_head_dir": init_head_dir, "init_head_digest": head_digest}
    fingerprint = hashlib.sha256(
        json.dumps([config, base_id, n_examples, signature], sort_keys=True).encode()
    ).hexdigest()
    model_dir = os.path.join(work_dir, "model")
    log.info(
        "contrastive (encoder): %d examples, %d items, %d processes on %s, fingerprint %s",
        n_examples, n_items, num_processes, device, fingerprint[:12],
    )  # fmt: skip
    try:
        output = train_on_petastorm(
            ctx,
            shuffle_examples(
                examples, files=example_files(n_examples, num_processes), seed=cfg.seed
            ),
            train_text_encoder,
            {
                **config,
                "checkpoint_dir": os.path.join(work_dir, "checkpoints"),
                "output_dir": model_dir,
                "fingerprint": fingerprint,
                "model_metadata": {**metadata, "base_model_id": base_id},
            },
            label="text encoder",
            num_processes=num_processes,
            device=device,
            cache_url=cache_dir_url(os.path.join(work_dir, "petastorm")),
            extra_rows={
                "item_converter": item_tokens(
                    items, model_path=model_path, max_length=cfg.encoder_max_length
                )
            },
        )
    finally:
        examples.unpersist()
        items.unpersist()
    model_id = encoder_model_id(base_id, tuned_digest(model_dir))
    return EncoderFit(model_dir, model_id, output, n_examples, n_items)


def training_config(
    cfg: ContrastiveConfig, device: str, *, model_path: str, n_items: int
) -> dict[str, Any]:
    """The settings `train_text_encoder` reads from its config dict."""
    return {
        "model_path": model_path,
        "pad_id": int(_tokenizer(model_path).pad_token_id or 0),
        "n_items": n_items,
        "lora_rank": cfg.encoder_lora_rank,
        "lora_alpha": cfg.encoder_lora_alpha,
        "max_length": cfg.encoder_max_length,
        "hidden_dim": cfg.hidden_dim,
        "out_dim": cfg.out_dim,
        "epochs": cfg.encoder_epochs,
        "max_steps": cfg.encoder_max_steps,
        "batch_size": cfg.encoder_batch_size,
        "learning_rate": cfg.learning_rate,
        "encoder_learning_rate": cfg.encoder_learning_rate,
        "weight_decay": cfg.weight_decay,
        "temperature": cfg.temperature,
        "num_sampled_negatives": cfg.encoder_num_negatives,
        "history_grad": cfg.encoder_history_grad,
        "seed": cfg.seed,
        "device": device,
        "reader_workers": cfg.reader_workers,
    }


def _signature(examples: DataFrame, items: DataFrame) -> tuple[int, int]:
    """(example count, order-independent hash of the examples and the items' texts)."""
    row = examples.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.xxhash64("history", "pos") % (1 << 31)).alias("h"),
    ).collect()[0]
    text_hash = items.agg(F.sum(F.xxhash64("item_idx", "text") % (1 << 31))).collect()[0][0]
    return int(row["n"]), int(row["h"] or 0) + int(text_hash or 0)


def tuned_item_vectors(
    model_dir: str, texts: list[str], *, model_path: str, max_length: int
) -> np.ndarray:
    """(n, out_dim) unit rows of the tuned encoder for `texts`, on the driver (evaluation)."""
    from llmrec_spark.core.encoder_tuning import make_tuned_encoder

    encode = make_tuned_encoder(model_path, model_dir, max_length=max_length, batch_size=64)
    return encode(texts)


def run_encoder_mode(ctx: RunContext, base_id: str, head: StageResult | None) -> StageResult:
    """train-contrastive in encoder mode: tune the encoder on the date's training window
    (from `head`'s trained head, the head mode's result, when there is one), then embed every
    catalog item's current text with it under its own model id (`encoder_model_id`),
    incrementally."""
    from llmrec_spark.stages import embed
    from llmrec_spark.stages.als import training_events

    cfg = ctx.cfg.contrastive
    texts = embed.item_text(
        ctx.store.read("items"),
        template=ctx.cfg.embed.text_template,
        max_chars=ctx.cfg.embed.max_text_chars,
    )
    started = time.perf_counter()
    fit = fit_text_encoder(
        ctx,
        cfg,
        training_events(ctx, cfg.train_days),
        texts.select("item_id", "text"),
        work_dir=ctx.model_dir(ENCODER_FOLDER),
        metadata={"ds": ctx.ds},
        init_head_dir=head.artifacts["text_tower"] if head is not None else None,
    )
    train_seconds = time.perf_counter() - started
    counts = embed.embed_new_texts(
        ctx,
        texts,
        key="item_id",
        table="item_embeddings",
        model_path=_model_path(ctx),
        model_id=fit.model_id,
        tuned=embed.TunedEncoder(fit.model_dir, cfg.encoder_max_length),
    )
    losses = fit.output["losses"]
    log.info(
        "contrastive (encoder): loss %.4f -> %.4f (%.1fs); %d items embedded by %s",
        losses[0], losses[-1], train_seconds, counts.embedded, fit.model_id,
    )  # fmt: skip
    return StageResult(
        rows_in=fit.examples,
        rows_out=counts.embedded,
        metrics={
            "contrastive_first_epoch_loss": losses[0],
            "contrastive_last_epoch_loss": losses[-1],
            "contrastive_train_seconds": train_seconds,
            "contrastive_examples": float(fit.examples),
            "contrastive_items": float(fit.items),
        },
        params={
            **{f"contrastive.{k}": v for k, v in vars(cfg).items()},
            "contrastive.model_id": fit.model_id,
        },
        artifacts={"text_tower": fit.model_dir},
        summary={
            "mode": "encoder",
            "model_id": fit.model_id,
            "examples": fit.examples,
            "items": fit.items,
            "embedded": counts.embedded,
            "loss": [round(x, 4) for x in losses],
            "resumed_from": fit.output["resumed_from"],
            "start": head.summary if head is not None else "scratch",
        },
    )


def _model_path(ctx: RunContext) -> str:
    from llmrec_spark.core.encoder import resolve_model

    return resolve_model(ctx.cfg.embed.model)[0]


def saved_encoder_model_id(ctx: RunContext, base_id: str) -> str | None:
    """The model id of the encoder train-contrastive tuned for ctx.ds (None: none saved)."""
    from llmrec_spark.core.encoder_tuning import HEAD_WEIGHTS, tuned_digest

    model_dir = os.path.join(ctx.model_dir(ENCODER_FOLDER), "model")
    if not os.path.exists(os.path.join(model_dir, HEAD_WEIGHTS)):
        return None
    return encoder_model_id(base_id, tuned_digest(model_dir))
