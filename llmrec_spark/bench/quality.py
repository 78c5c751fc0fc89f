"""`llmrec bench quality`: a public dataset through the pipeline, scored under the bar protocols.

The dataset (`io.datasets`) lands as one landing date (the day after its last event) in a
scratch lakehouse; the real `clean` and `embed` stages run on it, then the offline
evaluation (`evaluation.evaluate.evaluate_events`) fits ALS and the text tower on each protocol's
training part, chooses the hybrids' mix on a validation split of that training part, and
ranks the six models. Ratings are not clickstreams, so the bot rule and the lateness window
are widened to the dataset (a rater who rates 500 films in a day is a person catching up),
and a rating is valid on the dataset's own scale (MovieLens latest: 0.5 to 5 in half stars).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from llmrec_spark.config import Config
from llmrec_spark.core import encoder
from llmrec_spark.core.metrics import paired_bootstrap
from llmrec_spark.errors import InputError
from llmrec_spark.evaluation.evaluate import (
    CLAIMS,
    Evaluation,
    evaluate_events,
    profile_embeddings,
)
from llmrec_spark.evaluation.report import (
    MODEL_ORDER,
    Claim,
    Stats,
    claim_values,
    draw_summary,
    find_view,
    report_summary,
)
from llmrec_spark.evaluation.validation import VAE_WEIGHTS
from llmrec_spark.io.datasets import (
    AMAZON,
    MOVIELENS_LAYOUTS,
    Dataset,
    RatingScale,
    folder_layout,
    load_public_dataset,
)
from llmrec_spark.pipeline.runner import make_context, run_stage
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.runtime.session import build_spark
from llmrec_spark.runtime.tracking import Tracker
from llmrec_spark.stages import embed

log = logging.getLogger(__name__)

# Each `--dataset` and the folder layouts (io.datasets) it stands for.
DATASETS = {"movielens": tuple(MOVIELENS_LAYOUTS), "amazon": (AMAZON,)}
BAR_PROTOCOLS = ("user_temporal", "cold_item")
# ALS grid searched on the user_temporal validation split unless evaluate.tune_als_* are set
# (reg_param and alpha widen while the best sits on an edge). min_weight: every rating as a
# weighted positive (0), or only ratings of at least LIKED (see quality_config). The solver
# is cg with a constant penalty (MLlib's penalty grows with a row's pairs, which favours rare
# items: docs/2026-12-06-quality-beyond-one-dataset.md).
ALS_SOLVER = "cg"
ALS_REG_SCALING = "constant"
ALS_REG_PARAMS = (3.0, 10.0, 30.0)
ALS_ALPHAS = (0.03, 0.1, 0.3, 1.0)
LIKED = 4.0  # the least rating that counts as a positive (x clean.rating_weight_scale)
# The tower's temperatures tried on the cold_item validation split unless set in config.
TOWER_TEMPERATURES = (0.05, 0.1, 0.2)
# Other seeded picks of the cold items refitted for the report's spread (unless set in config).
COLD_ITEM_DRAWS = 2
# The text-only items' kernels tried on the cold_item validation split (0: the mean vector).
TEXT_KERNELS = (0.0, 0.05, 0.1, 0.2, 0.4)
# How many text neighbours a new item borrows an ALS factor from (0: none), tried with the
# hybrid's cold offsets on the cold_item validation split.
NEIGHBOUR_FACTORS = (0, 30)
# The hybrid's places reserved for new items in its list of recommend.top_n, and the text
# z-score a new item needs to take one, tried on the cold_item validation split. Five of
# twenty is the cap by design, not a grid's edge: cold_item makes a fifth of the items with
# five or more positive users new, far more than a catalog adds in a day, so its mixed
# view favours ever more slots (8 were chosen when tried: -19% user_temporal NDCG@20).
NEW_ITEM_SLOTS = (0, 1, 2, 3, 5)
NEW_ITEM_MIN_Z = (0.0, 0.5, 1.0, 2.0, 3.0)


def quality_config(cfg: Config, root: str, *, span_days: int, ratings: RatingScale) -> Config:
    """`cfg` with its storage under `root`, clean's clickstream rules widened for ratings and
    clean's rating scale set to the dataset's `ratings`."""
    storage = dataclasses.replace(
        cfg.storage,
        lakehouse=os.path.join(root, "lakehouse"),
        landing=os.path.join(root, "landing"),
        checkpoint_dir=os.path.join(root, "lakehouse", "_checkpoints"),
        models_dir=os.path.join(root, "lakehouse", "_models"),
    )
    clean = dataclasses.replace(
        cfg.clean,
        source_format="parquet",
        max_late_days=span_days + 2,
        lookback_days=0,
        bot_max_events_per_day=10**9,
        bot_max_distinct_items_per_day=10**9,
        rating_min=ratings.min,
        rating_max=ratings.max,
        rating_step=ratings.step,
    )
    scale = cfg.clean.rating_weight_scale
    evaluate = dataclasses.replace(
        cfg.evaluate,
        positive_min_weight=LIKED * scale,  # rating >= 4 is a positive
        tune_als_reg_params=cfg.evaluate.tune_als_reg_params or list(ALS_REG_PARAMS),
        tune_als_alphas=cfg.evaluate.tune_als_alphas or list(ALS_ALPHAS),
        tune_als_min_weights=cfg.evaluate.tune_als_min_weights or [0.0, LIKED * scale],
        implicit_anchor=True,
        tune_tower_temperatures=(cfg.evaluate.tune_tower_temperatures or list(TOWER_TEMPERATURES)),
        cold_item_draws=cfg.evaluate.cold_item_draws or COLD_ITEM_DRAWS,
        tune_text_kernels=cfg.evaluate.tune_text_kernels or list(TEXT_KERNELS),
        tune_neighbour_factors=cfg.evaluate.tune_neighbour_factors or list(NEIGHBOUR_FACTORS),
        tune_new_item_slots=cfg.evaluate.tune_new_item_slots or list(NEW_ITEM_SLOTS),
        tune_new_item_min_z=cfg.evaluate.tune_new_item_min_z or list(NEW_ITEM_MIN_Z),
    )
    # The bar is stated at rank 64; every window covers the whole dataset.
    als = dataclasses.replace(
        cfg.als,
        rank=64,
        max_iter=15,
        train_days=span_days + 2,
        solver=ALS_SOLVER,
        reg_scaling=ALS_REG_SCALING,
    )
    contrastive = dataclasses.replace(
        cfg.contrastive, train_days=span_days + 2, positive_min_weight=LIKED * scale
    )
    if os.environ.get("LLMREC_QUALITY_ENCODER", "0") == "1":
        # text_encoder_tuned ranked beside the head under cold_item (the encoder tuned on
        # each pick: docs/2026-12-07-profile-text-and-encoder-tuning.md for its CPU cost).
        contrastive = dataclasses.replace(contrastive, mode="encoder")
    # The Mult-VAE is measured here whatever the product's default (README: off until it
    # earns its place); its settings for sets of this size in VAE_SETTINGS.
    vae = dataclasses.replace(cfg.vae, enabled=True, **VAE_SETTINGS)
    profile = dataclasses.replace(cfg.profile, positive_min_weight=LIKED * scale)
    return dataclasses.replace(
        cfg,
        storage=storage,
        clean=clean,
        evaluate=evaluate,
        als=als,
        contrastive=contrastive,
        vae=vae,
        profile=profile,
    )


def run(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    """`llmrec bench quality --path DIR [--dataset NAME]`: `bench_quality` on that folder."""
    if not options.get("path"):
        raise InputError(
            "bench quality needs the dataset folder: "
            f"llmrec bench quality --path DIR [--dataset {'|'.join(DATASETS)}]"
        )
    return bench_quality(cfg, dataset=options.get("dataset"), path=options["path"])


def bench_quality(cfg: Config, *, dataset: str | None, path: str) -> dict[str, Any]:
    """Run the pipeline on the dataset at `path` in a Spark session of its own (stopped after);
    the bar protocols' metrics and the seconds. `dataset` None: the one the folder holds."""
    if dataset is not None and dataset not in DATASETS:
        raise InputError(
            f"bench quality: unknown dataset {dataset!r}; choose {', '.join(DATASETS)}"
        )
    if not path or not os.path.isdir(path):
        raise InputError(f"bench quality: --path {path!r} is not a folder with the dataset's files")
    dataset = dataset_in_folder(path, asked=dataset)
    spark = build_spark(cfg)
    try:
        return measure_quality(spark, cfg, dataset=dataset, path=path)
    finally:
        spark.stop()


