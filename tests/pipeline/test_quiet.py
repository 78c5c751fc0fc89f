"""A quiet run: `llmrec` prints progress and results, no warning a user cannot act on."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from llmrec_spark.pipeline.report import mlflow_ui_command
from llmrec_spark.pipeline.runner import _count_line
from llmrec_spark.runtime.context import StageResult
from llmrec_spark.runtime.session import LOCAL_LOG4J2, _local_log4j2
from tests.conftest import PROJECT, make_config
from tests.pipeline.test_nightly import DS, TINY

LLMREC = Path(sys.executable).parent / "llmrec"
# log4j's " WARN " (and Python logging's WARNING) lines, and Python's "...Warning: message".
NOISE = re.compile(r"\bWARN(ING)?\b|Warning:")
# The one warning left on purpose, where the machine has no native BLAS/LAPACK: it is
# actionable (`make native-blas`), and ALS runs several times slower without.
ALLOWED = re.compile(
    r"InstanceBuilder: Failed to load implementation from:"
    r"dev\.ludovic\.netlib\.(blas\.JNIBLAS|lapack\.JNILAPACK)$"
)


def run_llmrec(root: Path, *args: str, extra_confs: Sequence[str] = ()) -> str:
    """Run `llmrec ARGS` at test size (then `extra_confs`) with every path under `root`; its
    stdout and stderr."""
    confs = [
        f"root={root}",
        "spark.master=local[2]",
        "spark.shuffle_partitions=2",
        "spark.driver_memory=2g",
        *TINY,
        *extra_confs,
    ]
    # This test process's own session set SPARK_LOCAL_IP; the command must set it itself.
    env = {k: v for k, v in os.environ.items() if k != "SPARK_LOCAL_IP"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYSPARK_PYTHON=sys.executable)
    command = [str(LLMREC), *args, "--conf-dir", str(PROJECT / "conf")]
    for conf in confs:
        command += ["--conf", conf]
    done = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=900, check=False
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"{shlex.join(command)} exited {done.returncode}:\n{output}"
    return output


def noise(output: str) -> list[str]:
    return [
        line
        for line in output.splitlines()
        if NOISE.search(line) and not ALLOWED.search(line.rstrip())
    ]


def test_stage_line_gives_a_rate_only_where_rows_in_are_the_stage_s_work():
    clean = StageResult(
        rows_in=1402, rows_out=667, rows_duplicate=27, rows_quarantined=8, rows_excluded=700
    )
    assert _count_line("clean", clean, 2.0) == (
        "rows_in=1,402 rows_out=667 rows_duplicate=27 rows_quarantined=8 rows_excluded=700"
        " (701 rows/s)"
    )
    # evaluate's rows_in are test users: 779 users in 84 s is no throughput
    assert _count_line("evaluate", StageResult(rows_in=779), 84.0) == "rows_in=779"
    assert _count_line("clean", StageResult(rows_in=0, rows_out=0), 1.0) == "rows_in=0 rows_out=0"
    assert _count_line("embed", StageResult(), 3.0) == "done"


def test_mlflow_ui_hint_names_this_virtualenv_s_mlflow(tmp_path):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "mlflow").exists():
        pytest.skip("mlflow's script is not next to this interpreter")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    project = bin_dir.parent.parent  # .venv/bin/python -> the folder that holds .venv

    assert mlflow_ui_command(uri, cwd=str(project)) == (
        f"{bin_dir.parent.name}/bin/mlflow ui --backend-store-uri {uri}"
    )
    assert mlflow_ui_command(uri, cwd=str(tmp_path)) == (
        f"{bin_dir / 'mlflow'} ui --backend-store-uri {uri}"
    )
    assert mlflow_ui_command("sqlite:////a b/mlflow.db", cwd=str(tmp_path)).endswith(
        "--backend-store-uri 'sqlite:////a b/mlflow.db'"
    )
    assert mlflow_ui_command("http://tracking:5000") == "http://tracking:5000"


def test_local_log4j2_settings_are_written_unless_spark_conf_has_its_own(tmp_path, monkeypatch):
    cfg = make_config(tmp_path)
    monkeypatch.delenv("SPARK_CONF_DIR", raising=False)
    monkeypatch.delenv("SPARK_HOME", raising=False)
    path = _local_log4j2(cfg)
    assert path is not None and Path(path).read_text() == LOCAL_LOG4J2
    assert "logger.hadoop_native.level = error" in LOCAL_LOG4J2

    own = tmp_path / "spark-conf"
    own.mkdir()
    (own / "log4j2.properties").write_text("rootLogger.level = info\n")
    monkeypatch.setenv("SPARK_CONF_DIR", str(own))
    assert _local_log4j2(cfg) is None


# A session from the factory, then fit_als (index_ids, MLlib's BLAS) on six pairs.
SESSION_AND_ALS = """
import sys
from llmrec_spark.stages.als import fit_als
from llmrec_spark.config import AlsConfig
from llmrec_spark.runtime.session import build_spark
from tests.conftest import make_config

spark = build_spark(make_config(sys.argv[1]))
pairs = spark.createDataFrame(
    [("u1", "a", 1.0), ("u1", "b", 2.0), ("u2", "b", 1.0), ("u2", "c", 4.0), ("u3", "a", 1.0),
     ("u3", "c", 2.0)],
    "user_id string, item_id string, weight double",
)
factors = fit_als(pairs, AlsConfig(rank=2, max_iter=2, solver="mllib"))
print("users", sorted(r["id"] for r in factors.users.collect()))
"""


@pytest.mark.slow  # a Spark session and an ALS fit in a subprocess: ~30 s
def test_session_start_and_an_als_fit_print_no_warning(tmp_path):
    """The loopback address, native Hadoop, Spark's log-level banner, the id indexes' global
    window and MLlib's Vector API BLAS all used to warn here."""
    env = {k: v for k, v in os.environ.items() if k != "SPARK_LOCAL_IP"}
    done = subprocess.run(
        [sys.executable, "-c", SESSION_AND_ALS, str(tmp_path)],
        cwd=PROJECT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "users ['u1', 'u2', 'u3']" in output
    assert noise(output) == []
    assert "Setting default log level" not in output


@pytest.mark.slow  # the whole nightly at test size: 3 to 6 minutes on 2 busy cores
def test_nightly_prints_no_warning_and_a_runnable_mlflow_hint(tmp_path):
    output = run_llmrec(tmp_path, "generate-demo", "--ds", DS)
    output += run_llmrec(tmp_path, "nightly", "--ds", DS)

    assert "recommend 2026-11-23 ok" in output
    assert noise(output) == []
    assert "Setting OMP_NUM_THREADS" not in output  # torchrun's banner
    assert "Loading weights" not in output  # transformers' per-worker progress bar
    hint = next(line for line in output.splitlines() if "browse with:" in line)
    command = shlex.split(hint.split("browse with:", 1)[1])
    assert command[1:] == ["ui", "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db"]
    assert os.access(tmp_path / command[0], os.X_OK)  # as printed, from where llmrec ran
