"""`llmrec bench tower-warm --path DIR`: a text tower kept warm night after night against one
retrained from scratch, on a public dataset's cold items.

The dataset is landed, cleaned and embedded as `bench quality` does, and cut by the cold_item
protocol (a seeded fifth of the items held out whole: their events are test only). Its
training events are then replayed as nights: the first night sees all but the newest
NIGHTS x NEW_SHARE of them and trains from scratch; each later night adds the next NEW_SHARE
(the demo's one day in a 90-day window is 1.1%) and trains warm from the night before, as
`train-contrastive` does. The last night's warm head is compared with a head retrained from
scratch on the same events, with the first night's head left as it was (what the warm
nights bring), and the retrained one with a second retraining on another seed (how far two
equally good heads differ), on every test user's cold-only Recall@20 and NDCG@20 (paired
bootstrap intervals of the differences). The seconds of each fit go beside them.
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

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.bench.quality import land, landing_date, prepare_stages, quality_config
from llmrec_spark.config import Config
from llmrec_spark.core import encoder
from llmrec_spark.core.metrics import bootstrap_interval, paired_bootstrap
from llmrec_spark.errors import InputError
from llmrec_spark.evaluation.ranking import cold_only_view
from llmrec_spark.evaluation.refit import Fitted, apply_head, fit_split, make_split
from llmrec_spark.evaluation.tuning import text_only_mix
from llmrec_spark.io.datasets import load_public_dataset
from llmrec_spark.pipeline.runner import make_context
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.runtime.session import build_spark
from llmrec_spark.stages import contrastive, embed, tower_training

log = logging.getLogger(__name__)

# Warm nights after the first one, and the share of the training events each one adds.
NIGHTS = 5
NEW_SHARE = 0.01
K = 20


def run(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    """`llmrec bench tower-warm --path DIR`: `bench_tower_warm` on that folder."""
    path = options.get("path")
    if not path or not os.path.isdir(path):
        raise InputError(
            "bench tower-warm needs a dataset folder: llmrec bench tower-warm --path DIR "
            f"(got {path!r})"
        )
    spark = build_spark(cfg)
    try:
        return bench_tower_warm(spark, cfg, path)
    finally:
        spark.stop()


def bench_tower_warm(spark: Any, cfg: Config, path: str) -> dict[str, Any]:
    """The benchmark in `spark`, its lakehouse in a scratch folder (removed after)."""
    root = tempfile.mkdtemp(prefix="llmrec-tower-warm-")
    try:
        return measure(make_landed_context(cfg, spark, path, root), path)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def make_landed_context(cfg: Config, spark: Any, path: str, root: str) -> RunContext:
    """The dataset at `path` landed, cleaned and embedded under `root`; its context."""
    data = load_public_dataset(spark, path)
    ds, span_days = landing_date(data.events, path)
    qcfg = quality_config(cfg, root, span_days=span_days, ratings=data.rating_scale)
    land(qcfg, data, ds)
    ctx = make_context(qcfg, spark, ds)
    prepare_stages(ctx)
    return ctx


def measure(ctx: RunContext, path: str) -> dict[str, Any]:
    """The three towers on ctx's cold_item split; their metrics, differences and seconds."""
    cfg = ctx.cfg
    base_id = encoder.base_model_id(cfg.embed)
    frozen = embed.latest_embeddings(ctx.store, base_id, cfg.embed).select("item_id", "embedding")
    events = ctx.store.read("events_clean").cache()
    split = make_split(events, "cold_item", cfg.evaluate, seed=cfg.evaluate.seed)
    train = split.train.cache()
    work = ctx.model_dir("tower-warm")
    fitted = fit_split(
        ctx,
        dataclasses.replace(split, train=train),
        catalog=ctx.store.read("items"),
        embeddings=frozen,
        work_dir=work,
        max_test_users=cfg.evaluate.max_test_users,
        seed=cfg.evaluate.seed,
        tower=False,
    )
    current = contrastive.with_item_index(frozen).withColumn("dim", F.size("embedding")).cache()
    nights = replay_nights(ctx, train, current, work)
    started = time.perf_counter()
    retrained = contrastive.fit_text_tower(
        ctx,
        cfg.contrastive,
        train,
        current,
        work_dir=os.path.join(work, "retrained"),
        head_metadata={"base_model_id": base_id},
    )
    retrain_seconds = time.perf_counter() - started
    # The same retraining on another seed: how far two from-scratch heads fall apart.
    reseeded = contrastive.fit_text_tower(
        ctx,
        dataclasses.replace(cfg.contrastive, seed=cfg.contrastive.seed + 1),
        train,
        current,
        work_dir=os.path.join(work, "reseeded"),
        head_metadata={"base_model_id": base_id},
    )
    heads = {
        "warm": nights[-1]["head_dir"],
        "retrained": retrained.head_dir,
        "reseeded": reseeded.head_dir,
        "first_night": nights[0]["head_dir"],
    }
    kernel = cfg.recommend.text_kernel
    per_user = {arm: cold_only_metrics(fitted, head, kernel) for arm, head in heads.items()}
    per_user["text_frozen"] = cold_only_metrics(fitted, None, kernel)
    current.unpersist()
    train.unpersist()
    events.unpersist()
    return {
        "path": path,
        "nights": NIGHTS,
        "new_share_per_night": NEW_SHARE,
        "warm_settings": {
            "warm_epochs": cfg.contrastive.warm_epochs,
            "warm_fraction": cfg.contrastive.warm_fraction,
            "epochs": cfg.contrastive.epochs,
            "members": cfg.contrastive.members,
        },
        "cold_test_users": int(len(next(iter(per_user.values()))[f"recall@{K}"])),
        **summarize(per_user, samples=cfg.evaluate.bootstrap_samples, seed=cfg.evaluate.seed),
        "seconds": {
            "retrained": round(retrain_seconds, 1),
            "first_night": nights[0]["seconds"],
            "warm_nights": [n["seconds"] for n in nights[1:]],
        },
        "warm_vs_retrained_seconds": round(
            float(np.mean([n["seconds"] for n in nights[1:]])) / retrain_seconds, 3
        ),
    }


