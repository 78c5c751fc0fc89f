"""One Spark session for the whole test run, and a config whose paths live in a temp folder."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
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


# A demo small enough for every stage on 2 cores, as a config overlay (the notebooks and the
# README's queries run a whole nightly on it).
TINY_OVERLAY = {
    "demo": {
        "n_users": 40,
        "n_items": 60,
        "n_topics": 4,
        "days": 2,
        "events_per_day": 400,
        "n_bots": 1,
        "bot_events_per_day": 600,
        "new_items": 4,
    },
    "als": {"rank": 8, "max_iter": 3},
    "contrastive": {
        "epochs": 1,
        "batch_size": 64,
        "hidden_dim": 64,
        "out_dim": 32,
        "num_sampled_negatives": 32,
    },
    "recommend": {"top_n": 5},
    "evaluate": {"bootstrap_samples": 20},
}


def run_llmrec(
    root: Path,
    *args: str,
    ds: str,
    overrides: Sequence[str] = (),
    master: str = "local[2]",
    env: Mapping[str, str | None] | None = None,
) -> subprocess.CompletedProcess:
    """`llmrec ARGS --ds ds` as its own process on the project under `root`: the test config's
    paths and sizes, then `overrides`; `env` sets variables (a value) or removes them (None)."""
    settings = [
        f"root={root}",
        f"spark.master={master}",
        "spark.shuffle_partitions=2",
        "spark.driver_memory=1g",
        f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
        f"mlflow.artifact_location={root}/mlruns",
        *overrides,
    ]
    command = [sys.executable, "-m", "llmrec_spark.cli", *args, "--ds", ds]
    command += ["--conf-dir", str(PROJECT / "conf")]
    for setting in settings:
        command += ["--conf", setting]
    environ = {**os.environ, "PYSPARK_PYTHON": sys.executable, "HF_HUB_OFFLINE": "1"}
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run(
        command, cwd=root, env=environ, capture_output=True, text=True, timeout=900, check=False
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
