"""The tuned text encoder's training function (`contrastive.mode: encoder`), run in each
TorchDistributor process.

`train_text_encoder` trains `core.encoder_tuning`'s tower (LoRA adapters on the encoder plus
the head) with DDP on petastorm batches of (history, pos) item indices, every rank holding
every item's token ids; it checkpoints the trainable weights each epoch, resumes from a
checkpoint of the same job, and saves the adapter and head with `save_tuned` (rank 0).
"""

from __future__ import annotations

import functools
import logging
import os
import time
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch

from llmrec_spark.core.encoder_tuning import (
    EncoderTower,
    LoraSettings,
    encoder_tower,
    encoder_train_step,
    make_encoder_optimizer,
    save_tuned,
)
from llmrec_spark.core.tower import InfoNCELoss
from llmrec_spark.stages.torch_process import (
    ProcessPlace,
    RankZeroMetrics,
    load_checkpoint,
    quiet_petastorm,
    rank_zero_step,
    save_checkpoint,
    shard_batches,
    training_place,
)
from llmrec_spark.stages.tower_training import load_head

log = logging.getLogger(__name__)

# Rank 0 logs its progress every this many steps within an epoch.
PROGRESS_STEPS = 25

CHECKPOINT = "last.pt"
# Rows per batch when every rank reads every item's tokens.
ITEM_BATCH = 8192


def train_text_encoder(config: dict[str, Any]) -> dict[str, Any]:
    """Train LoRA + head with DDP on petastorm batches; checkpoint per epoch, resume, save them.

    Keys: converter (petastorm, columns `history` int (H,) PAD-filled and `pos` int),
    item_converter (petastorm, columns `item_idx` int and `tokens` int (max_length,) padded
    with pad_id; every rank reads all of it), model_path, pad_id, n_items, lora_rank,
    lora_alpha, max_length, hidden_dim, out_dim, init_head_dir (optional: start from the head
    saved there, frozen), epochs, max_steps (per epoch and process; 0: the whole shard),
    batch_size, learning_rate (head), encoder_learning_rate (LoRA), weight_decay, temperature,
    num_sampled_negatives, history_grad, seed, device, reader_workers, checkpoint_dir,
    output_dir, fingerprint, model_metadata, mlflow_tracking_uri, mlflow_run_id,
    fail_after_epoch (testing: raise after that epoch's checkpoint).
    Returns model_path, losses (per epoch, all so far), epochs_run, resumed_from, steps; the
    same on every rank.
    """
    from petastorm.pytorch import BatchedDataLoader

    with training_place(config.get("device", "cpu")) as place:
        return _train(config, place, BatchedDataLoader)


def _train(
    config: dict[str, Any], place: ProcessPlace, loader_fn: Callable[..., Any]
) -> dict[str, Any]:
    """Train in this process from the checkpoint (or from scratch); rank 0 saves the tuned
    encoder. Returns the training summary (the same on every rank)."""
    tower = new_encoder_tower(config).to(place.device)
    tokens = item_tokens(config, place, loader_fn)
    optimizer = make_encoder_optimizer(tower, config)
    checkpoint_path = os.path.join(config["checkpoint_dir"], CHECKPOINT)
    state = load_checkpoint(checkpoint_path, config.get("fingerprint", ""), place.device)
    first, step, losses = _resume(tower, optimizer, state)
    resumed_from = first if state is not None else None
    if state is not None and place.rank == 0:
        log.info("resuming from %s: epoch %d, step %d", checkpoint_path, first, step)
    model = _step_model(tower, place)
    tracker = RankZeroMetrics(config, place.rank)
    epochs = int(config["epochs"])
    for epoch in range(first, epochs):
        started = time.perf_counter()
        loss, rows, step = _train_epoch(
            config, model, optimizer, tokens, place, loader_fn, epoch, step
        )
        losses.append(loss)
        if place.rank == 0:
            save_checkpoint(
                checkpoint_path,
                {
                    "model": trainable_weights(tower),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "step": step,
                    "losses": losses,
                    "fingerprint": config.get("fingerprint", ""),
                },
            )
            seconds = time.perf_counter() - started
            log.info(
                "encoder epoch %d/%d loss %.4f step %d (%.1fs, %.0f examples/s)",
                epoch + 1, epochs, loss, step, seconds, rows / max(seconds, 1e-9),
            )  # fmt: skip
            tracker.log("encoder_contrastive_loss", loss, epoch + 1)
        if place.distributed:
            torch.distributed.barrier()
        fail_after = config.get("fail_after_epoch")
        if fail_after is not None and epoch + 1 == int(fail_after):
            raise RuntimeError(f"simulated failure after epoch {epoch + 1} (fail_after_epoch)")
    if place.rank == 0:
        save_tuned(tower, config["output_dir"], dict(config.get("model_metadata", {})))
    return {
        "model_path": config["output_dir"],
        "losses": losses,
        "epochs_run": epochs - (resumed_from or 0),
        "resumed_from": resumed_from,
        "steps": rank_zero_step(place, step),  # also: no rank returns before the files exist
    }


