"""Contrastive text tower: InfoNCE, negative masking, examples, training, resume, distributor, stage."""

from __future__ import annotations

import dataclasses
import datetime as dt
import itertools
import json
import os
import time

import numpy as np
import pytest
import torch
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from llmrec_spark.core.tower import (
    PAD,
    EnsembleHead,
    InfoNCELoss,
    TextTowerHead,
    dropout_rows,
    encode_batch,
    info_nce,
    negative_mask,
)
from llmrec_spark.schema import EVENTS_CLEAN, ITEM_EMBEDDINGS
from llmrec_spark.stages.contrastive import (
    PETASTORM_CACHE_CONF,
    shuffle_examples,
    spark_converter,
    training_examples,
    tuned_model_id,
    with_item_index,
)
from llmrec_spark.stages.tower_training import (
    CHECKPOINT,
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    file_digest,
    head_embedder,
    load_head,
    save_head,
    train_text_tower,
)

# ---------------------------------------------------------------------------------------------
# Pure torch


def test_info_nce_matches_hand_computed_value():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    positives = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([[-1.0, 0.0]])
    # temperature 1: row 0 logits [1, 0, -1] -> log(e + 1 + 1/e) - 1 = 0.407606
    #                row 1 logits [0, 1, 0]  -> log(1 + e + 1) - 1   = 0.551445
    expected = (0.407606 + 0.551445) / 2
    assert info_nce(anchors, positives, negatives, None, 1.0).item() == pytest.approx(
        expected, abs=1e-5
    )
    # temperature 0.5 doubles the logits: row 0 -> log(e^2 + 1 + e^-2) - 2 = 0.142931
    #                                     row 1 -> log(2 + e^2) - 2       = 0.239545
    loss = InfoNCELoss(0.5)(anchors, positives, negatives)
    assert loss.item() == pytest.approx((0.142931 + 0.239545) / 2, abs=1e-5)


def test_masked_negative_contributes_nothing():
    gen = torch.Generator().manual_seed(0)
    anchors = torch.nn.functional.normalize(torch.randn(3, 4, generator=gen), dim=-1)
    positives = torch.nn.functional.normalize(torch.randn(3, 4, generator=gen), dim=-1)
    negatives = torch.nn.functional.normalize(torch.randn(4, 4, generator=gen), dim=-1)
    # Mask sampled negative 1 (column 3 + 1) for every anchor == that negative never drawn.
    mask = torch.zeros(3, 7, dtype=torch.bool)
    mask[:, 4] = True
    masked = info_nce(anchors, positives, negatives, mask, 0.1)
    removed = info_nce(anchors, positives, negatives[[0, 2, 3]], None, 0.1)
    assert masked.item() == pytest.approx(removed.item(), abs=1e-6)
    assert masked.item() != pytest.approx(
        info_nce(anchors, positives, negatives, None, 0.1).item(), abs=1e-3
    )


