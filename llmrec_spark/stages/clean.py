"""The `clean` stage: one landing date of raw behaviour logs -> `events_clean` + `events_quarantine`.

Every input line ends in exactly one place: clean, duplicate (exact event_id repeat or a
client retry), quarantined (with reason codes) or excluded (bot traffic, kept in quarantine
with reason "bot"). The counts must reconcile, or the stage fails.
"""

from __future__ import annotations

import datetime as dt
import logging
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from functools import reduce

from pyspark import StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import StringType, StructField, StructType
from pyspark.sql.utils import AnalysisException

from llmrec_spark.config import EVENT_TYPES, CleanConfig, check_clean
from llmrec_spark.errors import GateError, InputError
from llmrec_spark.io.sources import read_event_lines
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.schema import CATALOG, EVENTS_CLEAN, EVENTS_QUARANTINE, RAW_EVENT

log = logging.getLogger(__name__)

# Reason codes in events_quarantine.reasons; a record can carry several. `bad_type` is
# written per field, as "bad_type:<field>" (e.g. "bad_type:user_id").
REASONS = (
    "malformed",
    "bad_type",
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
BAD_TYPE = "bad_type"
BOT_REASON = "bot"

# Outcome of every input line (column `outcome`).
CLEAN, DUPLICATE, QUARANTINED, EXCLUDED = "clean", "duplicate", "quarantined", "excluded"

# Same user, item and event type: the key of a near-duplicate (client retry).
RETRY_KEY = ("user_id", "item_id", "event_type")
RAW_FIELDS = tuple(f.name for f in RAW_EVENT.fields)
STRING_FIELDS = tuple(f.name for f in RAW_EVENT.fields if isinstance(f.dataType, StringType))
# The JSON types each landing field may have; null or absent is always allowed (the checks
# decide). Ids take an integer too, as its decimal text; a float id, a numeric string as
# `value`, a boolean, object or array anywhere is `bad_type:<field>`, never converted.
STRING, INTEGER, FLOAT = "string", "integer", "float"
ALLOWED_JSON_TYPES = {
    "event_id": (STRING, INTEGER),
    "user_id": (STRING, INTEGER),
    "item_id": (STRING, INTEGER),
    "event_type": (STRING,),
    "event_ts": (STRING,),
    "value": (INTEGER, FLOAT),
    "session_id": (STRING, INTEGER),
    "source": (STRING,),
}
_CORRUPT = "_corrupt_record"
_JSON_OPTIONS = {
    "mode": "PERMISSIVE",
    "columnNameOfCorruptRecord": _CORRUPT,
    # Standard JSON only: a single-quoted string would go unmarked, and NaN is no JSON number.
    "allowSingleQuotes": "false",
    "allowNonNumericNumbers": "false",
}
# Every JSON string token of a line gets this first character (as the escape \u0001), so a
# field parsed as text shows whether it was a string: Spark's parser writes any other value
# as its JSON text, which starts with {, [, t, f, a digit, - or " (for a number too large).
_STRING_MARK = "\u0001"
# One JSON string token; possessive quantifiers keep a long string from deep backtracking.
_STRING_TOKEN = r'"([^"\\]*+(?:\\[\s\S][^"\\]*+)*+)"'
DAY_S = 86_400


class ReconciliationError(RuntimeError):
    """rows_in != rows_out + duplicates + quarantined + excluded: a bug, never a data problem."""


# --------------------------------------------------------------------------- pure steps


def parse_raw(lines: DataFrame) -> DataFrame:
    """Lines (raw, source_file, line_seq) -> the same plus every RAW_EVENT field, `malformed`
    and `bad_types` (a "bad_type:<field>" code per field whose JSON type is not allowed).

    Invalid UTF-8 is replaced by U+FFFD so the raw text stays storable; such lines and lines
    that are not one standard JSON object are malformed. A field of a type it may not have is
    null (see ALLOWED_JSON_TYPES), never turned into text.
    """
    plain_schema = StructType([*RAW_EVENT.fields, StructField(_CORRUPT, StringType())])
    decoded = F.decode(F.col("raw").cast("binary"), "UTF-8")
    parsed = (
        lines.withColumn("_invalid_utf8", F.col("raw") != decoded)
        .withColumn("raw", decoded)
        .withColumn("_plain", F.from_json("raw", plain_schema, _JSON_OPTIONS))
    )
    # Spark reads any JSON value into a text field (an object as its JSON text), so a line
    # with a text that may be another type's JSON, or whose `value` is not a number, is parsed
    # again with its strings marked, to learn each field's JSON type. Real ids, names and
    # timestamps are seldom in doubt: nearly every line is parsed once.
    plain = F.col("_plain")
    doubts = [
        _may_be_another_type(plain.getField(name), ids=INTEGER in ALLOWED_JSON_TYPES[name])
        for name in STRING_FIELDS
    ]
    # A column of its own, so Spark generates code for the checks apart from the parser's.
    parsed = parsed.withColumn(
        "_in_doubt", reduce(operator.or_, doubts, plain.getField(_CORRUPT).isNotNull())
    ).withColumn("_typed", F.when(F.col("_in_doubt"), _parse_marked(F.col("raw"))))
    in_doubt, typed = F.col("_in_doubt"), F.col("_typed")
    malformed = (
        F.col("_invalid_utf8")
        | plain.isNull()
        | typed.getField(_CORRUPT).isNotNull()
        | ~F.ltrim("raw").startswith("{")
    )
    no_codes = F.array().cast("array<string>")
    fields, bad_types = [], []
    for field in RAW_EVENT.fields:
        value, wrong_type = _typed_value(typed.getField(_STRING_MARK + field.name), field)
        fields.append(F.when(in_doubt, value).otherwise(plain.getField(field.name)))
        code = F.array(F.lit(f"{BAD_TYPE}:{field.name}"))
        bad_types.append(F.when(wrong_type, code).otherwise(no_codes))
    return parsed.select(
        *lines.columns,
        *[value.alias(field.name) for value, field in zip(fields, RAW_EVENT.fields, strict=True)],
        malformed.alias("malformed"),
        F.when(in_doubt, F.flatten(F.array(*bad_types))).otherwise(no_codes).alias("bad_types"),
    )


def _may_be_another_type(text: Column, *, ids: bool) -> Column:
    """Whether a text field Spark read may have been a number, boolean, object or array.

    Spark writes those as their JSON text; an integer-looking id is not in doubt (an integer
    id becomes that text anyway). False for null.
    """
    first = F.substring(text, 1, 1)
    number = first.isin(*"-0123456789") & text.rlike(r"^-?[0-9][0-9.eE+-]*$")
    if ids:
        number = number & ~text.rlike("^-?[0-9]+$")
    doubtful = first.isin("{", "[", '"') | text.isin("true", "false") | number
    return F.coalesce(doubtful, F.lit(False))


def _typed_value(text: Column, field: StructField) -> tuple[Column, Column]:
    """(the field's value, whether its JSON type is not allowed) from its text in a marked
    line; both null when the field is null or absent."""
    # Spark writes a number as its digits, with "." for a float, or "Infinity" in quotes.
    number = F.substring(text, 1, 1).isin(*'-0123456789"')
    integer = text.rlike("^-?[0-9]+$")
    is_type = {STRING: text.startswith(_STRING_MARK), INTEGER: integer, FLOAT: number & ~integer}
    content = {
        STRING: text.substr(F.lit(2), F.length(text)),
        INTEGER: text,
        FLOAT: F.btrim(text, F.lit('"')),
    }
    first, *others = ALLOWED_JSON_TYPES[field.name]
    value = F.when(is_type[first], content[first])
    for kind in others:
        value = value.when(is_type[kind], content[kind])
    allowed = reduce(operator.or_, [is_type[kind] for kind in ALLOWED_JSON_TYPES[field.name]])
    return value.cast(field.dataType), ~allowed


def _parse_marked(raw: Column) -> Column:
    """Every field of a JSON line as text, a string's text starting with _STRING_MARK."""
    schema = StructType(
        [
            *[StructField(_STRING_MARK + name, StringType()) for name in RAW_FIELDS],
            StructField(_CORRUPT, StringType()),
        ]
    )
    # "abc" -> "\u0001abc": the replacement writes the mark as a JSON escape.
    marked = F.regexp_replace(raw, _STRING_TOKEN, '"\\\\u0001$1"')
    return F.from_json(marked, schema, _JSON_OPTIONS)


def validate_events(
    events: DataFrame,
    *,
    ds: str,
    known_items: DataFrame,
    max_field_chars: int,
    max_future_skew_s: int,
    max_late_days: int,
    rating_min: float = CleanConfig.rating_min,
    rating_max: float = CleanConfig.rating_max,
    rating_step: float = CleanConfig.rating_step,
) -> DataFrame:
    """Add `reasons` (array of REASONS codes, empty when valid) and normalise the fields.

    A malformed line gets only "malformed", a line with fields of a wrong JSON type only their
    "bad_type:<field>" codes; the other checks apply to the rest. A rating is valid from
    rating_min to rating_max in steps of rating_step from rating_min (0: any value between).
    `event_ts` becomes a timestamp, ids are trimmed, `event_type` lower-cased, `value` kept for
    ratings only; a missing event_id becomes a hash of the raw line, so its repeats still dedup.
    """
    day_start = utc_day_start_s(ds)
    latest_s = day_start + DAY_S + max_future_skew_s
    earliest_s = day_start - max_late_days * DAY_S
    known = known_items.select(F.col("item_id").alias("_known_item")).distinct()
    longest = F.greatest(*[F.length(name) for name in STRING_FIELDS])
    df = (
        events.withColumn("_oversized", F.coalesce(longest > max_field_chars, F.lit(False)))
        .withColumn("user_id", blank_to_null(F.trim("user_id")))
        .withColumn("item_id", blank_to_null(F.trim("item_id")))
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
            & ~on_rating_scale(F.col("value"), low=rating_min, high=rating_max, step=rating_step),
        ),
    ]
    reasons = (
        F.when(F.col("malformed"), F.array(F.lit("malformed")))
        .when(F.size("bad_types") > 0, F.col("bad_types"))
        .otherwise(F.array_compact(F.array(*[F.when(cond, F.lit(code)) for code, cond in checks])))
    )
    event_id = F.coalesce(
        blank_to_null(F.trim("event_id")),
        F.concat(F.lit("raw-"), F.sha2("raw", 256).substr(1, 32)),
    )
    return (
        df.withColumn("reasons", reasons.cast("array<string>"))
        .withColumn("event_id", event_id)
        .withColumn("event_ts", F.col("_ts"))
        .withColumn("value", F.when(F.col("event_type") == "rating", F.col("value")))
        .drop("_oversized", "_ts", "_ts_s", "_known_item", "malformed", "bad_types")
    )


