"""Views for the notebooks: embeddings, the nightly's MLflow runs, evaluation plots, and the
published tables read with delta-rs (Spark SQL views: `io.views.register_views`). Read-only:
nothing here writes a table.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.config import Config
from llmrec_spark.io.tables import TableStore

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Embeddings


def embedding_overview(embeddings: DataFrame) -> DataFrame:
    """Per model_id: embedded items, distinct texts and the vector size, most items first."""
    return (
        embeddings.groupBy("model_id")
        .agg(
            F.countDistinct("item_id").alias("items"),
            F.countDistinct("text_hash").alias("texts"),
            F.min("dim").alias("dim"),
            F.max("dim").alias("max_dim"),
        )
        .orderBy(F.col("items").desc(), "model_id")
    )


def nearest_items(
    vectors: pd.DataFrame, item_id: str, *, k: int = 10, titles: pd.DataFrame | None = None
) -> pd.DataFrame:
    """The k items whose embeddings are most cosine-similar to `item_id`'s (itself excluded).

    `vectors` has columns item_id and embedding (one row per item); `titles` (item_id, title,
    category) is joined on when given. Raises KeyError for an item without an embedding.
    """
    ids = vectors["item_id"].to_numpy()
    matrix = np.stack(vectors["embedding"].map(np.asarray).to_list()).astype(np.float32)
    matrix /= np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)  # (items, dim)
    where = np.flatnonzero(ids == item_id)
    if not len(where):
        raise KeyError(f"no embedding for item {item_id!r}")
    scores = matrix @ matrix[where[0]]  # (items,)
    scores[where[0]] = -np.inf
    top = np.argsort(-scores, kind="stable")[: min(k, len(ids) - 1)]
    out = pd.DataFrame({"item_id": ids[top], "similarity": scores[top].astype(float)})
    if titles is not None:
        out = out.merge(titles, on="item_id", how="left")
    return out


def item_vectors(store: TableStore, model_id: str) -> pd.DataFrame:
    """The newest embedding per item of one model, as pandas (item_id, embedding)."""
    from llmrec_spark.stages.embed import newest_embeddings

    return (
        newest_embeddings(store.read("item_embeddings"), model_id=model_id)
        .select("item_id", "embedding")
        .toPandas()
    )


# ---------------------------------------------------------------------------------------
# MLflow runs


def nightly_runs(cfg: Config, ds: str) -> pd.DataFrame:
    """The latest nightly run of `ds` and its stage runs: run_id, name, stage, status, seconds, metrics.

    Empty (with those columns) when MLflow has no nightly of that date.
    """
    import mlflow

    from llmrec_spark.runtime.tracking import tracking_uri

    columns = ["run_id", "run_name", "stage", "status", "start_time", "seconds"]
    mlflow.set_tracking_uri(tracking_uri(cfg))
    experiment = mlflow.get_experiment_by_name(cfg.mlflow.experiment)
    if experiment is None:
        return pd.DataFrame(columns=columns)
    runs = mlflow.search_runs(
        experiment_ids=[experiment.experiment_id],
        filter_string=f"tags.ds = '{ds}'",
        order_by=["attributes.start_time DESC"],
    )
    assert isinstance(runs, pd.DataFrame)
    if runs.empty or "tags.kind" not in runs:
        return pd.DataFrame(columns=columns)
    parents = runs[runs["tags.kind"] == "nightly"]
    if parents.empty:
        return pd.DataFrame(columns=columns)
    parent_id = parents.iloc[0]["run_id"]
    children = runs[runs.get("tags.mlflow.parentRunId") == parent_id]
    picked = pd.concat([parents.iloc[[0]], children.sort_values("start_time")])
    out = pd.DataFrame(
        {
            "run_id": picked["run_id"],
            "run_name": picked["tags.mlflow.runName"],
            "stage": picked["tags.stage"].fillna("nightly"),
            "status": picked["status"],
            "start_time": picked["start_time"],
            "seconds": (picked["end_time"] - picked["start_time"]).dt.total_seconds(),
        }
    )
    metrics = picked[[c for c in picked.columns if c.startswith("metrics.")]]
    metrics.columns = [c[len("metrics.") :] for c in metrics.columns]
    return pd.concat([out, metrics], axis=1).reset_index(drop=True)


def stage_metrics(runs: pd.DataFrame, stage: str) -> pd.Series:
    """The non-empty metrics of one stage's run in a `nightly_runs` frame (name -> value)."""
    row = runs[runs["stage"] == stage]
    if row.empty:
        raise KeyError(f"no {stage!r} run in this nightly")
    fixed = {"run_id", "run_name", "stage", "status", "start_time", "seconds"}
    values = row.iloc[0].drop(labels=[c for c in row.columns if c in fixed])
    return values.dropna().astype(float).sort_index()


