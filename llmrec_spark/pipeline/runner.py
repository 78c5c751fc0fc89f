"""Runs stages: times them, records `pipeline_runs`, opens MLflow runs, chains the nightly."""

from __future__ import annotations

import datetime as dt
import importlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pyspark.sql import SparkSession

from llmrec_spark.config import Config
from llmrec_spark.io import filesystem
from llmrec_spark.io.tables import TableStore, open_store
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.runtime.freshness import check_inputs, events_through
from llmrec_spark.runtime.registry import register_artifacts
from llmrec_spark.runtime.tracking import Tracker
from llmrec_spark.schema import PIPELINE_RUNS

log = logging.getLogger(__name__)

# stage name -> "module:function"; imported lazily so one stage's imports never slow another.
STAGES: dict[str, str] = {
    "clean": "llmrec_spark.stages.clean:run_clean",
    "embed": "llmrec_spark.stages.embed:run_embed",
    "train-als": "llmrec_spark.stages.als:run_train_als",
    "train-vae": "llmrec_spark.stages.vae:run_train_vae",
    "train-contrastive": "llmrec_spark.stages.contrastive:run_train_contrastive",
    "recommend": "llmrec_spark.stages.recommend:run_recommend",
    "evaluate": "llmrec_spark.evaluation.evaluate:run_evaluate",
    # The refitted protocol suite, on its own schedule (weekly); not part of the nightly.
    "evaluate-protocols": "llmrec_spark.evaluation.evaluate:run_evaluate_protocols",
}
# evaluate before recommend: the recommend gate compares the run date's offline metrics with
# those of the last published run before it replaces anything.
# train-vae skips itself (one line in pipeline_runs) unless vae.enabled.
NIGHTLY_AFTER_CLEAN = [
    "embed",
    "train-als",
    "train-vae",
    "train-contrastive",
    "evaluate",
    "recommend",
]


def stage_function(stage: str) -> Callable[[RunContext], StageResult]:
    module_name, _, func = STAGES[stage].partition(":")
    return getattr(importlib.import_module(module_name), func)


@dataclass
class StageRecord:
    """One stage run as the nightly summary shows it."""

    stage: str
    ds: str
    seconds: float
    result: StageResult


@dataclass
class NightlySummary:
    ds: str
    mlflow_run_id: str | None
    records: list[StageRecord] = field(default_factory=list)
    tables: dict[str, str] = field(default_factory=dict)
    tracking_uri: str = ""


def make_context(
    cfg: Config, spark: SparkSession, ds: str, store: TableStore | None = None
) -> RunContext:
    store = store or open_store(spark, cfg.path(cfg.storage.lakehouse), cfg.storage.engine)
    return RunContext(cfg=cfg, spark=spark, store=store, ds=ds)


def run_stage(ctx: RunContext, stage: str, tracker: Tracker | None = None) -> StageRecord:
    """Run one stage for ctx.ds inside a (nested) MLflow run and record it in pipeline_runs."""
    tracker = tracker or Tracker(ctx.cfg)
    func = stage_function(stage)
    started_at = dt.datetime.now(dt.UTC)
    started = time.perf_counter()
    nested = ctx.parent_run_id is not None
    with tracker.run(
        f"{stage} {ctx.ds}", nested=nested, tags={"stage": stage, "ds": ctx.ds}
    ) as run_id:
        ctx.stage_run_id = run_id
        ctx.stale_inputs, ctx.events_through = (), None
        try:
            stale = check_inputs(ctx.store, ctx.cfg, stage, ctx.ds)
            ctx.stale_inputs = tuple(s.label() for s in stale)
            ctx.events_through = events_through(ctx.store, ctx.ds)
            if stale:
                tracker.set_tags({"stale_inputs": ",".join(ctx.stale_inputs)})
            result = func(ctx)
        except Exception as exc:
            seconds = time.perf_counter() - started
            _record(
                ctx, stage, "failed", StageResult(), seconds, started_at, run_id, _one_line(exc)
            )
            log.error("%s %s failed after %.1fs: %s", stage, ctx.ds, seconds, _one_line(exc))
            raise
        seconds = time.perf_counter() - started
        tracker.log_params(result.params)
        tracker.log_metrics({**result.metrics, "seconds": seconds, **_counts(result)})
        for name, path in result.artifacts.items():
            tracker.log_artifact(name, path, spark=ctx.spark)
        registered = register_artifacts(ctx.cfg, run_id, result.artifacts, ctx.ds)
        if registered:
            result.summary["registered"] = registered
        _record(ctx, stage, "ok", result, seconds, started_at, run_id, "")
    log.info("%s %s ok in %.1fs: %s", stage, ctx.ds, seconds, _count_line(stage, result, seconds))
    return StageRecord(stage=stage, ds=ctx.ds, seconds=seconds, result=result)