def replay_nights(
    ctx: RunContext, train: DataFrame, current: DataFrame, work: str
) -> list[dict[str, Any]]:
    """Train the tower over NIGHTS + 1 nights of `train` (see the module): per night its
    date, events, head folder and seconds. Night k's date is k days before the last one's."""
    cfg = ctx.cfg.contrastive
    cuts = night_cuts(train, NIGHTS, NEW_SHARE)
    last = dt.date.fromisoformat(ctx.ds)
    nights: list[dict[str, Any]] = []
    warm: contrastive.WarmStart | None = None
    for night, cut in enumerate(cuts):
        ds = (last - dt.timedelta(days=NIGHTS - night)).isoformat()
        window = train if cut is None else train.where(F.col("event_ts") < F.lit(cut))
        started = time.perf_counter()
        fit = contrastive.fit_text_tower(
            dataclasses.replace(ctx, ds=ds),
            cfg,
            window,
            current,
            work_dir=os.path.join(work, f"night-{night}"),
            head_metadata={"ds": ds, "warm_nights": night},
            warm=warm,
        )
        seconds = time.perf_counter() - started
        log.info(
            "bench tower-warm: night %d (%s): %d examples, %.1fs", night, ds, fit.examples, seconds
        )
        nights.append({"ds": ds, "head_dir": fit.head_dir, "seconds": round(seconds, 1)})
        weights = os.path.join(fit.head_dir, tower_training.HEAD_WEIGHTS)
        warm = contrastive.WarmStart(
            head_dir=fit.head_dir,
            ds=ds,
            digest=tower_training.file_digest(weights),
            nights=night + 1,
        )
    return nights


def night_cuts(train: DataFrame, nights: int, share: float) -> list[Any]:
    """The event_ts each night's window ends before (None: the whole of `train`): the first
    night leaves out the newest nights x share of the events, each later one share fewer."""
    times = np.sort(
        np.array([r[0] for r in train.select("event_ts").collect()], dtype="datetime64[us]")
    )
    if len(times) == 0:
        raise InputError("bench tower-warm: the split has no training events")
    cuts: list[Any] = []
    for night in range(nights):
        index = int(len(times) * (1.0 - (nights - night) * share))
        cuts.append(times[index].astype(dt.datetime))
    return [*cuts, None]


def cold_only_metrics(fitted: Fitted, head_dir: str | None, kernel: float) -> dict[str, np.ndarray]:
    """Per test user the cold-only Recall@K and NDCG@K of the text model with the head in
    `head_dir` applied to the frozen text (None: the frozen text itself); new items matched
    with text kernel `kernel`, as recommend does."""
    items = fitted.items
    assert items.text is not None and items.has_text is not None
    if head_dir is None:
        model, view = "text_frozen", fitted
    else:
        head = tower_training.load_head(head_dir)
        tuned = apply_head(head, items.text, items.has_text)
        model, view = "text_finetuned", dataclasses.replace(fitted, tuned=tuned)
    matrices = view.variant(model)
    assert matrices is not None
    result = cold_only_view(view, {model: (matrices, text_only_mix(kernel))}, [K]).models[model]
    return {m: np.asarray(result.per_user[m], np.float64) for m in (f"recall@{K}", f"ndcg@{K}")}


def summarize(
    per_user: dict[str, dict[str, np.ndarray]], *, samples: int, seed: int
) -> dict[str, Any]:
    """Each arm's means with intervals, and warm minus retrained / minus first_night (paired)."""
    out: dict[str, Any] = {"metrics": {}, "differences": {}}
    for arm, metrics in per_user.items():
        out["metrics"][arm] = {
            name: {
                "mean": round(float(values.mean()), 4),
                "interval": [
                    round(v, 4) for v in bootstrap_interval(values, samples=samples, seed=seed)
                ],
            }
            for name, values in metrics.items()
        }
    for arm, other in (("warm", "retrained"), ("warm", "first_night"), ("reseeded", "retrained")):
        out["differences"][f"{arm}_minus_{other}"] = {
            name: [
                round(v, 4)
                for v in paired_bootstrap(
                    per_user[arm][name], per_user[other][name], samples=samples, seed=seed
                )
            ]
            for name in per_user[arm]
        }
    recall = out["differences"]["warm_minus_retrained"][f"recall@{K}"]
    seed_gap = abs(out["differences"]["reseeded_minus_retrained"][f"recall@{K}"][0])
    # Met when the warm tower is not measurably worse than retraining: the difference's
    # interval reaches 0, or its shortfall is no larger than another seed's.
    out["warm_as_good_as_retrained"] = bool(recall[2] >= 0.0 or -recall[0] <= seed_gap)
    return out
