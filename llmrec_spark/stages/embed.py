"""LLM item embeddings: catalog text -> L2-normalised mean-pooled transformer vectors.

Incremental: a night embeds only the (item_id, text_hash, model_id) triples that the
`item_embeddings` table does not hold yet, so unchanged items cost nothing and a new model
(or new weights) re-embeds everything. The model is loaded once per Python worker by
`make_encoder`; the pandas UDF only wraps that numpy -> numpy function.
"""

from __future__ import annotations

import logging
import math
import string
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd
from pyspark import TaskContext
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType

from llmrec_spark.config import EmbedConfig
from llmrec_spark.core.encoder import (
    check_embed_config,
    make_encoder,
    resolve_model,
)
from llmrec_spark.errors import ConfigError, InputError
from llmrec_spark.io import filesystem
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.session import session_conf
from llmrec_spark.schema import USER_PROFILE
from llmrec_spark.stages.clean import blank_to_null

if TYPE_CHECKING:
    from llmrec_spark.io.tables import TableStore

log = logging.getLogger(__name__)

# Items per Arrow batch handed to the UDF, in multiples of the encoder batch size: large
# enough for length bucketing to pay off, small enough to keep progress and memory smooth.
ARROW_BATCHES_PER_UDF_CALL = 16
# Upper bound on embedding partitions per Spark task slot (load balance vs per-task cost).
PARTITIONS_PER_SLOT = 2
# embedding_quarantine reason: every field of the template is null, blank or invisible.
REASON_EMPTY_TEXT = "empty_text"
# embedding_quarantine reason: a user-profile line without a user_id.
REASON_MISSING_USER = "missing_user_id"
# Characters removed from catalog text: control characters (Unicode Cc) and invisible
# format marks (zero-width space, word joiner, BOM, LRM/RLM). ZWJ/ZWNJ stay: emoji
# sequences and several scripts need them.
_INVISIBLE = r"[\p{Cc}\x{200B}\x{200E}\x{200F}\x{2060}\x{FEFF}]"


# ---------------------------------------------------------------------------------------
# Item text (Spark column functions only)


