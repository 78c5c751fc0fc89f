"""MLflow tracking: one parent run per nightly, one nested run per stage."""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from llmrec_spark.config import Config, is_uri

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


def tracking_uri(cfg: Config) -> str:
    """The configured tracking URI with a relative SQLite path made absolute under `root`."""
    uri = cfg.mlflow.tracking_uri
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + cfg.path(uri[len(prefix) :])
    return uri


def artifact_location(cfg: Config) -> str | None:
    location = cfg.mlflow.artifact_location
    if not location:
        return None
    if is_uri(location):
        return location
    return "file://" + cfg.path(location)


class Tracker:
    """Opens runs and logs params/metrics/artifacts; every method is a no-op when disabled."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.enabled = cfg.mlflow.enabled
        self.uri = tracking_uri(cfg)
        self.experiment_id: str | None = None
        if self.enabled:
            import mlflow

            logging.getLogger("alembic").setLevel(logging.WARNING)
            if self.uri.startswith("sqlite:///"):
                os.makedirs(os.path.dirname(self.uri[len("sqlite:///") :]), exist_ok=True)
            mlflow.set_tracking_uri(self.uri)
            experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
            if experiment is None:
                self.experiment_id = mlflow.create_experiment(
                    cfg.mlflow.experiment, artifact_location=artifact_location(cfg)
                )
            else:
                self.experiment_id = experiment.experiment_id

    @contextlib.contextmanager
    def run(
        self, name: str, *, nested: bool = False, tags: Mapping[str, str] | None = None
    ) -> Iterator[str | None]:
        """Start a run (nested under the active one when `nested`); yields its id."""
        if not self.enabled:
            yield None
            return
        import mlflow

        with mlflow.start_run(
            run_name=name, experiment_id=self.experiment_id, nested=nested, tags=dict(tags or {})
        ) as active:
            yield active.info.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        if not self.enabled or not params:
            return
        import mlflow

        mlflow.log_params({k: _short(v) for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled or not metrics:
            return
        import mlflow

        clean = {
            _metric_name(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        }
        if clean:
            mlflow.log_metrics(clean, step=step)

    def log_artifact(self, name: str, path: str, spark: SparkSession | None = None) -> None:
        """Log the file or folder at `path` under `name`: a local path, or a URI read via `spark`.

        Nothing at `path` is a warning: the stage's result stands without the artifact.
        """
        if not self.enabled:
            return
        import mlflow

        from llmrec_spark.io import filesystem

        with filesystem.local_copy(spark, path) as local:
            if local is None:
                log.warning("artifact %s not logged: nothing at %s", name, path)
            elif os.path.isdir(local):
                mlflow.log_artifacts(local, artifact_path=name)
            else:
                mlflow.log_artifact(local, artifact_path=name)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if not self.enabled:
            return
        import mlflow

        mlflow.set_tags(dict(tags))


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."


def _metric_name(name: str) -> str:
    # MLflow allows alphanumerics, _ - . space : / only.
    return "".join(c if c.isalnum() or c in "_-. :/" else "_" for c in name)


def latest_stage_metrics(cfg: Config, *, stage: str, ds: str) -> dict[str, float] | None:
    """Metrics of the newest finished MLflow run of `stage` for `ds`, or None (none, or disabled).

    Keys are MLflow's metric names (see `_metric_name`: "hybrid.ndcg@10" is "hybrid.ndcg_10").
    """
    if not cfg.mlflow.enabled:
        return None
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(cfg))
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return None
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=(
            f"tags.stage = '{stage}' AND tags.ds = '{ds}' AND attributes.status = 'FINISHED'"
        ),
        order_by=["attributes.start_time DESC"],
        max_results=1,
        output_format="list",
    )
    return dict(runs[0].data.metrics) if runs else None


def metric_key(name: str) -> str:
    """The name MLflow stores a metric under."""
    return _metric_name(name)
