"""Contrastive fine-tuning of the text tower: a trainable head on frozen base item embeddings.

Training examples come from user histories: by default one per (user, positive item), the
anchor being the user's other items (`contrastive.examples=next_item`: the items touched before
-> the next new item). The head is trained with InfoNCE (in-batch plus sampled negatives, the user's own
history masked out) under TorchDistributor, fed by petastorm. The trained head then maps
every item's base embedding -- items with no interactions included -- to a tuned embedding
appended to `item_embeddings` under its own model_id.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from pyspark.sql import DataFrame, Window
from pyspark.sql import functions as F
from pyspark.sql.types import ArrayType, FloatType

from llmrec_spark.config import EXAMPLE_KINDS, ContrastiveConfig, check_contrastive
from llmrec_spark.core.tower import (
    PAD,
    EnsembleHead,
    InfoNCELoss,
    TextTowerHead,
    make_optimizer,
    train_step,
)
from llmrec_spark.errors import ConfigError, InputError
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.indexing import dense_index
from llmrec_spark.stages.als import training_events

log = logging.getLogger(__name__)

# petastorm 0.12 imports pyarrow's LocalFileSystem, deprecated since pyarrow 2.0: a FutureWarning
# from petastorm.spark on import that no user can act on. Installed here because in each
# training process unpickling `train_text_tower` imports this module before the converter
# (which imports petastorm.spark), and before quiet_petastorm could run.
warnings.filterwarnings(
    "ignore",
    message=r"pyarrow\.\w+ is deprecated",
    category=FutureWarning,
    module=r"petastorm\.",
)

HEAD_WEIGHTS = "head.safetensors"
HEAD_CONFIG = "config.json"
CHECKPOINT = "last.pt"
# Member k of an ensemble trains with seed + k * this (its init, batch order and negatives).
MEMBER_SEED_STRIDE = 100_003
PETASTORM_CACHE_CONF = "petastorm.spark.converter.parentCacheDirUrl"
# Rows per training-data file; petastorm shards files/row groups across ranks.
EXAMPLES_PER_FILE = 50_000


def tuned_model_id(base_model_id: str, ds: str) -> str:
    """model_id of the tuned embeddings trained on run date `ds` from `base_model_id`."""
    return f"{base_model_id}+tower@{ds}"


# ---------------------------------------------------------------------------------------------
# Training function (runs in each TorchDistributor process)


def quiet_petastorm() -> None:
    """Silence petastorm 0.12's per-epoch noise in this process: its deprecation warnings
    about the pyarrow it must run on, unclosed-file warnings from its reader threads, and
    its INFO lines about a dataset not written by petastorm (ours never is). Hundreds of
    lines per training run buried the epoch losses; petastorm's errors still show."""
    warnings.filterwarnings("ignore", module=r"petastorm(\..*)?$")
    logging.getLogger("petastorm").setLevel(logging.WARNING)
    # The converter warns on every run that it casts floats to float32 (the tower wants
    # float32) and that its files are under 50 MB (advice for cluster-sized data).
    logging.getLogger("petastorm.spark.spark_dataset_converter").setLevel(logging.ERROR)


