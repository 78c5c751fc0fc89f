"""The user tower's pure-torch core: a user's own profile text to the items they consume.

A brand-new user has no history, only what they told us (`landing/users/`: interests, a
short bio; the MovieLens loaders render age band, gender and occupation). `ProfileTower`
maps that text's embedding (the same encoder as the items') to a vector, and scores an item
by its dot product with a learned item vector plus a learned item bias. It is trained as a
softmax over the catalog: each (profile, consumed item) example must pick its item among
uniformly drawn items (the whole catalog when it is small), so the bias learns what everyone
consumes and the vectors what sets this profile apart. In-batch negatives would subtract
popularity, which is what a user without history most needs.

Nothing here imports Spark: the same step runs in TorchDistributor's processes and on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch


class ProfileTower(torch.nn.Module):
    """Profile embedding (in_dim) -> user vector (out_dim); item vectors and biases per item index."""

    def __init__(self, in_dim: int, n_items: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.n_items = in_dim, n_items
        self.hidden_dim, self.out_dim = hidden_dim, out_dim
        self.user = torch.nn.Sequential(
            torch.nn.Linear(in_dim, hidden_dim),
            torch.nn.GELU(),
            torch.nn.Linear(hidden_dim, out_dim),
        )
        self.items = torch.nn.Embedding(n_items, out_dim)
        torch.nn.init.normal_(self.items.weight, std=0.01)
        self.bias = torch.nn.Parameter(torch.zeros(n_items))

    def forward(
        self,
        profiles: torch.Tensor,
        positive_ids: torch.Tensor | None = None,
        negative_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """User vectors (b, out_dim) of profiles (b, in_dim); with item ids, the batch's
        `catalog_softmax_loss` (one forward per step keeps DDP's gradient hooks simple)."""
        users = self.user(profiles)
        if positive_ids is None or negative_ids is None:
            return users
        return catalog_softmax_loss(users, self.items.weight, self.bias, positive_ids, negative_ids)

    def config(self) -> dict[str, int]:
        return {
            "in_dim": self.in_dim,
            "n_items": self.n_items,
            "hidden_dim": self.hidden_dim,
            "out_dim": self.out_dim,
        }


def catalog_softmax_loss(
    users: torch.Tensor,
    item_vectors: torch.Tensor,
    item_bias: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
) -> torch.Tensor:
    """Mean cross-entropy of each user's positive against the drawn negatives (the negatives
    equal to the row's own positive masked): users (b, d), item_vectors (n, d), item_bias
    (n,), positive_ids (b,), negative_ids (m,)."""
    positive = (users * item_vectors[positive_ids]).sum(-1) + item_bias[positive_ids]  # (b,)
    negative = users @ item_vectors[negative_ids].T + item_bias[negative_ids]  # (b, m)
    negative = negative.masked_fill(negative_ids[None, :] == positive_ids[:, None], float("-inf"))
    logits = torch.cat([positive[:, None], negative], dim=1)  # (b, 1 + m)
    target = torch.zeros(len(users), dtype=torch.long, device=users.device)
    return torch.nn.functional.cross_entropy(logits, target)


def draw_negatives(
    n_items: int, num_negatives: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Item indices every example of a step is contrasted with: the whole catalog when it has
    at most `num_negatives` items, else `num_negatives` uniform draws (CPU, from `generator`)."""
    if n_items <= num_negatives:
        return torch.arange(n_items)
    return torch.randint(n_items, (num_negatives,), generator=generator)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    profiles: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
) -> torch.Tensor:
    """One optimiser step on one batch (tensors on the model's device); returns the detached
    loss. `model` is a ProfileTower or its DistributedDataParallel wrapper."""
    loss = model(profiles, positive_ids, negative_ids)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def user_factors(tower: ProfileTower, profiles: np.ndarray) -> np.ndarray:
    """(u, out_dim + 1) float32: each profile's user vector with a trailing 1 (the bias column
    of `item_factors`), so user . item is the tower's score."""
    with torch.inference_mode():
        users = tower(torch.from_numpy(np.ascontiguousarray(profiles, dtype=np.float32)))
    return np.hstack([users.numpy(), np.ones((len(profiles), 1), np.float32)])


def item_factors(tower: ProfileTower) -> np.ndarray:
    """(n_items, out_dim + 1) float32: each item's vector with its bias as the last column."""
    with torch.no_grad():
        vectors = tower.items.weight.detach().cpu().numpy()
        bias = tower.bias.detach().cpu().numpy()[:, None]
    return np.hstack([vectors, bias]).astype(np.float32)
