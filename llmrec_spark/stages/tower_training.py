"""The text tower's training function, run in each TorchDistributor process, and its files.

`train_text_tower` trains the member heads with DDP on petastorm batches, checkpoints each
epoch, resumes from a checkpoint of the same job, and saves the head as safetensors (rank
0). A warm start (`init_head_dir`) begins each member from a previous head's weights.
`save_head` / `load_head` / `head_embedder` read and write the head's folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from llmrec_spark.core.tower import (
    EnsembleHead,
    InfoNCELoss,
    TextTowerHead,
    head_from_config,
    make_optimizer,
    train_step,
)
from llmrec_spark.stages.torch_process import (
    ProcessPlace,
    RankZeroMetrics,
    load_checkpoint,
    save_checkpoint,
    save_weights,
    shard_batches,
    training_place,
)

log = logging.getLogger(__name__)

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "config.json"
CHECKPOINT = "last.pt"
# Member k of an ensemble trains with seed + k * this (its init, batch order and negatives).
MEMBER_SEED_STRIDE = 100_003


def train_text_tower(config: dict[str, Any]) -> dict[str, Any]:
    """Train the head with DDP on petastorm batches; checkpoint per epoch, resume, save safetensors.

    Keys: converter, item_matrix_path, checkpoint_dir, output_dir, epochs, batch_size,
    learning_rate, weight_decay, temperature, num_sampled_negatives, hidden_dim, out_dim, members,
    seed, anchor_pooling, input_dropout, device, reader_workers, fingerprint, mlflow_tracking_uri, mlflow_run_id,
    head_metadata, init_head_dir (a warm start: member j begins from that saved head's member
    j), fail_after_epoch (testing: raise after that epoch's checkpoint).
    With members k > 1 it trains k heads one after another (member j on seed + j *
    MEMBER_SEED_STRIDE: its own init, batch order and negatives) and saves their EnsembleHead.
    Returns head_path, losses (per member epoch, all so far), epochs_run, resumed_from (member
    epochs already done), steps.
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
    """Train every member head of `train_text_tower`'s config in this process, resuming from the
    checkpoint; rank 0 saves the head. Returns the training summary (the same on every rank)."""
    base_np = np.load(config["item_matrix_path"], allow_pickle=False)
    rank, device = place.rank, place.device
    process = _Process(
        config=config,
        rank=rank,
        world_size=place.world_size,
        device=device,
        distributed=place.distributed,
        loader_fn=loader_fn,
        base=torch.from_numpy(np.ascontiguousarray(base_np, dtype=np.float32)).to(device),
        loss_fn=InfoNCELoss(float(config["temperature"])),
        checkpoint_path=os.path.join(config["checkpoint_dir"], CHECKPOINT),
        tracker=RankZeroMetrics(config, rank),
        initial=member_weights(config["init_head_dir"]) if config.get("init_head_dir") else None,
    )
    members, epochs = int(config.get("members", 1)), int(config["epochs"])
    if process.initial is not None and len(process.initial) != members:
        raise ValueError(
            f"init_head_dir {config['init_head_dir']} has {len(process.initial)} members, "
            f"training {members}"
        )
    state = load_checkpoint(process.checkpoint_path, config.get("fingerprint", ""), device)
    progress = _resume_point(state, process)
    for member in range(progress.start_member, members):
        resume = state if state is not None and member == progress.start_member else None
        progress.finished.append(_train_member(process, member, progress, resume))

    if rank == 0:
        final = _trained_head(config, process.base.shape[1], progress.finished)
        save_head(final, config["output_dir"], dict(config.get("head_metadata", {})), save_file)
    step = _shared_step(process, progress.step)
    resumed_from = (
        progress.start_member * epochs + progress.start_epoch if state is not None else None
    )
    # TorchDistributor's local mode keeps whichever rank's return value is written last, so
    # every rank returns the same summary (losses are all-reduced, the head path is shared).
    return {
        "head_path": config["output_dir"],
        "losses": progress.losses,
        "epochs_run": members * epochs - (resumed_from or 0),
        "resumed_from": resumed_from,
        "steps": step,
    }


@dataclass
class _Process:
    """One training process: its config, place among the ranks, data, loss, checkpoint file
    and metrics logger."""

    config: dict[str, Any]
    rank: int
    world_size: int
    device: torch.device
    distributed: bool
    loader_fn: Callable[..., Any]
    base: torch.Tensor  # (n_items, in_dim) frozen base embeddings, on `device`
    loss_fn: torch.nn.Module
    checkpoint_path: str
    tracker: RankZeroMetrics
    initial: list[dict[str, torch.Tensor]] | None = None  # per member: its warm-start weights


@dataclass
class _Progress:
    """Where training stands: the member and epoch it (re)started at, the finished members'
    weights, the step counter and the loss of every epoch so far."""

    start_member: int = 0
    start_epoch: int = 0
    finished: list[dict[str, torch.Tensor]] = field(default_factory=list)
    step: int = 0
    losses: list[float] = field(default_factory=list)


def _resume_point(state: dict[str, Any] | None, process: _Process) -> _Progress:
    """The progress recorded in checkpoint `state` (which holds the finished members' weights
    and the current member's state), or a fresh start without one."""
    if state is None:
        return _Progress()
    progress = _Progress(
        start_member=int(state.get("member", 0)),
        start_epoch=int(state["epoch"]),
        finished=list(state.get("finished", [])),
        step=int(state["step"]),
        losses=list(state["losses"]),
    )
    if process.rank == 0:
        log.info(
            "resuming from %s: member %d, epoch %d, step %d",
            process.checkpoint_path,
            progress.start_member + 1,
            progress.start_epoch,
            progress.step,
        )
    return progress


def _train_member(
    process: _Process, member: int, progress: _Progress, resume: dict[str, Any] | None
) -> dict[str, torch.Tensor]:
    """Train member head `member` through the remaining epochs (from checkpoint `resume` when
    given), checkpointing after each; returns its trained weights on the CPU."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    config = process.config
    epochs = int(config["epochs"])
    member_seed = int(config["seed"]) + MEMBER_SEED_STRIDE * member  # member 0: as a lone head
    head = _new_head(config, process.base.shape[1], member_seed)
    if process.initial is not None:
        head.load_state_dict(process.initial[member])
    head = head.to(process.device)
    optimizer = make_optimizer(head, config)
    first_epoch = 0
    if resume is not None:
        head.load_state_dict(resume["head"])
        optimizer.load_state_dict(resume["optimizer"])
        first_epoch = progress.start_epoch
    model: torch.nn.Module = head
    if process.distributed:
        cuda = process.device.type == "cuda"
        model = DistributedDataParallel(head, device_ids=[process.device.index] if cuda else None)
    for epoch in range(first_epoch, epochs):
        started = time.perf_counter()
        epoch_loss, rows, progress.step = _train_epoch(
            config,
            model,
            optimizer,
            process.loss_fn,
            process.base,
            process.loader_fn,
            member_seed,
            epoch,
            progress.step,
            rank=process.rank,
            world_size=process.world_size,
            distributed=process.distributed,
        )
        progress.losses.append(epoch_loss)
        done = member * epochs + epoch + 1  # epochs finished over all members
        if process.rank == 0:
            save_checkpoint(
                process.checkpoint_path,
                {
                    "member": member,
                    "finished": progress.finished,
                    "head": head.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "epoch": epoch + 1,
                    "step": progress.step,
                    "losses": list(progress.losses),
                    "fingerprint": config.get("fingerprint", ""),
                },
            )
            _log_epoch(process, member, epoch, progress, rows, time.perf_counter() - started)
        if process.distributed:
            dist.barrier()
        fail_after = config.get("fail_after_epoch")
        if fail_after is not None and done == int(fail_after):
            raise RuntimeError(f"simulated failure after epoch {done} (fail_after_epoch)")
    return {k: v.detach().cpu() for k, v in head.state_dict().items()}


def _log_epoch(
    process: _Process, member: int, epoch: int, progress: _Progress, rows: float, seconds: float
) -> None:
    """The epoch's loss and rate to the log, and its loss to the stage's MLflow run (rank 0)."""
    config = process.config
    members, epochs = int(config.get("members", 1)), int(config["epochs"])
    loss = progress.losses[-1]
    log.info(
        "member %d/%d epoch %d/%d loss %.4f step %d (%.1fs, %.0f examples/s)",
        member + 1,
        members,
        epoch + 1,
        epochs,
        loss,
        progress.step,
        seconds,
        rows / max(seconds, 1e-9),
    )
    process.tracker.log("contrastive_loss", loss, member * epochs + epoch + 1)


def _shared_step(process: _Process, step: int) -> int:
    """Rank 0's step counter on every rank (the one checkpointed; shards may differ by a
    batch). The broadcast also keeps every rank from returning before the head is on disk."""
    if not process.distributed:
        return step
    import torch.distributed as dist

    shared_step = torch.tensor([step], dtype=torch.int64, device=process.device)
    dist.broadcast(shared_step, src=0)
    return int(shared_step.item())


def _new_head(config: dict[str, Any], in_dim: int, seed: int) -> TextTowerHead:
    """A freshly initialised member head; its initial weights come from `seed`."""
    torch.manual_seed(seed)
    return TextTowerHead(in_dim, int(config["hidden_dim"]), int(config["out_dim"]))


def _trained_head(
    config: dict[str, Any], in_dim: int, finished: list[dict[str, torch.Tensor]]
) -> TextTowerHead | EnsembleHead:
    """The head to save from the members' trained weights: a lone head, or their ensemble."""
    heads = []
    for weights in finished:
        head = TextTowerHead(in_dim, int(config["hidden_dim"]), int(config["out_dim"]))
        head.load_state_dict(weights)
        heads.append(head)
    return heads[0] if len(heads) == 1 else EnsembleHead(heads)


