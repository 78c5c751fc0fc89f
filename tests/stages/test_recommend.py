"""The recommend stage's Spark glue: block scoring on the executors and the driver, the user
frame, and the stage on a tiny lakehouse (gate, publish)."""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd
import pytest

from llmrec_spark.core.hybrid import ItemMatrices, Mix
from llmrec_spark.errors import GateError
from llmrec_spark.schema import SCORED_SCHEMA
from llmrec_spark.stages.recommend import score_block_frame, score_users, user_frame
from tests.core.test_hybrid import hand_items, reference_hybrid


def test_hybrid_excludes_ineligible_and_seen_items():
    frame = score_block_frame(
        pd.DataFrame(
            {"user_id": ["u0"], "als_features": [np.array([1.0])], "history": [np.array([4])]}
        ),
        hand_items(eligible=(True, True, False, True, True)),
        n=5,
        mix=Mix(0.5),
    )
    # c is unavailable, e seen. ALS over a, b: raw 1, 2 -> z -1, 1. Text over a, b, d:
    # cos 1, 0, 1 -> z 0.7071, -1.4142, 0.7071. a = -0.1464, b = -0.2071, d (cold) = 0.7071.
    assert frame["item_id"].tolist() == ["d", "a", "b"]
    assert frame["rank"].tolist() == [1, 2, 3]
    np.testing.assert_allclose(frame["score"], [0.707107, -0.146447, -0.207107], atol=1e-5)
    assert frame["source"].tolist() == ["text", "hybrid", "hybrid"]


def test_block_frame_gives_a_new_item_slot_to_a_plausible_new_item():
    users = pd.DataFrame(
        {"user_id": ["u0"], "als_features": [np.array([1.0])], "history": [np.array([4])]}
    )
    # d (new, text z-score 1) offset by -2 scores -1.0, fourth after c, a, b.
    slotted = Mix(0.5, cold_offset=-2.0, new_item_slots=1, new_item_min_z=0.5)
    frame = score_block_frame(users, hand_items(), n=3, mix=slotted)
    assert frame["item_id"].tolist() == ["c", "a", "d"]
    assert frame["rank"].tolist() == [1, 2, 3]
    assert frame["source"].tolist() == ["hybrid", "hybrid", "text"]
    np.testing.assert_allclose(frame["score"], [0.112372, -0.112372, -1.0], atol=1e-5)


USER_FRAME_SCHEMA = "user_id string, als_features array<float>, history array<int>"


def random_scoring_problem(
    rng: np.random.Generator, n_users: int, n_items: int
) -> tuple[ItemMatrices, list[tuple]]:
    """Items with some ALS/text vectors missing, and user_frame rows (every 7th user without a
    factor, every 5th without history, so u00 has neither)."""
    has_als = rng.random(n_items) > 0.2
    has_text = rng.random(n_items) > 0.1
    items = ItemMatrices(
        item_ids=np.array([f"i{j:02d}" for j in range(n_items)], dtype=object),
        eligible=rng.random(n_items) > 0.1,
        popularity=rng.integers(0, 100, n_items).astype(np.float32),
        categories=np.zeros(n_items, dtype=np.int32),
        als=rng.standard_normal((n_items, 4)).astype(np.float32) * has_als[:, None],
        has_als=has_als,
        text=(lambda t: t / np.linalg.norm(t, axis=1, keepdims=True))(
            rng.standard_normal((n_items, 6))
        ).astype(np.float32)
        * has_text[:, None],
        has_text=has_text,
    )
    rows = []
    for u in range(n_users):
        factor = None if u % 7 == 0 else rng.standard_normal(4).astype(np.float32).tolist()
        history = (
            None
            if u % 5 == 0
            else sorted(rng.choice(n_items, size=rng.integers(1, 8), replace=False).tolist())
        )
        rows.append((f"u{u:02d}", factor, history))
    return items, rows