def on_rating_scale(value: Column, *, low: float, high: float, step: float) -> Column:
    """True when `value` is within [low, high] and, if step > 0, a whole number of steps above low."""
    in_range = value.between(low, high)
    if step > 0:
        steps = (value - F.lit(low)) / F.lit(step)
        # Tolerance for decimal steps (0.1) that binary floating point cannot hold exactly.
        in_range = in_range & (F.abs(steps - F.round(steps)) <= 1e-6)
    return F.coalesce(in_range, F.lit(False))


def dedup_events(
    events: DataFrame,
    *,
    window_s: int,
    prior: DataFrame | None = None,
    eligible: Column | None = None,
) -> DataFrame:
    """Add `duplicate`: null for the kept event, "exact" or "near" for a duplicate.

    Exact: same event_id as an earlier line (by event_ts, then source_file and line_seq) or as
    an event in `prior` (already clean). Near: same user, item and event type at most
    `window_s` seconds after the previous kept event (prior ones included), or at most
    `window_s` seconds before a prior event. Rows not matching `eligible` (e.g. quarantined
    ones) pass through untouched with duplicate null, so one dataflow carries every line.
    Two shuffles, by event_id then by user_id (which `flag_bots` reuses); rows stay rows
    (windows, no collect_list of whole rows).
    """
    window_us = window_s * 1_000_000
    columns = events.columns
    # A line that takes no part gets a key of its own, so it never meets another line.
    solo = (
        F.lit(None) if eligible is None else F.when(~eligible, F.struct("source_file", "line_seq"))
    )
    timeline = events.withColumn("_is_prior", F.lit(False)).withColumn("_solo", solo)
    if prior is not None:
        anchors = prior.select("event_id", *RETRY_KEY, "event_ts").withColumn(
            "_is_prior", F.lit(True)
        )
        timeline = timeline.unionByName(anchors, allowMissingColumns=True)
    # Prior rows sort first, so a new line repeating an already clean event_id is never first.
    first = Window.partitionBy("event_id", "_solo").orderBy(
        F.col("_is_prior").desc(), "event_ts", "source_file", "line_seq"
    )
    # One retry key's timeline: by time, new lines before clean ones, then file and line.
    by_key = Window.partitionBy(*RETRY_KEY, "_solo").orderBy(
        "_us", "_is_prior", "source_file", "line_seq"
    )
    so_far = by_key.rowsBetween(Window.unboundedPreceding, Window.currentRow)
    whole = by_key.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    entry = F.struct(
        F.col("_us").alias("us"),
        F.col("_is_prior").alias("is_prior"),
        F.col("_exact").alias("exact"),
    )
    kind = _duplicate_kind(F.col("_seq"), F.col("_prior_us"), window_us)
    return (
        timeline.withColumn("_us", F.unix_micros("event_ts"))
        .withColumn("_exact", ~F.col("_is_prior") & (F.row_number().over(first) > 1))
        # Hash by user only: it clusters every retry key and every user's days for flag_bots.
        .repartition("user_id")
        .withColumn("_seq", F.collect_list(entry).over(so_far))
        .withColumn(
            "_prior_us", F.collect_list(F.when(F.col("_is_prior"), F.col("_us"))).over(whole)
        )
        .where(~F.col("_is_prior"))
        .select(*columns, F.when(F.col("_solo").isNull(), kind).alias("duplicate"))
    )


