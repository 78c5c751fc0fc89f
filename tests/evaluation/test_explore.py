"""The notebooks' pure helpers in llmrec_spark.evaluation.explore, on hand-made inputs."""

import numpy as np
import pandas as pd
import pytest

from llmrec_spark.evaluation.explore import _partition_values, evaluation_frame, nearest_items


def test_evaluation_frame_reads_stage_and_mlflow_metric_names():
    frame = evaluation_frame(
        {
            "hybrid.ndcg@10": 0.5,
            "als.hit_rate_5": 0.25,
            "test_users": 12.0,
            "seconds": 3.0,
            "cold_item.mixed.hybrid.ndcg@10": 0.75,
            "user_temporal.warm.als.hit_rate_5": 0.5,
        }
    )
    assert frame.to_dict("records") == [
        {"model": "als", "metric": "hit_rate", "k": 5, "value": 0.25},
        {"model": "hybrid", "metric": "ndcg", "k": 10, "value": 0.5},
    ]


def test_nearest_items_by_cosine_excludes_the_item_itself():
    vectors = pd.DataFrame(
        {
            "item_id": ["a", "b", "c", "d"],
            "embedding": [
                np.array([1.0, 0.0]),
                np.array([10.0, 1.0]),  # same direction as a, nearly: cosine 0.995
                np.array([0.0, 1.0]),  # orthogonal: 0
                np.array([-1.0, 0.0]),  # opposite: -1
            ],
        }
    )
    titles = pd.DataFrame({"item_id": ["b", "c"], "title": ["B", "C"]})
    near = nearest_items(vectors, "a", k=2, titles=titles)
    assert list(near["item_id"]) == ["b", "c"]
    assert near["similarity"].round(3).tolist() == [0.995, 0.0]
    assert near["title"].tolist() == ["B", "C"]
    with pytest.raises(KeyError, match="no embedding for item 'z'"):
        nearest_items(vectors, "z")


def test_partition_values_from_a_file_uri():
    uri = "file:///lake/recommendations/ds=2026-11-23/src=a%20b/part-0.parquet"
    assert _partition_values(uri) == {"ds": "2026-11-23", "src": "a b"}
