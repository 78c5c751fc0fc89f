"""The clean stage: reason codes, dedup, bots, weights, gates, idempotency and demo reconciliation."""

from __future__ import annotations

import datetime as dt
import json
import os
import random
from pathlib import Path

import pytest
from pyspark.sql import Row
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from llmrec_spark.config import CleanConfig
from llmrec_spark.errors import ConfigError, GateError, InputError
from llmrec_spark.io.demo import generate_demo
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.schema import EVENTS_CLEAN, EVENTS_QUARANTINE
from llmrec_spark.stages import clean
from llmrec_spark.stages.clean import (
    ReconciliationError,
    add_weights,
    clean_events,
    dedup_events,
    flag_bots,
    parse_raw,
    run_clean,
    validate_events,
)
from tests.io.test_demo import TINY

DS = "2026-11-23"
ABSENT = object()
pytestmark = pytest.mark.spark


def event(event_id: str, **fields) -> str:
    """One landing line; a field set to ABSENT is left out."""
    base = {
        "event_id": event_id,
        "user_id": "u1",
        "item_id": "i1",
        "event_type": "view",
        "event_ts": f"{DS}T10:00:00Z",
        "value": None,
        "session_id": "s1",
        "source": "web",
    }
    base.update(fields)
    return json.dumps({k: v for k, v in base.items() if v is not ABSENT})


def lines_df(spark, raws: list[str], source_file: str = "file:/landing/part-0.jsonl"):
    rows = [(raw, source_file, i) for i, raw in enumerate(raws)]
    return spark.createDataFrame(rows, "raw string, source_file string, line_seq long")


def items_df(spark, ids=("i1", "i2", "i3")):
    return spark.createDataFrame([(i,) for i in ids], "item_id string")


# --------------------------------------------------------------------------- validation


REASON_CASES = {
    event("ok"): [],
    event("ok-view-upper", event_type=" VIEW "): [],
    event("ok-future-edge", event_ts="2026-11-24T00:59:59Z"): [],
    event("ok-late-edge", event_ts="2026-10-24T00:00:00Z"): [],
    event("ok-256", session_id="x" * 256): [],
    event("ok-rating", event_type="rating", value=5): [],
    '{"event_id": "trunc", "user_id": "u1", "item': ["malformed"],
    "ERROR 502 upstream timed out": ["malformed"],
    '[{"event_id": "array"}]': ["malformed"],
    "null": ["malformed"],
    "{'event_id': 'single-quotes', 'user_id': 'u1'}": ["malformed"],
    '{"event_id": "nan", "value": NaN}': ["malformed"],
    event("wrong-type", value="abc"): ["bad_type:value"],
    event("numeric-text-value", event_type="rating", value="4"): ["bad_type:value"],
    event("object-id", user_id={"id": "u00036"}): ["bad_type:user_id"],
    event("array-item", item_id=["i1"]): ["bad_type:item_id"],
    event("float-id", session_id=36.0): ["bad_type:session_id"],
    event("bool-type", event_type=True): ["bad_type:event_type"],
    event("epoch-ts", event_ts=1795428000): ["bad_type:event_ts"],
    event("number-source", source=7): ["bad_type:source"],
    # Only the type errors, though the item is unknown and the rating missing too.
    event(True, item_id="i999", event_type="rating", value={"stars": 4}): [
        "bad_type:event_id",
        "bad_type:value",
    ],
    # 100,000 escaped quotes in one string: typing the line must not exhaust the stack.
    event("escapes", session_id='"' * 100_000, value=True): ["bad_type:value"],
    event("ok-int-ids", user_id=36, item_id="i2", session_id=-7): [],
    event("ok-json-looking-strings", user_id='{"id": "u00036"}', session_id="true"): [],
    event("ok-rating-int", event_type="rating", value=4): [],
    event("ok-rating-float", event_type="rating", value=4.75): [],
    event("no-user", user_id=ABSENT): ["missing_user"],
    event("blank-user", user_id="  "): ["missing_user"],
    event("null-item", item_id=None): ["missing_item"],
    event("wishlist", event_type="wishlist"): ["unknown_event_type"],
    event("no-type", event_type=ABSENT): ["unknown_event_type"],
    event("bad-ts", event_ts="2026-13-45T99:61:00Z"): ["bad_timestamp"],
    event("no-ts", event_ts=ABSENT): ["bad_timestamp"],
    event("future", event_ts="2026-11-24T01:00:01Z"): ["future_timestamp"],
    event("too-late", event_ts="2026-10-23T23:59:59Z"): ["too_late"],
    event("unknown-item", item_id="i999"): ["unknown_item"],
    event("oversized", session_id="x" * 257): ["oversized_field"],
    event("rating-null", event_type="rating"): ["bad_rating"],
    event("rating-6", event_type="rating", value=6): ["bad_rating"],
    event("rating-half", event_type="rating", value=0.5): ["bad_rating"],
    event("two", user_id=None, event_type="share"): ["missing_user", "unknown_event_type"],
    event("three", item_id="i999", event_ts="2026-12-30T00:00:00Z", source="y" * 300): [
        "future_timestamp",
        "unknown_item",
        "oversized_field",
    ],
}


