"""Trust what is published: stale inputs refused, and a publish killed at each commit boundary.

Every run here is a real `llmrec` process on tiny demo data (`local[2]`); the kills are
SIGKILLs the process sends itself at a named crash point (`llmrec_spark/faults.py`), right
after a Delta commit, with nothing after it allowed to run.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from deltalake import DeltaTable

from llmrec_spark.faults import CRASH_ENV
from llmrec_spark.io.demo import generate_demo
from tests.conftest import make_config, run_llmrec
from tests.pipeline.test_nightly import DS, TINY

pytestmark = pytest.mark.slow

FIRST = "2026-11-22"  # the published date the faults start from; DS is the one they publish
LATER = "2026-11-30"  # a date no landing data exists for
KEY = ["user_id", "rank"]
COLUMNS = ["user_id", "rank", "item_id", "source"]


def llmrec(root: Path, *args: str, ds: str, crash_at: str | None = None):
    """Run `llmrec ARGS --ds ds` on the project under `root`, optionally killed at a crash point."""
    return run_llmrec(root, *args, ds=ds, overrides=TINY, env={CRASH_ENV: crash_at})


def rows(table: Path, ds: str | None = None):
    """A table's current rows through delta-rs' snapshot (what any Delta reader sees)."""
    delta = DeltaTable(str(table))
    files = [f.removeprefix("file://") for f in delta.file_uris()]
    dataset = pads.dataset(
        files, format="parquet", partitioning="hive", partition_base_dir=str(table)
    )
    frame = dataset.to_table().to_pandas()
    if ds is not None:
        frame = frame[frame["ds"] == ds]
    order = KEY if set(KEY) <= set(frame.columns) else list(frame.columns[:2])
    return frame.sort_values(order).reset_index(drop=True)


def publish_metadata(table: Path) -> dict[str, str]:
    """The metadata of the newest publish commit (one that names an llmrec.ds)."""
    for commit in DeltaTable(str(table)).history():
        if "llmrec.ds" in commit:
            return commit
    return {}


def assert_same_rows(got, expected) -> None:
    assert got[COLUMNS].equals(expected[COLUMNS])
    np.testing.assert_allclose(got["score"], expected["score"], rtol=1e-5)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A project whose nightly published FIRST; the landing zone also holds DS."""
    root = tmp_path_factory.mktemp("published")
    cfg = make_config(root, *TINY)
    generate_demo(cfg.demo, cfg.path(cfg.storage.landing), DS)
    result = llmrec(root, "nightly", ds=FIRST)
    assert result.returncode == 0, result.stderr[-4000:]
    return root


@pytest.fixture
def project(published, tmp_path):
    """A private copy of the published project (the tests below change it)."""
    root = tmp_path / "project"
    shutil.copytree(published, root)
    return root


