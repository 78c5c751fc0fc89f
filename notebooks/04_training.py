# Databricks notebook source
# MAGIC %md
# MAGIC # Training runs in MLflow
# MAGIC The nightly's parent MLflow run and its nested stage runs (ALS, contrastive text tower, ...)
# MAGIC with durations and metrics. Parameters: `ds` (run date), `env` (config overlay).

# COMMAND ----------

from llmrec_spark.evaluation.explore import nightly_runs, stage_metrics
from llmrec_spark.runtime.notebook import param, setup, show

ds = param("ds", "2026-11-23")
cfg, spark = setup(env=param("env", "local"))

# COMMAND ----------

runs = nightly_runs(cfg, ds)
show(runs[["run_name", "stage", "status", "seconds", "run_id"]])

# COMMAND ----------

als_metrics = stage_metrics(runs, "train-als")
show(als_metrics)

# COMMAND ----------

contrastive_metrics = stage_metrics(runs, "train-contrastive")
show(contrastive_metrics)
