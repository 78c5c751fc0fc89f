"""Running a stage: the Spark session, run context, MLflow tracking and registry, freshness, torchrun."""
