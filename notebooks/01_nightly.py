# Databricks notebook source
# MAGIC %md
# MAGIC # llmrec-spark: one nightly run
# MAGIC Runs every stage for one date (clean, embed, train-als, train-vae, train-contrastive,
# MAGIC evaluate, recommend) and shows what it published. Parameters: `ds` (run date), `env` (config overlay).

# COMMAND ----------

from llmrec_spark.runtime.notebook import param, setup, show
from llmrec_spark.pipeline.runner import make_context, run_nightly
from llmrec_spark.pipeline.report import format_nightly

ds = param("ds", "2026-11-23")
env = param("env", "local")
cfg, spark = setup(env=env)

# COMMAND ----------

summary = run_nightly(cfg, spark, ds)
print(format_nightly(summary))

# COMMAND ----------

store = make_context(cfg, spark, ds).store
show(store.read("pipeline_runs", where={"ds": ds}).orderBy("started_at"))

# COMMAND ----------

show(store.read("recommendations", where={"ds": ds}).orderBy("user_id", "rank"))
