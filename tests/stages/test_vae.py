"""The train-vae stage: user rows from pairs, training under TorchDistributor, resume, the stage."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch

from llmrec_spark.core.vae import PAD, dense_rows, item_vectors, user_vectors
from llmrec_spark.errors import ConfigError
from llmrec_spark.schema import EVENTS_CLEAN
from llmrec_spark.stages.contrastive import PETASTORM_CACHE_CONF, spark_converter
from llmrec_spark.stages.vae import padded_rows, shuffle_users, user_rows
from llmrec_spark.stages.vae_training import CHECKPOINT, ITEM_IDS, load_vae, train_vae

GROUPS, PER_GROUP, USERS = 4, 8, 160
N_ITEMS = GROUPS * PER_GROUP


@pytest.mark.spark
def test_user_rows_keep_the_heaviest_items_and_pad_to_one_width(spark):
    pairs = spark.createDataFrame(
        [
            ("u1", 0, 1.0),
            ("u1", 3, 5.0),
            ("u1", 2, 5.0),  # ties with item 3: the lower index first
            ("u1", 1, 2.0),
            ("u2", 4, 0.5),
        ],
        "user_id string, item_idx int, weight double",
    )
    rows = {r.user_id: r for r in user_rows(pairs, max_items=3).collect()}
    assert (rows["u1"].n_items, rows["u1"].items, rows["u1"].weights) == (4, [2, 3, 1], [5, 5, 2])
    assert (rows["u2"].n_items, rows["u2"].items, rows["u2"].weights) == (1, [4], [0.5])
    padded = sorted(
        (r.items, r.weights) for r in padded_rows(user_rows(pairs, max_items=3), 3).collect()
    )
    assert padded == [([2, 3, 1], [5.0, 5.0, 2.0]), ([4, PAD, PAD], [0.5, 0.0, 0.0])]


def _planted_rows() -> list[tuple[list[int], list[float]]]:
    """Users drawing 5 of the 8 items of their group (item % GROUPS), padded to 6."""
    rng = np.random.default_rng(8)
    rows = []
    for user in range(USERS):
        group_items = np.arange(user % GROUPS, N_ITEMS, GROUPS)
        chosen = [int(i) for i in rng.choice(group_items, size=5, replace=False)]
        weights = [float(w) for w in rng.choice([1.0, 2.0], size=5)]
        rows.append((chosen + [PAD], weights + [0.0]))
    return rows


@pytest.fixture(scope="module")
def planted(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-planted")
    spark.conf.set(PETASTORM_CACHE_CONF, f"file://{root}/petastorm")
    rows = spark.createDataFrame(_planted_rows(), "items array<int>, weights array<float>")
    converter = spark_converter(shuffle_users(rows, files=4, seed=3))
    yield converter
    converter.delete()


def _train_config(converter, out_dir, **overrides):
    return {
        "converter": converter,
        "n_items": N_ITEMS,
        "hidden_dim": 32,
        "latent_dim": 8,
        "dropout": 0.2,
        "beta_cap": 0.2,
        "anneal_steps": 40,
        "epochs": 12,
        "batch_size": 32,
        "learning_rate": 0.01,
        "weight_decay": 0.0,
        "seed": 5,
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


def _saved(result, item_ids=None):
    from llmrec_spark.stages.vae_training import write_item_ids

    write_item_ids(result["model_path"], item_ids or [f"i{k}" for k in range(N_ITEMS)])
    return load_vae(result["model_path"])[0]


@pytest.mark.spark
def test_training_on_petastorm_rows_learns_the_planted_groups(planted, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = train_vae(_train_config(planted, tmp_path))
    assert result["epochs_run"] == 12 and result["resumed_from"] is None
    assert result["steps"] == 12 * 5  # 160 users in batches of 32
    assert result["losses"][-1] < result["losses"][0] - 0.5, result["losses"]
    model = _saved(result)
    # Each user's 3 best unseen items lie in their own group (3 of the 3 unseen ones there).
    histories = [np.array([i for i in items if i != PAD]) for items, _ in _planted_rows()]
    x = dense_rows(histories, None, N_ITEMS)
    scores = user_vectors(model, x) @ item_vectors(model).T
    scores[x > 0] = -np.inf
    top = np.argsort(-scores, axis=1)[:, :3]
    own = top % GROUPS == (np.arange(USERS) % GROUPS)[:, None]
    assert own.mean() >= 0.9, own.mean()


@pytest.mark.spark
def test_a_crash_then_a_rerun_gives_the_weights_of_an_uninterrupted_run(
    planted, tmp_path, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    straight = train_vae(_train_config(planted, tmp_path / "straight", epochs=3))
    config = _train_config(planted, tmp_path / "crashy", epochs=3)
    with pytest.raises(RuntimeError, match="simulated failure after epoch 2"):
        train_vae({**config, "fail_after_epoch": 2})
    checkpoint = torch.load(os.path.join(config["checkpoint_dir"], CHECKPOINT), weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (2, 10)
    assert not os.path.exists(os.path.join(config["output_dir"], "vae.safetensors"))

    resumed = train_vae(config)
    assert (resumed["resumed_from"], resumed["epochs_run"]) == (2, 1)
    assert resumed["steps"] == straight["steps"] == 15
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-6)
    a, b = _saved(straight).state_dict(), _saved(resumed).state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # A checkpoint of other data or settings is not resumed.
    fresh = train_vae({**config, "fingerprint": "planted-v2"})
    assert fresh["resumed_from"] is None and fresh["epochs_run"] == 3


def _events(spark, store):
    """24 users in two taste groups over items i0..i9 (even / odd), 3 days of events."""
    events = []
    for user in range(24):
        group = [k for k in range(10) if k % 2 == user % 2]
        for step, k in enumerate(group[user % 5 :] + group[: user % 5]):
            day = f"2026-11-2{1 + step % 3}"
            ts = dt.datetime.fromisoformat(day) + dt.timedelta(minutes=step)
            weight = 2.0 if step % 2 else 1.0
            events.append(
                (f"e{user}-{step}", f"u{user}", f"i{k}", "click", ts, None, None, weight, day, day)
            )
    store.overwrite("events_clean", spark.createDataFrame(events, EVENTS_CLEAN))


def _with_vae(cfg, **settings):
    return dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, **settings))


@pytest.mark.spark
@pytest.mark.slow
def test_run_train_vae_trains_under_torch_distributor_and_a_rerun_resumes(spark, cfg, store):
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages.vae import run_train_vae

    ds = "2026-11-23"
    cfg = _with_vae(
        cfg, enabled=True, hidden_dim=16, latent_dim=4, epochs=3, batch_size=8, max_items=4
    )
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, holdout_fraction=0.0))
    _events(spark, store)
    ctx = RunContext(cfg=cfg, spark=spark, store=store, ds=ds)

    result = run_train_vae(ctx)
    assert (result.rows_in, result.rows_out) == (24, 10)  # users, items
    model_dir = result.artifacts["vae_model"]
    model, item_ids = load_vae(model_dir)
    assert item_ids == sorted(f"i{k}" for k in range(10))
    assert model.n_items == 10 and model.hidden_dim == 16
    with open(os.path.join(model_dir, "config.json")) as f:
        assert json.load(f)["ds"] == ds
    assert os.path.exists(os.path.join(model_dir, ITEM_IDS))
    assert len(result.summary["loss"]) == 3 and result.summary["resumed_from"] is None

    rerun = run_train_vae(ctx)  # the finished checkpoint of the same job: nothing retrained
    assert rerun.summary["resumed_from"] == 3
    assert torch.equal(
        load_vae(model_dir)[0].state_dict()["decoder.0.weight"],
        model.state_dict()["decoder.0.weight"],
    )


@pytest.mark.spark
def test_disabled_vae_stage_is_skipped(spark, cfg):
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages.vae import run_train_vae

    result = run_train_vae(RunContext(cfg=cfg, spark=spark, store=None, ds="2026-11-23"))
    assert result.summary == {"skipped": "vae.enabled=false"}


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"epochs": 0}, "vae.epochs: must be at least 1, got 0"),
        ({"dropout": 1.0}, "vae.dropout: must be within [0, 1)"),
        ({"device": "tpu"}, "vae.device: choose auto, cpu or cuda"),
    ],
)
def test_bad_vae_settings_are_config_errors(cfg, settings, message):
    from llmrec_spark.config import check_vae

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        check_vae(dataclasses.replace(cfg.vae, **settings))


def _saved_model(root, item_ids, seed=3):
    from llmrec_spark.core.vae import MultVAE
    from llmrec_spark.stages.vae_training import save_vae, write_item_ids

    torch.manual_seed(seed)
    model = MultVAE(len(item_ids), (6,), 3, 0.0).eval()
    save_vae(model, str(root), {"ds": "2026-11-23"})
    write_item_ids(str(root), item_ids)
    return model


def test_a_block_scores_als_users_with_both_models_and_users_without_a_factor_by_the_vae(
    tmp_path,
):
    from llmrec_spark.core.hybrid import ItemMatrices, Mix
    from llmrec_spark.core.zmix import z_scored_factors
    from llmrec_spark.stages.recommend import score_block_frame
    from llmrec_spark.stages.vae_scoring import with_vae

    # Five catalog items; the model knows i1..i4 (i0 is new to it, and i4 has no ALS factor).
    item_ids = np.array(["i0", "i1", "i2", "i3", "i4"], dtype=object)
    model = _saved_model(tmp_path, ["i1", "i2", "i3", "i4"])
    rng = np.random.default_rng(2)
    als = rng.normal(size=(5, 2)).astype(np.float32)
    als[4] = 0.0
    matrices = ItemMatrices(
        item_ids=item_ids,
        eligible=np.ones(5, bool),
        popularity=np.arange(5, dtype=np.float32),
        categories=np.zeros(5, np.int32),
        als=als,
        has_als=np.array([True, True, True, True, False]),
    )
    mixed = with_vae(matrices, str(tmp_path), weight=0.5)
    users = pd.DataFrame(
        {
            "user_id": ["u-als", "u-new"],
            "als_features": [np.array([1.0, -0.5], np.float32), None],
            "history": [np.array([1]), np.array([2])],
            "vae_items": [np.array([1]), np.array([2])],  # item_idx in the catalog order
            "vae_weights": [np.array([2.0], np.float32), np.array([3.0], np.float32)],
        }
    )
    rows = score_block_frame(users, mixed, n=3, mix=Mix(0.0))
    new_user = rows[rows["user_id"] == "u-new"]
    # The new user's ranking is the VAE's own z-scores from their pairs (i2 at weight 3),
    # 0 (the mean) for i0, which the model has no column for; the rows say "vae".
    x = np.zeros((1, 4), np.float32)
    x[0, 1] = 3.0
    user_z, item_z = z_scored_factors(
        user_vectors(model, x),
        _aligned(model, item_ids),
        np.array([False, True, True, True, True]),
        np.ones(5, bool),
    )
    expected_new = (user_z @ item_z.T)[0]
    expected_new[2] = -np.inf  # seen
    assert new_user["item_id"].tolist() == [f"i{k}" for k in np.argsort(-expected_new)[:3]]
    assert set(new_user["source"]) == {"vae"}
    # The ALS user: ALS's z + 0.5 x the VAE's z, as evaluation's hybrid_vae scores it.
    als_user = rows[rows["user_id"] == "u-als"]
    x = np.zeros((1, 4), np.float32)
    x[0, 0] = 2.0
    vae_z = z_scored_factors(
        user_vectors(model, x),
        _aligned(model, item_ids),
        np.array([False, True, True, True, True]),
        np.ones(5, bool),
    )
    als_z = z_scored_factors(
        np.array([[1.0, -0.5]], np.float32), als, matrices.has_als, np.ones(5, bool)
    )
    expected = (als_z[0] @ als_z[1].T + 0.5 * (vae_z[0] @ vae_z[1].T))[0]
    expected[1] = -np.inf  # seen
    order = [f"i{k}" for k in np.argsort(-expected, kind="stable")[:3]]
    assert als_user["item_id"].tolist() == order
    assert set(als_user["source"]) == {"als"}

    # With text on every item, the new user's items are scored by the VAE and text together:
    # "hybrid_vae", where a user with an ALS factor gets "hybrid".
    text = rng.normal(size=(5, 3)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    with_text = dataclasses.replace(mixed, text=text, has_text=np.ones(5, bool))
    rows = score_block_frame(users, with_text, n=3, mix=Mix(0.5))
    assert set(rows.loc[rows["user_id"] == "u-new", "source"]) == {"hybrid_vae"}
    assert set(rows.loc[rows["user_id"] == "u-als", "source"]) == {"hybrid"}


def _aligned(model, item_ids):
    rows = np.zeros((len(item_ids), model.hidden_dim + 1), np.float32)
    rows[1:] = item_vectors(model)
    return rows
