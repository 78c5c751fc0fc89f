# Databricks notebook source
# MAGIC %md
# MAGIC # Recommendations and offline evaluation
# MAGIC One user's top-N of the run date, the evaluation metrics per model (popularity, ALS, text,
# MAGIC hybrid) as plots, and the evaluation report with bootstrap intervals.
# MAGIC Parameters: `ds` (run date), `env` (config overlay), `user_id` (empty: the first user).

# COMMAND ----------

import os

from llmrec_spark.evaluation.explore import (
    evaluation_frame,
    nightly_runs,
    plot_evaluation,
    stage_metrics,
    user_recommendations,
)
from llmrec_spark.runtime.notebook import param, setup, show, show_html
from llmrec_spark.pipeline.runner import make_context
from llmrec_spark.evaluation.data_quality import stage_counts

ds = param("ds", "2026-11-23")
user_id = param("user_id", "")
cfg, spark = setup(env=param("env", "local"))
store = make_context(cfg, spark, ds).store
reports = cfg.path(cfg.storage.reports_dir)

# COMMAND ----------

show(stage_counts(store.read("pipeline_runs"), stage="recommend"))

# COMMAND ----------

user_id = (
    user_id or store.read("recommendations", where={"ds": ds}).agg({"user_id": "min"}).first()[0]
)
top = user_recommendations(store, ds, user_id)
show(top)

# COMMAND ----------

evaluation = evaluation_frame(stage_metrics(nightly_runs(cfg, ds), "evaluate"))
show(evaluation.pivot_table(index=["metric", "k"], columns="model", values="value"))

# COMMAND ----------

figure = plot_evaluation(
    evaluation,
    path=os.path.join(reports, f"evaluation-{ds}.png"),
    metrics=["ndcg", "recall", "precision", "hit_rate"],
)
show(figure)

# COMMAND ----------

show_html(os.path.join(reports, f"evaluation-{ds}.html"))