def _validate(spark, raws, **overrides):
    params = dict(
        ds=DS,
        known_items=items_df(spark),
        max_field_chars=256,
        max_future_skew_s=3600,
        max_late_days=30,
    )
    params.update(overrides)
    return lines_df(spark, raws).transform(parse_raw).transform(validate_events, **params)


def test_every_reason_code_on_hand_written_lines(spark):
    got = {r["raw"]: r["reasons"] for r in _validate(spark, list(REASON_CASES)).collect()}
    assert got == REASON_CASES
    families = {code.partition(":")[0] for codes in REASON_CASES.values() for code in codes}
    assert families == set(clean.REASONS)


def test_fields_of_an_allowed_json_type_keep_their_text(spark):
    raws = [
        event("e1", user_id=36, item_id="i2", session_id=12345678901234567890123),
        event(1007, user_id='{"id": "u00036"}', session_id="[1]"),
        event("e3", event_type="rating", value=4),
    ]
    got = [
        (r["event_id"], r["user_id"], r["item_id"], r["session_id"], r["value"], r["reasons"])
        for r in _validate(spark, raws).orderBy("line_seq").collect()
    ]
    assert got == [
        ("e1", "36", "i2", "12345678901234567890123", None, []),
        ("1007", '{"id": "u00036"}', "i1", "[1]", None, []),
        ("e3", "u1", "i1", "s1", 4.0, []),
    ]


def test_ratings_on_a_half_star_scale(spark):
    ratings = [0.5, 1, 4.5, 5.0, 0.25, 4.75, 5.5, 0.0, None]
    raws = [event(f"r{k}", event_type="rating", value=v) for k, v in enumerate(ratings)]
    half_stars = _validate(spark, raws, rating_min=0.5, rating_max=5.0, rating_step=0.5)
    got = [(r["value"], r["reasons"]) for r in half_stars.orderBy("line_seq").collect()]
    bad = ["bad_rating"]
    assert got == [
        (0.5, []),
        (1.0, []),
        (4.5, []),
        (5.0, []),
        (0.25, bad),
        (4.75, bad),
        (5.5, bad),
        (0.0, bad),
        (None, bad),
    ]
    # The default scale: any value from 1 to 5.
    default = _validate(spark, raws).orderBy("line_seq").collect()
    assert [r["reasons"] for r in default] == [bad, [], [], [], bad, [], bad, bad, bad]


