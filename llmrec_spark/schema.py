"""Every table's schema and column names, declared once and referenced by name."""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql.types import (
    ArrayType,
    DoubleType,
    FloatType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
    TimestampType,
)

# Recommendation sources, in the `source` column.
SOURCE_ALS = "als"
SOURCE_TEXT = "text"
SOURCE_HYBRID = "hybrid"
SOURCE_POPULAR = "popular"
# A user without an ALS factor scored by the Mult-VAE (vae.enabled): its score alone, or mixed
# with the text score (where "als" and "hybrid" stand for the others).
SOURCE_VAE = "vae"
SOURCE_VAE_HYBRID = "hybrid_vae"
# A user without history scored by their own profile text (the user tower, profile.enabled).
SOURCE_PROFILE = "profile"

# Raw event as it arrives in the landing zone (JSON lines). Everything is a string or
# number that may be wrong; validation happens in the clean stage.
RAW_EVENT = StructType(
    [
        StructField("event_id", StringType()),
        StructField("user_id", StringType()),
        StructField("item_id", StringType()),
        StructField("event_type", StringType()),
        StructField("event_ts", StringType()),
        StructField("value", DoubleType()),
        StructField("session_id", StringType()),
        StructField("source", StringType()),
    ]
)

CATALOG = StructType(
    [
        StructField("item_id", StringType(), False),
        StructField("title", StringType()),
        StructField("description", StringType()),
        StructField("category", StringType()),
        StructField("brand", StringType()),
        StructField("available", StringType()),
        StructField("added_ds", StringType()),
    ]
)

EVENTS_CLEAN = StructType(
    [
        StructField("event_id", StringType(), False),
        StructField("user_id", StringType(), False),
        StructField("item_id", StringType(), False),
        StructField("event_type", StringType(), False),
        StructField("event_ts", TimestampType(), False),
        StructField("value", DoubleType()),
        StructField("session_id", StringType()),
        StructField("weight", DoubleType(), False),
        StructField("ds", StringType(), False),
        StructField("ingest_ds", StringType(), False),
    ]
)
# The columns of events_clean that the splits, the models and the evaluation read.
EVENT_COLUMNS = ("user_id", "item_id", "event_ts", "weight")

EVENTS_QUARANTINE = StructType(
    [
        StructField("raw", StringType()),
        StructField("reasons", ArrayType(StringType()), False),
        StructField("source_file", StringType()),
        StructField("user_id", StringType()),
        StructField("ds", StringType(), False),
    ]
)

ITEM_EMBEDDINGS = StructType(
    [
        StructField("item_id", StringType(), False),
        StructField("text_hash", StringType(), False),
        StructField("model_id", StringType(), False),
        StructField("dim", IntegerType(), False),
        StructField("embedding", ArrayType(FloatType()), False),
        StructField("ds", StringType(), False),
    ]
)

# User profiles as they arrive in the landing zone (JSON lines, optional).
USER_PROFILE = StructType(
    [
        StructField("user_id", StringType(), False),
        StructField("interests", StringType()),
        StructField("bio", StringType()),
    ]
)

USER_EMBEDDINGS = StructType(
    [
        StructField("user_id", StringType(), False),
        StructField("text_hash", StringType(), False),
        StructField("model_id", StringType(), False),
        StructField("dim", IntegerType(), False),
        StructField("embedding", ArrayType(FloatType()), False),
        StructField("ds", StringType(), False),
    ]
)

# Texts the embed stage did not embed, with the reason (kind: item or user).
EMBEDDING_QUARANTINE = StructType(
    [
        StructField("kind", StringType(), False),
        StructField("id", StringType(), False),
        StructField("reason", StringType(), False),
        StructField("ds", StringType(), False),
    ]
)

ALS_FACTORS = StructType(
    [
        StructField("id", StringType(), False),
        StructField("features", ArrayType(FloatType()), False),
        StructField("kind", StringType(), False),
        StructField("ds", StringType(), False),
    ]
)

