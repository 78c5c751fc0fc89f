"""Top-N scoring: selection against a full sort, hybrid calibration, Spark blocks, gate, stage."""

from __future__ import annotations

import datetime as dt
import logging

import numpy as np
import pandas as pd
import pytest

from llmrec_spark.errors import GateError
from llmrec_spark.stages.recommend import (
    SCORED_SCHEMA,
    SOURCES,
    ItemMatrices,
    Mix,
    history_kernel_scores,
    history_vectors,
    hybrid_scores,
    hybrid_top_n,
    neighbour_factors,
    score_block_frame,
    score_users,
    select_top_n,
    top_n_block,
    user_frame,
)


def full_sort_top(scores: np.ndarray, n: int) -> np.ndarray:
    """Reference: every item sorted by (-score, index), first n."""
    return np.array(
        [sorted(range(scores.shape[1]), key=lambda j: (-row[j], j))[:n] for row in scores]
    )


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_top_n_block_equals_full_sort_with_ties_exclusions_and_bias(backend):
    rng = np.random.default_rng(11)
    # Small integer vectors: many exactly equal scores, so ties at the cut are common.
    users = rng.integers(-2, 3, size=(40, 3)).astype(np.float32)
    items = rng.integers(-2, 3, size=(200, 3)).astype(np.float32)
    bias = rng.integers(0, 2, size=200).astype(np.float32)
    exclude = [rng.choice(200, size=rng.integers(0, 30), replace=False) for _ in range(40)]

    indices, scores = top_n_block(users, items, 15, exclude, bias, backend=backend)

    expected_scores = users @ items.T + bias
    for u, seen in enumerate(exclude):
        expected_scores[u, seen] = -np.inf
    expected = full_sort_top(expected_scores, 15)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, np.take_along_axis(expected_scores, expected, axis=1))
    assert not any(set(indices[u]) & set(seen) for u, seen in enumerate(exclude))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_top_n_block_all_tied_row_takes_lowest_indices_and_n_beyond_items(backend):
    users = np.array([[0.0], [1.0]], dtype=np.float32)
    items = np.array([[3.0], [1.0], [3.0], [2.0]], dtype=np.float32)

    indices, scores = top_n_block(users, items, 2, [np.array([0]), np.array([0])], backend=backend)
    # user 0 scores 0 everywhere; item 0 excluded -> items 1, 2 (lowest indices of the tie).
    np.testing.assert_array_equal(indices, [[1, 2], [2, 3]])
    np.testing.assert_array_equal(scores, [[0.0, 0.0], [3.0, 2.0]])

    indices, scores = top_n_block(users[1:], items, 10, [np.array([1, 2])], backend=backend)
    # n is capped at the catalog; excluded items trail at -inf, by index.
    np.testing.assert_array_equal(indices, [[0, 3, 1, 2]])
    np.testing.assert_array_equal(scores, [[3.0, 2.0, -np.inf, -np.inf]])


def test_select_top_n_caps_items_per_category():
    scores = np.array([[9.0, 8.0, 7.0, 6.0, 5.0, 4.0]], dtype=np.float32)
    categories = np.array([0, 0, 0, 1, 1, 2], dtype=np.int32)

    indices, values = select_top_n(scores, 4, categories=categories, max_per_category=2)

    np.testing.assert_array_equal(indices, [[0, 1, 3, 4]])
    np.testing.assert_array_equal(values, [[9.0, 8.0, 6.0, 5.0]])
    # Cap 1: only three categories exist, so the fourth slot stays empty (-inf).
    indices, values = select_top_n(scores, 4, categories=categories, max_per_category=1)
    np.testing.assert_array_equal(indices[0, :3], [0, 3, 5])
    assert values[0, 3] == -np.inf