def dataset_in_folder(path: str, *, asked: str | None = None) -> str:
    """The DATASETS name of the layout in `path` (no Spark); InputError when none is known or
    when `asked` names another dataset."""
    layout = folder_layout(path)
    found = next(name for name, layouts in DATASETS.items() if layout in layouts)
    if asked is not None and asked != found:
        raise InputError(
            f"bench quality: --dataset {asked} but {path} holds {found} files "
            f"(the {layout} layout); pass --dataset {found} or leave --dataset out"
        )
    return found


def measure_quality(spark: SparkSession, cfg: Config, *, dataset: str, path: str) -> dict[str, Any]:
    """`bench_quality` in `spark`: the dataset landed in a scratch lakehouse (removed after),
    clean and embed run on it, every protocol evaluated with tuning; the report is copied to
    cfg's reports folder."""
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="llmrec-quality-")
    try:
        data = load_public_dataset(spark, path)
        ds, span_days = landing_date(data.events, path)
        qcfg = quality_config(cfg, root, span_days=span_days, ratings=data.rating_scale)
        land(qcfg, data, ds)
        log.info(
            "bench quality: %s (%s) landed as ds=%s, %d days", path, data.layout, ds, span_days
        )
        ctx = make_context(qcfg, spark, ds)
        stages = prepare_stages(ctx)
        evaluation = _evaluate(ctx, title=f"llmrec bench quality: {dataset} ({data.layout})")
        report_dir = cfg.path(cfg.storage.reports_dir)
        os.makedirs(report_dir, exist_ok=True)
        name = dataset if data.layout == dataset else f"{dataset}-{data.layout}"
        report = os.path.join(report_dir, f"quality-{name}.html")
        shutil.copyfile(evaluation.report, report)
        return {
            "dataset": dataset,
            "layout": data.layout,
            "path": path,
            "stages": stages,
            **_evaluation_json(evaluation, qcfg, report),
            **quality_json(evaluation),
            "intervals": interval_json(evaluation, qcfg),
            "paired": (paired := paired_json(evaluation, qcfg)),
            "grid_edges": grid_edges(evaluation, qcfg),
            "bar": bar_json(evaluation, paired),
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)