def test_rating_scale_is_validated(tmp_path):
    from tests.conftest import make_config

    with pytest.raises(
        ConfigError,
        match=r"^clean.rating_min, clean.rating_max: rating_min must be below rating_max, "
        r"got 5 and 5$",
    ):
        make_config(tmp_path, "clean.rating_min=5")
    with pytest.raises(ConfigError, match=r"^clean.rating_step: must not be negative .*got -0.5$"):
        make_config(tmp_path, "clean.rating_step=-0.5")
    cfg = make_config(tmp_path, "clean.rating_min=0.5", "clean.rating_step=0.5").clean
    assert (cfg.rating_min, cfg.rating_max, cfg.rating_step) == (0.5, 5.0, 0.5)


def test_validation_normalises_fields(spark):
    raws = [
        event(
            "e1",
            user_id=" u7 ",
            event_type=" Click ",
            value=3.0,
            event_ts="2026-11-23T10:00:00.5+01:00",
        ),
        event(ABSENT, item_id="i2"),
    ]
    rows = _validate(spark, raws).orderBy("line_seq").collect()
    first, second = rows
    assert (first["user_id"], first["event_type"], first["value"]) == ("u7", "click", None)
    micros = _validate(spark, raws[:1]).select(F.unix_micros("event_ts")).first()[0]
    assert micros == dt.datetime(2026, 11, 23, 9, 0, 0, 500_000, tzinfo=dt.UTC).timestamp() * 1e6
    # No event_id: a stable id from the raw line, so repeats of that line still dedup.
    assert second["event_id"].startswith("raw-") and len(second["event_id"]) == 36
    assert _validate(spark, raws).orderBy("line_seq").collect()[1]["event_id"] == second["event_id"]


# --------------------------------------------------------------------------- dedup


def _ts(seconds: int) -> str:
    return f"{DS}T10:{seconds // 60:02d}:{seconds % 60:02d}Z"


DEDUP_LINES = [
    event("e1", event_ts=_ts(0)),
    event("e1", event_ts=_ts(0)),  # exact copy
    event("e2", event_ts=_ts(3)),  # retry of e1
    event("e3", event_ts=_ts(8)),  # 8 s after the kept e1
    event("e4", event_ts=_ts(12)),  # 12 s after e1, the previous *kept* one: kept
    event("e5", event_type="click", event_ts=_ts(4)),  # other type
    event("e6", user_id="u2", event_ts=_ts(1)),  # other user
    event("e6", user_id="u2", item_id="i2", event_ts=_ts(300)),  # same id, later: exact
    event("e8", event_ts=_ts(21)),  # 9 s after e4
]
DEDUP_EXPECTED = {
    "e1": [None, "exact"],
    "e2": ["near"],
    "e3": ["near"],
    "e4": [None],
    "e5": [None],
    "e6": [None, "exact"],
    "e8": ["near"],
}


def _dedup(spark, raws, source_file="file:/a.jsonl", prior=None, window_s=10):
    valid = (
        lines_df(spark, raws, source_file)
        .transform(parse_raw)
        .transform(
            validate_events,
            ds=DS,
            known_items=items_df(spark),
            max_field_chars=256,
            max_future_skew_s=3600,
            max_late_days=30,
        )
    )
    return valid.transform(dedup_events, window_s=window_s, prior=prior)


def _outcome_by_id(df) -> dict[str, list]:
    out: dict[str, list] = {}
    for row in df.collect():
        out.setdefault(row["event_id"], []).append(row["duplicate"])
    return {k: sorted(v, key=lambda x: (x is not None, x)) for k, v in out.items()}


def test_exact_and_near_duplicates(spark):
    deduped = _dedup(spark, DEDUP_LINES)
    assert _outcome_by_id(deduped) == DEDUP_EXPECTED
    kept_e6 = deduped.where("event_id = 'e6' AND duplicate IS NULL").first()
    assert kept_e6["item_id"] == "i1"  # the earlier of the two e6 lines wins