def _template_pieces(template: str, setting: str) -> tuple[str, list[tuple[str, str]]]:
    """Split "{a}. {b}" into the leading literal and (field, literal after it) pairs."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigError(f"{setting}: {exc} in {template!r}") from None
    lead = ""
    pieces: list[tuple[str, str]] = []
    for literal, field_name, spec, conversion in parsed:
        if spec or conversion:
            raise ConfigError(f"{setting}: format specs are not supported in {template!r}")
        if pieces:
            pieces[-1] = (pieces[-1][0], pieces[-1][1] + literal)
        else:
            lead += literal
        if field_name is not None:
            if not field_name:
                raise ConfigError(f"{setting}: empty field {{}} in {template!r}")
            pieces.append((field_name, ""))
    if not pieces:
        raise ConfigError(f"{setting}: {template!r} names no catalog field")
    return lead, pieces


def _clean(column: Column) -> Column:
    """Nulls -> "", invisible/control characters removed, Unicode whitespace collapsed, trimmed."""
    text = F.coalesce(column.cast("string"), F.lit(""))
    text = F.regexp_replace(text, r"(?U)\s", " ")
    text = F.regexp_replace(text, _INVISIBLE, "")
    return F.trim(F.regexp_replace(text, r" {2,}", " "))


def item_text(items: DataFrame, *, template: str, max_chars: int) -> DataFrame:
    """Catalog rows plus `text` and `text_hash` from `embed.text_template` (see `template_text`)."""
    return template_text(
        items, template=template, max_chars=max_chars, setting="embed.text_template"
    )


def template_text(
    rows: DataFrame, *, template: str, max_chars: int, setting: str = "template"
) -> DataFrame:
    """Add `text` (template filled with cleaned fields, empty when every field is) and `text_hash`.

    A field that is empty drops out with the separator after it ("Shoe. Acme" rather than
    "Shoe. . Acme"); the result is whitespace-collapsed and cut to `max_chars` characters.
    """
    lead, pieces = _template_pieces(template, setting)
    unknown = sorted({name for name, _ in pieces} - set(rows.columns))
    if unknown:
        raise ConfigError(
            f"{setting}: unknown field(s) {unknown}; available: {', '.join(rows.columns)}"
        )
    if max_chars <= 0:
        raise ConfigError(f"embed.max_text_chars: must be positive, got {max_chars}")
    cleaned = {name: _clean(F.col(name)) for name, _ in pieces}
    parts = [
        F.when(cleaned[name] == "", F.lit("")).otherwise(F.concat(cleaned[name], F.lit(after)))
        for name, after in pieces
    ]
    filled = F.concat(F.lit(lead), *parts)
    filled = F.trim(F.regexp_replace(F.regexp_replace(filled, r"(?U)\s", " "), r" {2,}", " "))
    all_empty = F.concat(*cleaned.values()) == ""
    text = F.when(all_empty, F.lit("")).otherwise(F.rtrim(F.substring(filled, 1, max_chars)))
    return rows.withColumn("text", text).withColumn("text_hash", F.sha2(F.col("text"), 256))


def embed_udf(
    model_path: str,
    *,
    device: str,
    max_length: int,
    batch_size: int,
    cpu_threads: int = 0,
    adapter_dir: str = "",
) -> Callable[[Column], Column]:
    """Iterator pandas UDF text -> array<float> around `make_encoder` (model loaded per
    worker); with `adapter_dir`, the tuned encoder saved there (contrastive.mode encoder:
    the base model plus its LoRA adapters and head, `encoder_tuning.make_tuned_encoder`)."""

    @F.pandas_udf(ArrayType(FloatType(), False))  # type: ignore[call-overload]
    def embed(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        task = TaskContext.get()
        gpus = task.resources().get("gpu") if task is not None else None
        task_gpus = list(gpus.addresses) if gpus is not None else []
        if adapter_dir:
            from llmrec_spark.core.encoder import pick_device
            from llmrec_spark.core.encoder_tuning import make_tuned_encoder

            encode = make_tuned_encoder(
                model_path,
                adapter_dir,
                max_length=max_length,
                batch_size=batch_size,
                device=pick_device(device, task_gpus),
            )
        else:
            encode = make_encoder(
                model_path,
                device=device,
                max_length=max_length,
                batch_size=batch_size,
                cpu_threads=cpu_threads,
                task_gpus=task_gpus,
                task_cpus=task.cpus() if task is not None else 0,
            )
        for texts in batches:
            yield pd.Series(list(encode(texts.to_numpy())))

    return embed


@dataclass(frozen=True)
class TunedEncoder:
    """A tuned encoder to embed with (contrastive.mode encoder): the folder of its adapters
    and head, and the tokens per text it was trained on."""

    adapter_dir: str
    max_length: int


# ---------------------------------------------------------------------------------------
# Spark transformations


def embed_items(
    texts: DataFrame,
    *,
    model_path: str,
    model_id: str,
    ds: str,
    cfg: EmbedConfig,
    num_partitions: int,
    key: str = "item_id",
    tuned: TunedEncoder | None = None,
) -> DataFrame:
    """(key, text, text_hash) rows -> item/user_embeddings rows, spread over `num_partitions`;
    with `tuned`, by that tuned encoder."""
    udf = embed_udf(
        model_path,
        device=cfg.device,
        max_length=tuned.max_length if tuned is not None else cfg.max_length,
        batch_size=cfg.batch_size,
        cpu_threads=cfg.cpu_threads,
        adapter_dir=tuned.adapter_dir if tuned is not None else "",
    )
    return (
        texts.repartition(num_partitions)
        .withColumn("embedding", udf(F.col("text")))
        .select(
            key,
            "text_hash",
            F.lit(model_id).alias("model_id"),
            F.size("embedding").cast("int").alias("dim"),
            "embedding",
            F.lit(ds).alias("ds"),
        )
    )


def pending_texts(
    texts: DataFrame, existing: DataFrame, *, model_id: str, key: str = "item_id"
) -> DataFrame:
    """Non-empty texts whose (key, text_hash) has no embedding under `model_id` yet."""
    done = existing.where(F.col("model_id") == model_id).select(key, "text_hash")
    return (
        texts.where(F.col("text") != "")
        .select(key, "text", "text_hash")
        .dropDuplicates([key, "text_hash"])
        .join(done, [key, "text_hash"], "left_anti")
        .select(key, "text", "text_hash")
    )


def empty_text_quarantine(texts: DataFrame, *, key: str, kind: str, ds: str) -> DataFrame:
    """embedding_quarantine rows for texts that are empty after normalisation."""
    return _quarantine_rows(
        texts.where(F.col("text") == ""), kind=kind, id_=F.col(key), reason=REASON_EMPTY_TEXT, ds=ds
    )


def _quarantine_rows(rows: DataFrame, *, kind: str, id_: Column, reason: str, ds: str) -> DataFrame:
    """One embedding_quarantine row per row of `rows`."""
    return rows.select(
        F.lit(kind).alias("kind"),
        id_.alias("id"),
        F.lit(reason).alias("reason"),
        F.lit(ds).alias("ds"),
    )


def embedding_partitions(n_texts: int, *, batch_size: int, task_slots: int) -> int:
    """One partition per encoder batch, at most PARTITIONS_PER_SLOT per task slot."""
    wanted = math.ceil(n_texts / batch_size)
    return max(1, min(wanted, PARTITIONS_PER_SLOT * max(task_slots, 1)))


def current_embeddings(embeddings: DataFrame, texts: DataFrame, *, model_id: str) -> DataFrame:
    """Each item's embedding of its current text (`texts` from `item_text`) under `model_id`."""
    current = texts.where(F.col("text") != "").select("item_id", "text_hash").distinct()
    return _one_per_item(
        embeddings.where(F.col("model_id") == model_id).join(current, ["item_id", "text_hash"])
    )


