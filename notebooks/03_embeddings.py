# Databricks notebook source
# MAGIC %md
# MAGIC # Item embeddings
# MAGIC What `item_embeddings` holds per model (the frozen MiniLM base and the nightly's tuned text
# MAGIC tower), and the nearest neighbours of one item by cosine similarity.
# MAGIC Parameters: `ds` (run date), `env` (config overlay), `item_id` (empty: the first item).

# COMMAND ----------

from llmrec_spark.core.encoder import base_model_id
from llmrec_spark.evaluation.explore import embedding_overview, item_vectors, nearest_items
from llmrec_spark.runtime.notebook import param, setup, show
from llmrec_spark.pipeline.runner import make_context

ds = param("ds", "2026-11-23")
item_id = param("item_id", "")
cfg, spark = setup(env=param("env", "local"))
store = make_context(cfg, spark, ds).store

# COMMAND ----------

overview = embedding_overview(store.read("item_embeddings"))
show(overview)

# COMMAND ----------

vectors = item_vectors(store, base_model_id(cfg.embed))
items = store.read("items").select("item_id", "title", "category").toPandas()
item_id = item_id or str(vectors["item_id"].min())
show(items[items["item_id"] == item_id])

# COMMAND ----------

neighbours = nearest_items(vectors, item_id, k=10, titles=items)
show(neighbours)