def _train_epoch(
    config: dict[str, Any],
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    base: torch.Tensor,
    loader_fn: Callable[..., Any],
    seed: int,
    epoch: int,
    step: int,
    *,
    rank: int,
    world_size: int,
    distributed: bool,
) -> tuple[float, float, int]:
    """One pass over this rank's shard: (mean loss over all ranks, rows over all ranks, step)."""
    import torch.distributed as dist

    device = base.device
    n_items = base.shape[0]
    n_neg = int(config["num_sampled_negatives"])
    pooling = config.get("anchor_pooling", "mean_of_heads")
    dropout = float(config.get("input_dropout", 0.0))
    model.train()
    # Seeded per (member, epoch, rank): a resumed run draws the same negatives as an
    # uninterrupted one.
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + rank)
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # (loss * rows, rows)
    place = ProcessPlace(rank=rank, world_size=world_size, device=device)
    with shard_batches(config, place, model, loader_fn, seed=seed + epoch) as loader:
        for batch in loader:
            history = batch["history"].long().to(device)
            positive_ids = batch["pos"].long().to(device)
            negative_ids = torch.randint(n_items, (n_neg,), generator=generator).to(device)
            loss = train_step(
                model,
                optimizer,
                loss_fn,
                base,
                history,
                positive_ids,
                negative_ids,
                pooling,
                dropout,
                generator,
            )
            step += 1
            totals += torch.stack(
                [loss.double() * len(positive_ids), totals.new_tensor(len(positive_ids))]
            )
    if distributed:
        dist.all_reduce(totals)
    return float(totals[0] / totals[1].clamp_min(1.0)), float(totals[1]), step