def newest_embeddings(embeddings: DataFrame, *, model_id: str) -> DataFrame:
    """Each item's embedding from its latest ds under `model_id` (ties: largest text_hash)."""
    return _one_per_item(embeddings.where(F.col("model_id") == model_id))


def _one_per_item(embeddings: DataFrame) -> DataFrame:
    newest = Window.partitionBy("item_id").orderBy(F.col("ds").desc(), F.col("text_hash").desc())
    return (
        embeddings.withColumn("_rank", F.row_number().over(newest))
        .where(F.col("_rank") == 1)
        .drop("_rank")
    )


def latest_embeddings(
    store: TableStore, model_id: str, embed_cfg: EmbedConfig | None = None
) -> DataFrame:
    """The current embedding per item_id for `model_id` (item_embeddings columns).

    With `embed_cfg`, exactly the row matching each catalog item's current text (items no
    longer in the catalog drop out); without, the row of each item's latest ds.
    """
    embeddings = store.read("item_embeddings")
    if embed_cfg is None:
        return newest_embeddings(embeddings, model_id=model_id)
    texts = item_text(
        store.read("items"), template=embed_cfg.text_template, max_chars=embed_cfg.max_text_chars
    )
    return current_embeddings(embeddings, texts, model_id=model_id)


# ---------------------------------------------------------------------------------------
# Stage


@dataclass
class EmbedCounts:
    """What one incremental pass over a set of texts did."""

    total: int
    embedded: int
    empty: int
    seconds: float

    @property
    def unchanged(self) -> int:
        return self.total - self.embedded - self.empty

    @property
    def per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


def embed_new_texts(
    ctx: RunContext,
    texts: DataFrame,
    *,
    key: str,
    table: str,
    model_path: str,
    model_id: str,
    tuned: TunedEncoder | None = None,
) -> EmbedCounts:
    """Embed the (key, text, text_hash) rows `table` lacks under `model_id` (by the `tuned`
    encoder when given); append them in one commit."""
    texts = texts.select(key, "text", "text_hash").cache()
    pending: DataFrame | None = None
    try:
        counts = texts.agg(
            F.count(F.lit(1)).alias("total"), F.count(F.when(F.col("text") == "", 1)).alias("empty")
        ).collect()[0]
        total, empty = int(counts["total"]), int(counts["empty"])
        pending = pending_texts(texts, ctx.store.read(table), model_id=model_id, key=key).cache()
        n_pending = pending.count()
        seconds = 0.0
        if n_pending:
            seconds = _append_embeddings(
                ctx,
                pending,
                n_pending=n_pending,
                total=total,
                key=key,
                table=table,
                model_path=model_path,
                model_id=model_id,
                tuned=tuned,
            )
    finally:
        if pending is not None:
            pending.unpersist()
        texts.unpersist()
    result = EmbedCounts(total=total, embedded=n_pending, empty=empty, seconds=seconds)
    log.info(
        "embed %s: %d embedded in %.1fs (%.1f/s), %d unchanged, %d empty (quarantined)",
        table,
        result.embedded,
        result.seconds,
        result.per_s,
        result.unchanged,
        result.empty,
    )
    return result


