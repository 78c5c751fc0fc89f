"""Mult-VAE's training function, run in each TorchDistributor (or torchrun) process, and its files.

`train_vae` trains `core.vae.MultVAE` with DDP on petastorm batches of users' padded
(item, weight) rows, checkpoints each epoch, resumes from a checkpoint of the same job, and
saves the model as safetensors (rank 0). `save_vae` / `load_vae` / `vae_scorer` read and
write the model's folder: weights, config and the item ids in column order.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmrec_spark.core.vae import MultVAE, anneal_beta, dense_batch, train_step, user_vectors
from llmrec_spark.stages.torch_process import (
    ProcessPlace,
    RankZeroMetrics,
    load_checkpoint,
    rank_zero_step,
    save_checkpoint,
    save_weights,
    shard_batches,
    training_place,
)

log = logging.getLogger(__name__)

VAE_WEIGHTS = "vae.safetensors"
VAE_CONFIG = "config.json"
ITEM_IDS = "item_ids.json"
CHECKPOINT = "last.pt"


def train_vae(config: dict[str, Any]) -> dict[str, Any]:
    """Train the Mult-VAE with DDP on petastorm batches; checkpoint per epoch, resume, save it.

    Keys: converter (petastorm, columns `items` int (L,) PAD-filled and `weights` float
    (L,)), n_items, hidden_dim, latent_dim, dropout, beta_cap, anneal_steps, epochs,
    batch_size, learning_rate, weight_decay, seed, device, reader_workers, checkpoint_dir,
    output_dir, fingerprint, model_metadata, mlflow_tracking_uri, mlflow_run_id,
    fail_after_epoch (testing: raise after that epoch's checkpoint).
    Returns model_path, losses (mean NLL + beta KL per epoch, all so far), kl (per epoch),
    epochs_run, resumed_from (epochs already done), steps; the same on every rank.
    """
    from petastorm.pytorch import BatchedDataLoader
    from safetensors.torch import save_file

    with training_place(config.get("device", "cpu")) as place:
        return _train(config, place, BatchedDataLoader, save_file)


@dataclass
class _Progress:
    """Where training stands: the next epoch, the step counter, per-epoch losses and KLs."""

    epoch: int = 0
    step: int = 0
    losses: list[float] = field(default_factory=list)
    kls: list[float] = field(default_factory=list)


def _train(
    config: dict[str, Any],
    place: ProcessPlace,
    loader_fn: Callable[..., Any],
    save_file: Callable[..., Any],
) -> dict[str, Any]:
    """Train in this process from the checkpoint (or from scratch); rank 0 saves the model."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(int(config["seed"]))
    model = new_model(config).to(place.device)
    optimizer = torch.optim.Adam(
        model.parameters(),
        lr=float(config["learning_rate"]),
        weight_decay=float(config.get("weight_decay", 0.0)),
    )
    checkpoint_path = os.path.join(config["checkpoint_dir"], CHECKPOINT)
    state = load_checkpoint(checkpoint_path, config.get("fingerprint", ""), place.device)
    progress = _Progress()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = _Progress(state["epoch"], state["step"], state["losses"], state["kls"])
        if place.rank == 0:
            log.info(
                "resuming from %s: epoch %d, step %d",
                checkpoint_path,
                progress.epoch,
                progress.step,
            )
    resumed_from = progress.epoch if state is not None else None
    wrapped: torch.nn.Module = model
    if place.distributed:
        cuda = place.device.type == "cuda"
        wrapped = DistributedDataParallel(model, device_ids=[place.device.index] if cuda else None)
    tracker = RankZeroMetrics(config, place.rank)
    epochs = int(config["epochs"])
    for epoch in range(progress.epoch, epochs):
        started = time.perf_counter()
        loss, kl, rows = _train_epoch(config, wrapped, optimizer, place, loader_fn, epoch, progress)
        progress.epoch = epoch + 1
        progress.losses.append(loss)
        progress.kls.append(kl)
        if place.rank == 0:
            save_checkpoint(
                checkpoint_path,
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    **vars(progress),
                    "fingerprint": config.get("fingerprint", ""),
                },
            )
            seconds = time.perf_counter() - started
            log.info(
                "vae epoch %d/%d loss %.4f kl %.3f step %d (%.1fs, %.0f users/s)",
                epoch + 1, epochs, loss, kl, progress.step, seconds, rows / max(seconds, 1e-9),
            )  # fmt: skip
            tracker.log("vae_loss", loss, epoch + 1)
        if place.distributed:
            torch.distributed.barrier()
        if config.get("fail_after_epoch") is not None and epoch + 1 == int(
            config["fail_after_epoch"]
        ):
            raise RuntimeError(f"simulated failure after epoch {epoch + 1} (fail_after_epoch)")
    if place.rank == 0:
        save_vae(model, config["output_dir"], dict(config.get("model_metadata", {})), save_file)
    return {
        "model_path": config["output_dir"],
        "losses": progress.losses,
        "kl": progress.kls,
        "epochs_run": epochs - (resumed_from or 0),
        "resumed_from": resumed_from,
        "steps": rank_zero_step(place, progress.step),
    }


