"""The user tower's training function, run in each TorchDistributor process, and its files.

`train_profile_tower` trains `core.profile_tower.ProfileTower` with DDP on petastorm batches
of (profile embedding, consumed item index) rows, checkpoints each epoch, resumes from a
checkpoint of the same job, and saves the tower as safetensors (rank 0).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from llmrec_spark.core.profile_tower import ProfileTower, draw_negatives, train_step
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

PROFILE_WEIGHTS = "profile_tower.safetensors"
PROFILE_CONFIG = "config.json"
CHECKPOINT = "last.pt"


def train_profile_tower(config: dict[str, Any]) -> dict[str, Any]:
    """Train the user tower with DDP on petastorm batches; checkpoint per epoch, resume, save it.

    Keys: converter (petastorm, columns `profile` float (in_dim,) and `pos` int), n_items,
    in_dim, hidden_dim, out_dim, epochs, batch_size, learning_rate, weight_decay,
    num_negatives, seed, device, reader_workers, checkpoint_dir, output_dir, fingerprint,
    model_metadata, mlflow_tracking_uri, mlflow_run_id, item_prior_path (optional: an
    (n_items,) .npy of log item frequencies the biases start from).
    Returns model_path, losses (per epoch, all so far), epochs_run, resumed_from, steps; the
    same on every rank.
    """
    from petastorm.pytorch import BatchedDataLoader
    from safetensors.torch import save_file

    with training_place(config.get("device", "cpu")) as place:
        return _train(config, place, BatchedDataLoader, save_file)


def _train(
    config: dict[str, Any],
    place: ProcessPlace,
    loader_fn: Callable[..., Any],
    save_file: Callable[..., Any],
) -> dict[str, Any]:
    """Train in this process from the checkpoint (or from scratch); rank 0 saves the tower."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(int(config["seed"]))
    tower = new_tower(config)
    if config.get("item_prior_path"):
        # The biases start at log p(item) over the examples: the tower starts as the
        # popularity list, and its profile term learns what moves a kind of user off it.
        prior = np.load(config["item_prior_path"], allow_pickle=False)
        with torch.no_grad():
            tower.bias.copy_(torch.from_numpy(prior.astype(np.float32)))
    tower = tower.to(place.device)
    optimizer = torch.optim.AdamW(
        tower.parameters(),
        lr=float(config["learning_rate"]),
        weight_decay=float(config.get("weight_decay", 0.0)),
    )
    checkpoint_path = os.path.join(config["checkpoint_dir"], CHECKPOINT)
    state = load_checkpoint(checkpoint_path, config.get("fingerprint", ""), place.device)
    first, step, losses = 0, 0, []
    if state is not None:
        tower.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        first, step, losses = int(state["epoch"]), int(state["step"]), list(state["losses"])
        if place.rank == 0:
            log.info("resuming from %s: epoch %d, step %d", checkpoint_path, first, step)
    resumed_from = first if state is not None else None
    model: torch.nn.Module = tower
    if place.distributed:
        cuda = place.device.type == "cuda"
        model = DistributedDataParallel(tower, device_ids=[place.device.index] if cuda else None)
    tracker = RankZeroMetrics(config, place.rank)
    epochs = int(config["epochs"])
    for epoch in range(first, epochs):
        started = time.perf_counter()
        loss, rows, step = _train_epoch(config, model, optimizer, place, loader_fn, epoch, step)
        losses.append(loss)
        if place.rank == 0:
            save_checkpoint(
                checkpoint_path,
                {
                    "model": tower.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "losses": losses,
                    "fingerprint": config.get("fingerprint", ""),
                },
            )
            seconds = time.perf_counter() - started
            log.info(
                "profile tower epoch %d/%d loss %.4f step %d (%.1fs, %.0f examples/s)",
                epoch + 1, epochs, loss, step, seconds, rows / max(seconds, 1e-9),
            )  # fmt: skip
            tracker.log("profile_tower_loss", loss, epoch + 1)
        if place.distributed:
            torch.distributed.barrier()
    if place.rank == 0:
        save_profile_tower(
            tower, config["output_dir"], dict(config.get("model_metadata", {})), save_file
        )
    return {
        "model_path": config["output_dir"],
        "losses": losses,
        "epochs_run": epochs - (resumed_from or 0),
        "resumed_from": resumed_from,
        "steps": rank_zero_step(place, step),
    }


def new_tower(config: dict[str, Any]) -> ProfileTower:
    """An untrained tower of the config's sizes (seed the caller's RNG first)."""
    return ProfileTower(
        int(config["in_dim"]),
        int(config["n_items"]),
        int(config["hidden_dim"]),
        int(config["out_dim"]),
    )


def _train_epoch(
    config: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    place: ProcessPlace,
    loader_fn: Callable[..., Any],
    epoch: int,
    step: int,
) -> tuple[float, float, int]:
    """One pass over this rank's shard: (mean loss, examples) over all ranks, and the step."""
    seed, n_items = int(config["seed"]), int(config["n_items"])
    num_negatives = int(config["num_negatives"])
    # Seeded per (epoch, rank): a resumed run draws the negatives an uninterrupted one would.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + place.rank)
    model.train()
    totals = torch.zeros(2, dtype=torch.float64, device=place.device)  # loss * rows, rows
    with shard_batches(config, place, model, loader_fn, seed=seed + epoch) as loader:
        for batch in loader:
            profiles = batch["profile"].float().to(place.device)
            positive_ids = batch["pos"].long().to(place.device)
            negatives = draw_negatives(n_items, num_negatives, generator).to(place.device)
            loss = train_step(model, optimizer, profiles, positive_ids, negatives)
            step += 1
            rows = float(len(positive_ids))
            totals += totals.new_tensor([float(loss) * rows, rows])
    if place.distributed:
        torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1].clamp_min(1.0)), float(totals[1]), step


def save_profile_tower(
    tower: ProfileTower, output_dir: str, metadata: dict[str, Any], save_file: Any = None
) -> str:
    """Write profile_tower.safetensors and config.json (sizes plus `metadata`) under output_dir."""
    config = {**tower.config(), **metadata}
    return save_weights(
        tower, output_dir, weights=PROFILE_WEIGHTS, config=config, save_file=save_file
    )


def load_profile_tower(model_dir: str) -> ProfileTower:
    """The tower saved by `save_profile_tower`, in eval mode on the CPU."""
    from safetensors.torch import load_file

    with open(os.path.join(model_dir, PROFILE_CONFIG)) as f:
        meta = json.load(f)
    tower = new_tower(meta)
    tower.load_state_dict(load_file(os.path.join(model_dir, PROFILE_WEIGHTS)))
    return tower.eval()
