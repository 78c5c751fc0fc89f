"""Property tests of `dedup_events`: a sequential reference model, idempotence, order and partitioning.

Events are drawn from tiny pools (3 ids, 2 users, 2 items, 2 types, 40 s) so exact
duplicates, retries and chains of retries are common.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyspark.sql import functions as F

from llmrec_spark.clean import dedup_events

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
