# Databricks notebook source
# MAGIC %md
# MAGIC # Querying the published tables
# MAGIC The tables as a downstream team reads them: Spark SQL (the same query runs on Databricks
# MAGIC SQL against `catalog.schema.recommendations`), and delta-rs + pyarrow without Spark.
# MAGIC Parameters: `ds` (run date), `env` (config overlay), `user_id` (empty: the first user).

# COMMAND ----------

from llmrec_spark.evaluation.explore import read_partition_delta_rs
from llmrec_spark.io.views import register_views
from llmrec_spark.runtime.notebook import param, setup, show

ds = param("ds", "2026-11-23")
user_id = param("user_id", "")
cfg, spark = setup(env=param("env", "local"))
lakehouse = cfg.path(cfg.storage.lakehouse)
views = register_views(spark, lakehouse)

# COMMAND ----------

per_source = spark.sql(
    """
    SELECT source, COUNT(DISTINCT user_id) AS users, COUNT(*) AS n_rows, ROUND(AVG(score), 4) AS avg_score
    FROM recommendations WHERE ds = :ds
    GROUP BY source ORDER BY n_rows DESC
    """,
    args={"ds": ds},
)
show(per_source)

# COMMAND ----------

user_id = (
    user_id
    or spark.sql(
        "SELECT MIN(user_id) FROM recommendations WHERE ds = :ds", args={"ds": ds}
    ).first()[0]
)
top = spark.sql(
    """
    SELECT r.rank, r.item_id, i.title, i.category, r.score, r.source
    FROM recommendations r JOIN items i USING (item_id)
    WHERE r.ds = :ds AND r.user_id = :user_id
    ORDER BY r.rank
    """,
    args={"ds": ds, "user_id": user_id},
)
show(top)

# COMMAND ----------

without_spark = read_partition_delta_rs(f"{lakehouse}/recommendations", ds)
show(without_spark[without_spark["user_id"] == user_id].sort_values("rank"))
