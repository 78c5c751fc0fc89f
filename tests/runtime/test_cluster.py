"""A real Spark standalone cluster on loopback: master + two workers, the nightly via spark-submit."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pyarrow.dataset as pads
import pytest
from deltalake import DeltaTable

from llmrec_spark.runtime.cluster import DEMO_OVERRIDES, ClusterSpec, StandaloneCluster, run_demo

pytestmark = pytest.mark.cluster

DS = "2026-11-23"
TINY = (
    *DEMO_OVERRIDES,
    "demo.n_users=40",
    "demo.n_items=60",
    "demo.n_topics=4",
    "demo.days=2",
    "demo.events_per_day=400",
    "demo.new_items=4",
    "als.rank=8",
    "als.max_iter=3",
    "contrastive.batch_size=64",
    "contrastive.hidden_dim=64",
    "contrastive.out_dim=32",
    "contrastive.num_sampled_negatives=32",
    "recommend.top_n=5",
    "evaluate.bootstrap_samples=20",
)


def accepts_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_cluster_stops_when_the_body_fails(tmp_path):
    spec = ClusterSpec(workers=1, master_port=0, webui_port=0)
    with pytest.raises(ZeroDivisionError), StandaloneCluster(spec, tmp_path) as cluster:
        assert [w["host"] for w in cluster.alive_workers()] == ["127.0.0.1"]
        port = cluster.master_port
        assert accepts_connections(port)
        1 / 0  # noqa: B018
    assert not accepts_connections(port)
    assert list((tmp_path / "pids").iterdir()) == []


def test_nightly_runs_on_a_two_worker_standalone_cluster(tmp_path):
    spec = ClusterSpec(workers=2, worker_memory="1536m", master_port=0, webui_port=0)
    result = run_demo(DS, folder=tmp_path, spec=spec, overrides=TINY)
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"nightly {DS}: done" in result.stdout
    assert result.master_url.startswith("spark://127.0.0.1:")

    # Executors ran on both workers: each worker's work folder holds the application.
    apps = [
        sorted(p.name for p in (tmp_path / "cluster" / f"worker-{i}").iterdir()) for i in (1, 2)
    ]
    assert all(len(a) == 1 and a[0].startswith("app-") for a in apps), apps
    assert apps[0] == apps[1]

    table = DeltaTable(str(result.root / "lakehouse" / "recommendations"))
    recs = (
        pads.dataset(table.file_uris(file_pruning_predicate=[("ds", "=", DS)]), format="parquet")
        .to_table()
        .to_pandas()
    )
    assert recs.groupby("user_id")["rank"].apply(list).map(lambda r: r == [1, 2, 3, 4, 5]).all()
    # profile: a demo user with a profile and no event in the window (the user tower's list).
    assert set(recs["source"]) <= {"als", "text", "hybrid", "popular", "profile"}
    assert not os.listdir(tmp_path / "cluster" / "pids")
    assert Path(result.root, "mlflow.db").is_file()