def test_masking_everything_leaves_only_the_positive_and_zero_loss():
    anchors = torch.eye(2)
    mask = torch.ones(2, 3, dtype=torch.bool)  # the diagonal (own positive) is never masked
    loss = info_nce(
        anchors, torch.tensor([[0.0, 1.0], [1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), mask, 0.05
    )
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_negative_mask_covers_history_and_duplicates_of_the_positive():
    history = torch.tensor([[2, 5, PAD], [7, PAD, PAD]])
    positives = torch.tensor([3, 5])
    negatives = torch.tensor([5, 9, 3])
    # candidates: [3, 5 | 5, 9, 3]
    expected = torch.tensor(
        [
            [True, True, True, False, True],  # user 0: history {2, 5}, positive 3
            [False, True, True, False, False],  # user 1: history {7}, positive 5
        ]
    )
    assert torch.equal(negative_mask(history, positives, negatives), expected)


def test_negative_mask_equals_set_membership_on_random_batches():
    g = torch.Generator().manual_seed(8)
    for batch, width, n_items in ((1, 1, 3), (16, 7, 12), (64, 50, 40)):
        history = torch.randint(n_items, (batch, width), generator=g)
        history[torch.rand(batch, width, generator=g) < 0.3] = PAD
        positives = torch.randint(n_items, (batch,), generator=g)
        negatives = torch.randint(n_items, (9,), generator=g)
        candidates = torch.cat([positives, negatives]).tolist()
        expected = torch.tensor(
            [
                [c in set(history[i].tolist()) or c == int(positives[i]) for c in candidates]
                for i in range(batch)
            ]
        )
        assert torch.equal(negative_mask(history, positives, negatives), expected)
    empty = negative_mask(torch.zeros((2, 0), dtype=torch.long), torch.tensor([1, 2]), negatives)
    assert empty.tolist()[0][:2] == [True, False] and empty.tolist()[1][:2] == [False, True]


def test_head_outputs_unit_vectors_and_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    head = TextTowerHead(6, 8, 3)
    with torch.no_grad():
        head.mlp[2].weight.normal_()  # make the MLP branch matter for the round trip
    base = torch.randn(5, 6)
    out = head(base)
    assert out.shape == (5, 3)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-6)
    folder = save_head(head, str(tmp_path / "head"), {"model_id": "m+tower@d"})
    assert sorted(os.listdir(folder)) == [HEAD_CONFIG, HEAD_WEIGHTS]
    loaded = load_head(folder)
    assert torch.allclose(loaded(base), out.detach(), atol=1e-6)
    embed = head_embedder(folder, "digest-1")
    np.testing.assert_allclose(embed(base.numpy()), out.detach().numpy(), atol=1e-6)


def test_ensemble_head_dot_products_are_the_members_mean_cosine_and_it_round_trips(tmp_path):
    torch.manual_seed(3)
    members = [TextTowerHead(6, 8, 3) for _ in range(3)]
    for member in members:
        with torch.no_grad():
            member.mlp[2].weight.normal_()
    head = EnsembleHead(members)
    base = torch.randn(5, 6)
    with torch.no_grad():
        out = head(base)
        mean_cosine = sum(m(base) @ m(base).T for m in members) / 3
    assert out.shape == (5, 9)
    assert torch.allclose(out.norm(dim=-1), torch.ones(5), atol=1e-6)
    assert torch.allclose(out @ out.T, mean_cosine, atol=1e-6)
    folder = save_head(head, str(tmp_path / "head"), {"model_id": "m+tower@d"})
    loaded = load_head(folder)
    assert isinstance(loaded, EnsembleHead)
    assert loaded.config() == {
        "in_dim": 6,
        "hidden_dim": 8,
        "out_dim": 9,
        "member_out_dim": 3,
        "members": 3,
    }
    assert torch.allclose(loaded(base), out, atol=1e-6)


def test_mean_of_heads_anchor_is_the_normalised_mean_of_history_item_outputs():
    torch.manual_seed(1)
    head = TextTowerHead(4, 5, 3)
    base = torch.randn(6, 4)
    history = torch.tensor([[0, 2, PAD], [4, PAD, PAD]])
    anchors, positives, negatives = encode_batch(
        head, base, history, torch.tensor([1, 3]), torch.tensor([5]), "mean_of_heads"
    )
    z = head(base).detach()
    assert torch.allclose(anchors[0], torch.nn.functional.normalize(z[0] + z[2], dim=0), atol=1e-6)
    assert torch.allclose(anchors[1], z[4], atol=1e-6)
    assert torch.allclose(positives, z[[1, 3]], atol=1e-6)
    assert torch.allclose(negatives, z[[5]], atol=1e-6)
    anchors_hm, _, _ = encode_batch(
        head, base, history, torch.tensor([1, 3]), torch.tensor([5]), "head_of_mean"
    )
    assert torch.allclose(anchors_hm[0], head((base[0] + base[2])[None] / 2)[0], atol=1e-6)


def test_dropout_rows_zeroes_a_seeded_share_and_rescales_the_rest():
    rows = torch.ones(200, 50)
    assert dropout_rows(rows, 0.0) is rows
    dropped = dropout_rows(rows, 0.25, torch.Generator().manual_seed(3))
    assert torch.allclose(dropped.unique(), torch.tensor([0.0, 1 / 0.75]))
    zero_share = float((dropped == 0).float().mean())
    assert 0.23 < zero_share < 0.27
    again = dropout_rows(rows, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(dropped, again)
    assert not torch.equal(dropped, dropout_rows(rows, 0.25, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("pooling", ["mean_of_heads", "head_of_mean"])
def test_input_dropout_masks_each_item_once_per_batch(pooling):
    # Item 1 is user 0's whole history and user 1's positive: with one mask per item the
    # anchor of user 0 equals that positive's output, and neither equals the undropped one.
    torch.manual_seed(2)
    head = TextTowerHead(8, 6, 4)
    base = torch.randn(4, 8)
    history = torch.tensor([[1, PAD], [2, 3]])
    positive_ids, negative_ids = torch.tensor([0, 1]), torch.tensor([3])
    anchors, positives, negatives = encode_batch(
        head,
        base,
        history,
        positive_ids,
        negative_ids,
        pooling,
        0.5,
        torch.Generator().manual_seed(0),
    )
    assert torch.allclose(anchors[0], positives[1], atol=1e-6)
    assert not torch.allclose(positives[1], head(base[[1]])[0], atol=1e-3)
    same = encode_batch(
        head,
        base,
        history,
        positive_ids,
        negative_ids,
        pooling,
        0.5,
        torch.Generator().manual_seed(0),
    )
    assert all(
        torch.equal(a, b) for a, b in zip((anchors, positives, negatives), same, strict=True)
    )
    plain = encode_batch(head, base, history, positive_ids, negative_ids, pooling)
    assert torch.allclose(plain[1], head(base[[0, 1]]), atol=1e-6)


def test_tuned_model_id():
    assert (
        tuned_model_id("all-MiniLM-L6-v2@abc", "2026-11-23")
        == "all-MiniLM-L6-v2@abc+tower@2026-11-23"
    )


# ---------------------------------------------------------------------------------------------
# Spark transformations


def _ts(minute: int) -> dt.datetime:
    return dt.datetime(2026, 11, 20, 12, minute)


def _event(user: str, item: str, minute: int, ds: str = "2026-11-20", weight: float = 1.0):
    return (f"{user}-{item}-{minute}", user, item, "view", _ts(minute), None, None, weight, ds, ds)


@pytest.mark.spark
def test_user_item_examples_pair_each_positive_with_the_users_other_items(spark):
    events = spark.createDataFrame(
        [
            _event("u1", "i1", 1),  # weight 1.0: history only
            _event("u1", "i2", 2, weight=3.0),
            _event("u1", "i3", 3, weight=2.0),
            _event("u1", "i3", 4),  # the max weight of a pair counts: i3 stays positive
            _event("u1", "i9", 5, weight=5.0),  # no base embedding: ignored
            _event("u2", "i2", 1, weight=4.0),  # a positive with no other item: no example
            _event("u3", "i1", 1),  # no positive: no example
            _event("u3", "i2", 2),
        ],
        EVENTS_CLEAN,
    )
    items = spark.createDataFrame([("i1", 0), ("i2", 1), ("i3", 2)], "item_id string, item_idx int")
    examples = training_examples(
        events, items, max_history=3, examples="user_item", positive_min_weight=2.0, seed=1
    )
    rows = sorted((r.pos, r.history) for r in examples.collect())
    assert [pos for pos, _ in rows] == [1, 2]
    # The history is the user's other items (any weight) in a seeded order, PAD-filled.
    assert sorted(rows[0][1][:2]) == [0, 2] and rows[0][1][2] == PAD
    assert sorted(rows[1][1][:2]) == [0, 1] and rows[1][1][2] == PAD
    # Cut at max_history: one of the user's other items, the same order for every positive.
    cut = training_examples(
        events, items, max_history=1, examples="user_item", positive_min_weight=2.0, seed=1
    )
    histories = {r.pos: r.history for r in cut.collect()}
    orders_that_fit = [
        order
        for order in itertools.permutations([0, 1, 2])
        if all(h == [next(i for i in order if i != pos)] for pos, h in histories.items())
    ]
    assert set(histories) == {1, 2} and len(orders_that_fit) >= 1


@pytest.mark.spark
def test_training_examples_are_next_new_item_after_the_history(spark):
    events = spark.createDataFrame(
        [
            _event("u1", "i1", 1),
            _event("u1", "i2", 2),
            _event("u1", "i1", 3),  # repeat: not a new item, not an example
            _event("u1", "i9", 4),  # no base embedding: ignored
            _event("u1", "i3", 5),
            _event("u2", "i2", 1),  # a single item: no example
        ],
        EVENTS_CLEAN,
    )
    items = spark.createDataFrame([("i1", 0), ("i2", 1), ("i3", 2)], "item_id string, item_idx int")
    expected_schema = "history array<int>, pos int"
    assertDataFrameEqual(
        training_examples(events, items, max_history=2, examples="next_item"),
        spark.createDataFrame([([0, PAD], 1), ([0, 1], 2)], expected_schema),
    )
    assertDataFrameEqual(
        training_examples(events, items, max_history=1, examples="next_item"),
        spark.createDataFrame([([0], 1), ([1], 2)], expected_schema),
    )


@pytest.mark.spark
def test_shuffled_examples_do_not_depend_on_the_input_order(spark):
    rows = [([k, (k * 7) % 11, PAD], k % 5) for k in range(40)]
    schema = "history array<int>, pos int"

    def files(frame):
        shuffled = shuffle_examples(frame, files=3, seed=9)
        return shuffled.rdd.glom().map(lambda part: [(r.history, r.pos) for r in part]).collect()

    forward = files(spark.createDataFrame(rows, schema).repartition(4))
    backward = files(spark.createDataFrame(rows[::-1], schema).coalesce(1))
    assert forward == backward
    assert sorted(r for part in forward for r in part) == sorted((h, p) for h, p in rows)
    assert len(forward) == 3 and all(forward)


@pytest.mark.spark
def test_item_index_is_dense_in_item_id_order(spark):
    current = spark.createDataFrame([("b",), ("c",), ("a",)], "item_id string")
    assertDataFrameEqual(
        with_item_index(current),
        spark.createDataFrame([("a", 0), ("b", 1), ("c", 2)], "item_id string, item_idx int"),
    )


# ---------------------------------------------------------------------------------------------
# Training on a planted signal: 48 items in 8 behaviour groups, each user stays in one group.

N_ITEMS, DIM, GROUPS = 48, 16, 8


def _planted_matrix(path) -> str:
    rng = np.random.default_rng(3)
    base = rng.normal(size=(N_ITEMS, DIM)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    np.save(path, base, allow_pickle=False)
    return str(path)


def _planted_examples(max_history: int = 4) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(4)
    rows = []
    for user in range(80):
        group = user % GROUPS
        sequence = rng.permutation(np.arange(group, N_ITEMS, GROUPS))  # 6 items of the group
        for p in range(1, len(sequence)):
            history = [int(i) for i in sequence[max(0, p - max_history) : p]]
            rows.append((history + [PAD] * (max_history - len(history)), int(sequence[p])))
    return rows


@pytest.fixture(scope="module")
def planted(spark, tmp_path_factory):
    """(converter, item matrix path) for 400 planted-signal examples in 4 files."""
    root = tmp_path_factory.mktemp("planted")
    spark.conf.set(PETASTORM_CACHE_CONF, f"file://{root}/petastorm")
    examples = spark.createDataFrame(
        _planted_examples(), "history array<int>, pos int"
    ).repartition(4)
    converter = spark_converter(examples)
    yield converter, _planted_matrix(root / "items.npy")
    converter.delete()


def _train_config(planted, out_dir, **overrides):
    converter, matrix = planted
    return {
        "converter": converter,
        "item_matrix_path": matrix,
        "checkpoint_dir": str(out_dir / "checkpoints"),
        "output_dir": str(out_dir / "head"),
        "epochs": 4,
        "batch_size": 32,
        "learning_rate": 0.02,
        "weight_decay": 0.0,
        "temperature": 0.1,
        "num_sampled_negatives": 8,
        "hidden_dim": 32,
        "out_dim": 8,
        "seed": 11,
        "anchor_pooling": "mean_of_heads",
        "device": "cpu",
        "reader_workers": 1,
        "fingerprint": "planted-v1",
        "mlflow_tracking_uri": None,
        "mlflow_run_id": None,
        "head_metadata": {"model_id": "planted+tower@2026-11-23"},
        **overrides,
    }


@pytest.mark.spark
def test_loss_falls_on_planted_signal(planted, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    result = train_text_tower(_train_config(planted, tmp_path))
    losses = result["losses"]
    assert len(losses) == 4 and result["epochs_run"] == 4 and result["resumed_from"] is None
    assert losses[-1] < losses[0] - 0.2, losses
    assert result["steps"] == 4 * 13  # 400 examples in batches of 32 -> 13 steps per epoch
    # Each item's 5 nearest items come from its own behaviour group far more often after training
    # than with the base embeddings (random: 5 of the 47 others share the group, ~0.1).
    assert (
        _same_group_share(load_head(result["head_path"])(torch.from_numpy(np.load(planted[1]))))
        >= 0.25
    )
    assert _same_group_share(torch.from_numpy(np.load(planted[1]))) <= 0.12


def _same_group_share(vectors: torch.Tensor, k: int = 5) -> float:
    sims = vectors.detach() @ vectors.detach().T
    sims.fill_diagonal_(-2.0)
    neighbours = sims.topk(k, dim=1).indices
    return float(
        (neighbours % GROUPS == torch.arange(len(vectors))[:, None] % GROUPS).float().mean()
    )


@pytest.mark.spark
def test_the_same_examples_train_the_same_head_through_a_new_converter(
    spark, tmp_path, monkeypatch
):
    # Each converter writes its files under new random names; petastorm numbers row groups in
    # the order of its file list, so without a fixed order the seeded shuffle and the shards
    # change from run to run (measured: the cold-item tower moved 0.31 -> 0.33 between runs).
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    spark.conf.set(PETASTORM_CACHE_CONF, f"file://{tmp_path}/petastorm")
    examples = shuffle_examples(
        spark.createDataFrame(_planted_examples(), "history array<int>, pos int"), files=4, seed=5
    )
    matrix = _planted_matrix(tmp_path / "items.npy")
    heads, file_names = [], []
    for run in ("a", "b"):
        converter = spark_converter(examples)
        try:
            names = [url.rsplit("/", 1)[1] for url in converter.file_urls]
            assert names == sorted(names) and len(names) == 4
            file_names.append(names)
            result = train_text_tower(_train_config((converter, matrix), tmp_path / run, epochs=2))
        finally:
            converter.delete()
        heads.append(load_head(result["head_path"]).state_dict())
    assert file_names[0] != file_names[1]  # new files (random names) for the second run
    assert heads[0].keys() == heads[1].keys()
    for name in heads[0]:
        assert torch.equal(heads[0][name], heads[1][name]), name


@pytest.mark.spark
def test_crash_after_epoch_then_rerun_resumes_with_the_same_step_counter(
    planted, tmp_path, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    straight = train_text_tower(_train_config(planted, tmp_path / "straight", epochs=2))

    config = _train_config(planted, tmp_path / "crashy", epochs=2)
    with pytest.raises(RuntimeError, match="simulated failure after epoch 1"):
        train_text_tower({**config, "fail_after_epoch": 1})
    checkpoint = torch.load(os.path.join(config["checkpoint_dir"], CHECKPOINT), weights_only=True)
    assert (checkpoint["epoch"], checkpoint["step"]) == (1, straight["steps"] // 2)
    assert not os.path.exists(config["output_dir"])

    resumed = train_text_tower(config)
    assert resumed["resumed_from"] == 1 and resumed["epochs_run"] == 1
    assert resumed["steps"] == straight["steps"]
    # Seeded per epoch: the resumed run retraces the uninterrupted one.
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-5)

    # A checkpoint of other data or settings is not resumed.
    fresh = train_text_tower({**config, "fingerprint": "planted-v2"})
    assert fresh["resumed_from"] is None and fresh["epochs_run"] == 2


@pytest.mark.spark
def test_ensemble_trains_member_zero_as_a_lone_head_and_the_others_on_their_own_order(
    planted, tmp_path, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    lone = train_text_tower(_train_config(planted, tmp_path / "lone", epochs=2))
    pair = train_text_tower(_train_config(planted, tmp_path / "pair", epochs=2, members=2))
    assert len(pair["losses"]) == 4 and pair["epochs_run"] == 4
    assert pair["steps"] == 2 * lone["steps"]
    np.testing.assert_allclose(pair["losses"][:2], lone["losses"], rtol=1e-6)
    assert not np.allclose(pair["losses"][2:], pair["losses"][:2])  # own seed and batch order
    ensemble, single = load_head(pair["head_path"]), load_head(lone["head_path"])
    assert isinstance(ensemble, EnsembleHead) and ensemble.out_dim == 16
    first, second = ensemble.members
    for name, value in single.state_dict().items():
        assert torch.equal(first.state_dict()[name], value), name
    assert not torch.allclose(first.skip.weight, second.skip.weight)
    base = torch.from_numpy(np.load(planted[1]))
    with torch.no_grad():
        joint = ensemble(base)
    assert _same_group_share(joint) >= 0.25  # the joint vectors keep the learned groups


@pytest.mark.spark
def test_ensemble_crash_in_the_second_member_resumes_to_the_same_heads(
    planted, tmp_path, monkeypatch
):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    straight = train_text_tower(_train_config(planted, tmp_path / "straight", epochs=2, members=2))
    config = _train_config(planted, tmp_path / "crashy", epochs=2, members=2)
    with pytest.raises(RuntimeError, match="simulated failure after epoch 3"):
        train_text_tower({**config, "fail_after_epoch": 3})
    checkpoint = torch.load(os.path.join(config["checkpoint_dir"], CHECKPOINT), weights_only=True)
    assert (checkpoint["member"], checkpoint["epoch"], len(checkpoint["finished"])) == (1, 1, 1)

    resumed = train_text_tower(config)
    assert resumed["resumed_from"] == 3 and resumed["epochs_run"] == 1
    assert resumed["steps"] == straight["steps"]
    np.testing.assert_allclose(resumed["losses"], straight["losses"], rtol=1e-5)
    expected = load_head(straight["head_path"]).state_dict()
    got = load_head(resumed["head_path"]).state_dict()
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.spark
def test_warm_start_begins_each_member_from_the_saved_head(planted, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    yesterday = train_text_tower(_train_config(planted, tmp_path / "d1", epochs=2, members=2))
    saved = load_head(yesterday["head_path"]).state_dict()
    # No step moves a weight at learning rate 0: the head saved is the head it started from.
    still = train_text_tower(
        _train_config(
            planted,
            tmp_path / "d2",
            epochs=1,
            members=2,
            learning_rate=0.0,
            init_head_dir=yesterday["head_path"],
        )
    )
    got = load_head(still["head_path"]).state_dict()
    for name in saved:
        assert torch.equal(got[name], saved[name]), name
    # One more epoch from there starts where the second epoch ended, not where epoch 1 did.
    warm = train_text_tower(
        _train_config(
            planted, tmp_path / "d3", epochs=1, members=2, init_head_dir=yesterday["head_path"]
        )
    )
    cold = train_text_tower(_train_config(planted, tmp_path / "d4", epochs=1, members=2))
    assert warm["losses"][0] < cold["losses"][0] - 0.2, (warm["losses"], cold["losses"])
    with pytest.raises(ValueError, match="has 2 members, training 3"):
        train_text_tower(
            _train_config(
                planted, tmp_path / "d5", epochs=1, members=3, init_head_dir=yesterday["head_path"]
            )
        )


def _saved_head(models_dir, ds: str, **meta) -> str:
    head_dir = os.path.join(models_dir, ds, "text_tower", "head")
    head = EnsembleHead([TextTowerHead(4, 8, 2), TextTowerHead(4, 8, 2)])
    return save_head(head, head_dir, {"base_model_id": "base@1", "ds": ds, **meta})


def test_previous_head_is_the_latest_earlier_date_of_the_same_model_and_shape(tmp_path):
    from llmrec_spark.config import ContrastiveConfig
    from llmrec_spark.stages.contrastive import previous_head

    cfg = ContrastiveConfig(members=2, out_dim=2, hidden_dim=8, warm_max_nights=2)
    models = str(tmp_path)
    assert previous_head(models, "2026-11-23", cfg, "base@1") is None  # nothing saved yet
    _saved_head(models, "2026-11-20", warm_nights=0)
    _saved_head(models, "2026-11-21", warm_nights=1)
    _saved_head(models, "2026-11-24", warm_nights=0)  # a later date: never a start
    os.makedirs(os.path.join(models, "2026-11-22", "als"))  # a date without a head
    warm = previous_head(models, "2026-11-23", cfg, "base@1")
    assert warm is not None and (warm.ds, warm.nights) == ("2026-11-21", 2)
    assert warm.head_dir == os.path.join(models, "2026-11-21", "text_tower", "head")
    assert warm.digest == file_digest(os.path.join(warm.head_dir, HEAD_WEIGHTS))
    # A third warm date in a row is over warm_max_nights=2: from scratch.
    _saved_head(models, "2026-11-22", warm_nights=2)
    assert previous_head(models, "2026-11-23", cfg, "base@1") is None
    # Another base model, another shape, or warm starts off: from scratch.
    assert previous_head(models, "2026-11-22", cfg, "base@2") is None
    wider = dataclasses.replace(cfg, out_dim=4)
    assert previous_head(models, "2026-11-22", wider, "base@1") is None
    off = dataclasses.replace(cfg, warm_epochs=0)
    assert previous_head(models, "2026-11-22", off, "base@1") is None
    assert previous_head(models, "2026-11-22", cfg, "base@1").ds == "2026-11-21"


@pytest.mark.spark
def test_sample_examples_is_a_seeded_share_that_changes_with_the_date(spark):
    from llmrec_spark.stages.contrastive import sample_examples

    examples = spark.createDataFrame(_planted_examples(), "history array<int>, pos int")
    rows = sorted((tuple(r.history), r.pos) for r in examples.collect())

    def sample(df, salt):
        return sorted(
            (tuple(r.history), r.pos)
            for r in sample_examples(df, fraction=0.25, seed=13, salt=salt).collect()
        )

    monday, tuesday = sample(examples, "2026-11-23"), sample(examples, "2026-11-24")
    assert set(monday) <= set(rows) and 0.18 * len(rows) <= len(monday) <= 0.32 * len(rows)
    assert monday == sample(examples.repartition(7), "2026-11-23")  # content, not partitioning
    assert monday != tuesday and len(set(monday) & set(tuesday)) < len(monday) / 2
    assert (
        sorted(
            (tuple(r.history), r.pos)
            for r in sample_examples(examples, fraction=1.0, seed=13, salt="x").collect()
        )
        == rows
    )


@pytest.mark.spark
@pytest.mark.slow  # ~40 s: two torchrun processes importing torch, petastorm and mlflow
def test_torch_distributor_two_processes_logs_from_rank_zero_only(planted, tmp_path):
    from mlflow import MlflowClient

    from llmrec_spark.runtime.distributor import CheckedTorchDistributor

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment(
        "contrastive-test", artifact_location=f"file://{tmp_path}/mlruns"
    )
    run_id = client.create_run(experiment).info.run_id
    config = _train_config(
        planted, tmp_path, epochs=2, mlflow_tracking_uri=uri, mlflow_run_id=run_id
    )

    started = time.perf_counter()
    result = CheckedTorchDistributor(num_processes=2, local_mode=True, use_gpu=False).run(
        train_text_tower, config
    )
    seconds = time.perf_counter() - started
    print(f"CheckedTorchDistributor(num_processes=2) wall time: {seconds:.1f}s")  # noqa: T201 (timing for the report)

    assert result["epochs_run"] == 2 and len(result["losses"]) == 2
    assert sorted(os.listdir(result["head_path"])) == [HEAD_CONFIG, HEAD_WEIGHTS]
    history = client.get_metric_history(run_id, "contrastive_loss")
    assert sorted((m.step, round(m.value, 6)) for m in history) == [
        (1, round(result["losses"][0], 6)),
        (2, round(result["losses"][1], 6)),
    ]


# ---------------------------------------------------------------------------------------------
# The stage, end to end


def _with_contrastive(cfg, **settings):
    return dataclasses.replace(cfg, contrastive=dataclasses.replace(cfg.contrastive, **settings))


def _stage_tables(spark, store, cfg, ds):
    """Catalog of 9 items (i8 never interacted with), base embeddings, and 3 days of events."""
    from llmrec_spark.core.encoder import base_model_id
    from llmrec_spark.schema import CATALOG
    from llmrec_spark.stages.embed import item_text

    items = spark.createDataFrame(
        [
            (f"i{k}", f"Item {k}", f"about {k % 3}", f"cat{k % 3}", "acme", "true", ds)
            for k in range(9)
        ],
        CATALOG,
    )
    store.overwrite("items", items)
    texts = item_text(items, template=cfg.embed.text_template, max_chars=cfg.embed.max_text_chars)
    hashes = {r.item_id: r.text_hash for r in texts.select("item_id", "text_hash").collect()}
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(9, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    base_id = base_model_id(cfg.embed)
    rows = [(f"i{k}", hashes[f"i{k}"], base_id, 384, vectors[k].tolist(), ds) for k in range(9)]
    rows.append(
        ("i0", "stale-text", base_id, 384, [0.0] * 384, "2026-11-01")
    )  # an older text of i0
    rows.append(("i1", hashes["i1"], "other-model@1", 2, [1.0, 0.0], ds))  # another model: ignored
    store.overwrite("item_embeddings", spark.createDataFrame(rows, ITEM_EMBEDDINGS))
    events = []
    for user in range(12):
        group = [k for k in range(8) if k % 2 == user % 2]  # items 0..7 only; i8 stays cold
        for step, k in enumerate(group[user % 4 :] + group[: user % 4]):
            day = f"2026-11-2{1 + step % 3}"
            ts = dt.datetime.fromisoformat(day) + dt.timedelta(minutes=step)
            events.append(
                (f"e{user}-{step}", f"u{user}", f"i{k}", "click", ts, None, None, 2.0, day, day)
            )
    store.overwrite("events_clean", spark.createDataFrame(events, EVENTS_CLEAN))
    return base_id, vectors


@pytest.mark.spark
@pytest.mark.slow
def test_run_train_contrastive_writes_tuned_embeddings_for_every_item(spark, cfg, store):
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages.contrastive import run_train_contrastive

    ds = "2026-11-23"
    cfg = _with_contrastive(
        cfg,
        num_processes=1,
        epochs=2,
        batch_size=8,
        hidden_dim=16,
        out_dim=8,
        members=2,
        num_sampled_negatives=4,
        max_history=3,
    )
    # Every event trains here (the nightly's holdout users would lose their last ones).
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, holdout_fraction=0.0))
    base_id, vectors = _stage_tables(spark, store, cfg, ds)
    ctx = RunContext(cfg=cfg, spark=spark, store=store, ds=ds)

    result = run_train_contrastive(ctx)
    model_id = tuned_model_id(base_id, ds)
    assert result.rows_in == 12 * 4  # 12 users x 4 positive items -> 4 (user, item) examples each
    assert result.rows_out == 9
    assert set(result.metrics) >= {"contrastive_first_epoch_loss", "contrastive_last_epoch_loss"}
    head_dir = result.artifacts["text_tower"]
    tuned = store.read("item_embeddings").where(F.col("model_id") == model_id)
    rows = {r.item_id: r for r in tuned.collect()}
    assert sorted(rows) == [f"i{k}" for k in range(9)]  # i8 has no interactions and still has one
    # Two members of 8 coordinates each.
    assert {r.dim for r in rows.values()} == {16} and {r.ds for r in rows.values()} == {ds}
    expected = load_head(head_dir)(torch.from_numpy(vectors)).detach().numpy()
    got = np.array([rows[f"i{k}"].embedding for k in range(9)])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    text_hashes = {
        r.item_id: r.text_hash
        for r in store.read("item_embeddings")
        .where(F.col("model_id") == base_id)
        .where(F.col("ds") == ds)
        .collect()
    }
    assert {k: r.text_hash for k, r in rows.items()} == text_hashes

    # A rerun replaces the tuned rows instead of adding a second copy; other rows stay.
    before_other = store.read("item_embeddings").where(F.col("model_id") != model_id).count()
    rerun = run_train_contrastive(ctx)
    # The finished checkpoint of the same data (2 members x 2 epochs): no retraining.
    assert rerun.summary["resumed_from"] == 4
    table = store.read("item_embeddings")
    assert table.where(F.col("model_id") == model_id).count() == 9
    assert table.where(F.col("model_id") != model_id).count() == before_other == 11

    # The next date starts from this date's head: one epoch per member over a share of the
    # examples (0.25 of 48, a seeded sample), and says so in its summary and head config.
    following = run_train_contrastive(
        RunContext(cfg=cfg, spark=spark, store=store, ds="2026-11-24")
    )
    assert following.summary["warm_from"] == ds
    assert len(following.summary["loss"]) == 2  # 2 members x warm_epochs 1
    assert 0 < following.rows_in < 48
    with open(os.path.join(following.artifacts["text_tower"], HEAD_CONFIG)) as f:
        meta = json.load(f)
    assert (meta["warm_from"], meta["warm_nights"]) == (ds, 1)
    assert result.summary["warm_from"] is None


@pytest.mark.spark
def test_disabled_stage_is_skipped(spark, cfg):
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages.contrastive import run_train_contrastive

    cfg = _with_contrastive(cfg, enabled=False)
    cfg = dataclasses.replace(cfg, profile=dataclasses.replace(cfg.profile, enabled=False))
    result = run_train_contrastive(RunContext(cfg=cfg, spark=spark, store=None, ds="2026-11-23"))
    assert result.summary == {"skipped": "contrastive.enabled=false"}


@pytest.mark.spark
@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"members": 0}, "contrastive.members: must be at least 1, got 0"),
        ({"epochs": 0}, "contrastive.epochs: must be at least 1, got 0"),
        ({"anchor_pooling": "max"}, "contrastive.anchor_pooling: choose one of"),
    ],
)
def test_bad_tower_settings_stop_the_stage_with_a_config_error(spark, cfg, settings, message):
    from llmrec_spark.errors import ConfigError
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages.contrastive import run_train_contrastive

    ctx = RunContext(
        cfg=_with_contrastive(cfg, **settings), spark=spark, store=None, ds="2026-11-23"
    )
    with pytest.raises(ConfigError, match=message):
        run_train_contrastive(ctx)
