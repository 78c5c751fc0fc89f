"""Mult-VAE's pure numpy/torch core (Liang et al., "Variational Autoencoders for Collaborative
Filtering", WWW 2018): the model, its loss, one optimiser step, dense batches, and the factor
view that scores users against items with a dot product.

The decoder's last layer is linear, so its logits are [h, 1] @ [W | b]^T with h the last hidden
activation: a user row times an item row, so scoring at scale is a top-N over dot products.
`numpy_logits` is the same eval-mode forward in plain numpy, the reference benchmarks check
the torch model against. Nothing here imports Spark.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

PAD = -1
# torch.nn.functional.normalize's floor on the norm: an all-zero row stays zero.
_NORM_EPS = 1e-12


class MultVAE(torch.nn.Module):
    """Encoder [I -> h1 -> ... -> 2 * latent] and decoder [latent -> ... -> h1 -> I], tanh between.

    hidden_dims=(600,) and latent_dim=200 is the paper's [I -> 600 -> 200 -> 600 -> I]. Weights
    are Xavier-uniform and biases normal(0, 0.001) as in the paper's code; seed before building.
    """

    def __init__(
        self,
        n_items: int,
        hidden_dims: Sequence[int] = (600,),
        latent_dim: int = 200,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if n_items <= 0 or latent_dim <= 0 or any(d <= 0 for d in hidden_dims):
            raise ValueError(
                f"Mult-VAE sizes must be positive, got n_items={n_items}, "
                f"hidden_dims={list(hidden_dims)}, latent_dim={latent_dim}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"Mult-VAE input dropout must be in [0, 1), got {dropout}")
        self.n_items, self.latent_dim, self.dropout = n_items, latent_dim, dropout
        self.hidden_dims = [int(d) for d in hidden_dims]
        encoder_dims = [n_items, *self.hidden_dims, 2 * latent_dim]
        decoder_dims = [latent_dim, *reversed(self.hidden_dims), n_items]
        self.encoder = _linear_stack(encoder_dims)
        self.decoder = _linear_stack(decoder_dims)

    @property
    def output_layer(self) -> torch.nn.Linear:
        """The decoder's last, linear layer: logits = hidden @ weight.T + bias."""
        layer = self.decoder[-1]
        assert isinstance(layer, torch.nn.Linear)
        return layer

    @property
    def hidden_dim(self) -> int:
        """Width of the decoder's last hidden layer (h1; the latent size without hidden layers)."""
        return self.hidden_dims[0] if self.hidden_dims else self.latent_dim

    def config(self) -> dict[str, Any]:
        """The constructor's arguments: `MultVAE(**model.config())` rebuilds the architecture."""
        return {
            "n_items": self.n_items,
            "hidden_dims": list(self.hidden_dims),
            "latent_dim": self.latent_dim,
            "dropout": self.dropout,
        }

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar), each (batch, latent), of rows x (batch, n_items); dropout only in training."""
        h = torch.nn.functional.normalize(x, dim=1, eps=_NORM_EPS)  # (batch, n_items), unit rows
        h = torch.nn.functional.dropout(h, p=self.dropout, training=self.training)
        for layer in self.encoder[:-1]:
            h = torch.tanh(layer(h))  # (batch, hidden)
        out = self.encoder[-1](h)  # (batch, 2 * latent)
        mu, logvar = out.split(self.latent_dim, dim=1)
        return mu, logvar

    def decoder_hidden(self, z: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden activation (batch, hidden_dim) for latents z (batch, latent)."""
        h = z
        for layer in self.decoder[:-1]:
            h = torch.tanh(layer(h))
        return h

    def forward(
        self, x: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(logits (batch, n_items), mu, logvar) for rows x (batch, n_items).

        In training mode z = mu + eps * sigma with eps drawn from `generator` (on its device,
        then moved, so a CPU generator drives a GPU model); in eval mode z = mu.
        """
        mu, logvar = self.encode(x)
        z = _reparameterise(mu, logvar, generator) if self.training else mu
        logits = self.output_layer(self.decoder_hidden(z))  # (batch, n_items)
        return logits, mu, logvar


def _linear_stack(dims: Sequence[int]) -> torch.nn.ModuleList:
    """Linear layers dims[0] -> dims[1] -> ..., Xavier-uniform weights, biases normal(0, 0.001)."""
    layers = torch.nn.ModuleList()
    for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
        layer = torch.nn.Linear(d_in, d_out)
        torch.nn.init.xavier_uniform_(layer.weight)
        torch.nn.init.normal_(layer.bias, mean=0.0, std=0.001)
        layers.append(layer)
    return layers


def _reparameterise(
    mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """A sample mu + eps * exp(logvar / 2), eps standard normal from `generator`."""
    device = generator.device if generator is not None else mu.device
    eps = torch.randn(mu.shape, generator=generator, device=device, dtype=mu.dtype)
    return mu + eps.to(mu.device) * torch.exp(0.5 * logvar)  # (batch, latent)


def multinomial_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_i x_i log softmax(logits)_i; both (batch, n_items)."""
    log_probs = torch.nn.functional.log_softmax(logits, dim=1)  # (batch, n_items)
    return -(log_probs * x).sum(dim=1).mean()


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of KL(N(mu, exp(logvar)) || N(0, I)); both (batch, latent)."""
    per_dim = torch.exp(logvar) + mu**2 - 1.0 - logvar  # (batch, latent)
    return 0.5 * per_dim.sum(dim=1).mean()


def anneal_beta(step: int, total_anneal_steps: int, cap: float) -> float:
    """The KL weight at `step`: rises linearly to 1 over total_anneal_steps, never above cap."""
    if total_anneal_steps <= 0:
        return cap
    return min(cap, step / total_anneal_steps)


class MultVAELoss(torch.nn.Module):
    """The negative ELBO with a weighted KL term: multinomial_nll + beta * kl_divergence."""

    def forward(
        self,
        logits: torch.Tensor,
        mu: torch.Tensor,
        logvar: torch.Tensor,
        x: torch.Tensor,
        beta: float,
    ) -> torch.Tensor:
        return multinomial_nll(logits, x) + beta * kl_divergence(mu, logvar)


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    beta: float,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """One optimiser step on a dense batch x (batch, n_items); returns (nll, kl) as floats.

    `model` is a MultVAE in training mode, possibly wrapped in DistributedDataParallel (the
    generator goes through DDP as a keyword argument to the module's forward).
    """
    logits, mu, logvar = model(x, generator=generator)
    nll = multinomial_nll(logits, x)
    kl = kl_divergence(mu, logvar)
    loss = nll + beta * kl
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(nll.detach()), float(kl.detach())


def dense_batch(items: torch.Tensor, weights: torch.Tensor, n_items: int) -> torch.Tensor:
    """Rows (batch, n_items) float32 with weights scattered at items (batch, L), PAD skipped.

    A repeated item index in a row adds its weights up.
    """
    valid = items != PAD  # (batch, L)
    values = torch.where(valid, weights.to(torch.float32), 0.0)  # (batch, L)
    dense = torch.zeros(items.shape[0], n_items, dtype=torch.float32, device=items.device)
    return dense.scatter_add_(1, items.clamp_min(0), values)  # (batch, n_items)


def dense_rows(
    histories: Sequence[np.ndarray], weights: Sequence[np.ndarray] | None, n_items: int
) -> np.ndarray:
    """Rows (len(histories), n_items) float32 of each history's weights (1.0 when None).

    PAD entries are skipped and a repeated item index in a history adds its weights up.
    """
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    rows = np.repeat(np.arange(len(histories)), lengths)
    cols = np.concatenate([np.empty(0, np.int64), *histories]).astype(np.int64)
    if weights is None:
        values = np.ones(len(cols), dtype=np.float32)
    else:
        values = np.concatenate([np.empty(0, np.float32), *weights]).astype(np.float32)
    keep = cols != PAD
    dense = np.zeros((len(histories), n_items), dtype=np.float32)
    np.add.at(dense, (rows[keep], cols[keep]), values[keep])
    return dense


def item_vectors(model: MultVAE) -> np.ndarray:
    """Item rows (n_items, hidden_dim + 1) float32: the last decoder layer's weights, then its bias."""
    last = model.output_layer
    with torch.inference_mode():
        weight = last.weight.detach().float().cpu().numpy()  # (n_items, hidden_dim)
        bias = last.bias.detach().float().cpu().numpy()  # (n_items,)
    return np.concatenate([weight, bias[:, None]], axis=1).astype(np.float32)


def user_vectors(model: MultVAE, x: np.ndarray) -> np.ndarray:
    """User rows (batch, hidden_dim + 1) float32 for rows x (batch, n_items): eval-mode h, then 1.

    user_vectors(model, x) @ item_vectors(model).T are the model's eval-mode logits. The
    model's training/eval mode is left as it was.
    """
    device = next(model.parameters()).device
    with _eval_mode(model), torch.inference_mode():
        rows = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
        mu, _ = model.encode(rows)
        hidden = model.decoder_hidden(mu).float().cpu().numpy()  # (batch, hidden_dim)
    ones = np.ones((hidden.shape[0], 1), dtype=np.float32)
    return np.concatenate([hidden, ones], axis=1).astype(np.float32)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the block, then the mode the model had before."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def numpy_params(model: MultVAE) -> dict[str, np.ndarray]:
    """The model's parameters as float32 arrays, named as in its state_dict (encoder.0.weight, ...)."""
    return {
        name: tensor.detach().float().cpu().numpy() for name, tensor in model.state_dict().items()
    }


def numpy_logits(params: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """Eval-mode logits (batch, n_items) float32 of rows x (batch, n_items), in plain numpy.

    params as from `numpy_params`: L2-normalised rows, encoder with tanh, z = mu, decoder.
    """
    encoder, decoder = _numpy_layers(params, "encoder"), _numpy_layers(params, "decoder")
    h = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(h, axis=1, keepdims=True)  # (batch, 1)
    h = h / np.maximum(norms, _NORM_EPS)
    for weight, bias in encoder[:-1]:
        h = np.tanh(h @ weight.T + bias)  # (batch, hidden)
    weight, bias = encoder[-1]
    latent = weight.shape[0] // 2
    h = h @ weight[:latent].T + bias[:latent]  # (batch, latent): mu
    for weight, bias in decoder[:-1]:
        h = np.tanh(h @ weight.T + bias)
    weight, bias = decoder[-1]
    return (h @ weight.T + bias).astype(np.float32)  # (batch, n_items)


def _numpy_layers(params: dict[str, np.ndarray], part: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each linear layer of `part` ("encoder" or "decoder"), in order."""
    count = sum(1 for name in params if name.startswith(f"{part}.") and name.endswith(".weight"))
    return [(params[f"{part}.{i}.weight"], params[f"{part}.{i}.bias"]) for i in range(count)]