def hand_items(eligible=(True, True, True, True, True)) -> ItemMatrices:
    """Five items; item 3 has no ALS factor (cold), item 4 is the history item of user 0."""
    return ItemMatrices(
        item_ids=np.array(["a", "b", "c", "d", "e"], dtype=object),
        eligible=np.array(eligible),
        popularity=np.array([5, 1, 3, 0, 9], dtype=np.float32),
        categories=np.zeros(5, dtype=np.int32),
        als=np.array([[1], [2], [3], [0], [0]], dtype=np.float32),
        has_als=np.array([True, True, True, False, True]),
        text=np.array([[1, 0], [0, 1], [0, 1], [1, 0], [1, 0]], dtype=np.float32),
        has_text=np.ones(5, dtype=bool),
    )


def test_hybrid_calibrates_each_source_per_user_and_falls_back_to_popularity():
    indices, scores, codes = hybrid_top_n(
        np.array([[1.0], [0.0]], dtype=np.float32),
        np.array([True, False]),
        [np.array([4]), np.array([], dtype=np.int64)],
        hand_items(),
        n=4,
        mix=Mix(0.5),
    )
    # User 0: ALS raw 1, 2, 3 on a, b, c -> z -1.2247, 0, 1.2247; text cos 1, 0, 0, 1 on
    # a, b, c, d -> z 1, -1, -1, 1. Hybrid = 0.5 * als_z + 0.5 * text_z; d is cold (text only).
    np.testing.assert_array_equal(indices[0], [3, 2, 0, 1])
    np.testing.assert_allclose(scores[0], [1.0, 0.112372, -0.112372, -0.5], atol=1e-5)
    assert [("hybrid", "als", "text", "popular")[c] for c in codes[0]] == [
        "text",
        "hybrid",
        "hybrid",
        "hybrid",
    ]
    # User 1 has neither a factor nor a history: popularity 9, 5, 3, 1 over e, a, c, b.
    np.testing.assert_array_equal(indices[1], [4, 0, 2, 1])
    np.testing.assert_array_equal(scores[1], [9.0, 5.0, 3.0, 1.0])
    assert set(codes[1]) == {3}


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


