"""The user tower in Spark: current profiles, examples, training under TorchDistributor, resume."""

from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pytest
import torch

from llmrec_spark.core.profile_tower import item_factors, user_factors
from llmrec_spark.stages.contrastive import PETASTORM_CACHE_CONF, spark_converter
from llmrec_spark.stages.profile_training import (
    CHECKPOINT,
    PROFILE_WEIGHTS,
    load_profile_tower,
    train_profile_tower,
)
from llmrec_spark.stages.profiles import current_profiles, profile_examples

KINDS, N_ITEMS, DIM = 3, 12, 6


def _planted_rows(n: int = 480) -> list[tuple[list[float], int]]:
    """Profiles of three kinds (a noisy one-hot); kind k consumes items 4k..4k+3, item 4k most."""
    rng = np.random.default_rng(4)
    rows = []
    for j in range(n):
        kind = j % KINDS
        profile = np.eye(DIM)[kind] + rng.normal(0, 0.05, DIM)
        item = 4 * kind + (0 if rng.random() < 0.5 else int(rng.integers(1, 4)))
        rows.append(([float(x) for x in profile], item))
    return rows


@pytest.fixture(scope="module")
def planted(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("profile-planted")
    spark.conf.set(PETASTORM_CACHE_CONF, f"file://{root}/petastorm")
    rows = spark.createDataFrame(_planted_rows(), "profile array<float>, pos int").repartition(4)
    converter = spark_converter(rows)
    yield converter
    converter.delete()


def _config(converter, out_dir, **overrides):
    return {
        "converter": converter,
        "n_items": N_ITEMS,
        "in_dim": DIM,
        "hidden_dim": 16,
        "out_dim": 4,
        "epochs": 6,
        "batch_size": 32,
        "learning_rate": 0.02,
        "weight_decay": 0.0,
        "num_negatives": 64,
        "seed": 3,
        "device": "cpu",
        "reader_workers": 1,
        "checkpoint_dir": str(out_dir / "checkpoints"),
        "output_dir": str(out_dir / "model"),
        "fingerprint": "planted-v1",
        "model_metadata": {"ds": "2026-11-23"},
        "mlflow_tracking_uri": None,
        "mlflow_run_id": None,
        **overrides,
    }


@pytest.mark.spark
def test_training_on_petastorm_rows_learns_what_each_kind_of_profile_consumes(
    planted, tmp_path, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = train_profile_tower(_config(planted, tmp_path))
    assert result["epochs_run"] == 6 and result["resumed_from"] is None
    assert result["steps"] == 6 * 15  # 480 rows in batches of 32
    assert result["losses"][-1] < 0.7 * result["losses"][0], result["losses"]
    tower = load_profile_tower(result["model_path"])
    scores = user_factors(tower, np.eye(DIM, dtype=np.float32)[:KINDS]) @ item_factors(tower).T
    for kind in range(KINDS):
        assert int(scores[kind].argmax()) == 4 * kind
        assert set(np.argsort(-scores[kind])[:4]) == set(range(4 * kind, 4 * kind + 4))


@pytest.mark.spark
def test_a_rerun_resumes_the_finished_checkpoint_of_the_same_job_only(
    planted, tmp_path, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    config = _config(planted, tmp_path, epochs=2)
    first = train_profile_tower(config)
    saved = torch.load(os.path.join(config["checkpoint_dir"], CHECKPOINT), weights_only=True)
    assert (saved["epoch"], saved["step"]) == (2, 30)
    weights = load_profile_tower(first["model_path"]).state_dict()
    os.remove(os.path.join(config["output_dir"], PROFILE_WEIGHTS))

    again = train_profile_tower(config)  # nothing left to train: the checkpoint's tower saved
    assert (again["resumed_from"], again["epochs_run"], again["steps"]) == (2, 0, 30)
    assert again["losses"] == first["losses"]
    for name, value in load_profile_tower(again["model_path"]).state_dict().items():
        assert torch.equal(value, weights[name]), name

    # Another job trains from scratch, and the same seed and rows give the same tower again.
    fresh = train_profile_tower({**config, "fingerprint": "planted-v2"})
    assert fresh["resumed_from"] is None and fresh["epochs_run"] == 2
    assert fresh["losses"] == first["losses"]
    for name, value in load_profile_tower(fresh["model_path"]).state_dict().items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.spark
def test_examples_pair_each_profiled_users_positives_with_their_current_profile(spark, store):
    from llmrec_spark.config import EmbedConfig

    ts = dt.datetime(2026, 11, 20)
    events = spark.createDataFrame(
        [
            ("u1", "a", ts, 4.0),
            ("u1", "b", ts, 1.0),  # not a positive
            ("u1", "a", ts, 5.0),  # the same item again: one example
            ("u2", "b", ts, 4.0),
            ("u3", "a", ts, 4.0),  # no profile: no example
            ("u1", "zz", ts, 4.0),  # not in the item index
        ],
        "user_id string, item_id string, event_ts timestamp, weight double",
    )
    store.overwrite(
        "user_profiles",
        spark.createDataFrame(
            [("u1", None, "Age 18-24. Male."), ("u2", "jazz", None)],
            "user_id string, interests string, bio string",
        ),
    )
    texts = {"u1": "Age 18-24. Male.", "u2": "jazz."}
    import hashlib

    rows = [
        (u, hashlib.sha256(t.encode()).hexdigest(), "m@1", 2, [float(k), 1.0], "2026-11-20")
        for k, (u, t) in enumerate(sorted(texts.items()))
    ]
    rows.append(("u1", "stale-hash", "m@1", 2, [9.0, 9.0], "2026-11-19"))  # an older text
    rows.append(("u2", rows[1][1], "other@1", 2, [7.0, 7.0], "2026-11-20"))  # another model
    store.overwrite(
        "user_embeddings",
        spark.createDataFrame(
            rows,
            "user_id string, text_hash string, model_id string, dim int, "
            "embedding array<float>, ds string",
        ),
    )
    profiles = current_profiles(store, EmbedConfig(), "m@1")
    assert {r["user_id"]: r["embedding"] for r in profiles.collect()} == {
        "u1": [0.0, 1.0],
        "u2": [1.0, 1.0],
    }
    index = spark.createDataFrame([("a", 0), ("b", 1)], "item_id string, item_idx int")
    examples = profile_examples(events, profiles, index, positive_min_weight=2.0).collect()
    assert sorted((r["profile"], r["pos"]) for r in examples) == [([0.0, 1.0], 0), ([1.0, 1.0], 1)]
