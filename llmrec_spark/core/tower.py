"""The text tower's pure-torch core: the head, the InfoNCE loss, one batch's encoding and
one optimiser step.

Nothing here imports Spark, so the same code runs inside TorchDistributor's processes, in
`llmrec bench cores` and on a GPU machine that has torch but no JVM.
"""

from __future__ import annotations

from typing import Any

import torch

from llmrec_spark.config import ANCHOR_POOLINGS

PAD = -1


class TextTowerHead(torch.nn.Module):
    """MLP with a linear skip on a base embedding; output is L2-normalised.

    At initialisation the MLP branch is zero and the skip is a random orthogonal projection,
    so the untrained head approximately preserves the base embeddings' cosine geometry.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim
        last = torch.nn.Linear(hidden_dim, out_dim)
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(in_dim, hidden_dim), torch.nn.GELU(), last)
        self.skip = torch.nn.Linear(in_dim, out_dim, bias=False)
        torch.nn.init.orthogonal_(self.skip.weight)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        # base: (n, in_dim) -> (n, out_dim), unit rows
        return torch.nn.functional.normalize(self.skip(base) + self.mlp(base), dim=-1)

    def config(self) -> dict[str, int]:
        return {"in_dim": self.in_dim, "hidden_dim": self.hidden_dim, "out_dim": self.out_dim}


class EnsembleHead(torch.nn.Module):
    """Heads trained apart (each with its own seed, batch order and negatives), used as one.

    The output is the members' unit outputs side by side, scaled by 1 / sqrt(members): a unit
    row whose dot product with another is the mean of the members' cosines.
    """

    def __init__(self, members: list[TextTowerHead]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one member head")
        self.members = torch.nn.ModuleList(members)
        first = members[0]
        self.in_dim, self.hidden_dim = first.in_dim, first.hidden_dim
        self.member_out_dim = first.out_dim
        self.out_dim = sum(m.out_dim for m in members)

    def forward(self, base: torch.Tensor) -> torch.Tensor:
        # base: (n, in_dim) -> (n, members * member_out_dim), unit rows
        outputs = [member(base) for member in self.members]
        return torch.cat(outputs, dim=-1) / len(outputs) ** 0.5

    def config(self) -> dict[str, int]:
        return {
            "in_dim": self.in_dim,
            "hidden_dim": self.hidden_dim,
            "out_dim": self.out_dim,
            "member_out_dim": self.member_out_dim,
            "members": len(self.members),
        }


def head_from_config(dims: dict[str, Any]) -> TextTowerHead | EnsembleHead:
    """An untrained head of the shape `config()` wrote (a lone head, or an ensemble when
    `members` > 1): the frame a saved head's weights load into."""
    in_dim, hidden_dim = int(dims["in_dim"]), int(dims["hidden_dim"])
    members = int(dims.get("members", 1))
    if members > 1:
        out_dim = int(dims["member_out_dim"])
        return EnsembleHead([TextTowerHead(in_dim, hidden_dim, out_dim) for _ in range(members)])
    return TextTowerHead(in_dim, hidden_dim, int(dims["out_dim"]))