@pytest.mark.spark
def test_spark_block_scoring_equals_brute_force(spark):
    n = 7
    items, rows = random_scoring_problem(np.random.default_rng(3), n_users=30, n_items=50)
    users = spark.createDataFrame(rows, USER_FRAME_SCHEMA)

    bc = spark.sparkContext.broadcast(items)
    # Three tasks, blocks of 4 users: scoring must not depend on how users are grouped.
    scored = score_users(users, bc, n=n, mix=Mix(0.3), block_size=4, partitions=3)
    got = scored.toPandas().sort_values(["user_id", "rank"])
    bc.unpersist()

    for user_id, factor, history in rows:
        expected = reference_hybrid(
            None if factor is None else np.array(factor, dtype=np.float32),
            history or [],
            items,
            n,
            0.3,
        )
        mine = got[got["user_id"] == user_id]
        assert mine["item_id"].tolist() == [items.item_ids[j] for j, _, _ in expected], user_id
        assert mine["rank"].tolist() == list(range(1, len(expected) + 1))
        np.testing.assert_allclose(mine["score"], [s for _, s, _ in expected], atol=1e-4)
        assert mine["source"].tolist() == [s for _, _, s in expected], user_id
    assert set(got["user_id"]) == {r[0] for r in rows}
    assert set(got.loc[got["user_id"] == "u00", "source"]) == {"popular"}  # no factor, no history


# ---------------------------------------------------------------------------------------
# The stage on a tiny lakehouse

DS = "2026-11-23"
TS = dt.datetime(2026, 11, 22, 12, 0, 0)
CATEGORIES = ["books"] * 4 + ["toys"] * 4 + ["games"] * 4


def write_lakehouse(spark, store, cfg):
    """12 items (i03 unavailable, i11 without ALS factor), users u1..u5 in the window, u6 older."""
    from llmrec_spark.core import encoder
    from llmrec_spark.stages import embed

    catalog = spark.createDataFrame(
        [
            (
                f"i{j:02d}",
                f"Title {j}",
                f"description {j}",
                CATEGORIES[j],
                "acme",
                "false" if j == 3 else "true",
                "2026-11-01",
            )
            for j in range(12)
        ],
        store.spec("items").schema,
    )
    store.overwrite("items", catalog)
    # (user, item, weight): popularity of eligible items in the window: i00 10, i01 8, i08 6, i09 4.
    history = [
        ("u1", "i00", 4.0),
        ("u1", "i04", 1.0),
        ("u2", "i00", 4.0),
        ("u2", "i01", 4.0),
        ("u3", "i01", 4.0),
        ("u3", "i08", 2.0),
        ("u4", "i08", 4.0),
        ("u4", "i09", 4.0),
        ("u5", "i00", 2.0),
        ("u5", "i10", 1.0),
    ]
    events = [
        (f"e{k}", u, i, "click", TS, None, None, w, "2026-11-22", "2026-11-22")
        for k, (u, i, w) in enumerate(history)
    ]
    events.append(
        (
            "old",
            "u6",
            "i02",
            "click",
            TS - dt.timedelta(days=30),
            None,
            None,
            50.0,
            "2026-10-23",
            "2026-10-23",
        )
    )
    store.append("events_clean", spark.createDataFrame(events, store.spec("events_clean").schema))

    rng = np.random.default_rng(5)
    factors = [(f"u{k}", rng.standard_normal(4).tolist(), "user", DS) for k in range(1, 6)]
    factors += [(f"i{j:02d}", rng.standard_normal(4).tolist(), "item", DS) for j in range(11)]
    store.overwrite(
        "als_factors",
        spark.createDataFrame(factors, store.spec("als_factors").schema),
        partitions={"ds": DS},
    )

    texts = embed.item_text(
        catalog, template=cfg.embed.text_template, max_chars=cfg.embed.max_text_chars
    )
    hashes = {r["item_id"]: r["text_hash"] for r in texts.collect()}
    model_id = encoder.base_model_id(cfg.embed)
    vectors = rng.standard_normal((12, 3))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    rows = [
        (f"i{j:02d}", hashes[f"i{j:02d}"], model_id, 3, vectors[j].tolist(), DS) for j in range(12)
    ]
    store.append(
        "item_embeddings", spark.createDataFrame(rows, store.spec("item_embeddings").schema)
    )
    return {(u, i) for u, i, _ in history}