def reference_hybrid(
    user_als, history, items: ItemMatrices, n: int, w: float, r: float = 0.0, hr: float = 0.0
):
    """Brute-force hybrid for one user with loops and a full sort: [(item_idx, score, source)].

    History is oldest first; with r > 0 the collaborative score is (1 - r) * als_z + r * the
    z-score of unit ALS factors against their 0.5 ** (age / hr)-weighted mean over the history.
    """
    candidates = [j for j in range(items.size) if items.eligible[j] and j not in set(history)]
    user_recent = None
    if r > 0:
        unit = {j: items.als[j] / np.linalg.norm(items.als[j]) for j in history if items.has_als[j]}
        ages = {j: len(history) - 1 - k for k, j in enumerate(history)}
        if unit:
            weights = {j: 0.5 ** (ages[j] / hr) if hr > 0 else 1.0 for j in unit}
            mean = sum(weights[j] * unit[j] for j in unit)
            user_recent = mean / np.linalg.norm(mean)
    text_hist = [j for j in history if items.has_text[j]]
    user_text = None
    if text_hist:
        mean = np.mean([items.text[j] for j in text_hist], axis=0)
        user_text = mean / np.linalg.norm(mean)

    def zs(values: dict[int, float]) -> dict[int, float]:
        arr = np.array(list(values.values()), dtype=np.float64)
        mu, sd = arr.mean(), arr.std() or 1.0
        return {j: (v - mu) / sd for j, v in values.items()}

    als_z = (
        zs({j: float(user_als @ items.als[j]) for j in candidates if items.has_als[j]})
        if user_als is not None
        else {}
    )
    recent_z = (
        zs(
            {
                j: float(user_recent @ (items.als[j] / np.linalg.norm(items.als[j])))
                for j in candidates
                if items.has_als[j]
            }
        )
        if user_recent is not None
        else {}
    )
    if als_z and recent_z:
        als_z = {j: (1 - r) * als_z[j] + r * recent_z[j] for j in als_z}
    elif recent_z:
        als_z = recent_z
    text_z = (
        zs({j: float(user_text @ items.text[j]) for j in candidates if items.has_text[j]})
        if user_text is not None
        else {}
    )
    scored = []
    for j in candidates:
        if j in als_z and j in text_z:
            scored.append((j, (1 - w) * als_z[j] + w * text_z[j], "hybrid"))
        elif j in als_z:
            scored.append((j, als_z[j], "als"))
        elif j in text_z:
            scored.append((j, text_z[j], "text"))
        elif not als_z and user_text is None:
            scored.append((j, float(items.popularity[j]), "popular"))
    return sorted(scored, key=lambda t: (-t[1], t[0]))[:n]


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


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_prefiltered_selection_equals_full_sort_with_ties_and_degenerate_rows(backend):
    from llmrec_spark.stages.recommend import _PREFILTER_ITEMS_PER_N

    rng = np.random.default_rng(23)
    n_items, n = 1000, 10
    assert n_items >= _PREFILTER_ITEMS_PER_N * n  # the bound prefilter path, not the partial sort
    users = rng.integers(-2, 3, size=(60, 3)).astype(np.float32)
    items = rng.integers(-2, 3, size=(n_items, 3)).astype(np.float32)
    exclude = [rng.choice(n_items, size=rng.integers(0, 300), replace=False) for _ in range(60)]
    # User 0 has only items 996..999 left, scoring 1, 2, 2, -1: a tie, then -inf by index.
    exclude[0] = np.arange(n_items - 4)
    users[0] = [1.0, 0.0, 0.0]
    items[996:, 0] = [1.0, 2.0, 2.0, -1.0]
    users[1] = 0.0  # every score tied at 0: the lowest indices win

    indices, scores = top_n_block(users, items, n, exclude, backend=backend)

    expected_scores = users @ items.T
    for u, seen in enumerate(exclude):
        expected_scores[u, seen] = -np.inf
    expected = full_sort_top(expected_scores, n)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, np.take_along_axis(expected_scores, expected, axis=1))
    np.testing.assert_array_equal(indices[0], [997, 998, 996, 999, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(scores[0, :5], [2.0, 2.0, 1.0, -1.0, -np.inf])
    np.testing.assert_array_equal(indices[1], np.arange(10))


@pytest.mark.parametrize(("recent_weight", "recent_half_life"), [(0.0, 0.0), (0.4, 2.0)])
def test_hybrid_on_a_large_catalog_equals_brute_force(recent_weight, recent_half_life):
    # 400 items and n=5: selection takes the bound prefilter; mixed cold/warm items and users.
    rng = np.random.default_rng(8)
    n_items, n = 400, 5
    has_als = rng.random(n_items) > 0.3
    has_text = rng.random(n_items) > 0.2
    text = rng.standard_normal((n_items, 6))
    items = ItemMatrices(
        item_ids=np.array([f"i{j:03d}" for j in range(n_items)], dtype=object),
        eligible=rng.random(n_items) > 0.1,
        popularity=rng.integers(0, 50, n_items).astype(np.float32),
        categories=np.zeros(n_items, dtype=np.int32),
        als=(rng.standard_normal((n_items, 4)) * has_als[:, None]).astype(np.float32),
        has_als=has_als,
        text=(text / np.linalg.norm(text, axis=1, keepdims=True) * has_text[:, None]).astype(
            np.float32
        ),
        has_text=has_text,
    )
    user_als = rng.standard_normal((24, 4)).astype(np.float32)
    user_has_als = np.arange(24) % 3 != 0
    histories = [  # oldest first: a random order, so the recency weights matter
        np.array([], dtype=np.int64)
        if u % 4 == 0
        else rng.choice(n_items, size=rng.integers(1, 40), replace=False)
        for u in range(24)
    ]
    mix = Mix(0.3, recent_weight=recent_weight, recent_half_life=recent_half_life)

    indices, scores, codes = hybrid_top_n(user_als, user_has_als, histories, items, n=n, mix=mix)

    for u in range(24):
        expected = reference_hybrid(
            user_als[u] if user_has_als[u] else None,
            histories[u].tolist(),
            items,
            n,
            0.3,
            recent_weight,
            recent_half_life,
        )
        assert indices[u].tolist() == [j for j, _, _ in expected], u
        np.testing.assert_allclose(scores[u], [s for _, s, _ in expected], atol=1e-4)
        assert [SOURCES[c] for c in codes[u]] == [s for _, _, s in expected], u
    assert {SOURCES[c] for c in codes[0]} == {"popular"}  # no factor, no history


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


def test_user_text_vector_weighs_recent_history_items_by_half_life():
    text = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], dtype=np.float32)
    has_text = np.array([True, True, False])
    histories = [np.array([0, 1]), np.array([0, 2, 1]), np.array([2]), np.array([], dtype=np.int64)]
    plain, has = history_vectors(histories, text, has_text)
    np.testing.assert_allclose(plain[0], [0.70711, 0.70711], atol=1e-5)
    # Half-life 1: the newest item weighs 1, the one before 0.5, two before 0.25. Item 2 has
    # no text but still ages the items before it.
    recent, has = history_vectors(histories, text, has_text, half_life=1.0)
    np.testing.assert_allclose(recent[0], [0.5, 1.0] / np.hypot(0.5, 1.0), atol=1e-5)
    np.testing.assert_allclose(recent[1], [0.25, 1.0] / np.hypot(0.25, 1.0), atol=1e-5)
    assert has.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(recent[2:], 0.0)