def _duplicate_kind(seq: Column, prior_us: Column, window_us: int) -> Column:
    """The last entry's kind in its retry key's time-sorted timeline `seq` (up to and including it).

    null (kept), "exact" or "near". The near rule is sequential (t=0, 6, 12 with a 10 s window
    keeps 0 and 12), so it folds over the timeline with `aggregate`; clean (prior) events take
    part as kept anchors. A key's first line (nearly every line) skips the fold.
    """

    def before_prior(x: Column) -> Column:
        near = F.exists(prior_us, lambda p: (p - x["us"] >= 0) & (p - x["us"] <= window_us))
        return (F.size(prior_us) > 0) & near

    def kind(x: Column, last_kept_us: Column) -> Column:
        near = before_prior(x) | (last_kept_us.isNotNull() & (x["us"] - last_kept_us <= window_us))
        return (
            F.when(x["is_prior"], F.lit(None))
            .when(x["exact"], F.lit("exact"))
            .when(near, F.lit("near"))
            .cast("string")
        )

    init = F.struct(
        F.lit(None).cast("long").alias("last"), F.lit(None).cast("string").alias("kind")
    )

    def step(acc: Column, x: Column) -> Column:
        this = kind(x, acc["last"])
        kept = x["is_prior"] | this.isNull()
        return F.struct(
            F.when(kept, x["us"]).otherwise(acc["last"]).alias("last"), this.alias("kind")
        )

    only = F.element_at(seq, 1)
    return F.when(F.size(seq) == 1, kind(only, F.lit(None).cast("long"))).otherwise(
        F.aggregate(seq, init, step, lambda acc: acc["kind"])
    )