def landing_date(events: DataFrame, path: str) -> tuple[str, int]:
    """The landing date (the day after the last event) and the days the events span."""
    span = events.agg(
        F.min(F.to_timestamp("event_ts")).alias("first"),
        F.max(F.to_timestamp("event_ts")).alias("last"),
    ).collect()[0]
    if span["last"] is None:
        raise InputError(f"bench quality: no events in {path}")
    ds = (span["last"].date() + dt.timedelta(days=1)).isoformat()
    return ds, (span["last"] - span["first"]).days + 1


def land(cfg: Config, data: Dataset, ds: str) -> None:
    """The dataset's events as landing date `ds`, its catalog and (when it has them and
    `embed.user_profiles` names a folder) its user profiles, in cfg's landing zone."""
    landing = cfg.path(cfg.storage.landing)
    data.events.write.mode("overwrite").parquet(os.path.join(landing, "events", f"ds={ds}"))
    data.catalog.write.mode("overwrite").json(os.path.join(landing, "catalog"))
    if data.profiles is not None and cfg.embed.user_profiles:
        data.profiles.write.mode("overwrite").json(os.path.join(landing, cfg.embed.user_profiles))


def prepare_stages(ctx: RunContext) -> dict[str, Any]:
    """The real clean and embed stages on the landed data; per stage its seconds and rows."""
    tracker = Tracker(ctx.cfg)
    stages = {}
    for stage in ("clean", "embed"):
        record = run_stage(ctx, stage, tracker)
        stages[stage] = {
            "seconds": round(record.seconds, 1),
            "rows_in": record.result.rows_in,
            "rows_out": record.result.rows_out,
            "rows_quarantined": record.result.rows_quarantined,
            "rows_excluded": record.result.rows_excluded,
        }
    return stages