def test_history_kernel_scores_are_a_soft_best_match_of_the_history():
    text = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]], dtype=np.float32)
    has_text = np.array([True, True, True, False])
    histories = [np.array([0, 1]), np.array([3]), np.array([1, 3, 0]), np.array([], np.int64)]
    columns = np.array([2, 0])
    scores, has = history_kernel_scores(histories, text, has_text, columns, kernel=0.1)
    assert has.tolist() == [True, False, True, False]
    # User 0 against item 2: cosines 0.6 (item 0) and 0.8 (item 1) -> 0.1 * log of the mean of
    # exp(6) and exp(8); against item 0: cosines 1 and 0.
    expected = [0.1 * np.log((np.exp(6) + np.exp(8)) / 2), 0.1 * np.log((np.exp(10) + 1) / 2)]
    np.testing.assert_allclose(scores[0], expected, rtol=1e-5)
    # Item 3 has no text: user 1 has no match and user 2's history is items 1 and 0.
    np.testing.assert_array_equal(scores[1], 0.0)
    np.testing.assert_allclose(scores[2], scores[0], rtol=1e-6)
    # The limits: a narrow kernel is the best cosine, a wide one the mean cosine.
    narrow, _ = history_kernel_scores(histories, text, has_text, columns, kernel=1e-3)
    np.testing.assert_allclose(narrow[0], [0.8, 1.0], atol=2e-3)
    wide, _ = history_kernel_scores(histories, text, has_text, columns, kernel=1e3)
    np.testing.assert_allclose(wide[0], [0.7, 0.5], atol=1e-3)
    # A narrow kernel far below every cosine but the best stays finite (shifted by the best).
    far = np.array([[1.0, 0.0]] + [[-0.3, np.sqrt(0.91)]] * 150, dtype=np.float32)
    tight, _ = history_kernel_scores([np.arange(151)], far, np.ones(151, bool), [0], kernel=0.01)
    np.testing.assert_allclose(tight[0, 0], 1.0 + 0.01 * np.log(1 / 151), rtol=1e-5)
    # Blocks of one history item at a time give the same scores.
    blocked, _ = history_kernel_scores(histories, text, has_text, columns, kernel=0.1, max_cells=1)
    np.testing.assert_allclose(blocked, scores, rtol=1e-6)
    with pytest.raises(ValueError, match="kernel must be positive"):
        history_kernel_scores(histories, text, has_text, columns, kernel=0.0)


