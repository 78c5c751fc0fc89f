"""Mult-VAE's core: the losses by hand, dense batches, the factor view and the numpy reference
against the torch model, determinism, DDP, and a planted group structure it must recover."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from llmrec_spark.core.vae import (
    MultVAE,
    MultVAELoss,
    anneal_beta,
    dense_batch,
    dense_rows,
    item_vectors,
    kl_divergence,
    multinomial_nll,
    numpy_logits,
    numpy_params,
    train_step,
    user_vectors,
)

PROJECT = Path(__file__).resolve().parents[2]

# logits [[0, ln 2], [0, 0]] -> softmax [[1/3, 2/3], [1/2, 1/2]]; x [[1, 2], [0, 3]].
# Row 0: -(ln(1/3) + 2 ln(2/3)) = 3 ln 3 - 2 ln 2 = 1.909543; row 1: -3 ln(1/2) = 2.079442.
HAND_LOGITS = [[0.0, math.log(2.0)], [0.0, 0.0]]
HAND_X = [[1.0, 2.0], [0.0, 3.0]]
HAND_NLL = 1.994492  # (1.909543 + 2.079442) / 2
# Row 0: mu [1, 0], logvar [0, ln 2] -> 0.5 * ((1 + 1 - 1 - 0) + (2 + 0 - 1 - ln 2)) = 0.653426;
# row 1: mu [0, 2], logvar [0, 0] -> 0.5 * ((1 + 0 - 1 - 0) + (1 + 4 - 1 - 0)) = 2.
HAND_MU = [[1.0, 0.0], [0.0, 2.0]]
HAND_LOGVAR = [[0.0, math.log(2.0)], [0.0, 0.0]]
HAND_KL = 1.326713  # (0.653426 + 2) / 2


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny matrices: a second intra-op thread only adds overhead, a lot of it on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _counts(seed: int, batch: int, n_items: int) -> np.ndarray:
    """Random small counts (batch, n_items) float32 whose row 1 is all zero."""
    x = np.random.default_rng(seed).poisson(0.7, (batch, n_items)).astype(np.float32)
    x[1] = 0.0
    return x


def test_multinomial_nll_is_the_batch_mean_by_hand():
    nll = multinomial_nll(torch.tensor(HAND_LOGITS), torch.tensor(HAND_X))

    assert float(nll) == pytest.approx(HAND_NLL, rel=1e-6)


def test_kl_divergence_is_the_batch_mean_by_hand():
    kl = kl_divergence(torch.tensor(HAND_MU), torch.tensor(HAND_LOGVAR))

    assert float(kl) == pytest.approx(HAND_KL, rel=1e-6)


def test_loss_module_weighs_the_kl_by_beta():
    loss = MultVAELoss()(
        torch.tensor(HAND_LOGITS),
        torch.tensor(HAND_MU),
        torch.tensor(HAND_LOGVAR),
        torch.tensor(HAND_X),
        0.5,
    )

    assert float(loss) == pytest.approx(1.994492 + 0.5 * 1.326713, rel=1e-6)


def test_anneal_beta_rises_linearly_to_its_cap():
    assert anneal_beta(0, 100, 0.2) == 0.0
    assert anneal_beta(10, 100, 0.2) == pytest.approx(0.1)
    assert anneal_beta(50, 100, 1.0) == pytest.approx(0.5)
    assert anneal_beta(20, 100, 0.2) == pytest.approx(0.2)
    assert anneal_beta(500, 100, 0.2) == 0.2
    assert anneal_beta(7, 0, 0.3) == 0.3


def test_dense_batch_skips_padding_and_sums_repeats():
    items = torch.tensor([[2, 0, 2, -1], [-1, -1, -1, -1], [3, 1, -1, -1]])
    weights = torch.tensor([[1.0, 2.0, 3.0, 9.0], [5.0, 5.0, 5.0, 5.0], [0.5, 4.0, 7.0, 7.0]])

    dense = dense_batch(items, weights, n_items=4)

    assert dense.dtype == torch.float32
    assert dense.tolist() == [[2.0, 0.0, 4.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.5]]


def test_dense_rows_sums_repeats_with_unit_or_given_weights():
    histories = [np.array([1, 1, 3]), np.array([], dtype=np.int64), np.array([0, -1])]
    weights = [np.array([0.5, 0.25, 2.0]), np.array([]), np.array([3.0, 9.0])]

    unit = dense_rows(histories, None, n_items=4)
    weighted = dense_rows(histories, weights, n_items=4)

    assert unit.dtype == np.float32 and weighted.dtype == np.float32
    assert unit.tolist() == [[0, 2, 0, 1], [0, 0, 0, 0], [1, 0, 0, 0]]
    assert weighted.tolist() == [[0, 0.75, 0, 2], [0, 0, 0, 0], [3, 0, 0, 0]]


def test_default_architecture_is_the_papers():
    torch.manual_seed(0)
    model = MultVAE(50)

    assert [tuple(layer.weight.shape) for layer in model.encoder] == [(600, 50), (400, 600)]
    assert [tuple(layer.weight.shape) for layer in model.decoder] == [(600, 200), (50, 600)]
    assert model.hidden_dim == 600
    # Xavier-uniform bound sqrt(6 / (fan_in + fan_out)); biases normal(0, 0.001).
    weights = model.encoder[0].weight.detach()
    assert float(weights.abs().max()) <= math.sqrt(6 / (50 + 600))
    assert float(weights.abs().max()) > 0.9 * math.sqrt(6 / (50 + 600))
    assert all(float(layer.bias.detach().abs().max()) < 0.01 for layer in model.decoder)


def test_bad_sizes_and_dropout_are_refused():
    with pytest.raises(ValueError, match="n_items=0"):
        MultVAE(0)
    with pytest.raises(ValueError, match="dropout must be in"):
        MultVAE(10, dropout=1.0)


def test_rows_are_l2_normalised_and_an_empty_row_stays_finite():
    torch.manual_seed(1)
    model = MultVAE(20, (8,), 4).eval()
    row = torch.tensor(_counts(2, 3, 20)[[0]])
    x = torch.cat([row, 3.0 * row, torch.zeros(1, 20)])

    logits, _, _ = model(x)

    torch.testing.assert_close(logits[0], logits[1])
    assert bool(torch.isfinite(logits[2]).all())


@pytest.mark.parametrize("hidden_dims", [(8,), (16, 8), ()])
def test_factor_view_and_numpy_reference_match_the_eval_logits(hidden_dims):
    torch.manual_seed(3)
    model = MultVAE(30, hidden_dims, latent_dim=4, dropout=0.5)
    x = _counts(4, 6, 30)
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(x))[0].numpy()  # (6, 30)
    model.train()

    users, items = user_vectors(model, x), item_vectors(model)

    expected_width = hidden_dims[0] if hidden_dims else 4
    assert users.shape == (6, expected_width + 1) and users.dtype == np.float32
    assert items.shape == (30, expected_width + 1) and items.dtype == np.float32
    np.testing.assert_array_equal(users[:, -1], 1.0)
    np.testing.assert_allclose(users @ items.T, logits, atol=1e-4)
    np.testing.assert_allclose(numpy_logits(numpy_params(model), x), logits, atol=1e-4)
    assert model.training  # user_vectors left the mode as it found it


def test_eval_mode_is_deterministic_and_uses_the_mean():
    torch.manual_seed(5)
    model = MultVAE(20, (8,), 4, dropout=0.5).eval()
    x = torch.from_numpy(_counts(6, 4, 20))

    first, mu, _ = model(x)
    second, _, _ = model(x, generator=torch.Generator().manual_seed(1))

    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, model.output_layer(model.decoder_hidden(mu)))


def test_training_mode_is_reproducible_with_seeded_randomness():
    torch.manual_seed(7)
    model = MultVAE(20, (8,), 4, dropout=0.5).train()
    x = torch.from_numpy(_counts(8, 4, 20))

    def sample(seed: int) -> torch.Tensor:
        torch.manual_seed(100)  # the dropout mask
        return model(x, generator=torch.Generator().manual_seed(seed))[0]

    torch.testing.assert_close(sample(1), sample(1), rtol=0, atol=0)
    assert not torch.allclose(sample(1), sample(2))
    assert not torch.allclose(sample(1), model.eval()(x)[0])


def test_config_rebuilds_a_model_that_loads_the_state_dict():
    torch.manual_seed(9)
    model = MultVAE(30, (16, 8), 4, dropout=0.3).eval()
    x = torch.from_numpy(_counts(10, 3, 30))

    clone = MultVAE(**model.config())
    clone.load_state_dict(model.state_dict())

    assert clone.config() == {
        "n_items": 30,
        "hidden_dims": [16, 8],
        "latent_dim": 4,
        "dropout": 0.3,
    }
    torch.testing.assert_close(clone.eval()(x)[0], model(x)[0], rtol=0, atol=0)


def test_training_recovers_planted_item_groups(one_torch_thread):
    # 40 items in 4 groups of 10; each of 200 users holds 5 distinct items of one group.
    rng = np.random.default_rng(11)
    groups = rng.integers(0, 4, 200)
    histories = [g * 10 + rng.choice(10, 5, replace=False) for g in groups]
    x = torch.from_numpy(dense_rows(histories, None, 40))
    torch.manual_seed(12)
    model = MultVAE(40, (32,), latent_dim=8, dropout=0.2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(13)
    with torch.no_grad():
        nll_before = float(multinomial_nll(model.eval()(x)[0], x))

    model.train()
    losses = [
        train_step(model, optimizer, x, anneal_beta(s, 1000, 0.2), generator) for s in range(200)
    ]

    with torch.no_grad():
        logits = model.eval()(x)[0]
    nll_after = float(multinomial_nll(logits, x))
    # Uniform over all 40 items costs 5 ln 40 = 18.4 a user; knowing only the group, 5 ln 10 = 11.5.
    assert nll_before > 5 * math.log(30)
    assert nll_after < 5 * math.log(10)
    assert losses[-1][0] < losses[0][0] - 5.0
    unseen = logits.numpy().copy()
    unseen[x.numpy() > 0] = -np.inf  # the user's history is not recommended back
    top5 = np.argsort(-unseen, axis=1)[:, :5]
    all_in_own_group = (top5 // 10 == groups[:, None]).all(axis=1)
    assert all_in_own_group.mean() >= 0.9


DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import torch.distributed as dist
    import torch.distributed.nn  # before init_process_group; see stages/tower_training.py
    from torch.nn.parallel import DistributedDataParallel
    from llmrec_spark.core.vae import MultVAE, train_step

    dist.init_process_group("gloo", init_method=sys.argv[1], rank=0, world_size=1)
    try:
        x = torch.tensor([[1.0, 0, 2, 0, 0, 1], [0, 3, 0, 0, 1, 0]])
        runs = []
        for wrap in (False, True):
            torch.manual_seed(0)
            vae = MultVAE(6, (4,), 2, dropout=0.0)
            model = DistributedDataParallel(vae) if wrap else vae
            torch.manual_seed(100 + wrap)  # eps must come from the generator, not this
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
            generator = torch.Generator().manual_seed(3)
            start = vae.output_layer.bias.tolist()
            losses = [train_step(model, optimizer, x, 0.5, generator) for _ in range(3)]
            runs.append({"losses": losses, "start": start, "bias": vae.output_layer.bias.tolist()})
        print(json.dumps(runs))
    finally:
        dist.destroy_process_group()
    """
)


def test_train_step_through_ddp_matches_the_plain_model(tmp_path):
    # In a child process: a process group in the pytest process could outlive the test.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", DDP_SCRIPT, f"file://{tmp_path}/rendezvous"],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    plain, wrapped = json.loads(done.stdout.strip().splitlines()[-1])
    # The generator reaches the module through DDP: the same eps, so the same steps.
    np.testing.assert_allclose(wrapped["losses"], plain["losses"], rtol=1e-6)
    np.testing.assert_allclose(wrapped["bias"], plain["bias"], rtol=1e-5, atol=1e-7)
    # Three Adam steps at lr 1e-2 move every bias by about 3e-2.
    assert np.abs(np.subtract(plain["bias"], plain["start"])).min() > 1e-2
