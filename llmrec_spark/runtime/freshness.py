"""The freshness contract: a stage for date D runs on what its upstream stages produced for D.

Each stage names the upstream stages whose output it reads (`required_stages`). Before a stage
runs, `check_inputs` looks in `pipeline_runs` for a successful run of each of them for D. A
missing one is stale input: the stage stops with a `StaleInputError` (exit 2) naming the input
and the newest date it was produced for, unless `pipeline.allow_stale` (`--allow-stale`) is
set, in which case the stage goes on with the newest older input, logs a warning and the runner
records the stale inputs in `pipeline_runs` and in the published commit's metadata.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyspark.sql import functions as F

from llmrec_spark.config import Config
from llmrec_spark.errors import InputError
from llmrec_spark.io.tables import TableStore

log = logging.getLogger(__name__)

# What each upstream stage's output is, as the error line names it.
STAGE_OUTPUTS = {
    "clean": "events_clean",
    "embed": "item_embeddings",
    "train-als": "als_factors",
    "train-vae": "the Mult-VAE",
    "train-contrastive": "the text tower (and the user tower)",
    "evaluate": "the offline evaluation",
}


class StaleInputError(InputError):
    """A stage's input was not produced for its run date (and stale input was not allowed)."""


@dataclass(frozen=True)
class StaleInput:
    """An upstream stage with no successful run for the run date; `newest` is its newest date."""

    stage: str
    newest: str | None

    def label(self) -> str:
        """`clean@2026-11-03` (or `clean@never`), as pipeline_runs records it."""
        return f"{self.stage}@{self.newest or 'never'}"


def required_stages(cfg: Config, stage: str) -> tuple[str, ...]:
    """The upstream stages whose output for the same run date `stage` reads."""
    if stage == "clean":
        return ()
    if stage in ("embed", "train-als", "train-vae"):
        return ("clean",)
    if stage in ("train-contrastive", "evaluate-protocols"):
        return ("clean", "embed")
    if stage == "evaluate":
        if cfg.evaluate.holdout_fraction <= 0:  # the protocol suite refits its own models
            return ("clean", "embed")
        # The models trained for the date, measured on the users they held out.
        return (
            ("clean", "embed", "train-als")
            + (("train-vae",) if cfg.vae.enabled else ())
            + (("train-contrastive",) if cfg.contrastive.enabled else ())
        )
    if stage == "recommend":
        needed = ["clean", "embed", "train-als"]
        if cfg.vae.enabled:
            needed.append("train-vae")
        if cfg.contrastive.enabled or cfg.profile.enabled:  # the text and user towers
            needed.append("train-contrastive")
        # The metric gate reads the run date's evaluation from MLflow.
        if cfg.recommend.gate_metric and cfg.mlflow.enabled:
            needed.append("evaluate")
        return tuple(needed)
    raise ValueError(f"unknown stage {stage!r}")


def newest_successes(store: TableStore, stages: tuple[str, ...], ds: str) -> dict[str, str]:
    """stage -> the newest date up to `ds` it ran successfully for, from pipeline_runs."""
    if not stages:
        return {}
    rows = (
        store.read("pipeline_runs")
        .where(F.col("stage").isin(list(stages)) & (F.col("status") == "ok") & (F.col("ds") <= ds))
        .groupBy("stage")
        .agg(F.max("ds").alias("ds"))
        .collect()
    )
    return {row["stage"]: row["ds"] for row in rows}


def stale_inputs(store: TableStore, cfg: Config, stage: str, ds: str) -> list[StaleInput]:
    """The required upstream stages with no successful run for `ds`, in pipeline order."""
    needed = required_stages(cfg, stage)
    newest = newest_successes(store, needed, ds)
    return [StaleInput(s, newest.get(s)) for s in needed if newest.get(s) != ds]


def check_inputs(store: TableStore, cfg: Config, stage: str, ds: str) -> list[StaleInput]:
    """Raise StaleInputError for stale inputs unless allowed; returns the (allowed) stale ones."""
    stale = stale_inputs(store, cfg, stage, ds)
    if not stale:
        return []
    first = stale[0]
    what = STAGE_OUTPUTS[first.stage]
    newest = f"its newest is {first.newest}" if first.newest else "it was never produced"
    if not cfg.pipeline.allow_stale:
        raise StaleInputError(
            f"{stage} {ds}: input {what} is stale: no successful `{first.stage}` for {ds}, "
            f"{newest}. Run `llmrec {first.stage} --ds {ds}` first, or pass --allow-stale "
            "to use older inputs"
        )
    log.warning(
        "%s %s: using stale inputs (allowed by pipeline.allow_stale): %s",
        stage,
        ds,
        ", ".join(s.label() for s in stale),
    )
    return stale


def events_through(store: TableStore, ds: str) -> str | None:
    """The newest event date in events_clean up to `ds` (what a stage for `ds` can see)."""
    dates = [d for d in store.partition_values("events_clean", "ds") if d <= ds]
    return max(dates) if dates else None