def flag_bots(
    events: DataFrame,
    *,
    max_events_per_day: int,
    max_distinct_items_per_day: int,
    counted: Column | None = None,
) -> DataFrame:
    """Add `bot`: true for every event of a user above either limit on any event date.

    Only rows matching `counted` (all when None) count toward the limits; every row is flagged.
    Windows over user_id, so input already hashed by user (`dedup_events`) is not reshuffled.
    """
    counts = F.lit(True) if counted is None else counted
    day = Window.partitionBy("user_id", "_day")
    over_limit = (F.count(F.when(counts, F.lit(1))).over(day) > max_events_per_day) | (
        F.size(F.collect_set(F.when(counts, F.col("item_id"))).over(day))
        > max_distinct_items_per_day
    )
    return (
        events.withColumn("_day", _event_date(F.col("event_ts")))
        .withColumn("_over", over_limit)
        .withColumn("bot", F.max("_over").over(Window.partitionBy("user_id")))
        .drop("_day", "_over")
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
        rating_min=cfg.rating_min,
        rating_max=cfg.rating_max,
        rating_step=cfg.rating_step,
    )
    is_valid = F.size("reasons") == 0
    is_kept = is_valid & F.col("duplicate").isNull()
    # One dataflow: quarantined lines ride along untouched, so the input is parsed once.
    flagged = (
        validated.transform(
            dedup_events, window_s=cfg.near_duplicate_window_s, prior=prior, eligible=is_valid
        )
        .transform(
            flag_bots,
            max_events_per_day=cfg.bot_max_events_per_day,
            max_distinct_items_per_day=cfg.bot_max_distinct_items_per_day,
            counted=is_kept,
        )
        .transform(
            add_weights,
            event_weights=cfg.event_weights,
            rating_weight_scale=cfg.rating_weight_scale,
        )
    )
    is_bot = is_kept & F.col("bot")
    outcome = (
        F.when(~is_valid, F.lit(QUARANTINED))
        .when(~is_kept, F.lit(DUPLICATE))
        .when(is_bot, F.lit(EXCLUDED))
        .otherwise(F.lit(CLEAN))
    )
    return (
        flagged.withColumn("outcome", outcome)
        .withColumn("weight", F.when(is_kept, F.col("weight")))
        .withColumn(
            "reasons", F.when(is_bot, F.array(F.lit(BOT_REASON))).otherwise(F.col("reasons"))
        )
        .drop("bot")
    )


