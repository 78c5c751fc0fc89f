"""Evaluation protocols: cold items truly absent from training, global time cut, eligibility."""

from __future__ import annotations

import datetime as dt

import pytest
from pyspark.sql import functions as F

from llmrec_spark.stages import splits

T0 = dt.datetime(2026, 11, 1, 12, 0, 0)
SCHEMA = "user_id string, item_id string, event_ts timestamp, weight double"


def ts(hours: int) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


def cold_world(spark):
    """Six users over items w0..w5 (warm) and c0..c9 (each liked by 5+ users)."""
    rows = []
    for u in range(6):
        for j in range(10):
            if (u + j) % 6 != 0:  # c-items first: 5 of the 6 users each
                rows.append((f"u{u}", f"c{j}", ts(100 * u + j), 4.0 if j % 2 else 1.0))
        for h in range(6):
            rows.append((f"u{u}", f"w{h}", ts(100 * u + 20 + h), 4.0))
    return spark.createDataFrame(rows, SCHEMA)


@pytest.mark.spark
def test_pick_cold_items_is_seeded_and_only_from_items_with_enough_positive_users(spark):
    events = cold_world(spark)

    picked = {
        r["item_id"]
        for r in splits.pick_cold_items(
            events, fraction=0.5, min_positives=5, positive_min_weight=4.0, seed=3
        ).collect()
    }
    again = {
        r["item_id"]
        for r in splits.pick_cold_items(
            events.repartition(5), fraction=0.5, min_positives=5, positive_min_weight=4.0, seed=3
        ).collect()
    }
    other_seed = {
        r["item_id"]
        for r in splits.pick_cold_items(
            events, fraction=0.5, min_positives=5, positive_min_weight=4.0, seed=4
        ).collect()
    }

    # Eligible: w0..w5 (6 positive users) and the odd c-items (5 positive users each);
    # even c-items have only weight-1 events. Half of the 11 eligible items, rounded: 6.
    eligible = {f"w{h}" for h in range(6)} | {f"c{j}" for j in (1, 3, 5, 7, 9)}
    assert len(picked) == 6 and picked <= eligible
    assert picked == again
    assert picked != other_seed


@pytest.mark.spark
def test_cold_item_split_removes_cold_items_from_training_and_tests_their_positives(spark):
    events = cold_world(spark)

    split = splits.cold_item(
        events,
        cold_fraction=0.5,
        min_item_positives=5,
        test_fraction=0.2,
        positive_min_weight=4.0,
        seed=3,
    )

    cold = {r["item_id"] for r in split.cold_items.collect()}
    train = split.train.collect()
    test = split.test.collect()
    assert cold and not {r["item_id"] for r in train} & cold
    # Every positive (weight 4) event on a cold item is a cold test row of an eligible user.
    cold_positives = {
        (r["user_id"], r["item_id"])
        for r in events.collect()
        if r["item_id"] in cold and r["weight"] >= 4.0
    }
    assert {(r["user_id"], r["item_id"]) for r in test if r["cold"]} == cold_positives
    # Warm test rows are on warm items, held out after every training event of that user.
    warm_rows = [r for r in test if not r["cold"]]
    assert warm_rows and all(r["item_id"] not in cold for r in warm_rows)
    train_pairs = {(r["user_id"], r["item_id"]) for r in train}
    assert not {(r["user_id"], r["item_id"]) for r in test} & train_pairs
    last_train = {}
    for r in train:
        last_train[r["user_id"]] = max(last_train.get(r["user_id"], r["event_ts"]), r["event_ts"])
    warm_test = {(r["user_id"], r["item_id"]) for r in warm_rows}
    for r in events.collect():
        if (r["user_id"], r["item_id"]) in warm_test:
            assert r["event_ts"] >= last_train[r["user_id"]]


@pytest.mark.spark
def test_global_temporal_split_holds_out_the_latest_events_of_everyone(spark):
    rows = []
    for u in range(4):
        for h in range(10):  # user u's events at hours 10u .. 10u+9: the cut falls in u3's
            rows.append((f"u{u}", f"i{u}_{h}", ts(10 * u + h), 4.0))
    rows.append(("u0", "late", ts(39), 4.0))  # u0's one late event lands in test
    events = spark.createDataFrame(rows, SCHEMA)

    split = splits.global_temporal(events, test_fraction=0.1, positive_min_weight=4.0)

    train = split.train.collect()
    test = {(r["user_id"], r["item_id"]) for r in split.test.collect()}
    cut = min(r["event_ts"] for r in events.collect() if (r["user_id"], r["item_id"]) in test)
    assert all(r["event_ts"] < cut for r in train)
    assert ("u0", "late") in test
    # u1 and u2 have nothing after the cut; u3's latest events are held out.
    assert {u for u, _ in test} == {"u0", "u3"}
    assert not any(r["cold"] for r in split.test.collect())


@pytest.mark.spark
def test_user_temporal_protocol_flags_nothing_cold_and_needs_three_training_positives(spark):
    rows = [("ua", f"a{h}", ts(h), 4.0) for h in range(5)]  # 4 train positives, 1 test
    rows += [("ub", f"b{h}", ts(h), 4.0 if h < 2 else 1.0) for h in range(4)]  # 2 train positives
    rows += [("ub", "b9", ts(9), 4.0)]
    events = spark.createDataFrame(rows, SCHEMA)

    split = splits.user_temporal(events, test_fraction=0.2, positive_min_weight=4.0)

    assert [(r["user_id"], r["item_id"], r["cold"]) for r in split.test.collect()] == [
        ("ua", "a4", False)
    ]
    assert split.cold_items is None