def _evaluate(ctx: RunContext, *, title: str) -> Evaluation:
    """The offline evaluation of the cleaned events with tuning: the bar protocols, cold_user
    where the dataset has user profiles (ml-100k, ml-1m), and global_temporal with
    LLMREC_QUALITY_GLOBAL=1 (not a bar protocol; off keeps the run short)."""
    base_id = encoder.base_model_id(ctx.cfg.embed)
    frozen = embed.latest_embeddings(ctx.store, base_id, ctx.cfg.embed).select(
        "item_id", "embedding"
    )
    profiles = profile_embeddings(ctx, base_id)
    protocols = (
        list(BAR_PROTOCOLS)
        + (["cold_user"] if profiles is not None else [])
        + (["global_temporal"] if os.environ.get("LLMREC_QUALITY_GLOBAL", "0") == "1" else [])
    )
    return evaluate_events(
        ctx,
        ctx.store.read("events_clean"),
        catalog=ctx.store.read("items"),
        frozen=frozen,
        protocols=protocols,
        tune=True,
        work_dir=ctx.model_dir("evaluation"),
        title=title,
        profiles=profiles,
    )


def _evaluation_json(evaluation: Evaluation, cfg: Config, report: str) -> dict[str, Any]:
    """Test users per view, the chosen mixes, ALS's settings, the validation trials, the
    report's path and global_temporal's summary."""
    return {
        "users": {p.name: {v.name: v.users for v in p.views} for p in evaluation.protocols},
        "hybrid_params": {k: dataclasses.asdict(v) for k, v in evaluation.params.items()},
        "als": {
            "rank": cfg.als.rank,
            "max_iter": cfg.als.max_iter,
            "solver": cfg.als.solver,
            "reg_scaling": cfg.als.reg_scaling,
            **(evaluation.tuning.get("als") or {}),
        },
        "validation": evaluation.tuning,
        "report": report,
        "global_temporal": report_summary(
            [p for p in evaluation.protocols if p.name == "global_temporal"]
        ).get("global_temporal"),
    }


def quality_json(evaluation: Evaluation) -> dict[str, Any]:
    """Per protocol and model the bar's metrics (cold_item: cold-only + mixed), and the
    cold_item draws' Recall@20 with its mean per model."""
    summary = evaluation.summary()
    out: dict[str, Any] = {}
    if "user_temporal" in summary:
        out["user_temporal"] = {
            model: {k: round(v, 4) for k, v in values.items() if not _nan(v)}
            for model, values in summary["user_temporal"]["warm"].items()
        }
    if "cold_item" in summary:
        cold_only = summary["cold_item"].get("cold_only", {})
        mixed = summary["cold_item"].get("mixed", {})
        out["cold_item"] = {}
        for model in MODEL_ORDER:
            if model not in cold_only and model not in mixed:
                continue
            row = {
                "recall@20": cold_only.get(model, {}).get("recall@20"),
                "ndcg@20": cold_only.get(model, {}).get("ndcg@20"),
                "mixed_ndcg@10": mixed.get(model, {}).get("ndcg@10"),
                "mixed_cold_recall@20": mixed.get(model, {}).get("cold_recall@20"),
            }
            out["cold_item"][model] = {k: round(v, 4) for k, v in row.items() if not _nan(v)}
    if "cold_user" in summary:
        out["cold_user"] = {
            model: {k: round(v, 4) for k, v in values.items() if not _nan(v)}
            for model, values in summary["cold_user"]["warm"].items()
        }
    if evaluation.draws:
        out["cold_item_draws"] = _draws_json(evaluation)
    return out


