"""Offline evaluation: metrics against hand-computed values, the temporal split, the stage."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import numpy as np
import pytest

from llmrec_spark.core.hybrid import Mix
from llmrec_spark.evaluation.report import MODEL_ORDER
from llmrec_spark.evaluation.tuning import pick_trial
from llmrec_spark.stages.splits import user_temporal_split

T0 = dt.datetime(2026, 11, 1, 12, 0, 0)


def ts(hours: int) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


@pytest.mark.spark
def test_user_temporal_split_cuts_by_time_and_leaks_nothing(spark):
    rows = (
        # ua: 10 events -> last 2 to test; the weight-1 one is not a positive.
        [("ua", f"a{h}", ts(h), 2.0) for h in range(8)]
        + [("ua", "a8", ts(8), 4.0), ("ua", "a9", ts(9), 1.0)]
        # ub: 5 events -> 1 to test, though the last two are tied in time: one of them.
        + [
            ("ub", "b0", ts(0), 2.0),
            ("ub", "b1", ts(1), 2.0),
            ("ub", "b2", ts(2), 2.0),
            ("ub", "b3", ts(3), 2.0),
            ("ub", "b4", ts(3), 8.0),
        ]
        # uc: its held-out positive is an item it already had in train -> no test user.
        + [
            ("uc", "c0", ts(0), 1.0),
            ("uc", "c1", ts(1), 1.0),
            ("uc", "c2", ts(2), 1.0),
            ("uc", "c0", ts(3), 8.0),
        ]
        # ud: only two training items -> not evaluated, but its training events stay.
        + [("ud", "d0", ts(0), 2.0), ("ud", "d1", ts(1), 2.0), ("ud", "d2", ts(2), 8.0)]
        # ue: five training items but only two positives (weight >= 2) -> not evaluated.
        + [("ue", f"e{h}", ts(h), 2.0 if h < 2 else 1.0) for h in range(5)]
        + [("ue", "e5", ts(6), 8.0)]
    )
    events = spark.createDataFrame(
        rows, "user_id string, item_id string, event_ts timestamp, weight double"
    )

    train, test = user_temporal_split(events, test_fraction=0.2, positive_min_weight=2.0)

    got_test = sorted((r["user_id"], r["item_id"]) for r in test.collect())
    (ub_test,) = [i for u, i in got_test if u == "ub"]
    assert ub_test in ("b3", "b4")
    assert got_test == sorted([("ua", "a8"), ("ub", ub_test)])
    got_train = {(r["user_id"], r["item_id"], r["event_ts"]) for r in train.collect()}
    assert {(u, i) for u, i, _ in got_train} == (
        {("ua", f"a{h}") for h in range(8)}
        | {("ub", "b0"), ("ub", "b1"), ("ub", "b2"), ("ub", ({"b3", "b4"} - {ub_test}).pop())}
        | {("uc", "c0"), ("uc", "c1"), ("uc", "c2")}
        | {("ud", "d0"), ("ud", "d1")}
        | {("ue", f"e{h}") for h in range(5)}
    )
    for user, item in got_test:
        assert (user, item) not in {(u, i) for u, i, _ in got_train}
        last_train = max(t for u, _, t in got_train if u == user)
        first_test = min(r["event_ts"] for r in test.collect() if r["user_id"] == user)
        assert last_train <= first_test
    assert train.columns == events.columns and test.columns == events.columns


# ---------------------------------------------------------------------------------------
# The stage on a tiny lakehouse

DS = "2026-11-23"


def unit(*parts: tuple[int, float], dim: int = 12) -> list[float]:
    v = np.zeros(dim)
    for index, value in parts:
        v[index] = value
    return (v / np.linalg.norm(v)).tolist()


@pytest.mark.spark
@pytest.mark.slow
def test_evaluate_protocols_scores_every_model_and_writes_the_report(spark, store, tmp_path):
    from llmrec_spark.core import encoder
    from llmrec_spark.evaluation.evaluate import run_evaluate_protocols
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages import embed
    from tests.conftest import make_config

    cfg = make_config(
        tmp_path,
        "evaluate.ks=[1, 5]",
        "evaluate.test_fraction=0.25",
        "evaluate.bootstrap_samples=20",
        "evaluate.protocols=[user_temporal]",
        "contrastive.epochs=1",
        "contrastive.num_processes=1",
        "als.rank=4",
        "als.max_iter=3",
        "als.train_days=7",
        "recommend.text_kernel=0.1",  # every model is ranked, text_frozen_kernel included
    )
    catalog = spark.createDataFrame(
        [(f"i{j}", f"Title {j}", "", "c", "", "true", "2026-11-01") for j in range(10)],
        store.spec("items").schema,
    )
    store.overwrite("items", catalog)
    # u0-u3 trained on i1 i2 i3 and buy i0; u4-u7 trained on i0 i2 i3 and buy i9 (never seen in train).
    day = dt.datetime(2026, 11, 20, 9, 0, 0)
    events = []
    for u in range(8):
        history, bought = (["i1", "i2", "i3"], "i0") if u < 4 else (["i0", "i2", "i3"], "i9")
        for h, item in enumerate(history):
            events.append((f"u{u}", item, day + dt.timedelta(hours=h), 2.0))
        events.append((f"u{u}", bought, day + dt.timedelta(days=2), 8.0))
    store.append(
        "events_clean",
        spark.createDataFrame(
            [
                (
                    f"e{k}",
                    u,
                    i,
                    "view",
                    t,
                    None,
                    None,
                    w,
                    t.date().isoformat(),
                    t.date().isoformat(),
                )
                for k, (u, i, t, w) in enumerate(events)
            ],
            store.spec("events_clean").schema,
        ),
    )
    # Text: i0 is near i1 (so u0-u3 reach it); i9 is near i0 (so u4-u7 reach it); others one-hot.
    vectors = {f"i{j}": unit((j, 1.0)) for j in range(2, 9)}
    vectors |= {
        "i0": unit((0, 1.0), (1, 1.0)),
        "i1": unit((1, 1.0), (10, 1.0)),
        "i9": unit((0, 1.0), (11, 0.2)),
    }
    hashes = {
        r["item_id"]: r["text_hash"]
        for r in embed.item_text(
            catalog, template=cfg.embed.text_template, max_chars=cfg.embed.max_text_chars
        ).collect()
    }
    model_id = encoder.base_model_id(cfg.embed)
    store.append(
        "item_embeddings",
        spark.createDataFrame(
            [(i, hashes[i], model_id, 12, v, DS) for i, v in vectors.items()],
            store.spec("item_embeddings").schema,
        ),
    )

    result = run_evaluate_protocols(RunContext(cfg=cfg, spark=spark, store=store, ds=DS))

    m = result.metrics
    assert m["test_users"] == 8
    # Popularity in train: i2, i3 (8) > i0, i1 (4) > rest (0). u0-u3 have left i0 first: hit;
    # u4-u7 get i1, then the zero-popularity items in the seeded tie order (i6 i4 i7 i5 i8
    # i9): i9 seventh, a miss at 1 and 5.
    assert m["popularity.hit_rate@1"] == pytest.approx(0.5)
    assert m["popularity.ndcg@5"] == pytest.approx(0.5)
    assert m["popularity.recall@5"] == pytest.approx(0.5)
    # Text puts each held-out item first: u0-u3 cosine 0.5 to i0 vs 0; u4-u7 0.69 to i9 vs 0.5 to i1.
    assert m["text_frozen.hit_rate@1"] == pytest.approx(1.0)
    assert m["text_frozen.map@5"] == pytest.approx(1.0)
    assert m["user_temporal.warm.text_frozen.map@5"] == pytest.approx(1.0)
    # The kernel's soft best match finds the same items: u0-u3's history item i1 (cosine 0.5
    # to i0), u4-u7's i0 (0.69 to i9, against 0.5 to their other candidate i1).
    assert m["text_frozen_kernel.hit_rate@1"] == pytest.approx(1.0)
    # The anchor is ranked only with evaluate.implicit_anchor, hybrid_no_slots only when the
    # hybrid has new-item slots, the Mult-VAE's two only with vae.enabled: none here; every
    # other model is.
    absent = (
        "implicit_als",
        "hybrid_no_slots",
        "vae",
        "hybrid_vae",
        "profile_text",  # cold_user only
        "text_encoder_tuned",  # contrastive.mode encoder only
    )
    assert not any(key.startswith(tuple(f"{model}." for model in absent)) for key in m)
    for model in set(MODEL_ORDER) - set(absent):
        for metric in ("precision", "recall", "f1", "ndcg", "map", "hit_rate"):
            for k in (1, 5):
                assert 0.0 <= m[f"{model}.{metric}@{k}"] <= 1.0
    report = result.artifacts["evaluation_report"]
    assert report == os.path.join(cfg.path(cfg.storage.reports_dir), f"evaluation-{DS}.html")
    page = Path(report).read_text(encoding="utf-8")
    assert "hybrid" in page and "text_finetuned" in page and "user_temporal" in page


@pytest.mark.spark
@pytest.mark.slow
def test_cold_user_ranks_users_without_history_by_their_profile_against_popularity(
    spark, store, tmp_path
):
    import hashlib

    from llmrec_spark.core import encoder
    from llmrec_spark.evaluation.evaluate import run_evaluate_protocols
    from llmrec_spark.runtime.context import RunContext
    from tests.conftest import make_config

    cfg = make_config(
        tmp_path,
        "evaluate.ks=[5]",
        "evaluate.bootstrap_samples=20",
        "evaluate.protocols=[cold_user]",
        "als.rank=4",
        "als.max_iter=2",
        "als.train_days=7",
        "profile.epochs=40",
        "profile.learning_rate=0.02",
        "profile.num_processes=1",
    )
    catalog = spark.createDataFrame(
        [(f"i{j}", f"Title {j}", "", "c", "", "true", "2026-11-01") for j in range(12)],
        store.spec("items").schema,
    )
    store.overwrite("items", catalog)
    # 40 users of two kinds: kind a (profile "likes a") buys i0-i4, kind b i5-i9, each user
    # four of the five; i10, i11 are bought by everyone (the popularity list's top).
    day = dt.datetime(2026, 11, 20, 9, 0, 0)
    rows, profiles = [], []
    for u in range(40):
        kind = u % 2
        group = [f"i{5 * kind + (u // 2 + k) % 5}" for k in range(4)] + ["i10", "i11"]
        for h, item in enumerate(group):
            t = day + dt.timedelta(hours=u * 10 + h)
            rows.append((f"e{u}-{h}", f"u{u}", item, "view", t, None, None, 4.0, DS, DS))
        profiles.append((f"u{u}", None, f"likes {'ab'[kind]}"))
    store.append("events_clean", spark.createDataFrame(rows, store.spec("events_clean").schema))
    store.overwrite(
        "user_profiles", spark.createDataFrame(profiles, store.spec("user_profiles").schema)
    )
    model_id = encoder.base_model_id(cfg.embed)
    store.append(
        "user_embeddings",
        spark.createDataFrame(
            [
                (
                    u,
                    hashlib.sha256(text.encode()).hexdigest(),
                    model_id,
                    12,
                    unit((0 if text.endswith("a") else 1, 1.0)),
                    DS,
                )
                for u, _, text in profiles
            ],
            store.spec("user_embeddings").schema,
        ),
    )

    result = run_evaluate_protocols(RunContext(cfg=cfg, spark=spark, store=store, ds=DS))

    m = result.metrics
    assert m["test_users"] == 8  # a fifth of the 40 users, their whole history held out
    assert {k.split(".")[2] for k in m if k.startswith("cold_user.")} == {
        "popularity",
        "profile_text",
    }
    # Popularity lists i10, i11 (everyone's) and then i0-i9 tied (16 users each) in the
    # seeded tie order: three of the ten, for either kind; the tower lists the user's own
    # kind after i10, i11 (an expected NDCG@5 of about 0.91 against 0.73).
    assert m["profile_text.ndcg@5"] > m["popularity.ndcg@5"] + 0.1
    assert m["profile_text.recall@5"] > m["popularity.recall@5"] + 0.1
    page = Path(result.artifacts["evaluation_report"]).read_text(encoding="utf-8")
    assert "cold_user" in page and "profile_text" in page


def test_one_standard_error_rule_picks_the_smallest_weight_close_to_the_best():
    w2, w5, w8 = Mix(0.2, 0.0), Mix(0.5, 0.0), Mix(0.8, 0.0)
    best = np.array([0.5, 0.3, 0.4, 0.2])  # mean 0.35
    # w=0.5 differs from the best by [-0.1, 0.02, 0, 0]: mean -0.02, SE 0.0542 / 2 = 0.027 -> in.
    close = best + np.array([-0.1, 0.02, 0.0, 0.0])
    # w=0.2 differs by [-0.2, -0.2, -0.2, 0.0]: mean -0.15, SE 0.1 / 2 = 0.05 -> out.
    far = best + np.array([-0.2, -0.2, -0.2, 0.0])
    scored = [(w2, far), (w5, close), (w8, best)]
    assert pick_trial(scored, one_standard_error=False) == (w8, pytest.approx(0.35))
    assert pick_trial(scored, one_standard_error=True) == (w5, pytest.approx(0.35))
    # Equal means: the first trial wins without the rule, the smallest weight with it.
    assert pick_trial([(w8, best), (w2, best)], one_standard_error=False)[0] == w8
    assert pick_trial([(w8, best), (w2, best)], one_standard_error=True)[0] == w2


def test_one_standard_error_rule_picks_the_largest_cold_offset_close_to_the_best():
    b0, b1, b2 = Mix(0.1, 0.0), Mix(0.1, 1.0), Mix(0.1, 2.0)
    best = np.array([0.5, 0.3, 0.4, 0.2])
    close = best + np.array([-0.1, 0.02, 0.0, 0.0])  # as above: within one SE
    far = best + np.array([-0.2, -0.2, -0.2, 0.0])  # out
    assert pick_trial([(b0, best), (b1, close), (b2, far)], one_standard_error=True)[0] == b1
    assert pick_trial([(b0, close), (b1, best), (b2, far)], one_standard_error=True)[0] == b1
    assert pick_trial([(b0, best), (b1, close), (b2, far)], one_standard_error=False)[0] == b0


def test_one_standard_error_rule_picks_the_trial_that_shows_new_items_most_when_measured():
    # Borrowed factors at offset 0 show more new items than an offset of 2 without them.
    b2, n30 = Mix(0.1, 2.0), Mix(0.1, 0.0, neighbour_factors=30)
    best = np.array([0.5, 0.3, 0.4, 0.2])
    close = best + np.array([-0.1, 0.02, 0.0, 0.0])  # within one SE, as above
    far = best + np.array([-0.2, -0.2, -0.2, 0.0])  # out
    assert pick_trial([(b2, best), (n30, close)], one_standard_error=True)[0] == b2
    picked = pick_trial([(b2, best), (n30, close)], one_standard_error=True, shown=[0.09, 0.16])
    assert picked[0] == n30
    # Not close enough, it loses however much it shows; without the rule the best mean wins.
    assert pick_trial([(b2, best), (n30, far)], one_standard_error=True, shown=[0.0, 0.9])[0] == b2
    assert pick_trial([(b2, best), (n30, close)], one_standard_error=False, shown=[0, 1])[0] == b2


@pytest.mark.spark
def test_development_part_holds_only_events_every_protocol_trains_on(spark):
    from types import SimpleNamespace

    from llmrec_spark.evaluation.refit import make_split
    from llmrec_spark.evaluation.validation import development_part

    rows = []
    for u in range(6):
        for j in range(8):  # c-items early, liked by 5 of the 6 users: cold candidates
            if (u + j) % 6 != 0:
                rows.append((f"u{u}", f"c{j}", ts(10 * j + u), 4.0))
        for h in range(6):  # w-items late, liked by 4 users each: never cold
            if (u + h) % 3:
                rows.append((f"u{u}", f"w{h}", ts(100 + 10 * h + u), 4.0))
    events = spark.createDataFrame(
        rows, "user_id string, item_id string, event_ts timestamp, weight double"
    )
    cfg = SimpleNamespace(
        test_fraction=0.2, positive_min_weight=2.0, cold_fraction=0.5, cold_min_positives=5, seed=3
    )
    protocols = ["user_temporal", "cold_item"]
    columns = ["user_id", "item_id", "event_ts", "weight"]

    dev = {tuple(r) for r in development_part(events, protocols, cfg).collect()}

    trains = [
        {tuple(r) for r in make_split(events, p, cfg, seed=3).train.select(*columns).collect()}
        for p in protocols
    ]
    assert dev == trains[0] & trains[1]
    # Each training part holds events the other protocol tests on; the development part none.
    ut_test = make_split(events, "user_temporal", cfg, seed=3).test.collect()
    cold = {r["item_id"] for r in make_split(events, "cold_item", cfg, seed=3).cold_items.collect()}
    assert cold and any(r[1] in cold for r in trains[0])
    assert not any(r[1] in cold for r in dev)
    assert any((r[0], r[1]) in {(t["user_id"], t["item_id"]) for t in ut_test} for r in trains[1])
    assert not {(r[0], r[1]) for r in dev} & {(t["user_id"], t["item_id"]) for t in ut_test}
    assert len(dev) < len(trains[0])
