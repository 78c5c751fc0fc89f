"""Landing dates, input checks and artifacts through Spark's Hadoop filesystems.

Every case runs on a file: URI and on a second Hadoop filesystem that really runs here: an
FTP server on 127.0.0.1 read through Hadoop's FTPFileSystem (in Spark's own jars), the same
code path s3a:, abfss: or dbfs: take on a cluster.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmrec_spark.errors import InputError
from llmrec_spark.io import filesystem
from llmrec_spark.pipeline.runner import pending_clean_dates
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.runtime.tracking import Tracker
from llmrec_spark.stages.embed import read_user_profiles
from tests.conftest import make_config

pytestmark = pytest.mark.spark

FTP_USER, FTP_PASSWORD = "llmrec", "not-a-secret"


@pytest.fixture
def ftp(spark, tmp_path) -> Iterator[tuple[str, Path]]:
    """(ftp://127.0.0.1:<port>, the folder it serves, read-only); the server stops with the test."""
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    served = tmp_path / "ftp"
    served.mkdir()
    authorizer = DummyAuthorizer()
    authorizer.add_user(FTP_USER, FTP_PASSWORD, str(served), perm="elr")
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer})
    server = FTPServer(("127.0.0.1", 0), handler)
    port = server.socket.getsockname()[1]
    # Credentials in the Hadoop conf (as a cluster would hold them), not in the URI.
    conf = spark.sparkContext._jsc.hadoopConfiguration()
    settings = {
        "fs.ftp.user.127.0.0.1": FTP_USER,
        "fs.ftp.password.127.0.0.1": FTP_PASSWORD,
        "fs.ftp.data.connection.mode": "PASSIVE_LOCAL_DATA_CONNECTION_MODE",
        # FTPFileSystem keeps host and port in the shared conf: a fresh instance per call
        # follows this test's server rather than an earlier test's.
        "fs.ftp.impl.disable.cache": "true",
    }
    for key, value in settings.items():
        conf.set(key, value)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"timeout": 0.2, "handle_exit": False}, daemon=True
    )
    thread.start()
    try:
        yield f"ftp://127.0.0.1:{port}", served
    finally:
        server.close_all()
        thread.join(timeout=10)
        for key in [*settings, "fs.ftp.host", "fs.ftp.host.port"]:
            conf.unset(key)
    assert not thread.is_alive()


@pytest.fixture(params=["bare", "file", "ftp"])
def remote(request, tmp_path) -> tuple[str, Path]:
    """(the base of the paths under test, the local folder behind it) for each kind of path."""
    if request.param == "ftp":
        return request.getfixturevalue("ftp")
    folder = tmp_path / "disk"
    folder.mkdir()
    return (str(folder) if request.param == "bare" else f"file://{folder}"), folder


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_pending_clean_dates_lists_landing_folders_on_any_filesystem(
    spark, store, tmp_path, remote
):
    base, folder = remote
    events = folder / "landing" / "events"
    for name in ["ds=2026-11-20", "ds=2026-11-22", "ds=2026-11-25", "ds=2026-11-2x", "tmp"]:
        write(events / name / "part-0.json", '{"user_id": "u1"}\n')
    write(events / "ds=2026-11-21.bak" / "part-0.json", "\n")
    write(events / "ds=2026-11-19", "a file, not a landing folder\n")
    cfg = make_config(tmp_path, f"storage.landing={base}/landing")
    ctx = RunContext(cfg=cfg, spark=spark, store=store, ds="2026-11-23")

    # Junk names, the file and the date after --ds are left out; --ds itself always comes last.
    assert pending_clean_dates(ctx) == ["2026-11-20", "2026-11-22", "2026-11-23"]


def test_pending_clean_dates_without_a_landing_folder_is_the_run_date(spark, store, tmp_path, ftp):
    cfg = make_config(tmp_path, f"storage.landing={ftp[0]}/nowhere")
    ctx = RunContext(cfg=cfg, spark=spark, store=store, ds="2026-11-23")

    assert pending_clean_dates(ctx) == ["2026-11-23"]