def test_text_kernel_rescores_only_the_text_only_items():
    """Item 2 is closest to the user's mean vector, item 3 to one of their history items."""
    text = np.array([[1, 0], [0, 1], [1, 1], [1, 0.05], [0, 1]], dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)

    def items(has_als):
        return ItemMatrices(
            item_ids=np.array(["a", "b", "c", "d", "e"], dtype=object),
            eligible=np.ones(5, dtype=bool),
            popularity=np.zeros(5, dtype=np.float32),
            categories=np.zeros(5, dtype=np.int32),
            als=np.array([[1], [2], [0], [3], [0]], dtype=np.float32),
            has_als=np.array(has_als),
            text=text,
            has_text=np.ones(5, dtype=bool),
        )

    user = (np.array([[1.0]], dtype=np.float32), np.array([True]), [np.array([0, 4])])
    two_new = items([True, True, False, False, False])
    mean, _, _ = hybrid_scores(*user, two_new, mix=Mix(0.5, cold_offset=0.25))
    kernel, _, _ = hybrid_scores(*user, two_new, mix=Mix(0.5, cold_offset=0.25, text_kernel=0.1))
    # Items with an ALS factor keep their score; seen items 0 and 4 stay out.
    np.testing.assert_array_equal(kernel[0, [0, 1, 4]], mean[0, [0, 1, 4]])
    assert np.isneginf(kernel[0, [0, 4]]).all()
    # By hand: each unseen text item's cosines to the history items 0 and 4, soft-maxed with
    # kernel 0.1, z-scored over those unseen text items (1, 2, 3), plus the offset.
    cosines = text[[1, 2, 3]] @ text[[0, 4]].T  # (3, 2)
    soft = 0.1 * np.log(np.exp(cosines / 0.1).mean(axis=1))
    z = (soft - soft.mean()) / soft.std()
    np.testing.assert_allclose(kernel[0, [2, 3]], z[1:] + 0.25, atol=1e-5)
    # The mean vector (cosine 1 to item 2) puts c before d; the kernel finds d's near twin in
    # the history (item 0) and puts d first.
    assert mean[0, 2] > mean[0, 3] and kernel[0, 3] > kernel[0, 2]
    # A lone new item is z-scored against the other text items, not against itself: item 2,
    # the weakest match, stays below the average text item instead of at 0.
    one_new = items([True, True, False, True, False])
    alone, _, _ = hybrid_scores(*user, one_new, mix=Mix(0.5, text_kernel=0.1))
    np.testing.assert_allclose(alone[0, 2], z[1], atol=1e-5)
    assert alone[0, 2] < 0