@pytest.mark.spark
def test_user_cut_holds_out_a_fifth_by_rows_even_when_the_last_events_tie(spark):
    # uz: ten events, the last six in the same second (a batch of ratings). A timestamp cut
    # would hold out all six; the row cut holds out two, both from the tied batch.
    rows = [("uz", f"z{h}", ts(h), 4.0) for h in range(4)]
    rows += [("uz", f"z{h}", ts(4), 4.0) for h in range(4, 10)]
    rows += [("uy", f"y{h}", ts(h), 4.0) for h in range(5)]  # no ties: the last one held out
    events = spark.createDataFrame(rows, SCHEMA)

    train, held_out = splits.per_user_temporal_cut(events, test_fraction=0.2)
    again, _ = splits.per_user_temporal_cut(events.repartition(3), test_fraction=0.2)

    held = {(r["user_id"], r["item_id"]) for r in held_out.collect()}
    kept = [(r["user_id"], r["item_id"], r["event_ts"]) for r in train.collect()]
    assert len([p for p in held if p[0] == "uz"]) == 2 and ("uy", "y4") in held
    assert len(held) == 3 and len(kept) == 12
    assert {i for u, i in held if u == "uz"} <= {f"z{h}" for h in range(4, 10)}
    # No training event is later than a held-out one of the same user; ties may straddle.
    assert max(t for u, _, t in kept if u == "uz") == ts(4)
    assert sorted(kept) == sorted(
        (r["user_id"], r["item_id"], r["event_ts"]) for r in again.collect()
    )


def holdout_world(spark, users: int = 40):
    """`users` users with ten events each, one an hour, on items j0..j9 (weights 4, the
    last one 1: a held-out non-positive)."""
    rows = [
        (f"u{u}", f"j{(u + h) % 10}", ts(24 * u + h), 1.0 if h == 9 else 4.0)
        for u in range(users)
        for h in range(10)
    ]
    return spark.createDataFrame(rows, SCHEMA)


@pytest.mark.spark
def test_holdout_rows_are_the_last_events_of_a_stable_seeded_share_of_the_users(spark):
    events = holdout_world(spark)

    def users(frame, fraction=0.25, seed=5, min_users=0):
        picked = splits.holdout_users(frame, fraction=fraction, seed=seed, min_users=min_users)
        return {r["user_id"] for r in picked.collect()}

    chosen = users(events)
    held = splits.holdout_rows(events, fraction=0.25, seed=5, test_fraction=0.2).collect()

    assert len(chosen) == 10  # a quarter of 40
    # The same users from another night's events of the same users: the order is a hash of
    # the id, not of the events.
    assert users(events.where(F.col("event_ts") < ts(24 * 39 + 5))) == chosen
    assert users(events, seed=6) != chosen
    # At least min_users, at most half of the users.
    assert len(users(events, fraction=0.01, min_users=8)) == 8
    assert len(users(events, fraction=0.01, min_users=100)) == 20
    # Each chosen user loses its last 2 of 10 events (20%), nobody else loses any.
    by_user: dict[str, list] = {}
    for row in held:
        by_user.setdefault(row["user_id"], []).append(row["event_ts"])
    assert set(by_user) == chosen
    for user, times in by_user.items():
        u = int(user[1:])
        assert sorted(times) == [ts(24 * u + 8), ts(24 * u + 9)]


@pytest.mark.spark
def test_published_holdout_trains_on_everything_but_the_held_rows_and_tests_their_positives(
    spark,
):
    events = holdout_world(spark)

    split = splits.published_holdout(
        events, fraction=0.25, seed=5, test_fraction=0.2, positive_min_weight=2.0
    )
    held = splits.holdout_rows(events, fraction=0.25, seed=5, test_fraction=0.2)
    train = {(r["user_id"], r["event_ts"]) for r in split.train.collect()}
    held_keys = {(r["user_id"], r["event_ts"]) for r in held.collect()}
    test = {(r["user_id"], r["item_id"]) for r in split.test.collect()}

    assert split.protocol == "holdout"
    assert len(train) == 400 - len(held_keys) and not train & held_keys
    # The test positives: the 9th event of each held-out user (the 10th weighs 1).
    users = {u for u, _ in held_keys}
    assert test == {(u, f"j{(int(u[1:]) + 8) % 10}") for u in users}


@pytest.mark.spark
def test_cold_user_split_removes_a_seeded_fifth_of_the_users_whole_and_tests_all_their_positives(
    spark,
):
    events = holdout_world(spark, users=40).unionByName(
        # a user with no positive at all is never picked (nothing to test them on)
        spark.createDataFrame([("never", "j1", ts(5000), 1.0)], SCHEMA)
    )
    split = splits.cold_user(events, cold_fraction=0.2, positive_min_weight=2.0, seed=5)
    test = split.test.collect()
    cold = {r["user_id"] for r in test}
    assert len(cold) == 8  # a fifth of the 40 users with a positive
    assert "never" not in cold
    trained = {r["user_id"] for r in split.train.select("user_id").distinct().collect()}
    assert not cold & trained
    assert trained | cold == {f"u{u}" for u in range(40)} | {"never"}
    for user in cold:  # every positive they have, once per item; none of their weight-1 items
        expected = {f"j{(int(user[1:]) + h) % 10}" for h in range(9)}
        assert {r["item_id"] for r in test if r["user_id"] == user} == expected
    assert len(test) == 8 * 9 and not any(r["cold"] for r in test)
    again = splits.cold_user(events, cold_fraction=0.2, positive_min_weight=2.0, seed=5)
    assert {r["user_id"] for r in again.test.collect()} == cold
    other = splits.cold_user(events, cold_fraction=0.2, positive_min_weight=2.0, seed=6)
    assert {r["user_id"] for r in other.test.collect()} != cold