def test_stages_refuse_stale_inputs_unless_allowed(project):
    lake = project / "lakehouse"
    latest_before = rows(lake / "recommendations_latest")

    # Failure 1 of the issue: no clean for LATER, then train-als and recommend for LATER.
    clean = llmrec(project, "clean", ds=LATER)
    assert clean.returncode == 2
    for stage, newest_clean in (("train-als", FIRST), ("recommend", FIRST)):
        result = llmrec(project, stage, ds=LATER)
        assert result.returncode == 2, (stage, result.stderr[-2000:])
        error = [line for line in result.stderr.splitlines() if line.startswith("llmrec: error")]
        assert error == [
            f"llmrec: error: {stage} {LATER}: input events_clean is stale: no successful "
            f"`clean` for {LATER}, its newest is {newest_clean}. Run `llmrec clean --ds "
            f"{LATER}` first, or pass --allow-stale to use older inputs"
        ], stage
    assert_same_rows(rows(lake / "recommendations_latest"), latest_before)
    assert publish_metadata(lake / "recommendations_latest")["llmrec.ds"] == FIRST

    # With the override the stages run on the older inputs, and say so everywhere.
    for stage in ("embed", "train-als", "train-vae", "train-contrastive", "evaluate", "recommend"):
        result = llmrec(project, stage, "--allow-stale", ds=LATER)
        assert result.returncode == 0, (stage, result.stderr[-3000:])
        assert "using stale inputs" in result.stderr, stage
    runs = rows(lake / "pipeline_runs")
    runs = runs[runs["status"] == "ok"].set_index(["ds", "stage"])
    assert runs.loc[(LATER, "train-als"), "stale_inputs"] == f"clean@{FIRST}"
    # The stages after clean ran for LATER above, so recommend's only stale input is clean.
    assert runs.loc[(LATER, "recommend"), "stale_inputs"] == f"clean@{FIRST}"
    # The demo's events of FIRST end on FIRST itself: nothing newer was ever cleaned.
    assert set(runs.loc[LATER, "events_through"]) == {FIRST}
    assert runs.loc[(FIRST, "recommend"), "stale_inputs"] is None
    served = publish_metadata(lake / "recommendations_latest")
    assert served["llmrec.ds"] == LATER
    assert served["llmrec.events_through"] == FIRST
    assert served["llmrec.stale_inputs"] == runs.loc[(LATER, "recommend"), "stale_inputs"]


def test_a_publish_killed_after_each_commit_is_repaired_by_a_rerun(project):
    lake = project / "lakehouse"
    recommendations, latest = lake / "recommendations", lake / "recommendations_latest"
    first_rows = rows(recommendations, FIRST)

    # 1. Killed right after the commit to `recommendations`: the new partition is complete
    # and its commit names it, `recommendations_latest` still serves FIRST in full.
    killed = llmrec(project, "nightly", ds=DS, crash_at="after-commit:recommendations")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    new_rows = rows(recommendations, DS)
    assert len(new_rows) > 0 and not new_rows.duplicated(KEY).any()
    assert_same_rows(rows(recommendations, FIRST), first_rows)
    assert publish_metadata(recommendations)["llmrec.ds"] == DS
    assert_same_rows(rows(latest), first_rows)
    assert publish_metadata(latest)["llmrec.ds"] == FIRST
    assert set(rows(latest)["ds"]) == {FIRST}

    # 2. Rerun, killed right after the commit to `recommendations_latest`: it serves DS, and
    # its one commit carries the metadata that names DS.
    killed = llmrec(project, "recommend", ds=DS, crash_at="after-commit:recommendations_latest")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert_same_rows(rows(recommendations, DS), new_rows)
    assert_same_rows(rows(latest), new_rows)
    served = publish_metadata(latest)
    assert served["llmrec.ds"] == DS and served["operation"] == "WRITE"
    assert served["llmrec.model_version"] == set(rows(latest)["model_version"]).pop()

    # 3. A clean rerun finishes the publish: the same rows as the killed runs wrote, every
    # date complete, the registry's champion on the models the served commit names.
    done = llmrec(project, "recommend", ds=DS)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_rows(rows(recommendations, DS), new_rows)
    assert_same_rows(rows(recommendations, FIRST), first_rows)
    assert_same_rows(rows(latest), new_rows)
    served = publish_metadata(latest)
    assert served["llmrec.ds"] == DS
    assert served["llmrec.events_through"] == DS
    assert served["llmrec.stale_inputs"] == ""
    _assert_champions(project, served)


def _assert_champions(root: Path, served: dict[str, str]) -> None:
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = MlflowClient()
    for key in ("llmrec.als_model", "llmrec.text_tower_model"):
        name, _, version = served[key].rpartition("/")
        champion = client.get_model_version_by_alias(name, "champion")
        assert str(champion.version) == version, key
        assert champion.tags["ds"] == DS
        run = client.get_run(champion.run_id)
        assert run.data.tags["ds"] == DS