def run_nightly(
    cfg: Config, spark: SparkSession, ds: str, stages: list[str] | None = None
) -> NightlySummary:
    """Clean every landing date up to `ds` not cleaned yet, then run the later stages for `ds`."""
    ctx = make_context(cfg, spark, ds)
    tracker = Tracker(cfg)
    summary = NightlySummary(ds=ds, mlflow_run_id=None, tracking_uri=tracker.uri)
    with tracker.run(f"nightly {ds}", tags={"ds": ds, "kind": "nightly"}) as parent:
        ctx.parent_run_id = parent
        summary.mlflow_run_id = parent
        tracker.log_params(
            {k: v for k, v in cfg.to_flat_dict().items() if not k.startswith("demo.")}
        )
        for clean_ds in pending_clean_dates(ctx):
            clean_ctx = RunContext(
                cfg=cfg, spark=spark, store=ctx.store, ds=clean_ds, parent_run_id=parent
            )
            summary.records.append(run_stage(clean_ctx, "clean", tracker))
        for stage in stages or NIGHTLY_AFTER_CLEAN:
            summary.records.append(run_stage(ctx, stage, tracker))
        for record in summary.records:
            if record.stage == "evaluate":
                tracker.log_metrics(record.result.metrics)
    summary.tables = {
        name: ctx.store.path(name)
        for name in (
            "events_clean",
            "events_quarantine",
            "item_embeddings",
            "user_embeddings",
            "embedding_quarantine",
            "recommendations",
            "recommendations_latest",
            "pipeline_runs",
        )
        if ctx.store.exists(name)
    }
    return summary


def pending_clean_dates(ctx: RunContext) -> list[str]:
    """Landing dates up to ctx.ds with no successful clean yet, oldest first; ctx.ds always included."""
    found = []
    # Through Spark's own filesystems: the landing zone may be s3a:, abfss:, dbfs:, ...
    for name in filesystem.list_dir_names(ctx.spark, ctx.landing("events")):
        match = re.fullmatch(r"ds=(\d{4}-\d{2}-\d{2})", name)
        if match and match.group(1) <= ctx.ds:
            found.append(match.group(1))
    done = {
        row["ds"]
        for row in ctx.store.read("pipeline_runs")
        .where("stage = 'clean' AND status = 'ok'")
        .select("ds")
        .distinct()
        .collect()
    }
    pending = sorted(d for d in set(found) if d not in done)
    if ctx.ds not in pending:
        pending.append(ctx.ds)
    return pending


def _record(
    ctx: RunContext,
    stage: str,
    status: str,
    result: StageResult,
    seconds: float,
    started_at: dt.datetime,
    run_id: str | None,
    message: str,
) -> None:
    row = (
        ctx.ds,
        stage,
        status,
        result.rows_in,
        result.rows_out,
        result.rows_duplicate,
        result.rows_quarantined,
        result.rows_excluded,
        float(seconds),
        started_at,
        run_id,
        message[:2000],
        # clean's own output is what the stages after it see, so it is read after the stage
        events_through(ctx.store, ctx.ds) if stage == "clean" else ctx.events_through,
        ",".join(ctx.stale_inputs) or None,
    )
    ctx.store.append("pipeline_runs", ctx.spark.createDataFrame([row], PIPELINE_RUNS))


def _counts(result: StageResult) -> dict[str, float]:
    names = ("rows_in", "rows_out", "rows_duplicate", "rows_quarantined", "rows_excluded")
    return {n: float(getattr(result, n)) for n in names if getattr(result, n) is not None}


# Stages whose rows_in are the work they do, so rows_in per second is their throughput. The
# others' rows_in count users, items, pairs or examples, not what their time goes on.
THROUGHPUT_STAGES = ("clean",)


def _count_line(stage: str, result: StageResult, seconds: float) -> str:
    """The stage's counts, e.g. "rows_in=1,402 rows_out=667 (93 rows/s)", or "done"."""
    line = " ".join(f"{k}={int(v):,}" for k, v in _counts(result).items()) or "done"
    if stage in THROUGHPUT_STAGES and result.rows_in and seconds > 0:
        line += f" ({result.rows_in / seconds:,.0f} rows/s)"
    return line


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