def save_head(
    head: TextTowerHead | EnsembleHead, output_dir: str, metadata: dict[str, Any], save_file=None
) -> str:
    """Write head.safetensors and config.json (dims plus `metadata`) under output_dir; return it."""
    config = {**head.config(), **metadata}
    return save_weights(head, output_dir, weights=HEAD_WEIGHTS, config=config, save_file=save_file)


def load_head(head_dir: str) -> TextTowerHead | EnsembleHead:
    """The head (or ensemble of heads) saved by `save_head`, in eval mode on the CPU."""
    from safetensors.torch import load_file

    with open(os.path.join(head_dir, HEAD_CONFIG)) as f:
        head = head_from_config(json.load(f))
    head.load_state_dict(load_file(os.path.join(head_dir, HEAD_WEIGHTS)))
    return head.eval()


def member_weights(head_dir: str) -> list[dict[str, torch.Tensor]]:
    """Each member's weights of the head saved in `head_dir` (one entry for a lone head)."""
    head = load_head(head_dir)
    members = head.members if isinstance(head, EnsembleHead) else [head]
    return [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in members]


@functools.lru_cache(maxsize=4)
def head_embedder(head_dir: str, digest: str) -> Callable[[np.ndarray], np.ndarray]:
    """numpy (n, in_dim) -> (n, out_dim) float32 unit rows; loaded once per process per digest."""
    head = load_head(head_dir)

    def embed(base: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return head(torch.from_numpy(np.ascontiguousarray(base, dtype=np.float32))).numpy()

    return embed


def file_digest(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
