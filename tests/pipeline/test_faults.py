"""Faults survived: a killed executor, a training crash, a failed nightly rerun, a lost commit.

The local-cluster runs (separate executor JVMs) happen in subprocesses: the test session's own
SparkContext is `local[2]`, and one Python process hosts one SparkContext. The training-crash
case at the level of the training function is
`test_contrastive.py::test_crash_after_epoch_then_rerun_resumes_with_the_same_step_counter`;
here it goes through the stage and TorchDistributor. A crash between the Parquet write and
the Delta commit (table unchanged, vacuum removes the orphans) is
`test_publish.py::test_crash_before_commit_leaves_previous_rows_and_vacuum_removes_the_files`.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import torch
from deltalake import DeltaTable
from pyspark.sql import functions as F
from pyspark.testing import assertDataFrameEqual

from llmrec_spark.io.demo import generate_demo
from tests.conftest import make_config, run_llmrec
from tests.pipeline.test_nightly import DS, TINY, TOP_N

pytestmark = pytest.mark.slow

FAULT_HOOKS = Path(__file__).resolve().parents[1] / "faults"
LOCAL_CLUSTER = "local-cluster[2,1,1024]"
REC_COLUMNS = ["user_id", "rank", "item_id", "source"]


# ---------------------------------------------------------------------------------------------
# local-cluster: the nightly, then the recommend stage again with an executor killed mid-stage


def _cli(root: Path, *args: str, conf: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return run_llmrec(root, *args, ds=DS, master=LOCAL_CLUSTER, overrides=(*TINY, *conf))


def _delta_frame(path: Path, ds: str | None = None):
    table = DeltaTable(str(path))
    files = table.file_uris(file_pruning_predicate=[("ds", "=", ds)] if ds else None)
    # Partition columns live in the folder names (ds=...), not in the files.
    dataset = pads.dataset(
        [f.removeprefix("file://") for f in files],
        format="parquet",
        partitioning="hive",
        partition_base_dir=str(path),
    )
    return dataset.to_table().to_pandas()


@pytest.fixture(scope="module")
def cluster_nightly(tmp_path_factory):
    """One unfaulted tiny nightly under local-cluster; returns (root, seconds)."""
    root = tmp_path_factory.mktemp("cluster-nightly")
    cfg = make_config(root, *TINY)
    generate_demo(cfg.demo, cfg.path(cfg.storage.landing), DS)
    started = time.perf_counter()
    result = _cli(root, "nightly")
    assert result.returncode == 0, result.stderr[-4000:]
    return root, time.perf_counter() - started


def test_nightly_under_local_cluster_publishes_the_recommendations(cluster_nightly):
    root, _ = cluster_nightly
    lake = root / "lakehouse"
    recs = _delta_frame(lake / "recommendations", DS)
    events = _delta_frame(lake / "events_clean")
    assert sorted(events["ingest_ds"].unique()) == ["2026-11-21", "2026-11-22", "2026-11-23"]
    assert not events["event_id"].duplicated().any()
    seen = events[events["ds"] <= DS].groupby("user_id")["item_id"].apply(set).to_dict()
    assert set(seen) <= set(recs["user_id"])
    catalog = set(_delta_frame(lake / "items")["item_id"])
    for user, rows in recs.groupby("user_id"):
        rows = rows.sort_values("rank")
        assert rows["rank"].tolist() == list(range(1, TOP_N + 1)), user
        assert rows["item_id"].nunique() == TOP_N, user
        assert not set(rows["item_id"]) & seen.get(user, set()), f"{user} got a seen item"
        assert rows["score"].is_monotonic_decreasing, user
    assert set(recs["item_id"]) <= catalog
    # vae / hybrid_vae: users without an ALS factor, scored by the Mult-VAE (TINY turns it on);
    # profile: users with a profile and no event in the window, scored by the user tower.
    sources = {"als", "text", "hybrid", "popular", "vae", "hybrid_vae", "profile"}
    assert set(recs["source"]) <= sources
    assert not set(recs.loc[recs["source"] == "profile", "user_id"]) & set(seen)
    runs = _delta_frame(lake / "pipeline_runs")
    assert (runs["status"] == "ok").all()
    assert set(runs["stage"]) == {
        "clean",
        "embed",
        "train-als",
        "train-vae",
        "train-contrastive",
        "recommend",
        "evaluate",
    }


@pytest.mark.parametrize(
    ("path", "driver_max_cells"),
    [
        # recommend.driver_max_cells=0 forces the executor path: the stage's only Python tasks
        # are the scoring mapInPandas, so that is where the executor dies.
        ("executors", "0"),
        # The tiny data is below the default threshold: scoring runs in the driver, and the
        # kill lands in the first Python task on an executor around it.
        ("driver", "50000000"),
    ],
)
def test_executor_killed_mid_recommend_loses_nothing(
    cluster_nightly, tmp_path, path, driver_max_cells
):
    root, _ = cluster_nightly
    table = root / "lakehouse" / "recommendations"
    before = _delta_frame(table, DS).sort_values(["user_id", "rank"]).reset_index(drop=True)
    version = DeltaTable(str(table)).version()
    marker = tmp_path / "executor-killed"

    # Executors run tests/faults/kill_executor_daemon.py as their Python daemon: the first
    # Python task of the stage SIGKILLs its executor JVM.
    result = _cli(
        root,
        "recommend",
        conf=(
            f"recommend.driver_max_cells={driver_max_cells}",
            f"spark.extra.spark.executorEnv.PYTHONPATH={FAULT_HOOKS}",
            f"spark.extra.spark.executorEnv.LLMREC_FAULT_KILL_EXECUTOR_ONCE={marker}",
            "spark.extra.spark.python.daemon.module=kill_executor_daemon",
        ),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"scored (on the {path})" in result.stderr
    assert marker.read_text().startswith("pid="), "no task claimed the kill"
    assert "killed=True" in marker.read_text(), marker.read_text()
    assert "CoarseGrainedExecutorBackend" in marker.read_text()
    assert "Lost executor" in result.stderr or "ExecutorLostFailure" in result.stderr

    # One new data commit, with exactly the rows of the unfaulted run: nothing lost, nothing
    # twice.
    history = DeltaTable(str(table)).history()
    assert [h["operation"] for h in history if h["version"] > version].count("WRITE") == 1
    after = _delta_frame(table, DS).sort_values(["user_id", "rank"]).reset_index(drop=True)
    assert not after.duplicated(["user_id", "rank"]).any()
    assert after[REC_COLUMNS].equals(before[REC_COLUMNS])
    np.testing.assert_allclose(after["score"], before["score"], rtol=1e-5)
    assert not os.listdir(table / "_staging") if (table / "_staging").exists() else True


# ---------------------------------------------------------------------------------------------
# A nightly that fails after recommend published, rerun for the same date


@pytest.mark.spark
def test_failed_nightly_rerun_for_the_same_date_duplicates_nothing(spark, tmp_path, monkeypatch):
    import llmrec_spark.stages.recommend as recommend
    from llmrec_spark.pipeline.runner import make_context, run_nightly

    cfg = make_config(tmp_path, *TINY, "contrastive.enabled=false")
    generate_demo(cfg.demo, cfg.path(cfg.storage.landing), DS)
    real_recommend = recommend.run_recommend

    def publish_then_crash(ctx):
        real_recommend(ctx)
        raise RuntimeError("simulated crash after recommend published")

    monkeypatch.setattr(recommend, "run_recommend", publish_then_crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_nightly(cfg, spark, DS)
    store = make_context(cfg, spark, DS).store
    first_events = store.read("events_clean").toPandas()
    first_recs = store.read("recommendations").toPandas()
    first_runs = store.read("pipeline_runs").toPandas()
    assert list(first_runs.loc[first_runs["status"] == "failed", "stage"]) == ["recommend"]

    monkeypatch.setattr(recommend, "run_recommend", real_recommend)
    run_nightly(cfg, spark, DS)
    events = store.read("events_clean").toPandas()
    recs = store.read("recommendations").toPandas()
    runs = store.read("pipeline_runs").toPandas()

    assert not events["event_id"].duplicated().any()
    key = ["event_id", "user_id", "item_id", "ds"]
    assert (
        events.sort_values(key)[key]
        .reset_index(drop=True)
        .equals(first_events.sort_values(key)[key].reset_index(drop=True))
    )
    assert set(recs["ds"]) == {DS}
    assert not recs.duplicated(["user_id", "rank"]).any()
    by_key = ["user_id", "rank"]
    assert (
        recs.sort_values(by_key)[REC_COLUMNS]
        .reset_index(drop=True)
        .equals(first_recs.sort_values(by_key)[REC_COLUMNS].reset_index(drop=True))
    )
    # pipeline_runs is the log of both attempts: each stage once per attempt, nothing twice.
    rerun = runs.merge(first_runs, how="left", indicator=True)
    rerun = rerun[rerun["_merge"] == "left_only"]
    assert len(runs) == len(first_runs) + len(rerun)
    assert not runs.duplicated(["mlflow_run_id"]).any()
    assert sorted(zip(rerun["ds"], rerun["stage"], rerun["status"], strict=True)) == sorted(
        [(DS, "clean", "ok")] + [(DS, s, "ok") for s in _stages_after_clean()]
    )
    assert sorted(first_runs.loc[first_runs["stage"] == "clean", "ds"]) == [
        "2026-11-21",
        "2026-11-22",
        "2026-11-23",
    ]


def _stages_after_clean() -> list[str]:
    from llmrec_spark.pipeline.runner import NIGHTLY_AFTER_CLEAN

    return list(NIGHTLY_AFTER_CLEAN)


# ---------------------------------------------------------------------------------------------
# A training crash through the stage (TorchDistributor), resumed from its checkpoint


@pytest.mark.spark
def test_training_crash_in_the_stage_resumes_from_its_checkpoint(spark, cfg, store, monkeypatch):
    import llmrec_spark.stages.contrastive as contrastive
    from llmrec_spark.errors import TrainingProcessError
    from llmrec_spark.runtime.context import RunContext
    from llmrec_spark.stages.tower_training import CHECKPOINT
    from tests.stages.test_contrastive import _stage_tables, _with_contrastive

    settings = dict(num_processes=1, epochs=2, batch_size=8, hidden_dim=16, out_dim=8, members=1)
    cfg = _with_contrastive(cfg, **settings, num_sampled_negatives=4, max_history=3)
    base_id, _ = _stage_tables(spark, store, cfg, DS)
    ctx = RunContext(cfg=cfg, spark=spark, store=store, ds=DS)
    before = store.read("item_embeddings")
    real_run = contrastive._run_distributed

    def crash_after_first_epoch(*args):
        *head, paths = args
        return real_run(*head, {**paths, "fail_after_epoch": 1})

    monkeypatch.setattr(contrastive, "_run_distributed", crash_after_first_epoch)
    with pytest.raises(TrainingProcessError, match="rank 0 exited with code 1$"):
        contrastive.run_train_contrastive(ctx)
    monkeypatch.undo()
    assertDataFrameEqual(store.read("item_embeddings"), before)  # nothing published
    checkpoints = os.path.join(ctx.model_dir("text_tower"), "checkpoints")
    checkpoint = torch.load(os.path.join(checkpoints, CHECKPOINT), weights_only=True)
    assert checkpoint["epoch"] == 1 and len(checkpoint["losses"]) == 1

    resumed = contrastive.run_train_contrastive(ctx)
    assert resumed.summary["resumed_from"] == 1
    assert resumed.summary["loss"][0] == round(checkpoint["losses"][0], 4)
    assert len(resumed.summary["loss"]) == 2
    model_id = contrastive.tuned_model_id(base_id, DS)
    tuned = store.read("item_embeddings").where(F.col("model_id") == model_id)
    assert sorted(r.item_id for r in tuned.collect()) == [f"i{k}" for k in range(9)]
    others = store.read("item_embeddings").where(F.col("model_id") != model_id)
    assertDataFrameEqual(others, before)  # the other models' rows are kept as they were


@pytest.mark.spark
def test_a_training_process_aborting_at_exit_fails_the_stage(spark, cfg, store, monkeypatch):
    # Two of seven nightlies printed torchrun's ChildFailedError (rank 1 SIGABRT after the last
    # epoch) and still recorded the stage as ok: pyspark's torchrun wrapper exits 0.
    import llmrec_spark.stages.contrastive as contrastive
    from llmrec_spark.errors import TrainingProcessError
    from llmrec_spark.runtime.context import RunContext
    from tests.stages.test_contrastive import _stage_tables, _with_contrastive

    settings = dict(num_processes=2, epochs=1, batch_size=8, hidden_dim=16, out_dim=8, members=1)
    cfg = _with_contrastive(cfg, **settings, num_sampled_negatives=4, max_history=3)
    _stage_tables(spark, store, cfg, DS)
    ctx = RunContext(cfg=cfg, spark=spark, store=store, ds=DS)
    before = store.read("item_embeddings")

    def train_then_abort_at_exit_on_rank_1(config):
        import atexit
        import os

        # Imported in the torchrun worker, where train_text_tower is the real one.
        from llmrec_spark.stages.tower_training import train_text_tower

        output = train_text_tower(config)
        if int(os.environ["RANK"]) == 1:
            atexit.register(os.abort)  # after the output pickle is written, as in the nightlies
        return output

    monkeypatch.setattr(contrastive, "train_text_tower", train_then_abort_at_exit_on_rank_1)
    with pytest.raises(TrainingProcessError) as failed:
        contrastive.run_train_contrastive(ctx)
    assert str(failed.value) == (
        "text tower: training process rank 1 exited with SIGABRT (exit code -6)"
    )
    assertDataFrameEqual(store.read("item_embeddings"), before)  # nothing published