def test_dedup_does_not_depend_on_input_order(spark):
    shuffled = DEDUP_LINES[:]
    random.Random(5).shuffle(shuffled)
    assert shuffled != DEDUP_LINES
    columns = ["event_id", "user_id", "item_id", "event_type", "event_ts", "duplicate"]
    a = _dedup(spark, DEDUP_LINES).where("duplicate IS NULL").select(columns)
    b = (
        _dedup(spark, shuffled, source_file="file:/b.jsonl")
        .where("duplicate IS NULL")
        .select(columns)
    )
    assertDataFrameEqual(a, b)
    assert _outcome_by_id(_dedup(spark, list(reversed(DEDUP_LINES)))) == DEDUP_EXPECTED


def test_duplicates_of_already_clean_events_are_caught(spark):
    prior = spark.createDataFrame(
        [
            Row(event_id="p1", user_id="u3", item_id="i2", event_type="view", ts=_ts(100)),
            Row(event_id="p2", user_id="u3", item_id="i3", event_type="cart", ts=_ts(100)),
        ]
    ).selectExpr(
        "event_id", "user_id", "item_id", "event_type", "CAST(ts AS TIMESTAMP) AS event_ts"
    )
    raws = [
        event("p1", user_id="u3", item_id="i2", event_ts=_ts(100)),  # already clean
        event("n1", user_id="u3", item_id="i2", event_ts=_ts(107)),  # 7 s after a clean one
        event("n2", user_id="u3", item_id="i2", event_ts=_ts(92)),  # 8 s before it
        event("n5", user_id="u3", item_id="i2", event_ts=_ts(112)),  # 12 s after it, 5 s after n1
        event("n3", user_id="u3", item_id="i2", event_ts=_ts(130)),  # far enough
        event("n4", user_id="u3", item_id="i3", event_type="view", event_ts=_ts(101)),  # other type
    ]
    got = _outcome_by_id(_dedup(spark, raws, prior=prior))
    # n5 is compared with the previous *kept* event (the clean one), not with the dropped n1.
    assert got == {
        "p1": ["exact"],
        "n1": ["near"],
        "n2": ["near"],
        "n5": [None],
        "n3": [None],
        "n4": [None],
    }


# --------------------------------------------------------------------------- bots, weights


def test_flag_bots_by_events_or_distinct_items_per_day(spark):
    rows = (
        [("busy", f"i{k % 2}", f"{DS} 1{k}:00:00") for k in range(4)]  # 4 events, 2 items
        + [("wide", f"i{k}", f"{DS} 1{k}:00:00") for k in range(3)]  # 3 events, 3 items
        + [("calm", "i1", f"{DS} 10:00:00"), ("calm", "i2", f"{DS} 11:00:00")]
        # 3 + 3 events, 2 items, but on two different days
        + [("split", f"i{k % 2}", f"2026-11-2{2 + k // 3} 1{k}:00:00") for k in range(6)]
    )
    events = spark.createDataFrame(rows, "user_id string, item_id string, ts string").selectExpr(
        "user_id", "item_id", "CAST(ts AS TIMESTAMP) AS event_ts"
    )
    flagged = events.transform(flag_bots, max_events_per_day=3, max_distinct_items_per_day=2)
    got = {(r["user_id"], r["bot"]) for r in flagged.collect()}
    assert got == {("busy", True), ("wide", True), ("calm", False), ("split", False)}
    assert flagged.count() == len(rows)


def test_add_weights_by_type_and_rating_value(spark):
    events = spark.createDataFrame(
        [("view", None), ("purchase", None), ("rating", 4.0), ("rating", 1.0)],
        "event_type string, value double",
    )
    weighted = events.transform(
        add_weights,
        event_weights={"view": 1.0, "purchase": 8.0, "rating": 99.0},
        rating_weight_scale=0.5,
    )
    assert [r["weight"] for r in weighted.collect()] == [1.0, 8.0, 2.0, 0.5]


