# Databricks notebook source
# MAGIC %md
# MAGIC # Behaviour-log data quality
# MAGIC What the clean stage kept, dropped as duplicates and quarantined, by landing date and reason.

# COMMAND ----------

from llmrec_spark.runtime.notebook import param, setup, show
from llmrec_spark.pipeline.runner import make_context
from llmrec_spark.evaluation.data_quality import quarantine_reasons, stage_counts

ds = param("ds", "2026-11-23")
cfg, spark = setup(env=param("env", "local"))
store = make_context(cfg, spark, ds).store

# COMMAND ----------

show(stage_counts(store.read("pipeline_runs"), stage="clean"))

# COMMAND ----------

show(quarantine_reasons(store.read("events_quarantine")))
