"""`contrastive.mode: encoder`'s pure-torch core: LoRA adapters on the text encoder plus the
tower's head, trained with the tower's InfoNCE on token ids, and the tuned encoder's files.

Item texts reach training as token ids (`tokenize_texts`, called once per item by Spark in a
pandas UDF); nothing here sees a string while training, and nothing here imports Spark, so the
same step runs in TorchDistributor's processes, in `llmrec bench cores` and on a GPU machine
with torch alone.

The base model's own dropout is switched off at load (LoRA's dropout is `LoraSettings`'):
a step is then a deterministic function of its seed, the CPU and an accelerator compute the
same losses, and encoding an item with or without its gradient gives the same rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmrec_spark.core.encoder import mean_pool_normalize
from llmrec_spark.core.tower import (
    PAD,
    EnsembleHead,
    TextTowerHead,
    head_from_config,
    negative_mask,
)

ADAPTER_DIR = "adapter"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_WEIGHTS = "head.safetensors"
TUNED_CONFIG = "config.json"

TunedEncoder = Callable[[list[str]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters on the encoder's attention projections; `max_length` tokens per item."""

    rank: int = 4
    alpha: int = 8
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("query", "value")
    max_length: int = 32


# ---------------------------------------------------------------------------------------
# Model and tokens