def new_encoder_tower(config: dict[str, Any]) -> EncoderTower:
    """A fresh tower of the config's base model, LoRA settings and head sizes (seeded); with
    `init_head_dir`, the head saved there (`tower_training.save_head`), frozen."""
    settings = LoraSettings(
        rank=int(config["lora_rank"]),
        alpha=int(config["lora_alpha"]),
        max_length=int(config["max_length"]),
    )
    init_head_dir = config.get("init_head_dir")
    return encoder_tower(
        config["model_path"],
        settings,
        hidden_dim=int(config["hidden_dim"]),
        out_dim=int(config["out_dim"]),
        seed=int(config["seed"]),
        trained_head=load_head(init_head_dir) if init_head_dir else None,
    )


def trainable_weights(tower: EncoderTower) -> dict[str, torch.Tensor]:
    """The tower's trainable parameters (LoRA and head) by name: what a checkpoint holds."""
    return {n: p.detach() for n, p in tower.named_parameters() if p.requires_grad}


def _resume(
    tower: EncoderTower, optimizer: torch.optim.Optimizer, state: dict[str, Any] | None
) -> tuple[int, int, list[float]]:
    """Load checkpoint `state`'s trainable weights and optimizer into `tower` and `optimizer`;
    returns (first epoch to run, step, losses so far): (0, 0, []) without a checkpoint."""
    if state is None:
        return 0, 0, []
    missing = set(trainable_weights(tower)) - set(state["model"])
    if missing:
        raise ValueError(
            f"checkpoint lacks {len(missing)} trainable weights: {sorted(missing)[:3]}"
        )
    unexpected = tower.load_state_dict(state["model"], strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"checkpoint has weights the tower lacks: {sorted(unexpected)[:3]}")
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), int(state["step"]), [float(x) for x in state["losses"]]


def item_tokens(
    config: dict[str, Any], place: ProcessPlace, loader_fn: Callable[..., Any]
) -> torch.Tensor:
    """Every item's token ids (n_items, max_length) long on the device, row = item_idx, read
    in full from `config["item_converter"]` (by every rank, in file order)."""
    n_items, width = int(config["n_items"]), int(config["max_length"])
    tokens = torch.full((n_items, width), int(config["pad_id"]), dtype=torch.long)
    seen = torch.zeros(n_items, dtype=torch.bool)
    loader_cm = config["item_converter"].make_torch_dataloader(
        batch_size=ITEM_BATCH,
        num_epochs=1,
        workers_count=int(config.get("reader_workers", 1)),
        data_loader_fn=loader_fn,
        shard_count=1,
        cur_shard=0,
        shuffle_rows=False,
        shuffle_row_groups=False,
    )
    with warnings.catch_warnings(), loader_cm as loader:
        quiet_petastorm()
        for batch in loader:
            rows, ids = batch["item_idx"].long(), batch["tokens"].long()
            if ids.shape[1] != width:
                raise ValueError(f"item tokens are {ids.shape[1]} wide, max_length {width}")
            tokens[rows] = ids
            seen[rows] = True
    if not bool(seen.all()):
        raise ValueError(f"item_converter lacks {int((~seen).sum())} of {n_items} items")
    return tokens.to(place.device)


