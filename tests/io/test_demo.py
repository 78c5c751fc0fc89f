"""The demo generator: layout, determinism, planted dirt and the topic signal in the data."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from llmrec_spark.config import DemoConfig
from llmrec_spark.errors import ConfigError
from llmrec_spark.io import demo
from llmrec_spark.io.demo import build_world, generate_demo

END_DS = "2026-11-23"
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")

TINY = DemoConfig(
    seed=3,
    n_users=30,
    n_items=40,
    n_topics=4,
    days=2,
    events_per_day=150,
    exact_duplicate_rate=0.05,
    retry_rate=0.05,
    malformed_rate=0.03,
    unknown_item_rate=0.02,
    missing_field_rate=0.02,
    late_rate=0.05,
    unknown_event_type_rate=0.02,
    bad_timestamp_rate=0.02,
    n_bots=1,
    bot_events_per_day=100,
    new_items=5,
)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _events(root: Path) -> list[tuple[str, str]]:
    """(landing date, line) for every line of every events file."""
    out = []
    for path in sorted((root / "events").glob("ds=*/part-*.jsonl")):
        ds = path.parent.name.removeprefix("ds=")
        out.extend((ds, line) for line in path.read_text().splitlines())
    return out


def _parse_ts(text: str) -> dt.datetime | None:
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (TypeError, ValueError):
        return None


def test_same_seed_same_files_other_seed_other_files(tmp_path):
    first = generate_demo(TINY, str(tmp_path / "a"), END_DS)
    second = generate_demo(TINY, str(tmp_path / "b"), END_DS)
    other = generate_demo(DemoConfig(**{**TINY.__dict__, "seed": 4}), str(tmp_path / "c"), END_DS)
    files_a = _files(tmp_path / "a")
    assert sorted(files_a) == [
        "catalog/items.jsonl",
        "events/ds=2026-11-22/part-00000.jsonl",
        "events/ds=2026-11-23/part-00000.jsonl",
        "users/profiles.jsonl",
    ]
    assert files_a == _files(tmp_path / "b")
    assert files_a != _files(tmp_path / "c")
    first.pop("seconds"), second.pop("seconds"), other.pop("seconds")
    assert first == second


def test_catalog_has_topic_text_and_cold_start_items(tmp_path):
    summary = generate_demo(TINY, str(tmp_path), END_DS)
    items = [
        json.loads(line) for line in (tmp_path / "catalog" / "items.jsonl").read_text().splitlines()
    ]
    assert len(items) == summary["items"] == 45
    assert [it["item_id"] for it in items[:3]] == ["i000001", "i000002", "i000003"]
    assert all(
        set(it) == {"item_id", "title", "description", "category", "brand", "available", "added_ds"}
        for it in items
    )
    assert {it["available"] for it in items} <= {"true", "false"}
    new = [it for it in items if it["added_ds"] == END_DS]
    assert [it["item_id"] for it in new] == [f"i{n:06d}" for n in range(41, 46)]
    assert all(it["added_ds"] < "2026-11-22" for it in items[:40])
    # Titles and descriptions come from the topic vocabularies.
    vocab: dict[str, set[str]] = {}
    for topic in demo.TOPICS:
        vocab.setdefault(topic.category, set()).update(
            w.lower() for n in topic.nouns for w in n.split()
        )
    for it in items:
        assert any(word in it["title"].lower().split() for word in vocab[it["category"]]), it
    events = [
        json.loads(line)
        for _, line in _events(tmp_path)
        if line.startswith("{") and line.endswith("}")
    ]
    assert not {e.get("item_id") for e in events} & {it["item_id"] for it in new}


def test_event_lines_are_well_formed_and_dirt_counts_match(tmp_path):
    summary = generate_demo(TINY, str(tmp_path), END_DS)
    catalog = {
        json.loads(line)["item_id"] for line in (tmp_path / "catalog" / "items.jsonl").open()
    }
    found = Counter()
    ids = Counter()
    lines = _events(tmp_path)
    for ds, line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            found["malformed"] += 1
            continue
        if not isinstance(event, dict):
            found["malformed"] += 1
            continue
        ids[event["event_id"]] += 1
        assert UUID_RE.match(event["event_id"])
        if event.get("user_id") is None or event.get("item_id") is None:
            found["missing_fields"] += 1
            continue
        if event["item_id"] not in catalog:
            found["unknown_items"] += 1
        if event["event_type"] not in ("view", "click", "cart", "purchase", "rating"):
            found["unknown_event_types"] += 1
        ts = _parse_ts(event["event_ts"])
        if ts is None or not TS_RE.match(event["event_ts"]):
            found["bad_timestamps"] += 1
            continue
        if ts.date().isoformat() < ds:
            found["late"] += 1
        if int(event["user_id"][1:]) > TINY.n_users:
            found["bot_events"] += 1
        assert event["source"] in ("web", "app")
        assert (event["value"] is not None) == (event["event_type"] == "rating")
        if event["event_type"] == "rating":
            assert event["value"] in (1.0, 2.0, 3.0, 4.0, 5.0)
    found["exact_duplicates"] = sum(n - 1 for n in ids.values())
    assert len(lines) == summary["events"]
    assert summary["user_missing"] + summary["item_missing"] == summary["missing_fields"]
    for kind in (
        "malformed",
        "missing_fields",
        "unknown_items",
        "unknown_event_types",
        "bad_timestamps",
        "late",
        "bot_events",
        "exact_duplicates",
    ):
        assert found[kind] == summary[kind], kind
    assert summary["bot_events"] == TINY.n_bots * TINY.bot_events_per_day * TINY.days
    for kind in (
        "malformed",
        "missing_fields",
        "unknown_items",
        "late",
        "retries",
        "exact_duplicates",
    ):
        assert summary[kind] > 0, kind


def test_retries_repeat_an_event_one_to_five_seconds_later(tmp_path):
    summary = generate_demo(TINY, str(tmp_path), END_DS)
    events = []
    for _, line in _events(tmp_path):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and _parse_ts(event.get("event_ts")) and event.get("user_id"):
            events.append(event)
    by_key: dict[tuple, list[dt.datetime]] = {}
    seen_ids = set()
    for e in events:
        if e["event_id"] in seen_ids:
            continue
        seen_ids.add(e["event_id"])
        by_key.setdefault((e["user_id"], e.get("item_id"), e["event_type"]), []).append(
            _parse_ts(e["event_ts"])
        )
    gaps = [
        (b - a).total_seconds()
        for stamps in by_key.values()
        for a, b in zip(sorted(stamps), sorted(stamps)[1:], strict=False)
        if (b - a).total_seconds() <= 10
    ]
    assert len(gaps) == summary["retries"]
    assert all(1.0 <= g <= 5.0 for g in gaps)


def test_users_mostly_consume_their_favourite_topic():
    cfg = DemoConfig(seed=11, n_users=60, n_items=200, n_topics=6, days=1, events_per_day=1500)
    world = build_world(cfg, dt.date(2026, 11, 23), dt.date(2026, 11, 23))
    topic_of = {it["item_id"]: int(t) for it, t in zip(world.items, world.item_topic, strict=True)}
    per_user: dict[int, Counter] = {}
    free_at: dict[int, float] = {}
    rng = demo.random.Random(1)
    for start in range(0, 80_000, 50):
        for event in demo._session(world, 0, float(start), free_at, rng):
            user = int(event["user_id"][1:]) - 1
            per_user.setdefault(user, Counter())[topic_of[event["item_id"]]] += 1
    favourite_share = [
        counts[int(np.argmax(world.user_taste[user]))] / sum(counts.values())
        for user, counts in per_user.items()
        if sum(counts.values()) >= 10
    ]
    # A random choice of topic would give about 1/6.
    assert len(favourite_share) > 20
    assert np.mean(favourite_share) > 0.5


def test_small_chunks_write_the_same_kinds_of_lines(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "CHUNK_EVENTS", 40)
    summary = generate_demo(TINY, str(tmp_path), END_DS)
    lines = _events(tmp_path)
    assert len(lines) == summary["events"]
    assert summary["organic"] >= 0.9 * TINY.events_per_day * TINY.days
    malformed = 0
    for _, line in lines:
        try:
            malformed += not isinstance(json.loads(line), dict)
        except ValueError:
            malformed += 1
    assert malformed == summary["malformed"] > 0


@pytest.mark.parametrize("days", [1, 3])
def test_one_folder_per_day_ending_at_end_ds(tmp_path, days):
    generate_demo(DemoConfig(**{**TINY.__dict__, "days": days}), str(tmp_path), "2026-03-01")
    folders = sorted(p.name for p in (tmp_path / "events").iterdir())
    expected = (
        ["ds=2026-03-01"] if days == 1 else ["ds=2026-02-27", "ds=2026-02-28", "ds=2026-03-01"]
    )
    assert folders == expected


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"malformed_rate": 1.5}, r"demo.malformed_rate=1.5: rates must lie within \[0, 1\]"),
        ({"late_rate": 0.6, "malformed_rate": 0.5}, "add up to more than 1"),
        ({"days": 0}, "demo.days: must be at least 1"),
    ],
)
def test_impossible_settings_are_config_errors(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        generate_demo(DemoConfig(**{**TINY.__dict__, **override}), str(tmp_path), END_DS)
    with pytest.raises(ConfigError, match="not a date"):
        generate_demo(TINY, str(tmp_path), "23/11/2026")


def test_user_profiles_name_the_users_strongest_tastes(tmp_path):
    summary = generate_demo(TINY, str(tmp_path), END_DS)
    lines = (tmp_path / "users" / "profiles.jsonl").read_text().splitlines()
    profiles = [json.loads(line) for line in lines]
    assert len(profiles) == summary["user_profiles"] > 0
    world = demo.build_world(TINY, dt.date(2026, 11, 22), dt.date(2026, 11, 23))
    for profile in profiles:
        assert set(profile) == {"user_id", "interests", "bio"}
        idx = world.user_ids.index(profile["user_id"])
        favourite = demo.TOPICS[int(world.user_taste[idx].argmax()) % len(demo.TOPICS)]
        assert profile["interests"].split(", ")[0] == favourite.name