# ---------------------------------------------------------------------------------------
# Evaluation


def evaluation_frame(metrics: pd.Series | dict[str, float]) -> pd.DataFrame:
    """Evaluate-stage metrics as rows of model, metric, k, value.

    Keys are "hybrid.ndcg@10" (the stage's result) or "hybrid.ndcg_10" (MLflow, which
    allows no "@" in metric names): the headline protocol's. Protocol-qualified keys
    ("cold_item.mixed.hybrid.ndcg@10") are left out.
    """
    rows = []
    for key, value in dict(metrics).items():
        model, dot, rest = str(key).partition(".")
        metric, sep, k = rest.rpartition("@") if "@" in rest else rest.rpartition("_")
        if dot and sep and k.isdigit() and metric and "." not in metric:
            rows.append((model, metric, int(k), float(value)))
    frame = pd.DataFrame(rows, columns=["model", "metric", "k", "value"])
    return frame.sort_values(["metric", "model", "k"]).reset_index(drop=True)


def plot_evaluation(
    frame: pd.DataFrame, path: str | None = None, metrics: Sequence[str] = ()
) -> Any:
    """One panel per metric, value against k, one line per model; saved as PNG when `path`."""
    import matplotlib

    if not os.environ.get("DATABRICKS_RUNTIME_VERSION"):
        matplotlib.use("Agg")  # no display outside a notebook UI
    import matplotlib.pyplot as plt

    names = list(metrics) or sorted(frame["metric"].unique())
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for model, part in frame[frame["metric"] == name].groupby("model"):
            part = part.sort_values("k")
            ax.plot(part["k"], part["value"], marker="o", label=model)
        ax.set_title(name)
        ax.set_xlabel("k")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.tight_layout()
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=100)
        log.info("evaluation plot: %s", path)
    return fig


def user_recommendations(store: TableStore, ds: str, user_id: str) -> DataFrame:
    """One user's top-N of `ds` with item titles and categories, by rank."""
    items = store.read("items").select("item_id", "title", "category")
    return (
        store.read("recommendations", where={"ds": ds})
        .where(F.col("user_id") == user_id)
        .join(items, "item_id", "left")
        .select("rank", "item_id", "title", "category", "score", "source", "model_version")
        .orderBy("rank")
    )


# ---------------------------------------------------------------------------------------
# Reading the published tables without Spark


def read_partition_delta_rs(table_path: str, ds: str | None = None) -> pd.DataFrame:
    """A Delta table (one ds partition when given) read with delta-rs and pyarrow, no Spark.

    Reads the snapshot's file list (deltalake 1.x's own to_pyarrow_table() needs pyarrow >= 15)
    and adds the partition columns back from the files' `key=value` folders.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    table = DeltaTable(table_path)
    partition_columns = table.metadata().partition_columns
    files = table.file_uris(file_pruning_predicate=[("ds", "=", ds)] if ds else None)
    parts = []
    for uri in files:
        part = pq.read_table(uri)
        values = _partition_values(uri)
        for column in partition_columns:
            part = part.append_column(column, pa.array([values.get(column)] * part.num_rows))
        parts.append(part)
    if not parts:
        return pd.DataFrame(columns=[f.name for f in table.schema().fields])
    return pa.concat_tables(parts).to_pandas()


def _partition_values(uri: str) -> dict[str, str]:
    """`key=value` folder names in a file URI, unquoted."""
    import urllib.parse

    return {
        k: urllib.parse.unquote(v)
        for k, sep, v in (segment.partition("=") for segment in uri.split("/")[:-1])
        if sep
    }
