"""One Spark session for the whole test run, and a config whose paths live in a temp folder."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmrec_spark.config import load_config

PROJECT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def make_config(root: Path, *overrides: str):
    """The local config with every path under `root` and test-sized settings."""
    return load_config(
        PROJECT / "conf",
        env="local",
        overrides=[
            f"root={root}",
            "spark.master=local[2]",
            "spark.shuffle_partitions=2",
            "spark.driver_memory=2g",
            f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
            f"mlflow.artifact_location={root}/mlruns",
            *overrides,
        ],
    )


@pytest.fixture(scope="session")
def session_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llmrec")


@pytest.fixture(scope="session")
def spark(session_root):
    from llmrec_spark.runtime.session import build_spark

    session = build_spark(make_config(session_root))
    yield session
    session.stop()


@pytest.fixture
def cfg(tmp_path):
    """A config rooted in this test's own temp folder."""
    return make_config(tmp_path)


@pytest.fixture
def store(spark, tmp_path):
    from llmrec_spark.io.tables import open_store

    return open_store(spark, str(tmp_path / "lakehouse"), "embedded")
