"""The user tower's core: the catalog softmax, its negatives, a step that learns who likes what."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmrec_spark.core.profile_tower import (
    ProfileTower,
    catalog_softmax_loss,
    draw_negatives,
    item_factors,
    train_step,
    user_factors,
)


def test_catalog_softmax_masks_the_rows_own_positive_among_the_negatives():
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    vectors = torch.tensor([[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    bias = torch.tensor([0.0, 0.0, 1.0])
    positives = torch.tensor([0, 1])
    negatives = torch.arange(3)
    loss = catalog_softmax_loss(users, vectors, bias, positives, negatives)
    # row 0: logits pos 2; negatives item1 0, item2 1 (item0 masked) -> the same for row 1
    expected = -np.log(np.exp(2) / (np.exp(2) + np.exp(0) + np.exp(1)))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_negatives_are_the_whole_small_catalog_or_seeded_uniform_draws():
    assert draw_negatives(5, 8).tolist() == [0, 1, 2, 3, 4]
    a = draw_negatives(1000, 16, torch.Generator().manual_seed(3))
    b = draw_negatives(1000, 16, torch.Generator().manual_seed(3))
    assert a.tolist() == b.tolist() and len(a) == 16 and int(a.max()) < 1000


def planted(seed: int = 0):
    """Two kinds of profile; kind 0 consumes items 0-4, kind 1 items 5-9; items 0 and 5 are
    the most consumed of their kind; nobody consumes items 10-11."""
    rng = np.random.default_rng(seed)
    kinds = rng.integers(0, 2, 512)
    profiles = np.stack([np.eye(8)[k] + rng.normal(0, 0.05, 8) for k in kinds]).astype(np.float32)
    items = np.array(
        [5 * k + (0 if rng.random() < 0.5 else rng.integers(1, 5)) for k in kinds], np.int64
    )
    return torch.from_numpy(profiles), torch.from_numpy(items)


def test_training_learns_what_each_kind_of_profile_consumes_and_the_factors_score_as_the_tower():
    torch.manual_seed(0)
    tower = ProfileTower(in_dim=8, n_items=12, hidden_dim=16, out_dim=4)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=0.02)
    profiles, items = planted()
    negatives = draw_negatives(12, 64)
    losses = [float(train_step(tower, optimizer, profiles, items, negatives)) for _ in range(200)]
    assert losses[-1] < 0.6 * losses[0]
    users = user_factors(tower.eval(), np.eye(8, dtype=np.float32)[:2])
    scores = users @ item_factors(tower).T  # (2 kinds, 12 items)
    assert scores.shape == (2, 12)
    assert int(scores[0].argmax()) == 0 and int(scores[1].argmax()) == 5
    assert set(np.argsort(-scores[0])[:5]) == set(range(5))
    assert set(np.argsort(-scores[1])[:5]) == set(range(5, 10))
    assert scores[:, 10:].max() < scores[0, :5].min()  # never consumed: at the bottom
    with torch.inference_mode():
        direct = tower(torch.eye(8)[:2]) @ tower.items.weight.T + tower.bias
    np.testing.assert_allclose(scores, direct.numpy(), rtol=1e-5, atol=1e-5)
