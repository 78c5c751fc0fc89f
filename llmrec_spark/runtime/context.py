"""What every stage receives (`RunContext`) and returns (`StageResult`)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from pyspark.sql import SparkSession

from llmrec_spark.config import Config
from llmrec_spark.io.tables import TableStore


@dataclass
class RunContext:
    """One run date's stage inputs: config, session, table layer and tracking ids."""

    cfg: Config
    spark: SparkSession
    store: TableStore
    ds: str
    # MLflow run of the whole nightly (the recommendations' model_version) and of this stage.
    parent_run_id: str | None = None
    stage_run_id: str | None = None
    # Set by the runner's freshness check (llmrec_spark/runtime/freshness.py): upstream outputs taken
    # from an older date under --allow-stale ("clean@2026-11-03"), and the newest event date.
    stale_inputs: tuple[str, ...] = ()
    events_through: str | None = None

    def landing(self, *parts: str) -> str:
        return os.path.join(self.cfg.path(self.cfg.storage.landing), *parts)

    def model_dir(self, name: str, ds: str | None = None) -> str:
        """Folder for one model's files of a run date, e.g. lakehouse/_models/2026-11-23/als."""
        return os.path.join(self.cfg.path(self.cfg.storage.models_dir), ds or self.ds, name)


@dataclass
class StageResult:
    """Counts and metrics a stage reports; the pipeline records them in pipeline_runs and MLflow."""

    rows_in: int | None = None
    rows_out: int | None = None
    rows_duplicate: int | None = None
    rows_quarantined: int | None = None
    rows_excluded: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    # name -> local file or folder to log as an MLflow artifact
    artifacts: dict[str, str] = field(default_factory=dict)
    # anything the nightly summary should print (human readable)
    summary: dict[str, Any] = field(default_factory=dict)