def to_events_clean(outcomes: DataFrame, *, ingest_ds: str) -> DataFrame:
    """Clean rows in the events_clean layout: ds = UTC event date, ingest_ds = landing date."""
    return (
        outcomes.where(F.col("outcome") == CLEAN)
        .withColumn("ds", _event_date(F.col("event_ts")))
        .withColumn("ingest_ds", F.lit(ingest_ds))
        .select(*EVENTS_CLEAN.fieldNames())
    )


def to_quarantine(outcomes: DataFrame, *, ds: str) -> DataFrame:
    """Quarantined and excluded rows in the events_quarantine layout (ds = landing date)."""
    return (
        outcomes.where(F.col("outcome").isin(QUARANTINED, EXCLUDED))
        .withColumn("ds", F.lit(ds))
        .select(*EVENTS_QUARANTINE.fieldNames())
    )


def normalize_catalog(catalog: DataFrame) -> DataFrame:
    """Catalog rows with a trimmed, non-empty item_id; one row per item (latest added_ds wins)."""
    latest = Window.partitionBy("item_id").orderBy(
        F.col("added_ds").desc_nulls_last(), F.col("title").asc_nulls_last()
    )
    return (
        catalog.withColumn("item_id", blank_to_null(F.trim("item_id")))
        .where(F.col("item_id").isNotNull())
        .withColumn("_n", F.row_number().over(latest))
        .where(F.col("_n") == 1)
        .drop("_n")
    )


def blank_to_null(col: Column) -> Column:
    """An empty string becomes null (use after trimming ids)."""
    return F.when(col != "", col)


def _event_date(ts: Column) -> Column:
    """UTC calendar date of a timestamp as YYYY-MM-DD, whatever the session time zone."""
    days = F.floor(F.unix_seconds(ts) / DAY_S).cast("int")
    return F.date_format(F.date_from_unix_date(days), "yyyy-MM-dd")


def utc_day_start_s(ds: str) -> int:
    """Unix seconds of 00:00 UTC on date `ds` (YYYY-MM-DD)."""
    day = dt.date.fromisoformat(ds)
    return int(dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp())


# --------------------------------------------------------------------------- I/O and the stage


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


@dataclass(frozen=True)
class OutcomeCounts:
    """Rows of one landing date per outcome, as `_outcome_counts` finds them."""

    clean: int
    duplicates_exact: int
    duplicates_near: int
    quarantined: int
    excluded: int
    # Clean events dated before the landing date.
    late: int
    bot_users: int
    # Quarantined rows per reason code ("bad_type:user_id" also counts under "bad_type").
    reasons: dict[str, int]

    @property
    def duplicates(self) -> int:
        return self.duplicates_exact + self.duplicates_near