def test_clean_events_assigns_every_line_one_outcome(spark):
    raws = [
        *DEDUP_LINES,
        "not json",
        event("q1", item_id="i999"),
        *[
            event(f"b{k}", user_id="bot", item_id=f"i{1 + k % 3}", event_ts=_ts(60 * k))
            for k in range(5)
        ],
    ]
    cfg = CleanConfig(
        bot_max_events_per_day=4, event_weights={**CleanConfig().event_weights, "click": 3.0}
    )
    outcomes = clean_events(
        lines_df(spark, raws), ds=DS, known_items=items_df(spark), prior=None, cfg=cfg
    )
    got = sorted(
        (
            r["raw"] if r["outcome"] == "quarantined" else r["event_id"],
            r["outcome"],
            r["reasons"],
            r["weight"],
        )
        for r in outcomes.collect()
    )
    expected = sorted(
        [
            ("e1", "clean", [], 1.0),
            ("e1", "duplicate", [], None),
            ("e2", "duplicate", [], None),
            ("e3", "duplicate", [], None),
            ("e4", "clean", [], 1.0),
            ("e5", "clean", [], 3.0),
            ("e6", "clean", [], 1.0),
            ("e6", "duplicate", [], None),
            ("e8", "duplicate", [], None),
            ("not json", "quarantined", ["malformed"], None),
            (event("q1", item_id="i999"), "quarantined", ["unknown_item"], None),
            *[(f"b{k}", "excluded", ["bot"], 1.0) for k in range(5)],
        ]
    )
    assert got == expected


# --------------------------------------------------------------------------- the stage


def _write_landing(root: Path, ds: str, files: dict[str, bytes], items=("i1", "i2", "i3")) -> None:
    folder = root / "landing" / "events" / f"ds={ds}"
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    catalog = root / "landing" / "catalog"
    catalog.mkdir(parents=True, exist_ok=True)
    (catalog / "items.jsonl").write_text(
        "".join(
            json.dumps({"item_id": i, "title": f"Item {i}", "added_ds": "2026-01-01"}) + "\n"
            for i in items
        )
    )


def _ctx(cfg, spark, store, ds=DS) -> RunContext:
    return RunContext(cfg=cfg, spark=spark, store=store, ds=ds)


def test_missing_landing_folder_is_an_input_error(spark, cfg, store):
    with pytest.raises(InputError, match=r"no landing data at .*ds=2026-11-23.*generate-demo"):
        run_clean(_ctx(cfg, spark, store))


def test_landing_folder_without_lines_is_an_input_error(spark, cfg, store, tmp_path):
    _write_landing(tmp_path, DS, {"part-0.jsonl": b"", "part-1.jsonl": b"\n  \n"})
    with pytest.raises(InputError, match=r"no event lines under .*ds=2026-11-23"):
        run_clean(_ctx(cfg, spark, store))
    assert not store.exists("events_clean") and not store.exists("items")


def test_garbage_landing_files_end_up_in_quarantine(spark, tmp_path, store):
    from tests.conftest import make_config

    cfg = make_config(tmp_path, "clean.max_quarantine_rate=1.0")
    garbage = b"".join(
        [
            b"\x00\x01\x02\xff\xfe binary junk\n",
            b'{"event_id":"g1","user_id":"u\xff\xfe1","item_id":"i1","event_type":"view",'
            b'"event_ts":"2026-11-23T10:00:00Z"}\n',
            b'{"event_id": 5, "user_id": ["a"], "item_id": {"x": 1}, "value": "x"}\n',
            b"\n   \n",
            event("good").encode() + b"\n",
            b"\xc3\x28\xa0\xa1" * 50 + b"\n",
            b"{" * 10_000 + b"\n",
            event("huge", session_id="x" * 1_000_000).encode() + b"\n",  # a 1 MB line
            event("good2", item_id="i2").encode() + b"\n",
        ]
    )
    _write_landing(
        tmp_path, DS, {"part-0.jsonl": garbage, "empty.jsonl": b"", "nul.jsonl": b"\x00" * 64}
    )
    result = run_clean(_ctx(cfg, spark, store))
    assert (result.rows_in, result.rows_out, result.rows_quarantined, result.rows_duplicate) == (
        9,
        2,
        7,
        0,
    )
    assert result.metrics["blank_lines"] == 2
    clean_rows = store.read("events_clean").collect()
    assert sorted((r["event_id"], r["item_id"], r["ds"], r["ingest_ds"]) for r in clean_rows) == [
        ("good", "i1", DS, DS),
        ("good2", "i2", DS, DS),
    ]
    quarantine = store.read("events_quarantine", where={"ds": DS}).collect()
    assert sorted(r["reasons"] for r in quarantine) == [
        ["bad_type:user_id", "bad_type:item_id", "bad_type:value"],
        *[["malformed"]] * 5,
        ["oversized_field"],
    ]
    assert max(len(r["raw"]) for r in quarantine) > 1_000_000
    assert {os.path.basename(r["source_file"]) for r in quarantine} == {"part-0.jsonl", "nul.jsonl"}
    assert any("\ufffd" in r["raw"] for r in quarantine)