def test_exists_sees_folders_and_files_and_not_missing_paths(spark, remote):
    base, folder = remote
    write(folder / "catalog" / "part-0.json", "{}\n")

    assert filesystem.exists(spark, f"{base}/catalog")
    assert filesystem.exists(spark, f"{base}/catalog/part-0.json")
    assert not filesystem.exists(spark, f"{base}/users")
    assert filesystem.list_dir_names(spark, base) == ["catalog"]
    assert filesystem.list_dir_names(spark, f"{base}/users") == []


def test_user_profiles_are_optional_on_remote_filesystems(spark, ftp):
    # Spark would fail on the missing folder (PATH_NOT_FOUND); profiles are optional instead.
    assert read_user_profiles(spark, f"{ftp[0]}/landing/users") is None


def test_user_profiles_under_a_file_uri_are_read(spark, tmp_path):
    write(tmp_path / "users" / "part-0.json", '{"user_id": "u7", "bio": "likes jazz"}\n')

    profiles = read_user_profiles(spark, f"file://{tmp_path}/users")

    assert profiles is not None
    assert [(r["user_id"], r["bio"]) for r in profiles.collect()] == [("u7", "likes jazz")]


def test_a_scheme_spark_cannot_open_names_the_scheme(spark):
    with pytest.raises(InputError, match="s3a"):
        filesystem.list_dir_names(spark, "s3a://landing-bucket/events")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/data/landing", "/data/landing"),
        ("file:/data/landing", "/data/landing"),
        ("file:///data/landing", "/data/landing"),
        ("file://localhost/data/landing", "/data/landing"),
        ("file://other-host/data/landing", None),
        ("s3a://bucket/landing", None),
        ("dbfs:/landing", None),
    ],
)
def test_local_path_only_for_this_machines_disk(path, expected):
    assert filesystem.local_path(path) == expected


def logged_files(tracker: Tracker, run_id: str, name: str, into: Path) -> dict[str, str]:
    """Every file the run logged under `name`, relative path -> text."""
    import mlflow

    mlflow.set_tracking_uri(tracker.uri)
    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(into)))
    root = local / name
    return {str(p.relative_to(root)): p.read_text() for p in root.rglob("*") if p.is_file()}


def test_log_artifact_logs_a_remote_folder_into_the_run(spark, tmp_path, remote):
    base, folder = remote
    write(folder / "models" / "als" / "metadata" / "part-00000", '{"rank": 8}\n')
    write(folder / "models" / "als" / "userFactors" / "part-00000.parquet", "factors")
    write(folder / "reports" / "evaluation.html", "<h1>ndcg</h1>")
    tracker = Tracker(make_config(tmp_path))

    with tracker.run("artifacts") as run_id:
        tracker.log_artifact("als_model", f"{base}/models/als", spark=spark)
        tracker.log_artifact("evaluation_report", f"{base}/reports/evaluation.html", spark=spark)

    assert run_id is not None
    assert logged_files(tracker, run_id, "als_model", tmp_path / "downloaded") == {
        "metadata/part-00000": '{"rank": 8}\n',
        "userFactors/part-00000.parquet": "factors",
    }
    assert logged_files(tracker, run_id, "evaluation_report", tmp_path / "downloaded") == {
        "evaluation.html": "<h1>ndcg</h1>"
    }


def test_log_artifact_warns_when_nothing_is_there(spark, tmp_path, remote, caplog):
    import mlflow

    base, _ = remote
    tracker = Tracker(make_config(tmp_path))

    with (
        caplog.at_level(logging.WARNING, logger="llmrec_spark.runtime.tracking"),
        tracker.run("artifacts") as run_id,
    ):
        tracker.log_artifact("text_tower", f"{base}/models/head", spark=spark)

    assert [
        r.getMessage() for r in caplog.records if r.name == "llmrec_spark.runtime.tracking"
    ] == [f"artifact text_tower not logged: nothing at {base}/models/head"]
    assert mlflow.MlflowClient(tracker.uri).list_artifacts(run_id) == []
