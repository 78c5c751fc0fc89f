"""contrastive.mode encoder as a stage: the tuned encoder, its embeddings, incremental reruns."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from pyspark.sql import functions as F
from safetensors.torch import load_file

from llmrec_spark.stages.tower_training import HEAD_WEIGHTS
from tests.stages.test_contrastive import _stage_tables

DS = "2026-11-23"


def _encoder_cfg(cfg):
    contrastive = dataclasses.replace(
        cfg.contrastive,
        mode="encoder",
        num_processes=1,
        hidden_dim=16,
        out_dim=8,
        members=1,
        epochs=2,
        encoder_num_negatives=4,
        encoder_batch_size=8,
        encoder_max_steps=2,
        encoder_max_length=16,
        encoder_max_history=3,
    )
    return dataclasses.replace(
        cfg,
        contrastive=contrastive,
        profile=dataclasses.replace(cfg.profile, enabled=False),
        # Every event trains here (the nightly's holdout users would lose their last ones).
        evaluate=dataclasses.replace(cfg.evaluate, holdout_fraction=0.0),
    )


@pytest.mark.spark
@pytest.mark.slow
def test_encoder_mode_embeds_every_item_with_the_tuned_encoder_and_reruns_only_what_changed(
    spark, cfg, store
):
    from llmrec_spark.core.encoder import resolve_model
    from llmrec_spark.core.encoder_tuning import make_tuned_encoder
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.schema import CATALOG
    from llmrec_spark.stages.contrastive import run_train_contrastive, tuned_model_id
    from llmrec_spark.stages.embed import item_text
    from llmrec_spark.stages.recommend import embedding_frame

    cfg = _encoder_cfg(cfg)
    base_id, _ = _stage_tables(spark, store, cfg, DS)
    ctx = RunContext(cfg=cfg, spark=spark, store=store, ds=DS)

    result = run_train_contrastive(ctx)
    model_id = result.summary["model_id"]
    assert model_id.startswith(f"{base_id}+lora@") and result.summary["mode"] == "encoder"
    assert (result.rows_in, result.rows_out, result.summary["embedded"]) == (48, 9, 9)
    assert len(result.summary["loss"]) == 1  # encoder_epochs 1, of encoder_max_steps 2
    # encoder_start head: the head mode's head trained first (its two epochs), and the tuned
    # encoder's head is that head, unchanged (frozen while the adapters trained).
    start = result.summary["start"]
    assert start["model_id"] == tuned_model_id(base_id, DS) and len(start["loss"]) == 2
    head_dir = os.path.join(ctx.model_dir("text_tower"), "head")
    saved = load_file(os.path.join(result.artifacts["text_tower"], HEAD_WEIGHTS))
    trained = load_file(os.path.join(head_dir, HEAD_WEIGHTS))
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in saved)
    rows = {
        r.item_id: r
        for r in store.read("item_embeddings").where(F.col("model_id") == model_id).collect()
    }
    assert sorted(rows) == [f"i{k}" for k in range(9)]  # i8, never interacted with, too
    assert {r.dim for r in rows.values()} == {8}
    texts = {
        r.item_id: r.text
        for r in item_text(
            store.read("items"), template=cfg.embed.text_template, max_chars=4000
        ).collect()
    }
    encode = make_tuned_encoder(
        resolve_model(cfg.embed.model)[0],
        result.artifacts["text_tower"],
        max_length=16,
        batch_size=4,
    )
    ids = sorted(rows)
    expected = encode([texts[i] for i in ids])
    np.testing.assert_allclose([rows[i].embedding for i in ids], expected, atol=1e-4)
    frame, used = embedding_frame(ctx)  # recommend reads the date's tuned model
    assert used == model_id and frame.count() == 9

    # A rerun of the date: the finished checkpoint, the same weights and id: nothing embedded.
    rerun = run_train_contrastive(ctx)
    assert rerun.summary["model_id"] == model_id and rerun.summary["resumed_from"] == 1
    assert rerun.summary["embedded"] == 0

    # One item's text changes: the examples are the same, the items' texts are not, so the
    # tower trains again; the new weights get a new id and every item is embedded under it.
    items = store.read("items").toPandas()
    items.loc[items["item_id"] == "i3", "title"] = "A brand new title"
    store.overwrite("items", spark.createDataFrame(items, CATALOG))
    changed = run_train_contrastive(ctx)
    assert changed.summary["resumed_from"] is None
    assert changed.summary["model_id"] != model_id and changed.summary["embedded"] == 9