def run_clean(ctx: RunContext) -> StageResult:
    """Clean the landing date ctx.ds into events_clean (ingest_ds = ds) and events_quarantine.

    The quarantine partition is written before the gates, so a failed gate can be inspected;
    events_clean is only replaced when the gates pass.
    """
    cfg, ds = ctx.cfg.clean, ctx.ds
    check_clean(cfg)  # a Config built in code skips load_config's checks
    _check_run_date(ds)
    all_lines = read_event_lines(
        ctx.spark, cfg.source_format, events_root=ctx.landing("events"), ds=ds
    )
    # Both inputs are opened (InputError when one is missing) before either is counted.
    raw_catalog = read_catalog(ctx.spark, ctx.landing("catalog"))
    rows_in, blank_lines = _count_lines(all_lines, landing=ctx.landing("events", f"ds={ds}"))
    lines = all_lines.where(~_is_blank(F.col("raw")))
    catalog, n_items = _cached_catalog(raw_catalog, path=ctx.landing("catalog"))
    try:
        prior, lookback = _recent_clean_events(ctx, days=cfg.lookback_days)
        log.info(
            "clean %s: %d input lines, %d catalog items, dedup against ingest dates %s",
            ds,
            rows_in,
            n_items,
            ", ".join(lookback) or "none",
        )
        outcomes = clean_events(lines, ds=ds, known_items=catalog, prior=prior, cfg=cfg)
        counts = _write_outcomes(ctx, outcomes, catalog, rows_in=rows_in)
    finally:
        catalog.unpersist()
    _reconcile_written(ctx, rows_in=rows_in, duplicates=counts.duplicates)
    _log_outcomes(ds, rows_in, counts)
    return _clean_result(cfg, ds, counts, rows_in=rows_in, blank_lines=blank_lines, n_items=n_items)


def _check_run_date(ds: str) -> None:
    try:
        dt.date.fromisoformat(ds)
    except ValueError:
        raise InputError(f"run date {ds!r} is not a date in YYYY-MM-DD form") from None


def _is_blank(raw: Column) -> Column:
    # Blank lines are not records (as in Spark's own JSON reader); they are counted, not kept.
    return F.trim(raw) == ""


def _count_lines(lines: DataFrame, *, landing: str) -> tuple[int, int]:
    """(records, blank lines) among the landing lines; InputError when there is no record."""
    counts = lines.agg(
        F.count(F.lit(1)).alias("lines"),
        F.sum(_is_blank(F.col("raw")).cast("long")).alias("blank"),
    ).collect()[0]
    blank = int(counts["blank"] or 0)
    records = int(counts["lines"]) - blank
    if records == 0:
        raise InputError(
            f"no event lines under {landing}; check the upstream export or storage.landing"
        )
    return records, blank


def _cached_catalog(raw_catalog: DataFrame, *, path: str) -> tuple[DataFrame, int]:
    """(the normalised catalog, cached; its item count); InputError when it has no item."""
    catalog = normalize_catalog(raw_catalog).cache()
    n_items = catalog.count()
    if n_items == 0:
        catalog.unpersist()
        raise InputError(f"the item catalog at {path} has no item with an item_id")
    return catalog, n_items


def _recent_clean_events(ctx: RunContext, *, days: int) -> tuple[DataFrame | None, list[str]]:
    """(events_clean of the `days` landing dates before ctx.ds, or None when days is 0; those dates)."""
    lookback = [_shift(ctx.ds, -d) for d in range(1, days + 1)]
    if not lookback:
        return None, lookback
    return ctx.store.read("events_clean", where={"ingest_ds": lookback}), lookback