def test_a_wrongly_typed_id_is_quarantined_never_stringified(spark, tmp_path, store):
    from tests.conftest import make_config

    cfg = make_config(tmp_path, "clean.max_quarantine_rate=1.0")
    object_id = event("e1", user_id={"id": "u00036"})
    lines = [object_id, event("e2", user_id=36, item_id="i2"), event("e3", user_id="u00036")]
    _write_landing(tmp_path, DS, {"part-0.jsonl": ("\n".join(lines) + "\n").encode()})
    result = run_clean(_ctx(cfg, spark, store))
    published = store.read("events_clean").select("event_id", "user_id").collect()
    assert sorted(tuple(r) for r in published) == [("e2", "36"), ("e3", "u00036")]
    quarantine = store.read("events_quarantine").collect()
    assert [(r["raw"], r["reasons"], r["user_id"]) for r in quarantine] == [
        (object_id, ["bad_type:user_id"], None)
    ]
    assert result.summary["quarantine_reasons"] == {"bad_type": 1, "bad_type:user_id": 1}
    assert result.metrics["quarantine_bad_type"] == 1


def test_quarantine_rate_gate_stops_before_publishing(spark, cfg, store, tmp_path):
    lines = [event("ok1"), "junk 1", "junk 2", event("bad-item", item_id="nope")]
    _write_landing(tmp_path, DS, {"part-0.jsonl": ("\n".join(lines) + "\n").encode()})
    with pytest.raises(
        GateError,
        match=r"^gate clean.max_quarantine_rate: quarantined 75.0% of 4 input rows > 20.0%$",
    ):
        run_clean(_ctx(cfg, spark, store))
    assert store.read("events_clean").count() == 0
    # The quarantine is kept for inspection.
    reasons = sorted(r["reasons"] for r in store.read("events_quarantine").collect())
    assert reasons == [["malformed"], ["malformed"], ["unknown_item"]]


def test_volume_gate_compares_with_the_previous_landing_date(spark, cfg, store, tmp_path):
    # The previous landing date held 5 clean and 1 quarantined record.
    ts = dt.datetime(2026, 11, 22, 10)
    clean_rows = [
        (f"a{k}", "u1", "i1", "view", ts, None, "s1", 1.0, "2026-11-22", "2026-11-22")
        for k in range(5)
    ]
    store.overwrite("events_clean", spark.createDataFrame(clean_rows, EVENTS_CLEAN))
    store.overwrite(
        "events_quarantine",
        spark.createDataFrame(
            [("junk", ["malformed"], "f", None, "2026-11-22")], EVENTS_QUARANTINE
        ),
    )
    _write_landing(tmp_path, DS, {"part-0.jsonl": (event("b0") + "\n").encode()})
    with pytest.raises(
        GateError,
        match=r"^gate clean.max_volume_change: 1 records on 2026-11-23 vs 6 on 2026-11-22 \(x6.0\) > x5.0$",
    ):
        run_clean(_ctx(cfg, spark, store))
    assert [
        r["event_id"] for r in store.read("events_clean", where={"ingest_ds": DS}).collect()
    ] == []