def _draws_json(evaluation: Evaluation) -> dict[str, Any]:
    """Per cold_item draw its seed, cold items and each model's Recall@20; the means."""
    draws = evaluation.draws
    models = [m for m in MODEL_ORDER if any(m in d.recall for d in draws)]
    return {
        "seeds": [d.seed for d in draws],
        "cold_items": [d.cold_items for d in draws],
        "recall@20": {
            m: [round(d.recall[m], 4) if m in d.recall else None for d in draws] for m in models
        },
        "mean_recall@20": {m: round(v["mean"], 4) for m, v in draw_summary(draws).items()},
    }


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# The Mult-VAE on sets of ~1,000 users: the paper's architecture (600 -> 200) and dropout,
# 50 epochs of 64 users per process and step, the KL weight annealed to 0.5 over 200 steps
# (docs/2026-12-06-mult-vae.md: chosen on the development parts' validation splits).
VAE_SETTINGS: dict[str, Any] = {
    "epochs": 50,
    "batch_size": 128,
    "beta_cap": 0.5,
    "anneal_steps": 200,
}
# The figures the bench reports with their 95% user-bootstrap intervals: (protocol, view, metric).
INTERVAL_FIGURES = (
    ("user_temporal", "warm", "ndcg@10"),
    ("user_temporal", "warm", "ndcg@20"),
    ("cold_item", "cold_only", "recall@20"),
    ("cold_item", "mixed", "ndcg@10"),
    ("cold_item", "mixed", "cold_recall@20"),
    ("cold_user", "warm", "ndcg@10"),
    ("cold_user", "warm", "recall@20"),
)
# The quality bar: (name, (protocol, view, metric, model), baseline (the same, or
# "draws" for the mean over the cold-item picks), factor).
BAR = (
    (
        "user_temporal hybrid ndcg@10 >= 1.0x implicit_als",
        ("user_temporal", "warm", "ndcg@10", "hybrid"),
        ("user_temporal", "warm", "ndcg@10", "implicit_als"),
        1.0,
    ),
    (
        "user_temporal hybrid ndcg@10 >= 1.05x als",
        ("user_temporal", "warm", "ndcg@10", "hybrid"),
        ("user_temporal", "warm", "ndcg@10", "als"),
        1.05,
    ),
    (
        "cold_item cold-only text_finetuned recall@20 (mean over picks) >= 1.3x text_frozen",
        ("draws", "text_finetuned"),
        ("draws", "text_frozen"),
        1.3,
    ),
    (
        "cold_item cold-only text_encoder_tuned recall@20 (mean over picks) >= 1.1x text_finetuned",
        ("draws", "text_encoder_tuned"),
        ("draws", "text_finetuned"),
        1.1,
    ),
    (
        "cold_item mixed hybrid cold_recall@20 >= 0.5x text_finetuned",
        ("cold_item", "mixed", "cold_recall@20", "hybrid"),
        ("cold_item", "mixed", "cold_recall@20", "text_finetuned"),
        0.5,
    ),
    (
        "cold_item mixed hybrid ndcg@10 >= 1.03x als",
        ("cold_item", "mixed", "ndcg@10", "hybrid"),
        ("cold_item", "mixed", "ndcg@10", "als"),
        1.03,
    ),
    (
        "user_temporal vae ndcg@10 >= 1.0x als",
        ("user_temporal", "warm", "ndcg@10", "vae"),
        ("user_temporal", "warm", "ndcg@10", "als"),
        1.0,
    ),
    (
        "user_temporal hybrid_vae ndcg@10 >= 1.0x hybrid",
        ("user_temporal", "warm", "ndcg@10", "hybrid_vae"),
        ("user_temporal", "warm", "ndcg@10", "hybrid"),
        1.0,
    ),
)


# The bar's checks on a paired difference: (name, the `paired_json` key); met when the 95%
# interval's lower end is above 0.
PAIRED_BAR = (
    (
        "cold_user profile_text ndcg@10 above popularity (paired 95% interval above 0)",
        "cold_user.warm.ndcg@10: profile_text - popularity",
    ),
)


def interval_json(evaluation: Evaluation, cfg: Config) -> dict[str, Any]:
    """Per `INTERVAL_FIGURES` figure and model: [mean, low, high] of the report's 95%
    user-bootstrap interval (the same resamples as the report)."""
    stats = Stats(bootstrap_samples=cfg.evaluate.bootstrap_samples, seed=cfg.evaluate.seed)
    out: dict[str, Any] = {}
    for protocol, view_name, metric in INTERVAL_FIGURES:
        view = find_view(evaluation.protocols, protocol, view_name)
        if view is None:
            continue
        out[f"{protocol}.{view_name}.{metric}"] = {
            model: [round(v, 4) for v in stats.get(view.models[model], metric)]
            for model in MODEL_ORDER
            if model in view.models and metric in view.models[model].per_user
        }
    return out