def _append_embeddings(
    ctx: RunContext,
    pending: DataFrame,
    *,
    n_pending: int,
    total: int,
    key: str,
    table: str,
    model_path: str,
    model_id: str,
    tuned: TunedEncoder | None = None,
) -> float:
    """Embed the `n_pending` rows of `pending` (of `total` texts) and append them to `table`;
    the seconds that took."""
    cfg = ctx.cfg.embed
    partitions = embedding_partitions(
        n_pending, batch_size=cfg.batch_size, task_slots=ctx.spark.sparkContext.defaultParallelism
    )
    log.info(
        "embed %s: %d of %d texts new or changed; %s on device=%s, %d partitions",
        table,
        n_pending,
        total,
        model_id,
        cfg.device,
        partitions,
    )
    rows = embed_items(
        pending,
        model_path=model_path,
        model_id=model_id,
        ds=ctx.ds,
        cfg=cfg,
        num_partitions=partitions,
        key=key,
        tuned=tuned,
    )
    arrow_batch = str(cfg.batch_size * ARROW_BATCHES_PER_UDF_CALL)
    started = time.perf_counter()
    with session_conf(ctx.spark, "spark.sql.execution.arrow.maxRecordsPerBatch", arrow_batch):
        ctx.store.append(
            table, rows, metadata={"stage": "embed", "ds": ctx.ds, "model_id": model_id}
        )
    return time.perf_counter() - started


def read_user_profiles(spark: SparkSession, path: str) -> DataFrame | None:
    """The landing user profiles (JSON lines, schema USER_PROFILE) in line order, or None.

    Profiles are optional: a catalog without them has no such folder.
    """
    if not filesystem.exists(spark, path):
        return None
    raw = spark.read.schema(USER_PROFILE).option("recursiveFileLookup", "true").json(path)
    return raw.withColumn("line_seq", F.monotonically_increasing_id())


def split_profiles(raw: DataFrame, *, ds: str) -> tuple[DataFrame, DataFrame]:
    """(one profile per user, the last line wins; embedding_quarantine rows of lines without a user_id)."""
    trimmed = raw.withColumn("user_id", blank_to_null(F.trim("user_id")))
    last = Window.partitionBy("user_id").orderBy(F.col("line_seq").desc())
    profiles = (
        trimmed.where(F.col("user_id").isNotNull())
        .withColumn("_n", F.row_number().over(last))
        .where(F.col("_n") == 1)
        .drop("_n", "line_seq")
    )
    missing = _quarantine_rows(
        trimmed.where(F.col("user_id").isNull()),
        kind="user",
        id_=F.lit(""),
        reason=REASON_MISSING_USER,
        ds=ds,
    )
    return profiles, missing


def run_embed(ctx: RunContext) -> StageResult:
    """Embed new or changed catalog (and user-profile) texts into item_embeddings/user_embeddings.

    Texts that are empty after normalisation are not embedded; they go to
    `embedding_quarantine` (this run date's partition, replaced on a rerun) with a reason.
    """
    cfg = ctx.cfg.embed
    started = time.perf_counter()
    model_path, model_id = resolve_model(cfg.model)
    check_embed_config(cfg, model_path)
    items, quarantine = _embed_catalog(ctx, model_path=model_path, model_id=model_id)
    users: EmbedCounts | None = None
    profiles = _embed_user_profiles(ctx, model_path=model_path, model_id=model_id)
    if profiles is not None:
        users, user_quarantine = profiles
        quarantine = quarantine.unionByName(user_quarantine)
    ctx.store.overwrite("embedding_quarantine", quarantine, partitions={"ds": ctx.ds})
    empty_items = _empty_text_examples(ctx, n_empty=items.empty)
    seconds = time.perf_counter() - started
    return _embed_result(cfg, model_id, items, users, empty_items=empty_items, seconds=seconds)