def _base_model(model_path: str) -> Any:
    """The HF encoder from safetensors with its own dropout off (config and modules)."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as transformers_logging

    # transformers 5 draws a "Loading weights" progress bar per load.
    transformers_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(model_path)
    for name, value in config.to_dict().items():
        if "dropout" in name and isinstance(value, float):
            setattr(config, name, 0.0)
    # safetensors only: a model folder's pytorch_model.bin is a pickle and could run code.
    model = AutoModel.from_pretrained(model_path, config=config, use_safetensors=True)
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def lora_encoder(model_path: str, settings: LoraSettings, seed: int) -> Any:
    """A peft model over the encoder: base weights frozen, LoRA weights (seeded init) trainable."""
    from peft import LoraConfig, get_peft_model

    base = _base_model(model_path)
    lora = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=list(settings.target_modules),
        bias="none",
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        # peft 0.21 asks transformers 5 for the deprecated `is_gradient_checkpointing`.
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, lora)
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" in name)
    return model


def tokenize_texts(
    tokenizer: Any, texts: Iterable[Any], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """(token ids (n, max_length) int32 padded with the tokenizer's pad id, lengths (n,) int32).

    Plain numpy out, any iterable of texts in (a list, a numpy or pandas column); None and
    other non-strings count as "" ([CLS] [SEP] for BERT). Texts truncate to `max_length`.
    """
    texts = [t if isinstance(t, str) else "" for t in texts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = np.full((len(texts), max_length), pad_id, dtype=np.int32)
    lengths = np.zeros(len(texts), dtype=np.int32)
    if not texts:
        return ids, lengths
    rows = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_attention_mask=False,
        return_token_type_ids=False,
    )["input_ids"]
    for i, row in enumerate(rows):
        lengths[i] = len(row)
        ids[i, : len(row)] = row
    return ids, lengths


def attention_mask(token_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(n, L) long mask of each row's tokens up to its last non-pad one (padding trails).

    A pad id inside a row (a tokenizer whose pad is its end token) stays attended; a row is
    at least its first token ([CLS]) long.
    """
    positions = torch.arange(1, token_ids.shape[1] + 1, device=token_ids.device)  # (L,)
    lengths = ((token_ids != pad_id) * positions).amax(dim=1).clamp_min(1)  # (n,)
    return (positions[None, :] <= lengths[:, None]).long()


class EncoderTower(torch.nn.Module):
    """The (LoRA-adapted) encoder, mean pooling and the tower's head: token ids -> unit rows."""

    def __init__(
        self, encoder: Any, head: TextTowerHead | EnsembleHead, settings: LoraSettings
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.settings = settings

    @property
    def out_dim(self) -> int:
        return int(self.head.out_dim)

    def forward(self, token_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
        # token_ids (n, L) -> (n, out_dim), unit rows
        mask = attention_mask(token_ids, pad_id)  # (n, L)
        width = int(mask.sum(dim=1).max()) if mask.shape[0] else 1
        ids, mask = token_ids[:, :width].long(), mask[:, :width]  # trim to the longest row
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = mean_pool_normalize(hidden.float(), mask)  # (n, hidden)
        return self.head(pooled).float()


def encoder_tower(
    model_path: str,
    settings: LoraSettings,
    *,
    hidden_dim: int,
    out_dim: int,
    seed: int,
    trained_head: TextTowerHead | EnsembleHead | None = None,
) -> EncoderTower:
    """A fresh tower: seeded LoRA adapters (B = 0: the base encoder at first) and a seeded head,
    or `trained_head` (a head trained on this encoder's frozen embeddings), kept frozen: the
    tower then starts as that head on the base encoder, and only the adapters learn."""
    encoder = lora_encoder(model_path, settings, seed)
    in_dim = int(encoder.config.hidden_size)
    if trained_head is None:
        torch.manual_seed(seed + 1)
        return EncoderTower(encoder, TextTowerHead(in_dim, hidden_dim, out_dim), settings)
    if trained_head.in_dim != in_dim:
        raise ValueError(
            f"the trained head reads {trained_head.in_dim}-d embeddings; the encoder gives {in_dim}"
        )
    trained_head.train().requires_grad_(False)
    return EncoderTower(encoder, trained_head, settings)


# ---------------------------------------------------------------------------------------
# Training


def encode_step_items(
    model: EncoderTower,
    tokens: torch.Tensor,
    pad_id: int,
    ids: torch.Tensor,
    candidate_ids: torch.Tensor,
    history_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoded unique items (n_unique, out), inverse of `ids` into them), one forward per item.

    Without `history_grad` the items that are not in `candidate_ids` (positives and
    negatives) are encoded under no_grad: a forward pass only.
    """
    unique_ids, inverse = torch.unique(ids, return_inverse=True)
    if history_grad:
        return model(tokens[unique_ids], pad_id), inverse
    is_candidate = torch.isin(unique_ids, candidate_ids)
    with_grad = is_candidate.nonzero().squeeze(1)  # (n_cand,)
    without = (~is_candidate).nonzero().squeeze(1)  # (n_hist_only,)
    encoded = model(tokens[unique_ids[with_grad]], pad_id)
    if without.numel():
        with torch.no_grad():
            history_only = model(tokens[unique_ids[without]], pad_id)
        encoded = torch.cat([encoded, history_only])
    position = torch.empty_like(unique_ids)
    position[with_grad] = torch.arange(with_grad.numel(), device=position.device)
    position[without] = torch.arange(without.numel(), device=position.device) + with_grad.numel()
    return encoded[position], inverse


def encoder_train_step(
    model: EncoderTower,
    optimizer: torch.optim.Optimizer,
    loss_fn: torch.nn.Module,
    tokens: torch.Tensor,
    pad_id: int,
    history: torch.Tensor,
    positive_ids: torch.Tensor,
    negative_ids: torch.Tensor,
    *,
    history_grad: bool = True,
    autocast: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """One optimiser step of LoRA + head on one batch; returns the detached loss.

    tokens (n_items, L) every item's token ids on the model's device; history (B, H) item
    indices PAD-filled; positive_ids (B,); negative_ids (N,). Anchors are the normalised mean
    of the history items' encodings (tower's "mean_of_heads"); each unique item of the step
    is encoded once. `autocast`: a context-manager factory for the forward (GPU: bf16).
    """
    batch, max_history = history.shape
    candidate_ids = torch.cat([positive_ids, negative_ids])  # (B + N,)
    ids = torch.cat([history.clamp_min(0).reshape(-1), candidate_ids])
    with (autocast or contextlib.nullcontext)():
        encoded, inverse = encode_step_items(
            model, tokens, pad_id, ids, candidate_ids, history_grad
        )
    encoded = encoded.float()  # (n_unique, out)
    valid = (history != PAD).unsqueeze(-1).to(encoded.dtype)  # (B, H, 1)
    per_item = encoded[inverse[: batch * max_history]].view(batch, max_history, -1)
    pooled = (per_item * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)
    anchors = torch.nn.functional.normalize(pooled, dim=-1)  # (B, out)
    candidates = encoded[inverse[batch * max_history :]]  # (B + N, out)
    n_pos = positive_ids.shape[0]
    mask = negative_mask(history, positive_ids, negative_ids)
    loss = loss_fn(anchors, candidates[:n_pos], candidates[n_pos:], mask)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def make_encoder_optimizer(model: EncoderTower, config: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: the head at learning_rate, LoRA at
    encoder_learning_rate (default learning_rate), both with weight_decay."""
    learning_rate = float(config["learning_rate"])
    encoder_rate = config.get("encoder_learning_rate")
    encoder_rate = learning_rate if encoder_rate is None else float(encoder_rate)
    lora = [p for p in model.encoder.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]  # none: a frozen trained head
    groups = [{"params": head, "lr": learning_rate}, {"params": lora, "lr": encoder_rate}]
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        lr=learning_rate,
        weight_decay=float(config.get("weight_decay", 0.0)),
    )


# ---------------------------------------------------------------------------------------
# Files: adapter + head, digest, loading for inference


def save_tuned(model: EncoderTower, output_dir: str | Path, metadata: dict[str, Any]) -> None:
    """output_dir/adapter (peft, safetensors), head.safetensors and config.json (head dims,
    LoRA settings, `metadata`)."""
    from safetensors.torch import save_file

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.encoder.save_pretrained(str(out / ADAPTER_DIR), safe_serialization=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()}
    save_file(state, str(out / HEAD_WEIGHTS))
    config = {
        "head": model.head.config(),
        "lora": dataclasses.asdict(model.settings),
        "metadata": metadata,
    }
    (out / TUNED_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def tuned_digest(output_dir: str | Path) -> str:
    """sha256 over the adapter's and the head's weight files."""
    out = Path(output_dir)
    sha = hashlib.sha256()
    for path in (out / ADAPTER_DIR / ADAPTER_WEIGHTS, out / HEAD_WEIGHTS):
        sha.update(path.name.encode() + b"\0")
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                sha.update(chunk)
    return sha.hexdigest()


def load_tuned(model_path: str, output_dir: str | Path, device: str = "cpu") -> EncoderTower:
    """The saved tower in eval mode on `device`, LoRA merged into the base weights."""
    from peft import PeftModel
    from safetensors.torch import load_file

    out = Path(output_dir)
    config = json.loads((out / TUNED_CONFIG).read_text())
    lora = dict(config["lora"])
    lora["target_modules"] = tuple(lora["target_modules"])
    settings = LoraSettings(**lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = PeftModel.from_pretrained(_base_model(model_path), str(out / ADAPTER_DIR))
    encoder = peft_model.merge_and_unload()
    head = head_from_config(config["head"])
    head.load_state_dict(load_file(str(out / HEAD_WEIGHTS)))
    tower = EncoderTower(encoder, head, settings).to(device).eval()
    tower.requires_grad_(False)
    return tower


@functools.lru_cache(maxsize=4)
def _load_cached(
    model_path: str, output_dir: str, digest: str, device: str
) -> tuple[Any, EncoderTower]:
    """Tokenizer and merged tower, once per (model, tuned folder, digest, device) and process."""
    from transformers import AutoTokenizer

    del digest  # part of the cache key only: new weights in the same folder load again
    return AutoTokenizer.from_pretrained(model_path), load_tuned(model_path, output_dir, device)


def make_tuned_encoder(
    model_path: str,
    output_dir: str | Path,
    *,
    max_length: int,
    batch_size: int,
    device: str = "cpu",
) -> TunedEncoder:
    """texts -> float32 (n, out_dim) unit rows of the tuned tower; `encoder.make_encoder`'s
    analogue. Texts are sorted by token count so each batch pads to similar lengths."""
    if batch_size <= 0 or max_length <= 1:
        raise ValueError(f"batch_size and max_length must be positive: {batch_size}, {max_length}")
    output_dir = str(Path(output_dir).resolve())
    tokenizer, tower = _load_cached(model_path, output_dir, tuned_digest(output_dir), device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    autocast: Callable[[], Any] = contextlib.nullcontext
    if device.startswith("cuda"):
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)

    def encode(texts: list[str]) -> np.ndarray:
        ids, lengths = tokenize_texts(tokenizer, texts, max_length)
        out = np.empty((len(ids), tower.out_dim), dtype=np.float32)
        order = np.argsort(-lengths, kind="stable")
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = torch.from_numpy(ids[rows]).to(device)
                with autocast():
                    out[rows] = tower(batch, pad_id).float().cpu().numpy()
        return out

    return encode
