"""What every training function run under TorchDistributor shares: its place among the
processes, quiet petastorm readers, atomic checkpoints and rank-0 metrics to MLflow.

`train_text_tower` (`tower_training`) and `train_vae` (`vae_training`) each run inside
`training_place`, which reads torchrun's environment, picks the device, joins the process
group and leaves it cleanly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

# petastorm 0.12 imports pyarrow's LocalFileSystem, deprecated since pyarrow 2.0: a FutureWarning
# from petastorm.spark on import that no user can act on. Installed here because in each
# training process unpickling a training function imports this module before the converter
# (which imports petastorm.spark), and before quiet_petastorm could run.
warnings.filterwarnings(
    "ignore",
    message=r"pyarrow\.\w+ is deprecated",
    category=FutureWarning,
    module=r"petastorm\.",
)


def quiet_petastorm() -> None:
    """Silence petastorm 0.12's per-epoch noise in this process: its deprecation warnings
    about the pyarrow it must run on, unclosed-file warnings from its reader threads, and
    its INFO lines about a dataset not written by petastorm (ours never is). Hundreds of
    lines per training run buried the epoch losses; petastorm's errors still show."""
    warnings.filterwarnings("ignore", module=r"petastorm(\..*)?$")
    logging.getLogger("petastorm").setLevel(logging.WARNING)
    # The converter warns on every run that it casts floats to float32 (the models want
    # float32) and that its files are under 50 MB (advice for cluster-sized data).
    logging.getLogger("petastorm.spark.spark_dataset_converter").setLevel(logging.ERROR)


@dataclass(frozen=True)
class ProcessPlace:
    """One training process: its rank among world_size processes and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@contextlib.contextmanager
def training_place(device_name: str) -> Iterator[ProcessPlace]:
    """This process's place from torchrun's environment (rank 0 of 1 without torchrun), on
    "cuda" (its local GPU, nccl) or "cpu" (gloo, the cores shared among the local processes);
    the process group is joined for the block and destroyed after it."""
    import torch.distributed as dist

    # Before init_process_group: torch.distributed.nn (imported lazily by the first DDP) binds
    # `group=group.WORLD` as default arguments at import, so imported after init it holds the
    # gloo group for good. destroy_process_group then leaves its worker threads running, and
    # the thread that releases the last collective (the step broadcast) can need the GIL
    # while the interpreter is finalising: "terminate called without an active exception",
    # SIGABRT at exit (about 1 run in 10 with 2 processes).
    import torch.distributed.nn  # noqa: F401

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ and not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s: %(message)s"
        )
    quiet_petastorm()
    use_cuda = device_name == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
        # Under torchrun the processes share the cores: do not oversubscribe them.
        if "LOCAL_WORLD_SIZE" in os.environ:
            local_procs = int(os.environ["LOCAL_WORLD_SIZE"])
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_procs))
    place = ProcessPlace(rank=rank, world_size=world_size, device=device)
    if place.distributed and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    try:
        yield place
    finally:
        # Joins the group's worker threads (they must not outlive the interpreter; see above).
        if place.distributed and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def shard_batches(
    config: dict[str, Any],
    place: ProcessPlace,
    model: torch.nn.Module,
    loader_fn: Callable[..., Any],
    *,
    seed: int,
) -> Iterator[Iterable[dict[str, Any]]]:
    """One epoch of this process's shard of the petastorm converter `config["converter"]`:
    batches of `config["batch_size"]` rows in a seeded order, inside DDP's join (ranks whose
    shard has fewer batches shadow the others' all-reduces)."""
    from torch.nn.parallel import DistributedDataParallel

    loader_cm = config["converter"].make_torch_dataloader(
        batch_size=int(config["batch_size"]),
        num_epochs=1,
        workers_count=int(config.get("reader_workers", 1)),
        data_loader_fn=loader_fn,
        shard_count=place.world_size,
        cur_shard=place.rank,
        seed=seed,
        shuffle_rows=True,
        shuffle_row_groups=True,
    )
    join_cm = (
        model.join() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
    )
    # Join's __enter__ calls warnings.simplefilter("once") for the whole process (torch
    # 2.x), in front of quiet_petastorm's filter: catch_warnings undoes it after the epoch.
    with warnings.catch_warnings(), loader_cm as loader, join_cm:
        quiet_petastorm()
        yield loader


def rank_zero_step(place: ProcessPlace, step: int) -> int:
    """Rank 0's step counter on every rank. The broadcast also keeps every rank from
    returning before rank 0 has saved the model."""
    if not place.distributed:
        return step
    shared = torch.tensor([step], dtype=torch.int64, device=place.device)
    torch.distributed.broadcast(shared, src=0)
    return int(shared.item())


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    """torch.save `state` to `path` through a temporary file: a crash never leaves it torn."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    partial = f"{path}.partial"
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: str, fingerprint: str, device: torch.device) -> dict[str, Any] | None:
    """The checkpoint at `path` when it was written by the job `fingerprint`, else None."""
    if not os.path.exists(path):
        return None
    state = torch.load(path, map_location=device, weights_only=True)
    if state.get("fingerprint", "") != fingerprint:
        log.warning("ignoring checkpoint %s: trained on other data or settings", path)
        return None
    return state


def save_weights(
    module: torch.nn.Module,
    output_dir: str,
    *,
    weights: str,
    config: dict[str, Any],
    save_file: Any = None,
) -> str:
    """Write the module's state as safetensors (`weights`) and `config` as config.json under
    output_dir; returns output_dir."""
    if save_file is None:
        from safetensors.torch import save_file
    os.makedirs(output_dir, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, os.path.join(output_dir, weights))
    with open(os.path.join(output_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return output_dir


class RankZeroMetrics:
    """Per-epoch metrics to the stage's MLflow run (rank 0 only; a no-op without a run id)."""

    def __init__(self, config: dict[str, Any], rank: int) -> None:
        self.client = None
        self.run_id: str = config.get("mlflow_run_id") or ""
        if rank == 0 and self.run_id and config.get("mlflow_tracking_uri"):
            from mlflow import MlflowClient

            self.client = MlflowClient(tracking_uri=config["mlflow_tracking_uri"])

    def log(self, name: str, value: float, epoch: int) -> None:
        if self.client is not None:
            self.client.log_metric(self.run_id, name, value, step=epoch)