def paired_json(evaluation: Evaluation, cfg: Config) -> dict[str, list[float]]:
    """Each of the report's claims, "protocol.view.metric: model - baseline": the paired
    difference's [mean, low, high] 95% user-bootstrap interval (the report's resamples)."""
    out = {}
    for protocol, view, metric, model, baseline in CLAIMS:
        claim = Claim(protocol, view, metric, model, baseline)
        values, _ = claim_values(evaluation.protocols, claim)
        if values is None:
            continue
        stat = paired_bootstrap(
            *values, samples=cfg.evaluate.bootstrap_samples, seed=cfg.evaluate.seed
        )
        out[f"{protocol}.{view}.{metric}: {model} - {baseline}"] = [round(v, 4) for v in stat]
    return out


def bar_json(
    evaluation: Evaluation, paired: dict[str, list[float]] | None = None
) -> list[dict[str, Any]]:
    """Each `BAR` check: the value, the baseline, their ratio, the factor and whether it holds
    (None where a figure is missing); then each `PAIRED_BAR` check on `paired` (`paired_json`):
    the difference's [mean, low, high] and whether its low end is above 0."""
    summary = evaluation.summary()
    means = draw_summary(evaluation.draws) if evaluation.draws else {}

    def figure(key: tuple[str, ...]) -> float | None:
        if key[0] == "draws":
            return means.get(key[1], {}).get("mean")
        protocol, view, metric, model = key
        value = summary.get(protocol, {}).get(view, {}).get(model, {}).get(metric)
        return None if _nan(value) else float(value)

    checks: list[dict[str, Any]] = []
    for name, model, baseline, factor in BAR:
        value, base = figure(model), figure(baseline)
        ratio = value / base if value is not None and base else None
        checks.append(
            {
                "check": name,
                "value": None if value is None else round(value, 4),
                "baseline": None if base is None else round(base, 4),
                "ratio": None if ratio is None else round(ratio, 3),
                "factor": factor,
                "met": None if ratio is None else ratio >= factor,
            }
        )
    for name, key in PAIRED_BAR:
        difference = (paired or {}).get(key)
        met = None if difference is None else difference[1] > 0
        checks.append({"check": name, "difference": difference, "met": met})
    return checks


def grid_edges(evaluation: Evaluation, cfg: Config) -> list[str]:
    """Every setting chosen on validation whose value is the first or last of its grid (after
    the widening of the ALS, anchor and tower searches), as "setting=value"; a lower edge at
    0, the setting's own bound, is none."""
    e, params = cfg.evaluate, evaluation.params
    hybrid, recent = params.get("hybrid"), params.get("als_recent")
    chosen: list[tuple[str, Sequence[float], float | None]] = [
        ("als_recent.recent_weight", e.tune_recent_weights, _field(recent, "recent_weight")),
        (
            "als_recent.recent_half_life",
            e.tune_recent_half_lives,
            _field(recent, "recent_half_life"),
        ),
        ("hybrid.text_weight", e.tune_text_weights, _field(hybrid, "text_weight")),
        ("hybrid.text_half_life", e.tune_text_half_lives, _field(hybrid, "text_half_life")),
        ("hybrid.text_kernel", e.tune_text_kernels, _field(hybrid, "text_kernel")),
        ("hybrid.cold_offset", e.tune_cold_offsets, _field(hybrid, "cold_offset")),
        ("hybrid.neighbour_factors", e.tune_neighbour_factors, _field(hybrid, "neighbour_factors")),
        ("hybrid.new_item_slots", e.tune_new_item_slots, _field(hybrid, "new_item_slots")),
    ]
    if hybrid is not None and hybrid.new_item_slots > 0:
        chosen.append(("hybrid.new_item_min_z", e.tune_new_item_min_z, hybrid.new_item_min_z))
    edges = [
        f"{name}={value:g}"
        for name, grid, value in chosen
        if value is not None
        and len(grid) > 1
        and value in (min(grid), max(grid))
        and not (value == min(grid) == 0 and name != "hybrid.new_item_min_z")
    ]
    for key in ("als", "implicit_als", "tower"):
        record = evaluation.tuning.get(key) or {}
        edges += [f"{key}.{axis}={record[axis]}" for axis in record.get("at_edge", [])]
    weight = (evaluation.tuning.get("vae") or {}).get("hybrid_weight")
    if weight is not None and weight in (min(VAE_WEIGHTS), max(VAE_WEIGHTS)):
        edges.append(f"vae.hybrid_weight={weight:g}")
    return edges


def _field(mix: Any, name: str) -> float | None:
    return None if mix is None else float(getattr(mix, name))