def stage_config(tmp_path, *overrides):
    from tests.conftest import make_config

    return make_config(
        tmp_path,
        "als.train_days=7",
        "contrastive.enabled=false",
        "recommend.exclude_categories=[toys]",
        *overrides,
    )


@pytest.fixture(scope="module")
def lakehouse(spark, tmp_path_factory):
    """(store, seen pairs) of one tiny lakehouse shared by the stage tests of this module."""
    from llmrec_spark.io.tables import open_store

    root = tmp_path_factory.mktemp("recommend")
    store = open_store(spark, str(root / "lakehouse"), "embedded")
    return store, write_lakehouse(spark, store, stage_config(root))


@pytest.mark.spark
@pytest.mark.parametrize(
    ("driver_max_cells", "path"), [(0, "executors"), (50_000_000, "driver")], ids=["exec", "drv"]
)
def test_run_recommend_publishes_gated_lists(
    spark, lakehouse, tmp_path, caplog, driver_max_cells, path
):
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages.recommend import run_recommend

    store, seen = lakehouse
    cfg = stage_config(
        tmp_path, "recommend.top_n=3", f"recommend.driver_max_cells={driver_max_cells}"
    )

    with caplog.at_level(logging.INFO, logger="llmrec_spark.stages.recommend"):
        result = run_recommend(RunContext(cfg=cfg, spark=spark, store=store, ds=DS))

    assert f"scored (on the {path}) and gated 6 users" in caplog.text

    recs = (
        store.read("recommendations", where={"ds": DS}).toPandas().sort_values(["user_id", "rank"])
    )
    assert sorted(recs["user_id"].unique()) == ["u1", "u2", "u3", "u4", "u5", "u6"]
    assert recs.groupby("user_id")["rank"].apply(list).tolist() == [[1, 2, 3]] * 6
    assert not {(u, i) for u, i in zip(recs["user_id"], recs["item_id"], strict=True)} & seen
    assert not set(recs["item_id"]) & {"i03", "i04", "i05", "i06", "i07"}  # unavailable, toys
    # u6's only event is outside the 7-day window: popularity over the window, i00 > i01 > i08.
    u6 = recs[recs["user_id"] == "u6"]
    assert u6["item_id"].tolist() == ["i00", "i01", "i08"]
    assert u6["score"].tolist() == [10.0, 8.0, 6.0]
    assert set(u6["source"]) == {"popular"}
    warm = recs[recs["user_id"] != "u6"]
    assert set(warm.loc[warm["item_id"] == "i11", "source"]) <= {"text"}  # cold item
    assert set(warm.loc[warm["item_id"] != "i11", "source"]) == {"hybrid"}
    for _, group in recs.groupby("user_id"):
        assert group["score"].is_monotonic_decreasing
    assert set(recs["model_version"]) == {"local"}

    assert result.rows_out == 18
    assert result.summary["users"] == 6
    assert result.summary["share_by_source"]["popular"] == pytest.approx(3 / 18, abs=1e-4)
    samples = result.summary["samples"]
    assert len(samples) == 3
    assert "u6" in [s["user_id"] for s in samples]  # one sample per top-1 source first
    first = samples[0]
    assert [i["rank"] for i in first["items"]] == [1, 2, 3]
    assert all(i["title"] == f"Title {int(i['item_id'][1:])}" for i in first["items"])


