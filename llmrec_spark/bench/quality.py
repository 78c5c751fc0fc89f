"""`llmrec bench quality`: a public dataset through the pipeline, scored under the bar protocols.

The dataset (`io.datasets`) lands as one landing date (the day after its last event) in a
scratch lakehouse; the real `clean` and `embed` stages run on it, then the offline
evaluation (`evaluate.evaluate_events`) fits ALS and the text tower on each protocol's
training part, chooses the hybrids' mix on a validation split of that training part, and
ranks the six models. Ratings are not clickstreams, so the bot rule and the lateness window
are widened to the dataset (a rater who rates 500 films in a day is a person catching up),
and a rating is valid on the dataset's own scale (MovieLens latest: 0.5 to 5 in half stars).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
import tempfile
import time
from typing import Any

from pyspark.sql import functions as F

from llmrec_spark.config import Config
from llmrec_spark.errors import InputError
from llmrec_spark.io.datasets import RatingScale

log = logging.getLogger(__name__)

DATASETS = ("movielens",)
BAR_PROTOCOLS = ("user_temporal", "cold_item")
# ALS grid searched on the user_temporal validation split unless evaluate.tune_als_* are set.
ALS_REG_PARAMS = (0.1, 0.3)
ALS_ALPHAS = (0.3, 1.0)
# The tower's temperatures tried on the cold_item validation split unless set in config.
TOWER_TEMPERATURES = (0.05, 0.1, 0.2)
# Other seeded picks of the cold items refitted for the report's spread (unless set in config).
COLD_ITEM_DRAWS = 2
# The text-only items' kernels tried on the cold_item validation split (0: the mean vector).
TEXT_KERNELS = (0.0, 0.05, 0.1, 0.2)
# How many text neighbours a new item borrows an ALS factor from (0: none), tried with the
# hybrid's cold offsets on the cold_item validation split.
NEIGHBOUR_FACTORS = (0, 30)


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
        positive_min_weight=4.0 * scale,  # rating >= 4 is a positive
        tune_als_reg_params=cfg.evaluate.tune_als_reg_params or list(ALS_REG_PARAMS),
        tune_als_alphas=cfg.evaluate.tune_als_alphas or list(ALS_ALPHAS),
        tune_tower_temperatures=(cfg.evaluate.tune_tower_temperatures or list(TOWER_TEMPERATURES)),
        cold_item_draws=cfg.evaluate.cold_item_draws or COLD_ITEM_DRAWS,
        tune_text_kernels=cfg.evaluate.tune_text_kernels or list(TEXT_KERNELS),
        tune_neighbour_factors=cfg.evaluate.tune_neighbour_factors or list(NEIGHBOUR_FACTORS),
    )
    # The bar is stated at rank 64; every window covers the whole dataset.
    als = dataclasses.replace(cfg.als, rank=64, max_iter=15, train_days=span_days + 2)
    contrastive = dataclasses.replace(
        cfg.contrastive, train_days=span_days + 2, positive_min_weight=4.0 * scale
    )
    return dataclasses.replace(
        cfg, storage=storage, clean=clean, evaluate=evaluate, als=als, contrastive=contrastive
    )


def bench_quality(cfg: Config, *, dataset: str, path: str) -> dict[str, Any]:
    """Run the pipeline on the dataset at `path`; the bar protocols' metrics and the seconds."""
    from llmrec_spark.evaluation import evaluate
    from llmrec_spark.io.datasets import load_public_dataset
    from llmrec_spark.pipeline.runner import make_context, run_stage
    from llmrec_spark.runtime.session import build_spark
    from llmrec_spark.runtime.tracking import Tracker

    if dataset not in DATASETS:
        raise InputError(
            f"bench quality: unknown dataset {dataset!r}; choose {', '.join(DATASETS)}"
        )
    if not path or not os.path.isdir(path):
        raise InputError(f"bench quality: --path {path!r} is not a folder with the dataset's files")
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="llmrec-quality-")
    spark = build_spark(cfg)
    try:
        data = load_public_dataset(spark, path)
        span = data.events.agg(
            F.min(F.to_timestamp("event_ts")).alias("first"),
            F.max(F.to_timestamp("event_ts")).alias("last"),
        ).collect()[0]
        if span["last"] is None:
            raise InputError(f"bench quality: no events in {path}")
        ds = (span["last"].date() + dt.timedelta(days=1)).isoformat()
        span_days = (span["last"] - span["first"]).days + 1
        qcfg = quality_config(cfg, root, span_days=span_days, ratings=data.rating_scale)
        qcfg = dataclasses.replace(
            qcfg,
            als=dataclasses.replace(qcfg.als, train_days=span_days + 2),
            contrastive=dataclasses.replace(qcfg.contrastive, train_days=span_days + 2),
        )
        landing = qcfg.path(qcfg.storage.landing)
        data.events.write.mode("overwrite").parquet(os.path.join(landing, "events", f"ds={ds}"))
        data.catalog.write.mode("overwrite").json(os.path.join(landing, "catalog"))
        log.info(
            "bench quality: %s (%s) landed as ds=%s, %d days", path, data.layout, ds, span_days
        )

        ctx = make_context(qcfg, spark, ds)
        tracker = Tracker(qcfg)
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
        from llmrec_spark.core import encoder
        from llmrec_spark.stages import embed

        base_id = encoder.base_model_id(qcfg.embed)
        frozen = embed.latest_embeddings(ctx.store, base_id, qcfg.embed).select(
            "item_id", "embedding"
        )
        protocols = list(BAR_PROTOCOLS) + (
            ["global_temporal"] if os.environ.get("LLMREC_QUALITY_GLOBAL", "1") == "1" else []
        )
        evaluation = evaluate.evaluate_events(
            ctx,
            ctx.store.read("events_clean"),
            catalog=ctx.store.read("items"),
            frozen=frozen,
            protocols=protocols,
            tune=True,
            work_dir=ctx.model_dir("evaluation"),
            title=f"llmrec bench quality: {dataset} ({data.layout})",
        )
        report_dir = cfg.path(cfg.storage.reports_dir)
        os.makedirs(report_dir, exist_ok=True)
        report = os.path.join(report_dir, f"quality-{dataset}-{data.layout}.html")
        shutil.copyfile(evaluation.report, report)
        result = evaluate.quality_json(evaluation)
        return {
            "dataset": dataset,
            "layout": data.layout,
            "path": path,
            "stages": stages,
            "users": {p.name: {v.name: v.users for v in p.views} for p in evaluation.protocols},
            "hybrid_params": {k: dataclasses.asdict(v) for k, v in evaluation.params.items()},
            "als": {
                "rank": qcfg.als.rank,
                "max_iter": qcfg.als.max_iter,
                **(evaluation.tuning.get("als") or {}),
            },
            "validation": evaluation.tuning,
            "report": report,
            "global_temporal": evaluate.report_summary(
                [p for p in evaluation.protocols if p.name == "global_temporal"]
            ).get("global_temporal"),
            **result,
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        spark.stop()
        shutil.rmtree(root, ignore_errors=True)