def _write_outcomes(
    ctx: RunContext, outcomes: DataFrame, catalog: DataFrame, *, rows_in: int
) -> OutcomeCounts:
    """Count and reconcile the outcomes, write the quarantine partition, pass the gates, then
    write events_clean and the catalog snapshot."""
    cfg, ds = ctx.cfg.clean, ctx.ds
    outcomes = outcomes.persist(StorageLevel.MEMORY_AND_DISK)
    try:
        counts = _outcome_counts(outcomes, ds=ds)
        _reconcile(
            ds,
            rows_in,
            counts.clean,
            counts.duplicates,
            counts.quarantined,
            counts.excluded,
            "before writing",
        )
        ctx.store.overwrite(
            "events_quarantine", to_quarantine(outcomes, ds=ds), partitions={"ds": ds}
        )
        _quarantine_gate(cfg, rows_in, counts.quarantined)
        _volume_gate(ctx, cfg, counts.clean + counts.quarantined + counts.excluded)
        ctx.store.overwrite(
            "events_clean", to_events_clean(outcomes, ingest_ds=ds), partitions={"ingest_ds": ds}
        )
        # The catalog snapshot changes only once the gates have passed.
        ctx.store.overwrite("items", catalog)
    finally:
        outcomes.unpersist()
    return counts


def _reconcile_written(ctx: RunContext, *, rows_in: int, duplicates: int) -> None:
    """Reconcile again against what events_clean and events_quarantine now hold for ctx.ds."""
    ds = ctx.ds
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
        duplicates,
        int(written["other"] or 0),
        int(written["bot"] or 0),
        "in the written tables",
    )


def _log_outcomes(ds: str, rows_in: int, counts: OutcomeCounts) -> None:
    log.info(
        "clean %s: %d in -> %d clean, %d duplicate (%d exact, %d near), %d quarantined (%.2f%%), "
        "%d excluded from %d bot users",
        ds,
        rows_in,
        counts.clean,
        counts.duplicates,
        counts.duplicates_exact,
        counts.duplicates_near,
        counts.quarantined,
        100 * _rate(counts.quarantined, rows_in),
        counts.excluded,
        counts.bot_users,
    )


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _clean_result(
    cfg: CleanConfig,
    ds: str,
    counts: OutcomeCounts,
    *,
    rows_in: int,
    blank_lines: int,
    n_items: int,
) -> StageResult:
    """The stage's row counts, metrics (rates, counts per reason code) and nightly summary."""
    metrics: dict[str, float] = {
        "quarantine_rate": _rate(counts.quarantined, rows_in),
        "duplicate_rate": _rate(counts.duplicates, rows_in),
        "duplicates_exact": counts.duplicates_exact,
        "duplicates_near": counts.duplicates_near,
        "bot_users": counts.bot_users,
        "late_events": counts.late,
        "blank_lines": blank_lines,
        "catalog_items": n_items,
        **{f"quarantine_{code}": counts.reasons.get(code, 0) for code in REASONS},
    }
    return StageResult(
        rows_in=rows_in,
        rows_out=counts.clean,
        rows_duplicate=counts.duplicates,
        rows_quarantined=counts.quarantined,
        rows_excluded=counts.excluded,
        metrics=metrics,
        params={f"clean.{k}": v for k, v in vars(cfg).items()},
        summary={
            "ds": ds,
            "clean": counts.clean,
            "duplicates": counts.duplicates,
            "quarantined": counts.quarantined,
            "quarantine_reasons": dict(sorted(counts.reasons.items())),
            "excluded_bot_events": counts.excluded,
            "bot_users": counts.bot_users,
            "late_events": counts.late,
            "catalog_items": n_items,
        },
    )


def _outcome_counts(outcomes: DataFrame, *, ds: str) -> OutcomeCounts:
    """Rows per outcome (duplicates by kind), late clean events, bot users and rows per reason code."""
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
            # "bad_type:user_id" counts under its own code and once under "bad_type".
            families = {code.partition(":")[0] for code in row["reasons"]}
            for code in families | set(row["reasons"]):
                reasons[code] = reasons.get(code, 0) + int(row["rows"])
    return OutcomeCounts(
        clean=counts[CLEAN],
        duplicates_exact=counts["duplicate_exact"],
        duplicates_near=counts["duplicate_near"],
        quarantined=counts[QUARANTINED],
        excluded=counts[EXCLUDED],
        late=counts["late"],
        bot_users=counts["bot_users"],
        reasons=reasons,
    )


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