def test_reconciliation_mismatch_is_an_error():
    clean._reconcile(DS, 10, 5, 2, 2, 1, "here")
    with pytest.raises(ReconciliationError, match="10 rows in != 5 clean \\+ 2 duplicate"):
        clean._reconcile(DS, 10, 5, 2, 2, 0, "here")


# --------------------------------------------------------------------------- on demo data


@pytest.fixture(scope="module")
def demo_run(spark, tmp_path_factory):
    """Generate the tiny demo, clean both days, then clean the second day again."""
    from llmrec_spark.io.tables import open_store
    from tests.conftest import make_config

    root = tmp_path_factory.mktemp("clean_demo")
    cfg = make_config(
        root, "clean.bot_max_events_per_day=60", "clean.bot_max_distinct_items_per_day=45"
    )
    planted = generate_demo(TINY, cfg.path(cfg.storage.landing), DS)
    store = open_store(spark, cfg.path(cfg.storage.lakehouse), "embedded")
    first = run_clean(_ctx(cfg, spark, store, "2026-11-22"))
    second = run_clean(_ctx(cfg, spark, store, DS))
    snapshot = store.read("events_clean").collect()
    rerun = run_clean(_ctx(cfg, spark, store, DS))
    return planted, [first, second], rerun, snapshot, store


def test_demo_reconciles_and_finds_the_planted_dirt(demo_run):
    planted, results, _, _, _ = demo_run
    total = {
        key: sum(getattr(r, key) for r in results)
        for key in ("rows_in", "rows_out", "rows_duplicate", "rows_quarantined", "rows_excluded")
    }
    reasons = {
        code: sum(r.metrics[f"quarantine_{code}"] for r in results) for code in clean.REASONS
    }
    assert total["rows_in"] == planted["events"]
    assert total["rows_in"] == (
        total["rows_out"]
        + total["rows_duplicate"]
        + total["rows_quarantined"]
        + total["rows_excluded"]
    )
    assert reasons == {
        "malformed": planted["malformed"],
        "bad_type": 0,
        "missing_user": planted["user_missing"],
        "missing_item": planted["item_missing"],
        "unknown_event_type": planted["unknown_event_types"],
        "bad_timestamp": planted["bad_timestamps"],
        "future_timestamp": 0,
        "too_late": 0,
        "unknown_item": planted["unknown_items"],
        "oversized_field": 0,
        "bad_rating": 0,
    }
    assert total["rows_quarantined"] == sum(reasons.values())
    assert total["rows_excluded"] == planted["bot_events"]
    assert sum(r.metrics["bot_users"] for r in results) == 2  # the one bot, on each day
    assert sum(r.metrics["duplicates_exact"] for r in results) == planted["exact_duplicates"]
    assert sum(r.metrics["duplicates_near"] for r in results) == planted["retries"]
    assert sum(r.metrics["late_events"] for r in results) == planted["late"]


def test_demo_events_clean_content(demo_run):
    _, results, _, snapshot, store = demo_run
    assert len(snapshot) == sum(r.rows_out for r in results)
    assert len({r["event_id"] for r in snapshot}) == len(snapshot)
    assert not {r["user_id"] for r in snapshot} & {f"u{TINY.n_users + 1:05d}"}
    assert all(r["weight"] > 0 for r in snapshot)
    table = store.read("events_clean")
    assert table.where("ds != date_format(event_ts, 'yyyy-MM-dd')").count() == 0  # UTC session
    # Late events land in their own event-date partition, under today's ingest date.
    assert {(r["ds"], r["ingest_ds"]) for r in snapshot} >= {("2026-11-22", DS), (DS, DS)}
    assert store.read("events_quarantine").select("ds").distinct().count() == 2


def test_rerunning_a_date_is_idempotent(demo_run, spark):
    _, results, rerun, snapshot, store = demo_run
    assert rerun == results[1]
    assertDataFrameEqual(store.read("events_clean"), spark.createDataFrame(snapshot, EVENTS_CLEAN))