def train_text_tower(config: dict[str, Any]) -> dict[str, Any]:
    """Train the head with DDP on petastorm batches; checkpoint per epoch, resume, save safetensors.

    Keys: converter, item_matrix_path, checkpoint_dir, output_dir, epochs, batch_size,
    learning_rate, weight_decay, temperature, num_sampled_negatives, hidden_dim, out_dim, members,
    seed, anchor_pooling, input_dropout, device, reader_workers, fingerprint, mlflow_tracking_uri, mlflow_run_id,
    head_metadata, fail_after_epoch (testing: raise after that epoch's checkpoint).
    With members k > 1 it trains k heads one after another (member j on seed + j *
    MEMBER_SEED_STRIDE: its own init, batch order and negatives) and saves their EnsembleHead.
    Returns head_path, losses (per member epoch, all so far), epochs_run, resumed_from (member
    epochs already done), steps.
    """
    import torch.distributed as dist

    # Before init_process_group: torch.distributed.nn (imported lazily by the first DDP) binds
    # `group=group.WORLD` as default arguments at import, so imported after init it holds the
    # gloo group for good. destroy_process_group then leaves its worker threads running, and
    # the thread that releases the last collective (the step broadcast) can need the GIL
    # while the interpreter is finalising: "terminate called without an active exception",
    # SIGABRT at exit (about 1 run in 10 with 2 processes).
    import torch.distributed.nn  # noqa: F401
    from petastorm.pytorch import BatchedDataLoader
    from safetensors.torch import save_file

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ and not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s"
        )
    quiet_petastorm()
    use_cuda = config.get("device", "cpu") == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Under torchrun the processes share the cores: do not oversubscribe them.
        if "LOCAL_WORLD_SIZE" in os.environ:
            local_procs = int(os.environ["LOCAL_WORLD_SIZE"])
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        return _train(config, rank, world_size, device, distributed, BatchedDataLoader, save_file)
    finally:
        # Joins the group's worker threads (they must not outlive the interpreter; see above).
        if distributed and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    config: dict[str, Any],
    rank: int,
    world_size: int,
    device: torch.device,
    distributed: bool,
    loader_fn: Callable[..., Any],
    save_file: Callable[..., Any],
) -> dict[str, Any]:
    """Train every member head of `train_text_tower`'s config in this process, resuming from the
    checkpoint; rank 0 saves the head. Returns the training summary (the same on every rank)."""
    base_np = np.load(config["item_matrix_path"], allow_pickle=False)
    process = _Process(
        config=config,
        rank=rank,
        world_size=world_size,
        device=device,
        distributed=distributed,
        loader_fn=loader_fn,
        base=torch.from_numpy(np.ascontiguousarray(base_np, dtype=np.float32)).to(device),
        loss_fn=InfoNCELoss(float(config["temperature"])),
        checkpoint_path=os.path.join(config["checkpoint_dir"], CHECKPOINT),
        tracker=_RankZeroMetrics(config if rank == 0 else {}),
    )
    members, epochs = int(config.get("members", 1)), int(config["epochs"])
    state = _load_checkpoint(process.checkpoint_path, config.get("fingerprint", ""), device)
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
    tracker: _RankZeroMetrics


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
    head = _new_head(config, process.base.shape[1], member_seed).to(process.device)
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
            _save_checkpoint(
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
    process.tracker.log(loss, member * epochs + epoch + 1)


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
    from torch.nn.parallel import DistributedDataParallel

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
    loader_cm = config["converter"].make_torch_dataloader(
        batch_size=int(config["batch_size"]),
        num_epochs=1,
        workers_count=int(config.get("reader_workers", 1)),
        data_loader_fn=loader_fn,
        shard_count=world_size,
        cur_shard=rank,
        seed=seed + epoch,
        shuffle_rows=True,
        shuffle_row_groups=True,
    )
    # join(): ranks whose shard has fewer batches shadow the others' all-reduces.
    join_cm = (
        model.join() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    )
    # Join's __enter__ calls warnings.simplefilter("once") for the whole process (torch
    # 2.x), in front of quiet_petastorm's filter: catch_warnings undoes it after the epoch.
    with warnings.catch_warnings(), loader_cm as loader, join_cm:
        quiet_petastorm()
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


class _RankZeroMetrics:
    """Per-epoch loss to the stage's MLflow run (rank 0 only; a no-op without a run id)."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.client = None
        self.run_id: str = config.get("mlflow_run_id") or ""
        if self.run_id and config.get("mlflow_tracking_uri"):
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=config["mlflow_tracking_uri"])

    def log(self, loss: float, epoch: int) -> None:
        if self.client is not None:
            self.client.log_metric(self.run_id, "contrastive_loss", loss, step=epoch)


def _save_checkpoint(path: str, state: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial"
    torch.save(state, partial)
    os.replace(partial, path)  # a crash mid-write never leaves a torn checkpoint


def _load_checkpoint(path: str, fingerprint: str, device) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("fingerprint", "") != fingerprint:
        log.warning("ignoring checkpoint %s: trained on other data or settings", path)
        return None
    return state


def save_head(
    head: TextTowerHead | EnsembleHead, output_dir: str, metadata: dict[str, Any], save_file=None
) -> str:
    """Write head.safetensors and config.json (dims plus `metadata`) under output_dir; return it."""
    if save_file is None:
        from safetensors.torch import save_file
    os.makedirs(output_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, os.path.join(output_dir, HEAD_WEIGHTS))
    with open(os.path.join(output_dir, HEAD_CONFIG), "w") as f:
        json.dump({**head.config(), **metadata}, f, indent=2, sort_keys=True)
    return output_dir


def load_head(head_dir: str) -> TextTowerHead | EnsembleHead:
    """The head (or ensemble of heads) saved by `save_head`, in eval mode on the CPU."""
    from safetensors.torch import load_file

    with open(os.path.join(head_dir, HEAD_CONFIG)) as f:
        meta = json.load(f)
    head: TextTowerHead | EnsembleHead
    if int(meta.get("members", 1)) > 1:
        head = EnsembleHead(
            [
                TextTowerHead(meta["in_dim"], meta["hidden_dim"], meta["member_out_dim"])
                for _ in range(int(meta["members"]))
            ]
        )
    else:
        head = TextTowerHead(meta["in_dim"], meta["hidden_dim"], meta["out_dim"])
    head.load_state_dict(load_file(os.path.join(head_dir, HEAD_WEIGHTS)))
    return head.eval()


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


# ---------------------------------------------------------------------------------------------
# Spark transformations


def with_item_index(current: DataFrame) -> DataFrame:
    """Add a dense `item_idx` (0..n-1 in item_id order) to one-row-per-item embeddings.

    Runs the small jobs of `dense_index`."""
    index = dense_index(current.select("item_id"), "item_idx", "item_id")
    return current.join(index, "item_id").select(*current.columns, "item_idx")


def training_examples(
    events: DataFrame,
    items: DataFrame,
    *,
    max_history: int,
    examples: str = "user_item",
    positive_min_weight: float = 0.0,
    seed: int = 0,
) -> DataFrame:
    """Training rows `history` (item indices, PAD-filled to max_history) and `pos`; see EXAMPLE_KINDS.

    Events on items without a base embedding are ignored.
    """
    if examples == "user_item":
        return user_item_examples(
            events,
            items,
            max_history=max_history,
            positive_min_weight=positive_min_weight,
            seed=seed,
        )
    if examples == "next_item":
        return next_item_examples(events, items, max_history=max_history)
    raise ValueError(f"examples must be one of {', '.join(EXAMPLE_KINDS)}, got {examples!r}")


def user_item_examples(
    events: DataFrame, items: DataFrame, *, max_history: int, positive_min_weight: float, seed: int
) -> DataFrame:
    """One row per (user, positive item): `pos`, and the user's other items as `history`.

    A positive is an item the user has an event of weight >= positive_min_weight on. The
    history is every other item the user touched, in a seeded hash order cut at max_history
    (the same order for each of the user's rows), so the anchor is the whole user, as it is
    when the tuned embeddings are scored, not the prefix before one event.
    """
    touched = (
        events.join(items.select("item_id", "item_idx"), "item_id")
        .groupBy("user_id", "item_idx")
        .agg(F.max("weight").alias("weight"))
    )
    per_user = touched.groupBy("user_id").agg(
        F.array_sort(
            F.collect_list(
                F.struct(F.xxhash64("user_id", "item_idx", F.lit(seed)).alias("h"), "item_idx")
            )
        ).alias("ordered"),
        F.collect_list(F.when(F.col("weight") >= positive_min_weight, F.col("item_idx"))).alias(
            "positives"
        ),
    )
    pairs = per_user.select(
        F.transform("ordered", lambda x: x["item_idx"]).alias("touched"),
        F.explode("positives").alias("pos"),
    )
    others = F.slice(F.filter("touched", lambda x: x != F.col("pos")), 1, max_history)
    with_history = pairs.select(others.alias("h"), "pos").where(F.size("h") > 0)
    return _padded(with_history, max_history)


def next_item_examples(events: DataFrame, items: DataFrame, *, max_history: int) -> DataFrame:
    """One row per (user, next new item): the items touched before it, oldest first, as `history`.

    A user's sequence is their distinct items in order of first interaction.
    """
    first_touch = (
        events.join(items.select("item_id", "item_idx"), "item_id")
        .groupBy("user_id", "item_idx")
        .agg(F.min("event_ts").alias("first_ts"))
    )
    previous = (
        Window.partitionBy("user_id").orderBy("first_ts", "item_idx").rowsBetween(-max_history, -1)
    )
    with_history = first_touch.select(
        F.collect_list("item_idx").over(previous).alias("h"), F.col("item_idx").alias("pos")
    ).where(F.size("h") > 0)
    return _padded(with_history, max_history)


def _padded(with_history: DataFrame, max_history: int) -> DataFrame:
    padding = F.array_repeat(F.lit(PAD), F.lit(max_history) - F.size("h"))
    return with_history.select(
        F.concat("h", padding).cast("array<int>").alias("history"),
        F.col("pos").cast("int").alias("pos"),
    )


def shuffle_examples(examples: DataFrame, *, files: int, seed: int) -> DataFrame:
    """Spread examples over `files` partitions in a seeded order that depends on content only.

    Partition and in-partition order come from a seeded hash of each row, not from the order
    rows arrive in after a shuffle, so the same examples give the same files on every run.
    """
    key = F.xxhash64("history", "pos", F.lit(seed))
    return examples.repartition(files, key).sortWithinPartitions(key, "pos")


def tuned_embeddings(
    current: DataFrame, *, head_dir: str, head_digest: str, model_id: str, ds: str, out_dim: int
) -> DataFrame:
    """item_embeddings rows of the tuned model: the head applied to each item's base embedding."""

    @F.pandas_udf(ArrayType(FloatType(), containsNull=False))  # type: ignore[call-overload]
    def apply_head(batches: Iterator[pd.Series]) -> Iterator[pd.Series]:
        embed = head_embedder(head_dir, head_digest)
        for base in batches:
            tuned = (
                embed(np.stack(base.to_numpy()))
                if len(base)
                else np.zeros((0, out_dim), np.float32)
            )
            yield pd.Series(list(tuned))

    return current.select(
        "item_id",
        "text_hash",
        F.lit(model_id).alias("model_id"),
        F.lit(out_dim).cast("int").alias("dim"),
        apply_head("embedding").alias("embedding"),
        F.lit(ds).alias("ds"),
    )


# ---------------------------------------------------------------------------------------------
# Stage


def run_train_contrastive(ctx: RunContext) -> StageResult:
    """Fine-tune the text-tower head on ctx.ds's training window; append tuned item embeddings."""
    cfg = ctx.cfg.contrastive
    if not cfg.enabled:
        log.info("contrastive: skipped (contrastive.enabled=false)")
        return StageResult(summary={"skipped": "contrastive.enabled=false"})
    check_contrastive(cfg)
    from llmrec_spark.core import encoder
    from llmrec_spark.stages import embed

    base_id = encoder.base_model_id(ctx.cfg.embed)
    model_id = tuned_model_id(base_id, ctx.ds)
    work_dir = ctx.model_dir("text_tower")
    device = _training_device(ctx, cfg)

    # The same "current embedding per item" as the recommend stage reads (catalog's current text).
    current = with_item_index(embed.latest_embeddings(ctx.store, base_id, ctx.cfg.embed)).cache()
    events = training_events(ctx, cfg.train_days)
    started = time.perf_counter()
    fit = fit_text_tower(
        ctx,
        cfg,
        events,
        current,
        work_dir=work_dir,
        head_metadata={"base_model_id": base_id, "model_id": model_id, "ds": ctx.ds},
    )
    train_seconds = time.perf_counter() - started
    output, n_examples, n_items, head_dir = fit.output, fit.examples, fit.items, fit.head_dir

    tuned = tuned_embeddings(
        current,
        head_dir=head_dir,
        head_digest=file_digest(os.path.join(head_dir, HEAD_WEIGHTS)),
        model_id=model_id,
        ds=ctx.ds,
        out_dim=cfg.out_dim * cfg.members,
    )
    replaced = _write_tuned(ctx, tuned, model_id)
    current.unpersist()

    losses = output["losses"]
    log.info(
        "contrastive: loss %.4f -> %.4f over %d epochs (%d run now, %.1fs); %d tuned embeddings %s",
        losses[0],
        losses[-1],
        len(losses),
        output["epochs_run"],
        train_seconds,
        n_items,
        "replaced" if replaced else "appended",
    )
    return StageResult(
        rows_in=n_examples,
        rows_out=n_items,
        metrics={
            "contrastive_first_epoch_loss": losses[0],
            "contrastive_last_epoch_loss": losses[-1],
            "contrastive_train_seconds": train_seconds,
            "contrastive_examples": float(n_examples),
            "contrastive_items": float(n_items),
        },
        params={
            **{f"contrastive.{k}": v for k, v in vars(cfg).items()},
            "contrastive.device": device,
            "contrastive.model_id": model_id,
        },
        artifacts={"text_tower": head_dir},
        summary={
            "model_id": model_id,
            "examples": n_examples,
            "items": n_items,
            "loss": [round(x, 4) for x in losses],
            "resumed_from": output["resumed_from"],
        },
    )


@dataclass(frozen=True)
class TowerFit:
    """A trained head: its folder, the training summary, and the examples and items it saw."""

    head_dir: str
    output: dict[str, Any]
    examples: int
    items: int


def fit_text_tower(
    ctx: RunContext,
    cfg: ContrastiveConfig,
    events: DataFrame,
    current: DataFrame,
    *,
    work_dir: str,
    head_metadata: dict[str, Any],
) -> TowerFit:
    """Train the head on `events` under TorchDistributor; the head lands in work_dir/head.

    `current` has one base embedding per item with a dense `item_idx` (`with_item_index`);
    the item matrix, checkpoints and petastorm cache live under `work_dir`.
    """
    check_contrastive(cfg)
    head_dir = os.path.join(work_dir, "head")
    device = _training_device(ctx, cfg)
    num_processes = _process_count(cfg, device)
    item_matrix_path = os.path.join(work_dir, "item_matrix.npy")
    n_items, in_dim = _write_item_matrix(
        current, item_matrix_path, str(head_metadata.get("base_model_id", ""))
    )
    examples = training_examples(
        events,
        current,
        max_history=cfg.max_history,
        examples=cfg.examples,
        positive_min_weight=cfg.positive_min_weight,
        seed=cfg.seed,
    ).cache()
    n_examples, signature = _examples_signature(examples)
    if n_examples < num_processes:
        raise InputError(
            f"contrastive: {n_examples} training examples in the {cfg.train_days} days up to {ctx.ds} "
            f"(need at least {num_processes}); users need two or more items with base embeddings"
            + (
                f", one of them with an event of weight >= {cfg.positive_min_weight}"
                if cfg.examples == "user_item"
                else ""
            )
        )
    files = min(n_examples, max(2 * num_processes, math.ceil(n_examples / EXAMPLES_PER_FILE)))
    shuffled = shuffle_examples(examples, files=files, seed=cfg.seed)
    fingerprint = _fingerprint(cfg, n_items, in_dim, signature, file_digest(item_matrix_path))
    log.info(
        "contrastive: %d examples, %d items, %d processes on %s, fingerprint %s",
        n_examples,
        n_items,
        num_processes,
        device,
        fingerprint[:12],
    )
    cache_url = _cache_dir_url(os.path.join(work_dir, "petastorm"))
    try:
        output = _run_distributed(
            ctx,
            cfg,
            shuffled,
            device,
            num_processes,
            cache_url,
            {
                "item_matrix_path": item_matrix_path,
                "checkpoint_dir": os.path.join(work_dir, "checkpoints"),
                "output_dir": head_dir,
                "fingerprint": fingerprint,
                "head_metadata": head_metadata,
            },
        )
    finally:
        examples.unpersist()
    return TowerFit(head_dir=head_dir, output=output, examples=n_examples, items=n_items)


def _training_device(ctx: RunContext, cfg: ContrastiveConfig) -> str:
    """The training device, "cuda" or "cpu"; local-mode GPU training needs GPUs in the driver's resources."""
    driver_gpus = "gpu" in ctx.spark.sparkContext.resources
    if cfg.device == "cpu":
        return "cpu"
    if cfg.device == "cuda":
        if not (torch.cuda.is_available() and driver_gpus):
            raise ConfigError(
                "contrastive.device=cuda but torch sees no GPU or the Spark driver has no GPU resources "
                "(set spark.driver.resource.gpu.amount and a discovery script)"
            )
        return "cuda"
    if torch.cuda.is_available() and not driver_gpus:
        log.warning(
            "contrastive: a GPU is visible but the Spark driver has no GPU resources; training on CPU"
        )
    return "cuda" if torch.cuda.is_available() and driver_gpus else "cpu"


def _process_count(cfg: ContrastiveConfig, device: str) -> int:
    if device == "cuda":
        return max(1, min(cfg.num_processes, torch.cuda.device_count()))
    return cfg.num_processes


def _write_item_matrix(current: DataFrame, path: str, base_id: str) -> tuple[int, int]:
    """Collect base embeddings in item_idx order into an (n_items, dim) float32 .npy file."""
    rows: pd.DataFrame = (
        current.select("item_idx", "dim", "embedding").orderBy("item_idx").toPandas()
    )
    if rows.empty:
        raise InputError(
            f"item_embeddings has no rows of model {base_id!r}; run `llmrec embed` first"
        )
    dims = sorted(rows["dim"].unique())
    if len(dims) != 1:
        raise InputError(f"item_embeddings rows of model {base_id!r} mix dimensions {dims}")
    matrix = np.stack(rows["embedding"].to_numpy()).astype(np.float32)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, matrix, allow_pickle=False)
    return int(matrix.shape[0]), int(matrix.shape[1])


def _examples_signature(examples: DataFrame) -> tuple[int, int]:
    """(row count, order-independent content hash) of the training examples, in one pass."""
    row = examples.agg(
        F.count(F.lit(1)).alias("n"),
        F.sum(F.xxhash64("history", "pos") % (1 << 31)).alias("h"),
    ).collect()[0]
    return int(row["n"]), int(row["h"] or 0)


def _fingerprint(
    cfg: ContrastiveConfig, n_items: int, in_dim: int, signature: int, matrix_digest: str
) -> str:
    """Identity of one training job: a checkpoint is resumed only by a job with the same identity."""
    keys = {k: v for k, v in vars(cfg).items() if k not in ("enabled", "reader_workers")}
    payload = json.dumps(
        [keys, n_items, in_dim, signature, matrix_digest], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _cache_dir_url(path: str) -> str:
    return path if "://" in path or path.startswith("dbfs:") else "file://" + os.path.abspath(path)


def spark_converter(examples: DataFrame) -> Any:
    """petastorm's Spark converter for `examples`, its files in part-number order.

    petastorm numbers row groups in the order of `converter.file_urls`, which comes from
    `Dataset.inputFiles()`, a set: its order changes with the files' random names on every
    run, and with it the seeded row-group shuffle and each process's shard. Sorted by name
    (`part-NNNNN-...`), the same examples train the same model on every run.
    """
    from petastorm.spark import make_spark_converter

    quiet_petastorm()  # the driver's converter warns about pyarrow.localfs as the workers do
    converter = make_spark_converter(examples)
    converter.file_urls = sorted(converter.file_urls)
    return converter


def training_config(cfg: ContrastiveConfig, device: str) -> dict[str, Any]:
    """The hyperparameters `train_text_tower` reads from its config dict, taken from `cfg`."""
    return {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "learning_rate": cfg.learning_rate,
        "weight_decay": cfg.weight_decay,
        "temperature": cfg.temperature,
        "num_sampled_negatives": cfg.num_sampled_negatives,
        "hidden_dim": cfg.hidden_dim,
        "out_dim": cfg.out_dim,
        "members": cfg.members,
        "seed": cfg.seed,
        "anchor_pooling": cfg.anchor_pooling,
        "input_dropout": cfg.input_dropout,
        "device": device,
        "reader_workers": cfg.reader_workers,
    }


def _run_distributed(
    ctx: RunContext,
    cfg: ContrastiveConfig,
    examples: DataFrame,
    device: str,
    num_processes: int,
    cache_url: str,
    paths: dict[str, Any],
) -> dict[str, Any]:
    """Materialise the examples with petastorm and run `train_text_tower` under TorchDistributor.

    A training process that exits non-zero raises TrainingProcessError (CheckedTorchDistributor).
    """
    from llmrec_spark.runtime.distributor import CheckedTorchDistributor
    from llmrec_spark.runtime.tracking import tracking_uri

    ctx.spark.conf.set(PETASTORM_CACHE_CONF, cache_url)
    converter = spark_converter(examples)
    try:
        # petastorm shards by file/row group: every process needs at least one.
        if len(converter.file_urls) < num_processes:
            log.warning(
                "contrastive: %d data files for %d processes; training with %d",
                len(converter.file_urls),
                num_processes,
                len(converter.file_urls),
            )
            num_processes = len(converter.file_urls)
        config = {
            **paths,
            "converter": converter,
            **training_config(cfg, device),
            "mlflow_tracking_uri": tracking_uri(ctx.cfg) if ctx.cfg.mlflow.enabled else None,
            "mlflow_run_id": ctx.stage_run_id,
        }
        distributor = CheckedTorchDistributor(
            label="text tower",
            num_processes=num_processes,
            local_mode=True,
            use_gpu=device == "cuda",
        )
        output = distributor.run(train_text_tower, config)
        if not isinstance(output, dict):
            raise RuntimeError(
                f"TorchDistributor returned {type(output).__name__}, not the training summary"
            )
        return output
    finally:
        converter.delete()


def _write_tuned(ctx: RunContext, tuned: DataFrame, model_id: str) -> bool:
    """Append the tuned rows; on a rerun (model_id present) rewrite the table without the old ones."""
    table = ctx.store.read("item_embeddings")
    if table.where(F.col("model_id") == model_id).limit(1).count() == 0:
        ctx.store.append(
            "item_embeddings", tuned, metadata={"stage": "train-contrastive", "ds": ctx.ds}
        )
        return False
    kept = table.where(F.col("model_id") != model_id)
    ctx.store.overwrite(
        "item_embeddings",
        kept.unionByName(tuned),
        metadata={"stage": "train-contrastive", "ds": ctx.ds},
    )
    return True
