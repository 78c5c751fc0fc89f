"""Property tests of the clean stage.

`dedup_events`: a sequential reference model, idempotence, order and partitioning; events are
drawn from tiny pools (3 ids, 2 users, 2 items, 2 types, 40 s) so exact duplicates, retries
and chains of retries are common. JSON types at the edge: every field of a landing line drawn
as each JSON type, and each line found in exactly one table with the reasons the rules give.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import random
from collections import Counter

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pyspark.sql import functions as F

from llmrec_spark.config import CleanConfig
from llmrec_spark.stages.clean import clean_events, dedup_events, to_events_clean, to_quarantine
from tests.stages.test_clean import DS, items_df, lines_df

pytestmark = pytest.mark.spark
WINDOW_S = 10
START = dt.datetime(2026, 11, 23, 10, 0)
SCHEMA = (
    "event_id string, user_id string, item_id string, event_type string, event_ts timestamp, "
    "source_file string, line_seq long"
)
# No example database: nothing may appear at the top level of the project.
EXAMPLES = settings(max_examples=15, deadline=None, derandomize=True, database=None)

event_st = st.tuples(
    st.sampled_from(["e0", "e1", "e2"]),
    st.sampled_from(["u1", "u2"]),
    st.sampled_from(["i1", "i2"]),
    st.sampled_from(["view", "click"]),
    st.integers(min_value=0, max_value=40),
    st.sampled_from(["a.jsonl", "b.jsonl"]),
)
events_st = st.lists(event_st, min_size=1, max_size=12)


def as_rows(drawn) -> list[tuple]:
    """Drawn tuples -> rows; line_seq is the position, so every line is distinct."""
    return [
        (eid, user, item, kind, START + dt.timedelta(seconds=s), f"file:/{f}", seq)
        for seq, (eid, user, item, kind, s, f) in enumerate(drawn)
    ]


def reference(rows: list[tuple], window_s: int) -> dict[int, str | None]:
    """line_seq -> duplicate kind, by the rules written sequentially in plain Python."""
    order = sorted(rows, key=lambda r: (r[4], r[5], r[6]))
    first_of_id: dict[str, int] = {}
    for r in order:
        first_of_id.setdefault(r[0], r[6])
    kinds: dict[int, str | None] = {}
    last_kept: dict[tuple, dt.datetime] = {}
    for r in order:
        key = (r[1], r[2], r[3])
        if first_of_id[r[0]] != r[6]:
            kinds[r[6]] = "exact"
        elif key in last_kept and (r[4] - last_kept[key]).total_seconds() <= window_s:
            kinds[r[6]] = "near"
        else:
            kinds[r[6]] = None
            last_kept[key] = r[4]
    return kinds


def kinds_of(df) -> dict[int, str | None]:
    return {r["line_seq"]: r["duplicate"] for r in df.select("line_seq", "duplicate").collect()}


@EXAMPLES
@given(drawn=events_st, seed=st.integers(0, 10_000), partitions=st.integers(1, 4))
def test_dedup_matches_the_sequential_rules_whatever_the_order_and_partitioning(
    spark, drawn, seed, partitions
):
    rows = as_rows(drawn)
    expected = reference(rows, WINDOW_S)
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    df = spark.createDataFrame(shuffled, SCHEMA).repartition(partitions)
    got = dedup_events(df, window_s=WINDOW_S).collect()  # one job per example
    assert {r["line_seq"]: r["duplicate"] for r in got} == expected
    # Every input line comes out once, with its own columns.
    assert sorted(tuple(r)[:-1] for r in got) == sorted(rows)


@EXAMPLES
@given(drawn=events_st)
def test_dedup_is_idempotent(spark, drawn):
    rows = as_rows(drawn)
    kept_lines = {seq for seq, kind in reference(rows, WINDOW_S).items() if kind is None}
    df = spark.createDataFrame(rows, SCHEMA)
    kept = dedup_events(df, window_s=WINDOW_S).where(F.col("duplicate").isNull()).drop("duplicate")
    # Deduplicating the kept lines again drops nothing more.
    assert kinds_of(dedup_events(kept, window_s=WINDOW_S)) == dict.fromkeys(kept_lines)


# --------------------------------------------------------------------------- JSON types at the edge

# Which JSON types each landing field accepts, restated from the README's rules.
ACCEPTS = {
    "event_id": {"string", "integer"},
    "user_id": {"string", "integer"},
    "item_id": {"string", "integer"},
    "event_type": {"string"},
    "event_ts": {"string"},
    "value": {"integer", "float"},
    "session_id": {"string", "integer"},
    "source": {"string"},
}
MISSING = object()
# Strings each field is drawn from when it is a string; every one is valid for its field, and
# some read like JSON of another type, which must not fool the parser.
STRINGS = {
    "user_id": ["u1", "true", '{"id": "u00036"}', "[1]", "-7", "4.5", "null", 'say "hi"\\'],
    "item_id": ["i1", "false", "[1]"],
    "event_type": ["view", "rating"],
    "value": ["4.5", "abc", ""],
    "session_id": ["s1", "{}"],
    "source": ["web", "false"],
}
KNOWN_ITEMS = ["i1", "false", "[1]", "7", "36"]
HALF_STARS = CleanConfig(rating_min=0.5, rating_max=5.0, rating_step=0.5)
VALUES = {
    "string": lambda name: st.sampled_from(STRINGS.get(name, ["x"])),
    # Item ids drawn as integers are in the catalog, so only their type decides.
    "integer": lambda name: (
        st.sampled_from([7, 36])
        if name == "item_id"
        else st.integers(-2, 7)
        if name == "value"
        else st.integers(-(10**20), 10**20)
    ),
    "float": lambda name: (
        st.integers(-2, 12).map(lambda k: k / 2) | st.sampled_from([0.25, 4.75, 1e300])
        if name == "value"
        else st.sampled_from([36.0, 0.5, -1e3])
    ),
    "boolean": lambda name: st.booleans(),
    "null": lambda name: st.none(),
    "object": lambda name: st.sampled_from([{"id": "u00036"}, {}, {"a": [1, {"b": None}]}]),
    "array": lambda name: st.sampled_from([[], ["u1"], [1, "a", None]]),
    "missing": lambda name: st.just(MISSING),
}


def field_st(name: str):
    """(JSON type, value) of one field, any of the eight types."""
    return st.one_of(
        *[values(name).map(lambda v, kind=kind: (kind, v)) for kind, values in VALUES.items()]
    )


record_st = st.fixed_dictionaries({name: field_st(name) for name in ACCEPTS})


def landing_line(index: int, record: dict, compact: bool) -> str:
    """The JSON line of a drawn record; a string event_id or event_ts is made unique by index."""
    out = {}
    for name, (kind, value) in record.items():
        if name == "event_id" and kind in ("string", "integer"):
            value = f"e{index}" if kind == "string" else 1000 + index
        if name == "event_ts" and kind == "string":
            value = f"{DS}T10:{index:02d}:00Z"  # a minute apart: no retries
        if value is not MISSING:
            out[name] = value
    return json.dumps(out, separators=(",", ":") if compact else None)


def expected_place(line: str, record: dict) -> tuple:
    """("events_quarantine", line, sorted reasons) or ("events_clean", event_id, user, ...)."""
    kinds = {name: kind for name, (kind, _) in record.items()}
    fields = json.loads(line)
    absent = {name for name, kind in kinds.items() if kind in ("null", "missing")}
    wrong = [
        f"bad_type:{n}" for n, kind in kinds.items() if n not in absent and kind not in ACCEPTS[n]
    ]
    if wrong:
        return ("events_quarantine", line, tuple(sorted(wrong)))
    is_rating = fields.get("event_type") == "rating"
    value = fields.get("value")
    on_scale = value is not None and 0.5 <= value <= 5.0 and float(2 * value).is_integer()
    checks = {
        "missing_user": "user_id" in absent,
        "missing_item": "item_id" in absent,
        "unknown_event_type": "event_type" in absent,
        "bad_timestamp": "event_ts" in absent,
        "bad_rating": is_rating and not on_scale,
    }
    reasons = tuple(sorted(code for code, failed in checks.items() if failed))
    if reasons:
        return ("events_quarantine", line, reasons)
    as_text = {n: None if fields.get(n) is None else str(fields[n]) for n in ACCEPTS}
    event_id = as_text["event_id"] or "raw-" + hashlib.sha256(line.encode()).hexdigest()[:32]
    return (
        "events_clean",
        event_id,
        as_text["user_id"],
        as_text["item_id"],
        fields["event_type"],
        float(value) if is_rating else None,
        as_text["session_id"],
    )


# One value of each type; the explicit example below gives every field every type.
ONE_OF_EACH = {
    "integer": 36,
    "float": 4.5,
    "boolean": True,
    "null": None,
    "object": {"id": "u00036"},
    "array": ["u1"],
    "missing": MISSING,
}
EVERY_TYPE = [
    {name: ("string", STRINGS.get(name, ["x"])[0]) for name in ACCEPTS},
    *[{name: (kind, value) for name in ACCEPTS} for kind, value in ONE_OF_EACH.items()],
]


# One batch of records, so one Spark job, per example.
@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(records=st.lists(record_st, min_size=1, max_size=40), compact=st.booleans())
@example(records=EVERY_TYPE, compact=False)
def test_every_record_lands_in_exactly_one_place_whatever_its_json_types(spark, records, compact):
    lines = [landing_line(i, record, compact) for i, record in enumerate(records)]
    outcomes = clean_events(
        lines_df(spark, lines),
        ds=DS,
        known_items=items_df(spark, KNOWN_ITEMS),
        prior=None,
        cfg=HALF_STARS,
    )
    published = to_events_clean(outcomes, ingest_ds=DS).select(
        F.lit("events_clean").alias("table"),
        "event_id",
        "user_id",
        "item_id",
        "event_type",
        "value",
        "session_id",
    )
    quarantined = to_quarantine(outcomes, ds=DS).select(
        F.lit("events_quarantine").alias("table"), "raw", F.array_sort("reasons").alias("reasons")
    )
    rows = published.unionByName(quarantined, allowMissingColumns=True).collect()  # one job
    got = Counter(
        (r["table"], r["raw"], tuple(r["reasons"]))
        if r["table"] == "events_quarantine"
        else (
            r["table"],
            r["event_id"],
            r["user_id"],
            r["item_id"],
            r["event_type"],
            r["value"],
            r["session_id"],
        )
        for r in rows
    )
    assert got == Counter(
        expected_place(line, rec) for line, rec in zip(lines, records, strict=True)
    )
