"""The `clean` stage: one landing date of raw behaviour logs -> `events_clean` + `events_quarantine`.

Every input line ends in exactly one place: clean, duplicate (exact event_id repeat or a
client retry), quarantined (with reason codes) or excluded (bot traffic, kept in quarantine
with reason "bot"). The counts must reconcile, or the stage fails.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType
from pyspark.sql.utils import AnalysisException

from llmrec_spark.config import CleanConfig
from llmrec_spark.context import RunContext, StageResult
from llmrec_spark.errors import ConfigError, GateError, InputError
from llmrec_spark.schema import CATALOG, EVENT_TYPES, RAW_EVENT

log = logging.getLogger(__name__)

# Reason codes in events_quarantine.reasons; a record can carry several.
REASONS = (
    "malformed",
    "missing_user",
    "missing_item",
    "unknown_event_type",
    "bad_timestamp",
    "future_timestamp",
    "too_late",
    "unknown_item",
    "oversized_field",
    "bad_rating",
)
BOT_REASON = "bot"

# Outcome of every input line (column `outcome`).
CLEAN, DUPLICATE, QUARANTINED, EXCLUDED = "clean", "duplicate", "quarantined", "excluded"

# Same user, item and event type: the key of a near-duplicate (client retry).
RETRY_KEY = ("user_id", "item_id", "event_type")
RAW_FIELDS = tuple(f.name for f in RAW_EVENT.fields)
STRING_FIELDS = tuple(f.name for f in RAW_EVENT.fields if isinstance(f.dataType, StringType))
_CORRUPT = "_corrupt_record"
DAY_S = 86_400


class ReconciliationError(RuntimeError):
    """rows_in != rows_out + duplicates + quarantined + excluded: a bug, never a data problem."""


# --------------------------------------------------------------------------- pure steps


def parse_raw(lines: DataFrame) -> DataFrame:
    """Lines (raw, source_file, line_seq) -> the same plus every RAW_EVENT field and `malformed`.

    Invalid UTF-8 is replaced by U+FFFD so the raw text stays storable; such lines, lines that
    are not a JSON object and objects holding a value of the wrong type are malformed.
    """
    schema = StructType([*RAW_EVENT.fields, StructField(_CORRUPT, StringType())])
    options = {"mode": "PERMISSIVE", "columnNameOfCorruptRecord": _CORRUPT}
    decoded = F.decode(F.col("raw").cast("binary"), "UTF-8")
    parsed = (
        lines.withColumn("_invalid_utf8", F.col("raw") != decoded)
        .withColumn("raw", decoded)
        .withColumn("_parsed", F.from_json("raw", schema, options))
    )
    malformed = (
        F.col("_invalid_utf8")
        | F.col("_parsed").isNull()
        | F.col(f"_parsed.{_CORRUPT}").isNotNull()
        | ~F.ltrim("raw").startswith("{")
    )
    return parsed.select(
        *lines.columns,
        *[F.col(f"_parsed.{name}").alias(name) for name in RAW_FIELDS],
        malformed.alias("malformed"),
    )


def validate_events(
    events: DataFrame,
    *,
    ds: str,
    known_items: DataFrame,
    max_field_chars: int,
    max_future_skew_s: int,
    max_late_days: int,
) -> DataFrame:
    """Add `reasons` (array of REASONS codes, empty when valid) and normalise the fields.

    `event_ts` becomes a timestamp, ids are trimmed, `event_type` lower-cased, `value` kept for
    ratings only; a missing event_id becomes a hash of the raw line, so its repeats still dedup.
    """
    day_start = _epoch_s(ds)
    latest_s = day_start + DAY_S + max_future_skew_s
    earliest_s = day_start - max_late_days * DAY_S
    known = known_items.select(F.col("item_id").alias("_known_item")).distinct()
    longest = F.greatest(*[F.length(name) for name in STRING_FIELDS])
    df = (
        events.withColumn("_oversized", F.coalesce(longest > max_field_chars, F.lit(False)))
        .withColumn("user_id", _blank_to_null(F.trim("user_id")))
        .withColumn("item_id", _blank_to_null(F.trim("item_id")))
        .withColumn("event_type", F.lower(F.trim("event_type")))
        .withColumn("_ts", F.expr("try_cast(event_ts AS TIMESTAMP)"))
        .withColumn("_ts_s", F.unix_seconds("_ts"))
        .join(known, F.col("item_id") == F.col("_known_item"), "left")
    )
    checks: list[tuple[str, Column]] = [
        ("missing_user", F.col("user_id").isNull()),
        ("missing_item", F.col("item_id").isNull()),
        ("unknown_event_type", ~F.coalesce(F.col("event_type").isin(*EVENT_TYPES), F.lit(False))),
        ("bad_timestamp", F.col("_ts").isNull()),
        ("future_timestamp", F.col("_ts_s") > latest_s),
        ("too_late", F.col("_ts_s") < earliest_s),
        ("unknown_item", F.col("item_id").isNotNull() & F.col("_known_item").isNull()),
        ("oversized_field", F.col("_oversized")),
        (
            "bad_rating",
            (F.col("event_type") == "rating")
            & ~F.coalesce(F.col("value").between(1.0, 5.0), F.lit(False)),
        ),
    ]
    reasons = F.when(F.col("malformed"), F.array(F.lit("malformed"))).otherwise(
        F.array_compact(F.array(*[F.when(cond, F.lit(code)) for code, cond in checks]))
    )
    event_id = F.coalesce(
        _blank_to_null(F.trim("event_id")),
        F.concat(F.lit("raw-"), F.sha2("raw", 256).substr(1, 32)),
    )
    return (
        df.withColumn("reasons", reasons.cast("array<string>"))
        .withColumn("event_id", event_id)
        .withColumn("event_ts", F.col("_ts"))
        .withColumn("value", F.when(F.col("event_type") == "rating", F.col("value")))
        .drop("_oversized", "_ts", "_ts_s", "_known_item", "malformed")
    )


def split_valid(validated: DataFrame) -> tuple[DataFrame, DataFrame]:
    """(valid, quarantined) by whether a record has any reason code."""
    has_reason = F.size("reasons") > 0
    return validated.where(~has_reason), validated.where(has_reason)


def dedup_events(events: DataFrame, *, window_s: int, prior: DataFrame | None = None) -> DataFrame:
    """Add `duplicate`: null for the kept event, "exact" or "near" for a duplicate.

    Exact: same event_id as an earlier line (by event_ts, then source_file and line_seq) or as
    an event in `prior` (already clean). Near: same user, item and event type at most
    `window_s` seconds after the previous kept event (prior ones included), or at most
    `window_s` seconds before a prior event. Two shuffles: by event_id, then by retry key.
    """
    window_us = window_s * 1_000_000
    columns = events.columns
    timeline = events.withColumn("_is_prior", F.lit(False))
    if prior is not None:
        anchors = prior.select("event_id", *RETRY_KEY, "event_ts").withColumn(
            "_is_prior", F.lit(True)
        )
        timeline = timeline.unionByName(anchors, allowMissingColumns=True)
    # Prior rows sort first, so a new line repeating an already clean event_id is never first.
    first = Window.partitionBy("event_id").orderBy(
        F.col("_is_prior").desc(), "event_ts", "source_file", "line_seq"
    )
    entry = F.struct(
        F.unix_micros("event_ts").alias("us"),
        F.col("_is_prior").alias("is_prior"),
        F.col("source_file").alias("file"),
        F.col("line_seq").alias("line"),
        (~F.col("_is_prior") & (F.row_number().over(first) > 1)).alias("exact"),
        F.struct(*columns).alias("row"),
    )
    grouped = (
        timeline.select(*RETRY_KEY, entry.alias("_entry"))
        .groupBy(*RETRY_KEY)
        .agg(F.array_sort(F.collect_list("_entry"), _timeline_order).alias("_seq"))
        .select("_seq", _duplicate_kinds(F.col("_seq"), window_us).alias("_kinds"))
    )
    return (
        grouped.select(F.inline(F.arrays_zip("_seq", "_kinds")))
        .where(~F.col("_seq.is_prior"))
        .select(
            *[F.col(f"_seq.row.{c}").alias(c) for c in columns], F.col("_kinds").alias("duplicate")
        )
    )


def _timeline_order(left: Column, right: Column) -> Column:
    """Comparator for array_sort: by time, new lines before clean ones, then file and line."""
    order = F.lit(0)
    for key in ("line", "file", "is_prior", "us"):  # innermost tie-breaker first
        lk, rk = left[key], right[key]
        order = F.when(lk < rk, F.lit(-1)).when(lk > rk, F.lit(1)).otherwise(order)
    return order


def _duplicate_kinds(seq: Column, window_us: int) -> Column:
    """Per entry of one retry key's time-sorted timeline: null (kept), "exact" or "near".

    The near rule is sequential (t=0, 6, 12 with a 10 s window keeps 0 and 12), so it folds
    over the timeline with `aggregate`; clean (prior) events take part as kept anchors.
    """
    prior_us = F.transform(F.filter(seq, lambda x: x["is_prior"]), lambda x: x["us"])

    def before_prior(x: Column) -> Column:
        return F.exists(prior_us, lambda p: (p - x["us"] >= 0) & (p - x["us"] <= window_us))

    init = F.struct(
        F.lit(None).cast("long").alias("last"), F.array().cast("array<string>").alias("kinds")
    )

    def step(acc: Column, x: Column) -> Column:
        near = before_prior(x) | (acc["last"].isNotNull() & (x["us"] - acc["last"] <= window_us))
        kind = (
            F.when(x["is_prior"], F.lit(None))
            .when(x["exact"], F.lit("exact"))
            .when(near, F.lit("near"))
        )
        kept = x["is_prior"] | (~x["exact"] & ~near)
        return F.struct(
            F.when(kept, x["us"]).otherwise(acc["last"]).alias("last"),
            F.concat(acc["kinds"], F.array(kind.cast("string"))).alias("kinds"),
        )

    return F.aggregate(seq, init, step, lambda acc: acc["kinds"])


def flag_bots(
    events: DataFrame, *, max_events_per_day: int, max_distinct_items_per_day: int
) -> DataFrame:
    """Add `bot`: true for every event of a user above either limit on any event date."""
    per_day = events.groupBy("user_id", _event_date(F.col("event_ts")).alias("_day")).agg(
        F.count(F.lit(1)).alias("_n"), F.countDistinct("item_id").alias("_items")
    )
    bots = (
        per_day.where(
            (F.col("_n") > max_events_per_day) | (F.col("_items") > max_distinct_items_per_day)
        )
        .select(F.col("user_id").alias("_bot_user"))
        .distinct()
    )
    return (
        events.join(bots, F.col("user_id") == F.col("_bot_user"), "left")
        .withColumn("bot", F.col("_bot_user").isNotNull())
        .drop("_bot_user")
    )


def add_weights(
    events: DataFrame, *, event_weights: Mapping[str, float], rating_weight_scale: float
) -> DataFrame:
    """Add `weight`: event_weights[event_type], or rating_weight_scale * value for ratings."""
    by_type = F.create_map(*[F.lit(x) for pair in sorted(event_weights.items()) for x in pair])
    weight = F.when(
        F.col("event_type") == "rating", F.lit(float(rating_weight_scale)) * F.col("value")
    ).otherwise(by_type[F.col("event_type")])
    return events.withColumn("weight", weight.cast("double"))


def clean_events(
    lines: DataFrame,
    *,
    ds: str,
    known_items: DataFrame,
    prior: DataFrame | None,
    cfg: CleanConfig,
) -> DataFrame:
    """Every line with its `outcome` (clean/duplicate/quarantined/excluded), reasons and weight."""
    validated = lines.transform(parse_raw).transform(
        validate_events,
        ds=ds,
        known_items=known_items,
        max_field_chars=cfg.max_field_chars,
        max_future_skew_s=cfg.max_future_skew_s,
        max_late_days=cfg.max_late_days,
    )
    valid, quarantined = split_valid(validated)
    deduped = valid.transform(dedup_events, window_s=cfg.near_duplicate_window_s, prior=prior)
    kept = (
        deduped.where(F.col("duplicate").isNull())
        .transform(
            flag_bots,
            max_events_per_day=cfg.bot_max_events_per_day,
            max_distinct_items_per_day=cfg.bot_max_distinct_items_per_day,
        )
        .transform(
            add_weights,
            event_weights=cfg.event_weights,
            rating_weight_scale=cfg.rating_weight_scale,
        )
    )
    return (
        quarantined.withColumn("outcome", F.lit(QUARANTINED))
        .unionByName(
            deduped.where(F.col("duplicate").isNotNull()).withColumn("outcome", F.lit(DUPLICATE)),
            allowMissingColumns=True,
        )
        .unionByName(
            kept.withColumn(
                "outcome", F.when(F.col("bot"), F.lit(EXCLUDED)).otherwise(F.lit(CLEAN))
            )
            .withColumn(
                "reasons",
                F.when(F.col("bot"), F.array(F.lit(BOT_REASON))).otherwise(F.col("reasons")),
            )
            .drop("bot"),
            allowMissingColumns=True,
        )
    )


def to_events_clean(outcomes: DataFrame, *, ingest_ds: str) -> DataFrame:
    """Clean rows in the events_clean layout: ds = UTC event date, ingest_ds = landing date."""
    return outcomes.where(F.col("outcome") == CLEAN).select(
        "event_id",
        "user_id",
        "item_id",
        "event_type",
        "event_ts",
        "value",
        "session_id",
        "weight",
        _event_date(F.col("event_ts")).alias("ds"),
        F.lit(ingest_ds).alias("ingest_ds"),
    )


def to_quarantine(outcomes: DataFrame, *, ds: str) -> DataFrame:
    """Quarantined and excluded rows in the events_quarantine layout (ds = landing date)."""
    return outcomes.where(F.col("outcome").isin(QUARANTINED, EXCLUDED)).select(
        "raw", "reasons", "source_file", "user_id", F.lit(ds).alias("ds")
    )


def normalize_catalog(catalog: DataFrame) -> DataFrame:
    """Catalog rows with a trimmed, non-empty item_id; one row per item (latest added_ds wins)."""
    latest = Window.partitionBy("item_id").orderBy(
        F.col("added_ds").desc_nulls_last(), F.col("title").asc_nulls_last()
    )
    return (
        catalog.withColumn("item_id", _blank_to_null(F.trim("item_id")))
        .where(F.col("item_id").isNotNull())
        .withColumn("_n", F.row_number().over(latest))
        .where(F.col("_n") == 1)
        .drop("_n")
    )


def _blank_to_null(col: Column) -> Column:
    return F.when(col != "", col)


def _event_date(ts: Column) -> Column:
    """UTC calendar date of a timestamp as YYYY-MM-DD, whatever the session time zone."""
    days = F.floor(F.unix_seconds(ts) / DAY_S).cast("int")
    return F.date_format(F.date_from_unix_date(days), "yyyy-MM-dd")


def _epoch_s(ds: str) -> int:
    day = dt.date.fromisoformat(ds)
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


# --------------------------------------------------------------------------- I/O and the stage


def read_landing_lines(spark: SparkSession, path: str) -> DataFrame:
    """Every line under `path` (recursively) as raw, source_file, line_seq; InputError if missing."""
    try:
        text = spark.read.option("recursiveFileLookup", "true").text(path)
    except AnalysisException as exc:
        if "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc):
            raise InputError(
                f"no landing data at {path}; run `llmrec generate-demo` for demo data "
                "or check storage.landing"
            ) from None
        raise
    # Within a file, line_seq follows line order; it breaks ties between identical timestamps.
    return text.select(
        F.col("value").alias("raw"),
        F.input_file_name().alias("source_file"),
        F.monotonically_increasing_id().alias("line_seq"),
    )


def read_catalog(spark: SparkSession, path: str) -> DataFrame:
    """The landing catalog (JSON lines, schema CATALOG); InputError if missing."""
    try:
        return spark.read.schema(CATALOG).option("recursiveFileLookup", "true").json(path)
    except AnalysisException as exc:
        if "PATH_NOT_FOUND" in str(exc) or "does not exist" in str(exc):
            raise InputError(
                f"no item catalog at {path}; run `llmrec generate-demo` for demo data "
                "or check storage.landing"
            ) from None
        raise


def check_weights(cfg: CleanConfig) -> None:
    """Every event type needs a weight (ratings use rating_weight_scale)."""
    missing = [t for t in EVENT_TYPES if t != "rating" and t not in cfg.event_weights]
    unknown = sorted(set(cfg.event_weights) - set(EVENT_TYPES))
    if missing:
        raise ConfigError(f"clean.event_weights: no weight for event type(s) {', '.join(missing)}")
    if unknown:
        raise ConfigError(
            f"clean.event_weights: unknown event type(s) {', '.join(unknown)}; "
            f"known: {', '.join(EVENT_TYPES)}"
        )


def run_clean(ctx: RunContext) -> StageResult:
    """Clean the landing date ctx.ds into events_clean (ingest_ds = ds) and events_quarantine.

    The quarantine partition is written before the gates, so a failed gate can be inspected;
    events_clean is only replaced when the gates pass.
    """
    cfg = ctx.cfg.clean
    ds = ctx.ds
    check_weights(cfg)
    try:
        dt.date.fromisoformat(ds)
    except ValueError:
        raise InputError(f"run date {ds!r} is not a date in YYYY-MM-DD form") from None
    spark = ctx.spark

    landing = ctx.landing("events", f"ds={ds}")
    all_lines = read_landing_lines(spark, landing)
    catalog_path = ctx.landing("catalog")
    raw_catalog = read_catalog(spark, catalog_path)

    # Blank lines are not records (as in Spark's own JSON reader); they are counted, not kept.
    is_blank = F.trim(F.col("raw")) == ""
    line_counts = all_lines.agg(
        F.count(F.lit(1)).alias("lines"), F.sum(is_blank.cast("long")).alias("blank")
    ).collect()[0]
    rows_in = int(line_counts["lines"]) - int(line_counts["blank"] or 0)
    if rows_in == 0:
        raise InputError(
            f"no event lines under {landing}; check the upstream export or storage.landing"
        )
    lines = all_lines.where(~is_blank)

    catalog = normalize_catalog(raw_catalog).cache()
    n_items = catalog.count()
    if n_items == 0:
        catalog.unpersist()
        raise InputError(f"the item catalog at {catalog_path} has no item with an item_id")
    lookback = [_shift(ds, -d) for d in range(1, cfg.lookback_days + 1)]
    prior = ctx.store.read("events_clean", where={"ingest_ds": lookback}) if lookback else None
    log.info(
        "clean %s: %d input lines, %d catalog items, dedup against ingest dates %s",
        ds,
        rows_in,
        n_items,
        ", ".join(lookback) or "none",
    )

    outcomes = clean_events(lines, ds=ds, known_items=catalog, prior=prior, cfg=cfg)
    outcomes = outcomes.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts, reasons = _outcome_counts(outcomes, ds=ds)
        late, bot_users = counts["late"], counts["bot_users"]
        n_out = counts[CLEAN]
        n_dup = counts["duplicate_exact"] + counts["duplicate_near"]
        n_quarantined, n_excluded = counts[QUARANTINED], counts[EXCLUDED]
        _reconcile(ds, rows_in, n_out, n_dup, n_quarantined, n_excluded, "before writing")

        ctx.store.overwrite(
            "events_quarantine", to_quarantine(outcomes, ds=ds), partitions={"ds": ds}
        )
        _quarantine_gate(cfg, rows_in, n_quarantined)
        _volume_gate(ctx, cfg, n_out + n_quarantined + n_excluded)
        ctx.store.overwrite(
            "events_clean", to_events_clean(outcomes, ingest_ds=ds), partitions={"ingest_ds": ds}
        )
        # The catalog snapshot changes only once the gates have passed.
        ctx.store.overwrite("items", catalog)
    finally:
        outcomes.unpersist()
        catalog.unpersist()

    written_clean = ctx.store.read("events_clean", where={"ingest_ds": ds}).count()
    quarantine = ctx.store.read("events_quarantine", where={"ds": ds})
    is_bot = F.array_contains("reasons", BOT_REASON)
    written = quarantine.agg(
        F.sum(is_bot.cast("long")).alias("bot"), F.sum((~is_bot).cast("long")).alias("other")
    ).collect()[0]
    _reconcile(
        ds,
        rows_in,
        written_clean,
        n_dup,
        int(written["other"] or 0),
        int(written["bot"] or 0),
        "in the written tables",
    )

    quarantine_rate = n_quarantined / rows_in if rows_in else 0.0
    metrics: dict[str, float] = {
        "quarantine_rate": quarantine_rate,
        "duplicate_rate": n_dup / rows_in if rows_in else 0.0,
        "duplicates_exact": counts["duplicate_exact"],
        "duplicates_near": counts["duplicate_near"],
        "bot_users": bot_users,
        "late_events": late,
        "blank_lines": int(line_counts["blank"] or 0),
        "catalog_items": n_items,
        **{f"quarantine_{code}": reasons.get(code, 0) for code in REASONS},
    }
    log.info(
        "clean %s: %d in -> %d clean, %d duplicate (%d exact, %d near), %d quarantined (%.2f%%), "
        "%d excluded from %d bot users",
        ds,
        rows_in,
        n_out,
        n_dup,
        counts["duplicate_exact"],
        counts["duplicate_near"],
        n_quarantined,
        100 * quarantine_rate,
        n_excluded,
        bot_users,
    )
    return StageResult(
        rows_in=rows_in,
        rows_out=n_out,
        rows_duplicate=n_dup,
        rows_quarantined=n_quarantined,
        rows_excluded=n_excluded,
        metrics=metrics,
        params={f"clean.{k}": v for k, v in vars(cfg).items()},
        summary={
            "ds": ds,
            "clean": n_out,
            "duplicates": n_dup,
            "quarantined": n_quarantined,
            "quarantine_reasons": {k: v for k, v in sorted(reasons.items())},
            "excluded_bot_events": n_excluded,
            "bot_users": bot_users,
            "late_events": late,
            "catalog_items": n_items,
        },
    )


def _outcome_counts(outcomes: DataFrame, *, ds: str) -> tuple[dict[str, int], dict[str, int]]:
    """(rows per outcome with duplicates by kind, late clean events and bot users; rows per reason)."""
    keys = (CLEAN, QUARANTINED, EXCLUDED, "duplicate_exact", "duplicate_near", "late", "bot_users")
    counts = dict.fromkeys(keys, 0)
    reasons: dict[str, int] = {}
    is_late = (F.col("outcome") == CLEAN) & (_event_date(F.col("event_ts")) < ds)
    # One pass: quarantined rows group by their combination of reason codes.
    rows = (
        outcomes.groupBy("outcome", "duplicate", "reasons")
        .agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum(is_late.cast("long")).alias("late"),
            F.countDistinct("user_id").alias("users"),
        )
        .collect()
    )
    for row in rows:
        key = f"duplicate_{row['duplicate']}" if row["outcome"] == DUPLICATE else row["outcome"]
        counts[key] += int(row["rows"])
        counts["late"] += int(row["late"] or 0)
        if row["outcome"] == EXCLUDED:
            counts["bot_users"] += int(row["users"])
        if row["outcome"] == QUARANTINED:
            for code in row["reasons"]:
                reasons[code] = reasons.get(code, 0) + int(row["rows"])
    return counts, reasons


def _reconcile(
    ds: str, rows_in: int, out: int, dup: int, quarantined: int, excluded: int, where: str
) -> None:
    if rows_in != out + dup + quarantined + excluded:
        raise ReconciliationError(
            f"clean {ds}: {rows_in} rows in != {out} clean + {dup} duplicate + {quarantined} "
            f"quarantined + {excluded} excluded ({where}); this is a bug in the clean stage"
        )


def _quarantine_gate(cfg: CleanConfig, rows_in: int, quarantined: int) -> None:
    rate = quarantined / rows_in if rows_in else 0.0
    if rate > cfg.max_quarantine_rate:
        raise GateError(
            f"gate clean.max_quarantine_rate: quarantined {100 * rate:.1f}% of {rows_in} input rows "
            f"> {100 * cfg.max_quarantine_rate:.1f}%"
        )


def _volume_gate(ctx: RunContext, cfg: CleanConfig, records: int) -> None:
    """Today's distinct records vs the previous landing date's (clean + quarantine rows)."""
    previous = _shift(ctx.ds, -1)
    before = ctx.store.read("events_clean", where={"ingest_ds": previous}).count()
    before += ctx.store.read("events_quarantine", where={"ds": previous}).count()
    if before == 0:
        return
    change = max(records / before, before / records) if records else float("inf")
    if change > cfg.max_volume_change:
        raise GateError(
            f"gate clean.max_volume_change: {records} records on {ctx.ds} vs {before} on {previous} "
            f"(x{change:.1f}) > x{cfg.max_volume_change:.1f}"
        )


def _shift(ds: str, days: int) -> str:
    return (dt.date.fromisoformat(ds) + dt.timedelta(days=days)).isoformat()
