"""Publishing the recommend stage's gated rows: one Delta commit per table, each naming its rows.

Order, unchanged since the first publish: the ds partition of `recommendations`, then
`recommendations_latest` (when ds is the newest date), then the registry's champion alias.
Each commit carries the metadata (`PROP_*`) of what its rows were built from;
`published_metadata` reads it back.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

import pandas as pd
from pyspark.sql import DataFrame

from llmrec_spark.io.tables import TableStore
from llmrec_spark.runtime import registry
from llmrec_spark.runtime.context import RunContext

log = logging.getLogger(__name__)

# The metadata each publish commit carries (`published_metadata` reads it back): what its rows
# are, so the data and the metadata naming it are one commit.
PROP_DS = "llmrec.ds"
PROP_MODEL_VERSION = "llmrec.model_version"
PROP_MLFLOW_RUN_ID = "llmrec.mlflow_run_id"
PROP_TEXT_MODEL = "llmrec.text_model"
PROP_GATE_METRIC = "llmrec.gate_metric"
PROP_GATE_METRIC_VALUE = "llmrec.gate_metric_value"
PROP_EVENTS_THROUGH = "llmrec.events_through"
PROP_STALE_INPUTS = "llmrec.stale_inputs"
# registered artifact -> key of its registered model version ("llmrec-als/3")
PROP_REGISTERED = {
    "als_model": "llmrec.als_model",
    "text_tower": "llmrec.text_tower_model",
    "vae_model": "llmrec.vae_model",
}


def publish_run(
    ctx: RunContext,
    recs: DataFrame | pd.DataFrame,
    *,
    model_version: str,
    text_model: str,
    metric_value: float | None,
) -> dict[str, Any]:
    """Publish this run's gated rows (`publish_recommendations`) with the metadata naming them,
    then point the champion aliases at its registered models when its date is the one served.

    Returns `publish_recommendations`' summary.
    """
    cfg = ctx.cfg.recommend
    models = registry.versions_for(ctx.cfg, ctx.ds)
    metadata = {
        PROP_MODEL_VERSION: model_version,
        PROP_MLFLOW_RUN_ID: ctx.stage_run_id or "",
        PROP_TEXT_MODEL: text_model,
        PROP_EVENTS_THROUGH: ctx.events_through or "",
        PROP_STALE_INPUTS: ",".join(ctx.stale_inputs),
    } | {PROP_REGISTERED[artifact]: version for artifact, version in models.items()}
    if metric_value is not None:
        metadata |= {PROP_GATE_METRIC: cfg.gate_metric, PROP_GATE_METRIC_VALUE: repr(metric_value)}
    published = publish_recommendations(ctx, recs, metadata=metadata)
    if published["latest_ds"] == ctx.ds:  # the alias follows what is served
        registry.set_champions(ctx.cfg, models)
    return published


def published_metadata(store: TableStore, name: str, ds: str | None = None) -> dict[str, str]:
    """The metadata of the newest publish commit of table `name` (of run date `ds` if given).

    For `recommendations_latest` this names what is served now; for `recommendations` with a
    `ds`, what that partition was built from. Empty when nothing was published.
    """
    for metadata in store.commit_metadata(name):
        if PROP_DS in metadata and (ds is None or metadata[PROP_DS] == ds):
            return metadata
    return {}


def publish_recommendations(
    ctx: RunContext, recs: DataFrame | pd.DataFrame, *, metadata: dict[str, str]
) -> dict[str, Any]:
    """Publish gated rows for ctx.ds: one commit per table, each naming its rows in its metadata.

    1. `recommendations`: one commit replaces the ds partition, with `metadata` (+ llmrec.ds).
    2. When ctx.ds is the newest published date, `recommendations_latest`: one commit replaces
       all its rows by the same rows, with the same metadata.
    A reader between 1 and 2 sees the new partition in `recommendations` while
    `recommendations_latest` still serves the previous complete date. Rerunning the date
    repeats both commits (each replaces what it wrote), so it repairs a publish cut short
    between them; so does the next date's publish.
    3. Partitions older than `recommend.retention_days` are dropped (one commit), then files
       no version within `recommend.vacuum_retention_hours` uses are vacuumed.
    """
    cfg = ctx.cfg.recommend
    store = ctx.store
    metadata = {**metadata, PROP_DS: ctx.ds}
    version = store.overwrite("recommendations", recs, partitions={"ds": ctx.ds}, metadata=metadata)
    newest = max(store.partition_values("recommendations", "ds"))
    out: dict[str, Any] = {"version": version, "latest_ds": newest}
    if newest == ctx.ds:
        out["latest_version"] = store.overwrite("recommendations_latest", recs, metadata=metadata)
    else:
        log.info("recommend: %s is older than %s; recommendations_latest unchanged", ctx.ds, newest)
    if cfg.retention_days > 0:
        cutoff = (dt.date.fromisoformat(ctx.ds) - dt.timedelta(days=cfg.retention_days)).isoformat()
        out["dropped_partitions"] = store.drop_partitions_before("recommendations", "ds", cutoff)
    removed = []
    for name in ("recommendations", "recommendations_latest"):
        removed += store.vacuum(name, retention_hours=cfg.vacuum_retention_hours)
    out["vacuumed_files"] = len(removed)
    log.info("recommend: published %s", out)
    return out