class _GradSynced(torch.nn.Module):
    """The tower for `encoder_train_step` under DDP: forwards with a gradient go through DDP
    (one per step, matched by every rank and by DDP's join), forwards without one (history
    items under no_grad, not on every rank every step) go straight to the tower, since any
    DDP forward inside join runs collectives the other ranks would not match."""

    def __init__(self, ddp: torch.nn.Module, tower: EncoderTower) -> None:
        super().__init__()
        self.ddp = ddp
        self.tower = tower

    def forward(self, token_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        if torch.is_grad_enabled():
            return cast(torch.Tensor, self.ddp(token_ids, pad_id))
        return cast(torch.Tensor, self.tower(token_ids, pad_id))


def _step_model(tower: EncoderTower, place: ProcessPlace) -> torch.nn.Module:
    """The module the steps call: the tower itself in one process, else DDP around it."""
    if not place.distributed:
        return tower
    from torch.nn.parallel import DistributedDataParallel

    cuda = place.device.type == "cuda"
    # Every LoRA and head weight takes part in each step's one DDP forward (no unused
    # parameters); its buffer broadcast (the encoder's constant position ids) is matched by
    # every rank, joined ones included.
    ddp = DistributedDataParallel(tower, device_ids=[place.device.index] if cuda else None)
    return _GradSynced(ddp, tower)


def _train_epoch(
    config: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    tokens: torch.Tensor,
    place: ProcessPlace,
    loader_fn: Callable[..., Any],
    epoch: int,
    step: int,
) -> tuple[float, float, int]:
    """One pass over this rank's shard, at most max_steps batches: (mean loss, examples) over
    all ranks, and the step."""
    seed, n_items = int(config["seed"]), int(config["n_items"])
    n_neg, max_steps = int(config["num_sampled_negatives"]), int(config.get("max_steps", 0))
    pad_id, history_grad = int(config["pad_id"]), bool(config.get("history_grad", True))
    loss_fn = InfoNCELoss(float(config["temperature"]))
    autocast = None
    if place.device.type == "cuda":
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    # Seeded per (epoch, rank): a resumed run draws the negatives an uninterrupted one would.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + place.rank)
    model.train()
    totals = torch.zeros(2, dtype=torch.float64, device=place.device)  # loss * rows, rows
    started = time.perf_counter()
    ddp = model.ddp if isinstance(model, _GradSynced) else model
    with shard_batches(config, place, ddp, loader_fn, seed=seed + epoch) as loader:
        for taken, batch in enumerate(loader):
            if 0 < max_steps <= taken:
                break  # inside DDP's join: the other ranks' steps are shadowed
            history = batch["history"].long().to(place.device)
            positive_ids = batch["pos"].long().to(place.device)
            negative_ids = torch.randint(n_items, (n_neg,), generator=generator).to(place.device)
            loss = encoder_train_step(
                cast(EncoderTower, model),  # the tower, or DDP's forward of it (_GradSynced)
                optimizer, loss_fn, tokens, pad_id, history, positive_ids, negative_ids,
                history_grad=history_grad, autocast=autocast,
            )  # fmt: skip
            step += 1
            rows = float(len(positive_ids))
            totals += totals.new_tensor([float(loss) * rows, rows])
            if place.rank == 0 and (taken + 1) % PROGRESS_STEPS == 0:
                # A step takes seconds on CPU: a line now and then says the run is alive.
                log.info(
                    "encoder epoch %d: step %d%s, loss %.4f, %.1fs per step",
                    epoch + 1, taken + 1, f"/{max_steps}" if max_steps else "", float(loss),
                    (time.perf_counter() - started) / (taken + 1),
                )  # fmt: skip
    if place.distributed:
        torch.distributed.all_reduce(totals)
    return float(totals[0] / totals[1].clamp_min(1.0)), float(totals[1]), step