RECOMMENDATIONS = StructType(
    [
        StructField("user_id", StringType(), False, {"comment": "user the list is for"}),
        StructField("rank", IntegerType(), False, {"comment": "1 = best"}),
        StructField("item_id", StringType(), False, {"comment": "recommended item"}),
        StructField("score", FloatType(), False, {"comment": "non-increasing by rank"}),
        StructField("source", StringType(), False, {"comment": "als, text, hybrid or popular"}),
        StructField(
            "model_version", StringType(), False, {"comment": "MLflow run id of the models"}
        ),
        StructField("ds", StringType(), False, {"comment": "run date, YYYY-MM-DD; the partition"}),
    ]
)

# The recommend stage's scored rows, before model_version and ds are stamped on them.
# A StructType, not DDL: parsing DDL is a JVM round trip (~10 ms) per small driver-path call.
SCORED_SCHEMA = StructType(
    [
        StructField("user_id", StringType()),
        StructField("rank", IntegerType()),
        StructField("item_id", StringType()),
        StructField("score", FloatType()),
        StructField("source", StringType()),
    ]
)

PIPELINE_RUNS = StructType(
    [
        StructField("ds", StringType(), False),
        StructField("stage", StringType(), False),
        StructField("status", StringType(), False),
        StructField("rows_in", LongType()),
        StructField("rows_out", LongType()),
        StructField("rows_duplicate", LongType()),
        StructField("rows_quarantined", LongType()),
        StructField("rows_excluded", LongType()),
        StructField("seconds", DoubleType()),
        StructField("started_at", TimestampType()),
        StructField("mlflow_run_id", StringType()),
        StructField("message", StringType()),
        # The freshness contract (llmrec_spark/runtime/freshness.py): the newest event date in
        # events_clean up to ds when the stage ran, and the inputs it was allowed to take
        # from an older date (`--allow-stale`), e.g. "clean@2026-11-03"; null when fresh.
        StructField("events_through", StringType()),
        StructField("stale_inputs", StringType()),
    ]
)


@dataclass(frozen=True)
class TableSpec:
    name: str
    schema: StructType
    partition_by: tuple[str, ...]
    description: str


TABLES: dict[str, TableSpec] = {
    spec.name: spec
    for spec in [
        TableSpec(
            "items",
            CATALOG,
            (),
            "Item catalog snapshot (text fields used for embeddings and display).",
        ),
        TableSpec(
            "events_clean",
            EVENTS_CLEAN,
            ("ds", "ingest_ds"),
            "Validated, deduplicated behaviour events; ds = event date, ingest_ds = landing date.",
        ),
        TableSpec(
            "events_quarantine",
            EVENTS_QUARANTINE,
            ("ds",),
            "Rejected raw records with reason codes and source file; ds = landing date.",
        ),
        TableSpec(
            "item_embeddings",
            ITEM_EMBEDDINGS,
            (),
            "L2-normalised text embeddings per (item_id, text_hash, model_id).",
        ),
        TableSpec(
            "user_profiles", USER_PROFILE, (), "User profile snapshot (self-described text)."
        ),
        TableSpec(
            "user_embeddings",
            USER_EMBEDDINGS,
            (),
            "L2-normalised profile-text embeddings per (user_id, text_hash, model_id).",
        ),
        TableSpec(
            "embedding_quarantine",
            EMBEDDING_QUARANTINE,
            ("ds",),
            "Items and users whose text was not embedded, with the reason; ds = run date.",
        ),
        TableSpec("als_factors", ALS_FACTORS, ("ds",), "ALS user and item factors per run date."),
        TableSpec(
            "recommendations",
            RECOMMENDATIONS,
            ("ds",),
            "Nightly top-N per user; one partition per run date, rewritten atomically.",
        ),
        TableSpec(
            "recommendations_latest",
            RECOMMENDATIONS,
            (),
            "The rows of the newest published ds of `recommendations`, replaced atomically.",
        ),
        TableSpec(
            "pipeline_runs",
            PIPELINE_RUNS,
            ("ds",),
            "One row per stage run: status, row counts, timings, MLflow run id.",
        ),
    ]
}
