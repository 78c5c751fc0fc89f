"""Chaining stages: the stage runner (pipeline_runs, MLflow runs, freshness) and the nightly, and its run report."""