@pytest.mark.spark
@pytest.mark.parametrize("driver_max_cells", [0, 50_000_000], ids=["exec", "drv"])
def test_new_item_slots_publish_the_plausible_new_item_last(
    spark, lakehouse, tmp_path, driver_max_cells
):
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages.recommend import run_recommend

    store, _ = lakehouse
    # i11 is the one new item. Without slots and offset, every warm user's top 3 holds it at
    # its text z-score: u1 0.70, u2 0.57, u3 1.19, u4 1.42, u5 0.82 (u3: i11, i10, i09; u4:
    # i11, i00, i10). An offset of -5 pushes it out; two slots with z >= 1 bring it back
    # last for u3 and u4 only (one new item: fewer plausible than slots).
    cfg = stage_config(
        tmp_path,
        "recommend.top_n=3",
        f"recommend.driver_max_cells={driver_max_cells}",
        "recommend.cold_offset=-5.0",
        "recommend.new_item_slots=2",
        "recommend.new_item_min_z=1.0",
    )

    run_recommend(RunContext(cfg=cfg, spark=spark, store=store, ds=DS))

    recs = (
        store.read("recommendations", where={"ds": DS}).toPandas().sort_values(["user_id", "rank"])
    )
    lists = recs.groupby("user_id")["item_id"].apply(list).to_dict()
    assert lists["u3"] == ["i10", "i09", "i11"]
    assert lists["u4"] == ["i00", "i10", "i11"]
    new = recs[recs["item_id"] == "i11"]
    assert new["user_id"].tolist() == ["u3", "u4"]
    assert new["source"].tolist() == ["text", "text"]
    np.testing.assert_allclose(new["score"], [1.18707 - 5.0, 1.421243 - 5.0], atol=1e-4)
    # Below the threshold, the known items keep their order; u6 (no text vector) popularity.
    assert [lists[u][:2] for u in ("u1", "u2", "u5")] == [
        ["i02", "i08"],
        ["i10", "i08"],
        ["i01", "i08"],
    ]
    assert lists["u6"] == ["i00", "i01", "i08"]
    for _, group in recs.groupby("user_id"):
        assert group["score"].is_monotonic_decreasing


@pytest.mark.spark
def test_gate_failure_raises_and_keeps_the_previous_version(spark, lakehouse, tmp_path):
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages.recommend import run_recommend

    store, _ = lakehouse
    cfg = stage_config(tmp_path, "recommend.top_n=10")  # only 7 eligible items exist
    previous = spark.createDataFrame(
        [("u1", 1, "i00", 1.0, "als", "old-run", DS)], store.spec("recommendations").schema
    )
    version = store.overwrite("recommendations", previous, partitions={"ds": DS})

    with pytest.raises(GateError, match=r"short_lists.*6 users with fewer than 10 distinct items"):
        run_recommend(RunContext(cfg=cfg, spark=spark, store=store, ds=DS))

    assert store.version("recommendations") == version
    rows = store.read("recommendations").collect()
    assert [(r["user_id"], r["item_id"], r["model_version"]) for r in rows] == [
        ("u1", "i00", "old-run")
    ]


def uses_python_workers(frame) -> bool:
    return "MapInPandas" in frame._jdf.queryExecution().optimizedPlan().toString()


@pytest.mark.spark
def test_driver_path_returns_the_executor_rows_in_the_driver(spark):
    from llmrec_spark.stages.recommend import empty_scored_rows, score_on_driver

    items, rows = random_scoring_problem(np.random.default_rng(8), n_users=30, n_items=50)
    users = spark.createDataFrame(rows, USER_FRAME_SCHEMA)
    bc = spark.sparkContext.broadcast(items)
    order = ["user_id", "rank"]

    # All users in one block on both paths (one task, as for <= user_block_size users).
    on_executors = score_users(users, bc, n=7, mix=Mix(0.3), block_size=64, partitions=1)
    on_driver = score_on_driver(users, items, n=7, mix=Mix(0.3), block_size=64)

    assert uses_python_workers(on_executors)
    assert isinstance(on_driver, pd.DataFrame)
    assert list(on_driver.columns) == [f.name for f in SCORED_SCHEMA.fields]
    assert on_driver.dtypes.to_dict() == empty_scored_rows().dtypes.to_dict()
    # The same function over the same block of users: the same rows, scores to the bit.
    expected = on_executors.toPandas().sort_values(order, ignore_index=True)
    got = on_driver.sort_values(order, ignore_index=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, rtol=0.0, atol=0.0)
    assert len(got) == 30 * 7
    assert set(got.loc[got["user_id"] == "u00", "source"]) == {"popular"}

    # Blocks of 4 over three tasks vs blocks of 4 in collection order: BLAS rounds a user's
    # scores by its place in the block, so the lists are the same and scores agree to float32.
    blocked = score_on_driver(users, items, n=7, mix=Mix(0.3), block_size=4)
    tasks = score_users(users, bc, n=7, mix=Mix(0.3), block_size=4, partitions=3)
    pd.testing.assert_frame_equal(
        blocked.sort_values(order, ignore_index=True),
        tasks.toPandas().sort_values(order, ignore_index=True),
        check_dtype=False,
        rtol=1e-6,
    )

    none = score_on_driver(users.limit(0), items, n=7, mix=Mix(0.3))
    assert none.empty
    assert none.dtypes.to_dict() == empty_scored_rows().dtypes.to_dict()
    bc.unpersist()