def info_nce(
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    negative_mask: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Mean InfoNCE loss: anchor i must pick positive i among all positives and the negatives.

    negative_mask (batch, batch + n_neg) is True where a candidate must not count as a
    negative; the anchor's own positive (the diagonal) is never masked.
    """
    batch = anchors.shape[0]
    candidates = torch.cat([positives, negatives])  # (batch + n_neg, dim)
    logits = anchors @ candidates.T / temperature  # (batch, batch + n_neg)
    if negative_mask is not None:
        own_positive = torch.eye(batch, candidates.shape[0], dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(negative_mask & ~own_positive, float("-inf"))
    target = torch.arange(batch, device=logits.device)  # (batch,)
    return torch.nn.functional.cross_entropy(logits, target)


class InfoNCELoss(torch.nn.Module):
    """InfoNCE with a fixed temperature; see `info_nce`."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        anchors: torch.Tensor,
        positives: torch.Tensor,
        negatives: torch.Tensor,
        negative_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return info_nce(anchors, positives, negatives, negative_mask, self.temperature)


def negative_mask(
    history: torch.Tensor, positive_ids: torch.Tensor, negative_ids: torch.Tensor
) -> torch.Tensor:
    """True where candidate j (positives then negatives) is in user i's history or is i's positive item."""
    # history (batch, H); PAD (-1) never equals an item index. Each candidate is looked up in
    # the sorted history row (batch x candidates x log H), not compared with every history
    # entry (a (batch, candidates, H) tensor: 0.9 GB of booleans at batch 4096).
    candidates = torch.cat([positive_ids, negative_ids])  # (batch + n_neg,)
    wanted = candidates.expand(history.shape[0], -1).contiguous()  # (batch, batch + n_neg)
    if history.shape[1] == 0:
        in_history = torch.zeros_like(wanted, dtype=torch.bool)
    else:
        sorted_history = history.sort(dim=1).values  # (batch, H)
        at = torch.searchsorted(sorted_history, wanted).clamp_(max=history.shape[1] - 1)
        in_history = sorted_history.gather(1, at) == wanted  # (batch, batch + n_neg)
    same_item = wanted == positive_ids[:, None]  # (batch, batch + n_neg)
    return in_history | same_item


def encode_batch(
    head: torch.nn.Module,
    base: torch.Tensor,
    history: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    pooling: str = "mean_of_heads",
    input_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(anchors, positives, negatives) for one batch, with a single forward pass of `head`.

    base (n_items, in_dim); history (batch, H) item indices padded with PAD; positive_ids
    (batch,); negative_ids (n_neg,). One forward per step keeps DDP's gradient hooks simple.
    With `input_dropout` p > 0 each item's base embedding in the batch loses a random share p
    of its coordinates (the rest scaled by 1 / (1 - p)), one mask per item and step, drawn
    from `generator`: the head cannot lean on single coordinates of the items it trains on,
    which is what a new item's text needs.
    """
    batch, max_history = history.shape
    valid = (history != PAD).unsqueeze(-1).to(base.dtype)  # (batch, H, 1)
    counts = valid.sum(dim=1).clamp_min(1.0)  # (batch, 1)
    n_pos = positive_ids.shape[0]
    ids = torch.cat([history.clamp_min(0).reshape(-1), positive_ids, negative_ids])
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    rows = dropout_rows(base[unique_ids], input_dropout, generator)  # (n_unique, in_dim)
    history_rows = inverse[: batch * max_history]
    candidate_rows = inverse[batch * max_history :]
    if pooling == "mean_of_heads":
        encoded = head(rows)  # (n_unique, out)
        per_item = encoded[history_rows].view(batch, max_history, -1)  # (batch, H, out)
        anchors = torch.nn.functional.normalize((per_item * valid).sum(dim=1) / counts, dim=-1)
        candidates = encoded[candidate_rows]  # (batch + n_neg, out)
    elif pooling == "head_of_mean":
        in_history = rows[history_rows].view(batch, max_history, -1)  # (batch, H, in_dim)
        pooled = (in_history * valid).sum(dim=1) / counts  # (batch, in_dim)
        needed, needed_inverse = torch.unique(candidate_rows, return_inverse=True)
        encoded = head(torch.cat([pooled, rows[needed]]))
        anchors = encoded[:batch]  # (batch, out)
        candidates = encoded[batch:][needed_inverse]  # (batch + n_neg, out)
    else:
        raise ValueError(
            f"anchor pooling must be one of {', '.join(ANCHOR_POOLINGS)}, got {pooling!r}"
        )
    return anchors, candidates[:n_pos], candidates[n_pos:]


def dropout_rows(
    rows: torch.Tensor, p: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Inverted dropout of `rows` (n, dim) with a mask drawn on the CPU from `generator`.

    The mask comes from the seeded CPU generator on every device, so a resumed run and a GPU
    run drop the same coordinates as an uninterrupted CPU run. p = 0 returns `rows` as is.
    """
    if p <= 0.0:
        return rows
    keep = torch.rand(rows.shape, generator=generator) >= p  # (n, dim) bool
    return rows * keep.to(rows.device, rows.dtype) / (1.0 - p)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    base: torch.Tensor,
    history: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    pooling: str = "mean_of_heads",
    input_dropout: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One optimiser step on one batch (tensors on the model's device); returns the detached loss.

    This is the whole of a training step, so what `llmrec bench cores` times on a GPU is the
    step `train_text_tower` runs.
    """
    anchors, positives, negatives = encode_batch(
        model, base, history, positive_ids, negative_ids, pooling, input_dropout, generator
    )
    mask = negative_mask(history, positive_ids, negative_ids)
    loss = loss_fn(anchors, positives, negatives, mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_optimizer(head: torch.nn.Module, config: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the head's parameters with the config's learning_rate and weight_decay."""
    return torch.optim.AdamW(
        head.parameters(),
        lr=float(config["learning_rate"]),
        weight_decay=float(config.get("weight_decay", 0.0)),
    )