def test_neighbour_factors_are_the_softmax_weighted_factors_of_the_closest_known_items():
    # Items 0-2 are known (factors), 3 and 4 are new; item 5 has a factor but no text.
    text = np.array([[1, 0], [0.8, 0.6], [0, 1], [0.6, 0.8], [-1, 0], [0, 0]], dtype=np.float32)
    als = np.array([[1, 0], [0, 2], [3, 3], [0, 0], [0, 0], [9, 9]], dtype=np.float32)
    has_als = np.array([True, True, True, False, False, True])
    has_text = np.array([True, True, True, True, True, False])
    out, borrowed = neighbour_factors(als, has_als, text, has_text, k=2, temperature=0.5)
    np.testing.assert_array_equal(borrowed, [False, False, False, True, True, False])
    np.testing.assert_array_equal(out[:3], als[:3])  # known rows as given
    np.testing.assert_array_equal(out[5], als[5])
    # Item 3: cosines 0.6, 0.96, 0.8 -> the two closest are items 1 (0.96) and 2 (0.8),
    # weights softmax([0.96, 0.8] / 0.5) = [0.5793, 0.4207].
    w1 = np.exp(0.96 / 0.5) / (np.exp(0.96 / 0.5) + np.exp(0.8 / 0.5))
    np.testing.assert_allclose(out[3], w1 * als[1] + (1 - w1) * als[2], atol=1e-5)
    # Item 4: cosines -1, -0.8, 0 -> items 2 (0) and 1 (-0.8); the donor without text (5) never.
    w2 = np.exp(0.0 / 0.5) / (np.exp(0.0 / 0.5) + np.exp(-0.8 / 0.5))
    np.testing.assert_allclose(out[4], w2 * als[2] + (1 - w2) * als[1], atol=1e-5)
    # k beyond the donors takes them all; a cold temperature is the nearest donor's factor.
    everyone, _ = neighbour_factors(als, has_als, text, has_text, k=50, temperature=1e-3)
    np.testing.assert_allclose(everyone[3], als[1], atol=1e-5)
    # One block per item gives the same rows; k = 0 or no donor borrows nothing.
    blocked, _ = neighbour_factors(als, has_als, text, has_text, k=2, temperature=0.5, block=1)
    np.testing.assert_allclose(blocked, out, atol=1e-6)
    for k, known in ((0, has_als), (2, np.zeros(6, dtype=bool))):
        same, none = neighbour_factors(als, known, text, has_text, k=k, temperature=0.5)
        assert same is als and not none.any()


def test_items_with_borrowed_factors_are_scored_as_known_items_plus_the_cold_offset():
    text = np.array([[1, 0], [0, 1], [0.9, 0.1], [0.1, 0.9]], dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    items = ItemMatrices(
        item_ids=np.array(["a", "b", "c", "d"], dtype=object),
        eligible=np.ones(4, dtype=bool),
        popularity=np.zeros(4, dtype=np.float32),
        categories=np.zeros(4, dtype=np.int32),
        als=np.array([[2, 0], [0, 1], [0, 0], [0, 0]], dtype=np.float32),
        has_als=np.array([True, True, False, False]),
        text=text,
        has_text=np.ones(4, dtype=bool),
    )
    user = (np.array([[1.0, 0.0]], dtype=np.float32), np.array([True]), [np.zeros(0, np.int64)])
    mix = Mix(0.0, cold_offset=0.5, neighbour_factors=1, neighbour_temperature=0.1)
    scores, _, _ = hybrid_scores(*user, items, mix=mix)
    # k = 1: c borrows a's factor (2, 0), d borrows b's (0, 1). ALS scores 2, 0, 2, 0 over
    # the four candidates: mean 1, std 1 -> z 1, -1, 1, -1; the new items add the offset.
    np.testing.assert_allclose(scores[0], [1.0, -1.0, 1.5, -0.5], atol=1e-5)
    # Off, the new items are scored by text alone (z over the 4 text cosines) plus the offset.
    text_only, _, _ = hybrid_scores(*user, items, mix=Mix(0.0, cold_offset=0.5))
    np.testing.assert_allclose(text_only[0, :2], [1.0, -1.0], atol=1e-5)  # ALS z over a, b
    assert items.borrowed is None  # the caller's matrices are not changed
    again = items.with_neighbour_factors(1, 0.1)
    assert again is items.with_neighbour_factors(1, 0.1)  # computed once per (k, temperature)
    np.testing.assert_array_equal(again.borrowed, [False, False, True, True])
    # Published, a new item keeps source "text" (its text placed it), though this user has
    # no text vector of their own; the known items are "als".
    indices, _, codes = hybrid_top_n(*user, items, n=4, mix=mix)
    assert indices[0].tolist() == [2, 0, 3, 1]
    assert [SOURCES[c] for c in codes[0]] == ["text", "als", "text", "als"]


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
