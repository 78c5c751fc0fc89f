"""Where MLflow keeps a new experiment's artifacts: a path resolved under root, a URI as it is."""

from __future__ import annotations

import pytest

from llmrec_spark.config import Config, MlflowConfig
from llmrec_spark.runtime.tracking import artifact_location


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        ("", None),
        ("mlruns", "file:///srv/llmrec/mlruns"),
        ("/data/mlruns", "file:///data/mlruns"),
        ("s3a://bucket/mlruns", "s3a://bucket/mlruns"),
        ("dbfs:/databricks/mlruns", "dbfs:/databricks/mlruns"),
    ],
)
def test_artifact_location_resolves_paths_and_keeps_uris(location, expected):
    cfg = Config(root="/srv/llmrec", mlflow=MlflowConfig(artifact_location=location))
    assert artifact_location(cfg) == expected