def test_scoring_path_is_driver_up_to_the_threshold_and_never_at_zero():
    from llmrec_spark.stages.recommend import scoring_path

    assert scoring_path(943, 1_682, 50_000_000) == "driver"  # MovieLens-100K: 1.6M cells
    assert scoring_path(50_000, 20_000, 50_000_000) == "executors"  # 1e9 cells
    assert scoring_path(1_000, 50, 50_000) == "driver"  # at the threshold itself
    assert scoring_path(1_000, 51, 50_000) == "executors"
    assert scoring_path(943, 1_682, 0) == "executors"  # 0 switches the driver path off
    assert scoring_path(0, 1_682, 0) == "executors"


def test_scoring_partitions_two_per_core_at_most_one_per_block():
    from llmrec_spark.stages.recommend import scoring_partitions

    assert scoring_partitions(50_000, 2048, 2) == 4  # 25 blocks, 2 cores
    assert scoring_partitions(943, 2048, 2) == 1  # one block: one task
    assert scoring_partitions(10_000, 1000, 16) == 10  # fewer blocks than 2 x 16 cores
    assert scoring_partitions(0, 2048, 8) == 1


@pytest.mark.spark
def test_user_frame_history_is_oldest_last_touch_first(spark):
    at = dt.datetime(2026, 11, 20)
    events = spark.createDataFrame(
        [
            ("u1", "b", at),
            ("u1", "a", at + dt.timedelta(hours=2)),
            ("u1", "b", at + dt.timedelta(hours=3)),  # b touched again: now the newest
            ("u2", "b", at),
            ("u2", "a", at + dt.timedelta(hours=5)),
            ("u2", "z", at),  # not in the item index
        ],
        "user_id string, item_id string, event_ts timestamp",
    )
    index = spark.createDataFrame([("a", 0), ("b", 1)], "item_id string, item_idx int")
    users = spark.createDataFrame([("u1",), ("u2",), ("u3",)], "user_id string")
    rows = {
        r.user_id: r.history
        for r in user_frame(users, history=events, item_index=index, user_factors=None).collect()
    }
    assert rows == {"u1": [0, 1], "u2": [1, 0], "u3": None}


def test_aligned_text_puts_unit_rows_in_the_items_order_and_zeros_where_none():
    from llmrec_spark.stages.recommend import aligned_text

    embeddings = pd.DataFrame(
        {"item_id": ["b", "a", "z"], "embedding": [[0.0, 2.0], [3.0, 4.0], [1.0, 0.0]]}
    )
    text = aligned_text(np.array(["a", "b", "c"], dtype=object), embeddings)
    # "a" scaled to unit length, "b" as it is, "c" has none; "z" is not an item here.
    np.testing.assert_allclose(text, [[0.6, 0.8], [0.0, 1.0], [0.0, 0.0]])
    assert aligned_text(np.array(["c"], dtype=object), embeddings) is None