def _embed_catalog(
    ctx: RunContext, *, model_path: str, model_id: str
) -> tuple[EmbedCounts, DataFrame]:
    """Embed the `items` table's new or changed texts: (counts, quarantine rows of empty texts)."""
    cfg = ctx.cfg.embed
    if not ctx.store.exists("items"):
        raise InputError(
            "no `items` table (the item catalog) yet; load the catalog before `llmrec embed`"
        )
    texts = item_text(
        ctx.store.read("items"), template=cfg.text_template, max_chars=cfg.max_text_chars
    )
    counts = embed_new_texts(
        ctx,
        texts,
        key="item_id",
        table="item_embeddings",
        model_path=model_path,
        model_id=model_id,
    )
    return counts, empty_text_quarantine(texts, key="item_id", kind="item", ds=ctx.ds)


def _embed_user_profiles(
    ctx: RunContext, *, model_path: str, model_id: str
) -> tuple[EmbedCounts, DataFrame] | None:
    """Snapshot the landing user profiles into `user_profiles` and embed their new or changed
    texts: (counts, quarantine rows of empty texts and lines without a user_id); None when
    `embed.user_profiles` is unset or its folder does not exist."""
    cfg = ctx.cfg.embed
    if not cfg.user_profiles:
        return None
    path = ctx.landing(cfg.user_profiles)
    raw_profiles = read_user_profiles(ctx.spark, path)
    if raw_profiles is None:
        log.info("embed: no user profiles at %s; only items embedded", path)
        return None
    profiles, no_user = split_profiles(raw_profiles, ds=ctx.ds)
    ctx.store.overwrite("user_profiles", profiles)
    texts = template_text(
        ctx.store.read("user_profiles"),
        template=cfg.user_text_template,
        max_chars=cfg.max_text_chars,
        setting="embed.user_text_template",
    )
    counts = embed_new_texts(
        ctx,
        texts,
        key="user_id",
        table="user_embeddings",
        model_path=model_path,
        model_id=model_id,
    )
    empty = empty_text_quarantine(texts, key="user_id", kind="user", ds=ctx.ds)
    return counts, empty.unionByName(no_user)


def _empty_text_examples(ctx: RunContext, *, n_empty: int) -> list[str]:
    """Up to 20 item ids quarantined for empty text on ctx.ds (sorted); logs them as a warning."""
    examples = sorted(
        r.id
        for r in ctx.store.read("embedding_quarantine", where={"ds": ctx.ds})
        .where(F.col("kind") == "item")
        .select("id")
        .limit(20)
        .collect()
    )
    if examples:
        log.warning(
            "embed: %d items have no text after normalisation, not embedded (e.g. %s)",
            n_empty,
            ", ".join(examples),
        )
    return examples


def _embed_result(
    cfg: EmbedConfig,
    model_id: str,
    items: EmbedCounts,
    users: EmbedCounts | None,
    *,
    empty_items: list[str],
    seconds: float,
) -> StageResult:
    """The stage's row counts (of items), metrics and nightly summary."""
    summary: dict[str, Any] = {
        "model_id": model_id,
        "items": items.total,
        "embedded": items.embedded,
        "unchanged": items.unchanged,
        "empty_text": items.empty,
        "empty_text_items": empty_items,
        "items_per_s": round(items.per_s, 1),
    }
    metrics = {
        "items_per_s": items.per_s,
        "embed_seconds": items.seconds,
        "stage_seconds": seconds,
    }
    if users is not None:
        summary |= {
            "user_profiles": users.total,
            "users_embedded": users.embedded,
            "users_empty_text": users.empty,
        }
        metrics |= {"users_per_s": users.per_s, "user_embed_seconds": users.seconds}
    return StageResult(
        rows_in=items.total,
        rows_out=items.embedded,
        rows_quarantined=items.empty,
        rows_excluded=items.unchanged,
        metrics=metrics,
        params={"embed.model_id": model_id, **{f"embed.{k}": v for k, v in vars(cfg).items()}},
        summary=summary,
    )