def new_model(config: dict[str, Any]) -> MultVAE:
    """An untrained MultVAE of the config's sizes (seed the caller's RNG first)."""
    return MultVAE(
        int(config["n_items"]),
        (int(config["hidden_dim"]),),
        int(config["latent_dim"]),
        float(config["dropout"]),
    )


def _train_epoch(
    config: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    place: ProcessPlace,
    loader_fn: Callable[..., Any],
    epoch: int,
    progress: _Progress,
) -> tuple[float, float, float]:
    """One pass over this rank's shard: (mean loss, mean KL, users) over all ranks."""

    seed, n_items = int(config["seed"]), int(config["n_items"])
    # Dropout and the latent draws, seeded per (epoch, rank): a resumed run draws what an
    # uninterrupted one would have.
    torch.manual_seed(seed * 1_000_003 + epoch * 1009 + place.rank)
    model.train()
    totals = torch.zeros(3, dtype=torch.float64, device=place.device)  # loss*rows, kl*rows, rows
    beta_cap, anneal_steps = float(config["beta_cap"]), int(config["anneal_steps"])
    with shard_batches(config, place, model, loader_fn, seed=seed + epoch) as loader:
        for batch in loader:
            x = dense_batch(batch["items"].long(), batch["weights"].float(), n_items)
            beta = anneal_beta(progress.step, anneal_steps, beta_cap)
            nll, kl = train_step(model, optimizer, x.to(place.device), beta)
            progress.step += 1
            rows = float(len(x))
            totals += totals.new_tensor([(nll + beta * kl) * rows, kl * rows, rows])
    if place.distributed:
        torch.distributed.all_reduce(totals)
    rows_all = totals[2].clamp_min(1.0)
    return float(totals[0] / rows_all), float(totals[1] / rows_all), float(totals[2])


def save_vae(
    model: MultVAE, output_dir: str, metadata: dict[str, Any], save_file: Any = None
) -> str:
    """Write vae.safetensors and config.json (sizes plus `metadata`) under output_dir."""
    config = {**model.config(), **metadata}
    return save_weights(model, output_dir, weights=VAE_WEIGHTS, config=config, save_file=save_file)


def write_item_ids(output_dir: str, item_ids: list[str]) -> None:
    """The item id of each of the model's columns, in column order."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, ITEM_IDS), "w") as f:
        json.dump(item_ids, f)


def load_vae(model_dir: str) -> tuple[MultVAE, list[str]]:
    """The model saved by `save_vae` (eval mode, CPU) and its columns' item ids."""
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, VAE_CONFIG)) as f:
        meta = json.load(f)
    model = MultVAE(
        int(meta["n_items"]),
        [int(d) for d in meta["hidden_dims"]],
        int(meta["latent_dim"]),
        float(meta["dropout"]),
    )
    model.load_state_dict(load_file(os.path.join(model_dir, VAE_WEIGHTS)))
    with open(os.path.join(model_dir, ITEM_IDS)) as f:
        item_ids = json.load(f)
    if len(item_ids) != model.n_items:
        raise ValueError(f"{model_dir}: {len(item_ids)} item ids for {model.n_items} columns")
    return model.eval(), item_ids


@functools.lru_cache(maxsize=2)
def vae_scorer(model_dir: str, digest: str) -> Callable[[np.ndarray], np.ndarray]:
    """numpy (users, n_items) rows -> (users, hidden_dim + 1) user vectors, the model loaded
    once per process per digest (`core.vae.user_vectors`)."""
    model, _ = load_vae(model_dir)
    return functools.partial(user_vectors, model)
