"""A Spark standalone cluster on loopback, started from the installed pyspark, and the
nightly demo on it: `python -m llmrec_spark.runtime.cluster demo --ds 2026-11-23` (`make cluster-demo`).

The cluster is one master and N workers, each a JVM daemon started with pyspark's
`sbin/spark-daemon.sh` (the pip package has no start-master.sh/start-worker.sh; those are
thin wrappers around it). Everything binds to 127.0.0.1, and the daemons' pid files, logs
and work folders live under one folder of our own. The cluster is always stopped: on
success, on a failed run, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"

# A tiny demo: big enough for every stage and gate (bots above the clean thresholds,
# held-out users for the evaluation), small enough for a 2-core machine in a few minutes.
DEMO_OVERRIDES: tuple[str, ...] = (
    "demo.n_users=150",
    "demo.n_items=200",
    "demo.n_topics=6",
    "demo.days=3",
    "demo.events_per_day=1500",
    "demo.n_bots=1",
    "demo.bot_events_per_day=600",
    "demo.new_items=8",
    "spark.shuffle_partitions=4",
    "als.rank=16",
    "als.max_iter=5",
    "contrastive.epochs=1",
    "contrastive.batch_size=128",
    "contrastive.hidden_dim=128",
    "contrastive.out_dim=64",
    "contrastive.num_sampled_negatives=64",
    "recommend.top_n=10",
    "evaluate.bootstrap_samples=50",
)


@dataclass(frozen=True)
class ClusterSpec:
    """Shape of the loopback cluster; ports 0 pick free ones."""

    workers: int = 2
    worker_cores: int = 1
    worker_memory: str = "2g"
    host: str = "127.0.0.1"
    master_port: int = 7077
    webui_port: int = 8080
    start_timeout_s: float = 90.0


@dataclass
class StandaloneCluster:
    """Start with `with StandaloneCluster(spec, folder) as cluster:`; stopped on leaving."""

    spec: ClusterSpec
    folder: Path
    master_port: int = 0
    webui_port: int = 0
    started: list[tuple[str, int]] = field(default_factory=list)

    @property
    def master_url(self) -> str:
        return f"spark://{self.spec.host}:{self.master_port}"

    @property
    def webui_url(self) -> str:
        return f"http://{self.spec.host}:{self.webui_port}"

    def __enter__(self) -> StandaloneCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start the master and the workers; return once every worker has registered."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.master_port = self.spec.master_port or free_port(self.spec.host)
        self.webui_port = self.spec.webui_port or free_port(self.spec.host)
        for port in (self.master_port, self.webui_port):
            if not port_is_free(self.spec.host, port):
                raise RuntimeError(
                    f"port {self.spec.host}:{port} is in use (another cluster running?); "
                    "pass --master-port/--webui-port"
                )
        self._daemon(
            "start",
            MASTER_CLASS,
            1,
            "--host",
            self.spec.host,
            "--port",
            str(self.master_port),
            "--webui-port",
            str(self.webui_port),
        )
        self.started.append((MASTER_CLASS, 1))
        for instance in range(1, self.spec.workers + 1):
            work_dir = self.folder / f"worker-{instance}"
            work_dir.mkdir(exist_ok=True)
            self._daemon(
                "start",
                WORKER_CLASS,
                instance,
                "--host",
                self.spec.host,
                "--cores",
                str(self.spec.worker_cores),
                "--memory",
                self.spec.worker_memory,
                "--webui-port",
                "0",
                "--work-dir",
                str(work_dir),
                self.master_url,
            )
            self.started.append((WORKER_CLASS, instance))
        self._wait_for_workers()
        log.info(
            "cluster up: master %s (UI %s), %d workers x %d cores x %s; logs in %s",
            self.master_url,
            self.webui_url,
            self.spec.workers,
            self.spec.worker_cores,
            self.spec.worker_memory,
            self.folder / "logs",
        )

    def stop(self) -> None:
        """Stop every daemon this object started, workers first; safe to call twice."""
        while self.started:
            daemon, instance = self.started.pop()
            pid = self._pid(daemon, instance)
            try:
                self._daemon("stop", daemon, instance)
            except (OSError, subprocess.CalledProcessError) as exc:
                log.warning("could not stop %s %d: %s", daemon.rsplit(".", 1)[-1], instance, exc)
            if pid is not None:
                _wait_for_exit(pid, timeout_s=20.0)
        log.info("cluster stopped (%s)", self.master_url)

    def alive_workers(self) -> list[dict]:
        """The workers the master reports ALIVE (from its web UI's JSON)."""
        with urllib.request.urlopen(f"{self.webui_url}/json/", timeout=5) as response:
            state = json.load(response)
        return [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]

    def daemon_env(self) -> dict[str, str]:
        """The environment of the daemon scripts: loopback only, every file under `folder`."""
        conf_dir = self.folder / "conf"  # empty: no spark-defaults.conf from elsewhere
        conf_dir.mkdir(parents=True, exist_ok=True)
        return {
            **os.environ,
            "SPARK_HOME": spark_home(),
            "SPARK_LOCAL_IP": self.spec.host,
            "SPARK_MASTER_HOST": self.spec.host,
            "SPARK_CONF_DIR": str(conf_dir),
            "SPARK_LOG_DIR": str(self.folder / "logs"),
            "SPARK_PID_DIR": str(self.folder / "pids"),
            "SPARK_IDENT_STRING": f"llmrec-{self.master_port}",
        }

    def _daemon(self, action: str, daemon: str, instance: int, *args: str) -> None:
        env = self.daemon_env()
        env.pop("SPARK_NO_DAEMONIZE", None)  # the scripts must background the daemons
        script = os.path.join(spark_home(), "sbin", "spark-daemon.sh")
        done = subprocess.run(
            ["bash", script, action, daemon, str(instance), *args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        for line in done.stdout.splitlines():
            log.debug("spark-daemon: %s", line)
        if "failed to launch" in done.stdout:
            raise RuntimeError(f"{daemon} did not start:\n{done.stdout}")

    def _pid(self, daemon: str, instance: int) -> int | None:
        """The daemon's process id from the pid file spark-daemon.sh wrote, if any."""
        ident = self.daemon_env()["SPARK_IDENT_STRING"]
        path = self.folder / "pids" / f"spark-{ident}-{daemon}-{instance}.pid"
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def _wait_for_workers(self) -> None:
        deadline = time.monotonic() + self.spec.start_timeout_s
        alive: list[dict] = []
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                alive = self.alive_workers()
                if len(alive) >= self.spec.workers:
                    return
            time.sleep(0.5)
        raise RuntimeError(
            f"{len(alive)} of {self.spec.workers} workers registered with {self.master_url} "
            f"within {self.spec.start_timeout_s:.0f}s; see {self.folder / 'logs'}"
        )


def _wait_for_exit(pid: int, *, timeout_s: float) -> None:
    """Wait for a stopped daemon to exit (spark-daemon.sh only signals it); SIGKILL it after."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    log.warning("daemon %d still running %.0fs after stop; killing it", pid, timeout_s)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def spark_home() -> str:
    """The installed pyspark package folder, which is a complete SPARK_HOME."""
    import pyspark

    return os.path.dirname(pyspark.__file__)


def free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def nightly_command(
    master_url: str,
    ds: str,
    *,
    root: Path,
    conf_dir: Path,
    overrides: Sequence[str],
    python: str,
    venv_archive: str | None = None,
    executor_memory: str = "1g",
) -> list[str]:
    """The spark-submit line that runs jobs/nightly.py against `master_url`.

    The local overlay keeps the embedded Delta engine; `spark.master=""` hands the master to
    spark-submit. With `venv_archive` the executors run the packed virtualenv from `make dist`.
    """
    python_conf = (
        [
            "--archives",
            f"{venv_archive}#environment",
            "--conf",
            "spark.pyspark.python=./environment/bin/python",
        ]
        if venv_archive
        else ["--conf", f"spark.pyspark.python={python}"]
    )
    return [
        os.path.join(spark_home(), "bin", "spark-submit"),
        "--master",
        master_url,
        "--driver-memory",
        "2g",
        "--executor-memory",
        executor_memory,
        "--conf",
        "spark.executor.cores=1",
        *python_conf,
        "--conf",
        f"spark.pyspark.driver.python={python}",
        "--conf",
        "spark.executorEnv.HF_HUB_OFFLINE=1",
        "--conf",
        "spark.executorEnv.TRANSFORMERS_OFFLINE=1",
        str(PROJECT / "jobs" / "nightly.py"),
        "--ds",
        ds,
        "--env",
        "local",
        "--conf-dir",
        str(conf_dir),
        "--conf",
        'spark.master=""',
        "--conf",
        f"root={root}",
        *(arg for item in overrides for arg in ("--conf", item)),
    ]


@dataclass
class DemoResult:
    returncode: int
    stdout: str
    seconds: float
    master_url: str
    root: Path


def run_demo(
    ds: str,
    *,
    folder: Path,
    spec: ClusterSpec | None = None,
    conf_dir: Path = PROJECT / "conf",
    overrides: Sequence[str] = DEMO_OVERRIDES,
    venv_archive: str | None = None,
    python: str = sys.executable,
    echo: Callable[[str], object] | None = None,
) -> DemoResult:
    """Fresh demo data under `folder`, a loopback cluster, the nightly on it via spark-submit.

    The nightly's output (log lines, progress, the summary) goes to `echo` line by line as it
    comes and is returned whole. The cluster is stopped whatever happens.
    """
    from llmrec_spark.config import load_config
    from llmrec_spark.io.demo import generate_demo

    spec = spec or ClusterSpec()
    root = folder / "project"
    if root.exists():
        shutil.rmtree(root)  # our own folder: a fresh project each demo
    root.mkdir(parents=True)
    cfg = load_config(conf_dir, env="local", overrides=[f"root={root}", *overrides])
    summary = generate_demo(cfg.demo, cfg.path(cfg.storage.landing), ds)
    log.info("demo data in %s: %s", cfg.path(cfg.storage.landing), _short(summary))
    started = time.perf_counter()
    with StandaloneCluster(spec, folder / "cluster") as cluster:
        command = nightly_command(
            cluster.master_url,
            ds,
            root=root,
            conf_dir=conf_dir,
            overrides=overrides,
            python=python,
            venv_archive=venv_archive,
        )
        log.info("submitting: %s", " ".join(command))
        env = {**os.environ, "SPARK_LOCAL_IP": spec.host, "HF_HUB_OFFLINE": "1"}
        env["TRANSFORMERS_OFFLINE"] = "1"
        returncode, output = _run_streaming(command, env, echo)
    seconds = time.perf_counter() - started
    log.info("nightly on %s exited %d after %.0fs", cluster.master_url, returncode, seconds)
    return DemoResult(returncode, output, seconds, cluster.master_url, root)


def _run_streaming(
    command: Sequence[str], env: dict[str, str], echo: Callable[[str], object] | None
) -> tuple[int, str]:
    """Run `command`, passing each output line to `echo` as it comes; (exit code, all output).

    spark-submit merges the Python driver's stderr into its stdout, so one stream holds the
    log lines, Spark's progress and the nightly's summary.
    """
    lines = []
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if echo is not None:
                echo(line)
    return proc.returncode, "".join(lines)


def _short(summary: object) -> str:
    text = json.dumps(summary, default=str)
    return text if len(text) <= 300 else text[:297] + "..."


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so `finally`/`__exit__` stop the cluster."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llmrec_spark.runtime.cluster", description=__doc__
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="tiny demo data, a loopback cluster, the nightly on it")
    demo.add_argument("--ds", default=time.strftime("%Y-%m-%d", time.gmtime()))
    demo.add_argument("--folder", default=str(PROJECT / "build" / "cluster-demo"))
    demo.add_argument("--workers", type=int, default=2)
    demo.add_argument("--worker-cores", type=int, default=1)
    demo.add_argument("--worker-memory", default="2g")
    demo.add_argument("--master-port", type=int, default=7077)
    demo.add_argument("--webui-port", type=int, default=8080)
    demo.add_argument(
        "--venv-archive", default=None, help="ship this packed virtualenv (make dist) to executors"
    )
    demo.add_argument(
        "--conf", action="append", default=[], metavar="KEY=VALUE", help="more config overrides"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    spec = ClusterSpec(
        workers=args.workers,
        worker_cores=args.worker_cores,
        worker_memory=args.worker_memory,
        master_port=args.master_port,
        webui_port=args.webui_port,
    )
    try:
        with _sigterm_as_interrupt():
            result = run_demo(
                args.ds,
                folder=Path(args.folder).resolve(),
                spec=spec,
                overrides=[*DEMO_OVERRIDES, *args.conf],
                venv_archive=args.venv_archive,
                echo=sys.stdout.write,
            )
    except KeyboardInterrupt:
        sys.stderr.write("cluster demo interrupted; cluster stopped\n")
        return 130
    except RuntimeError as exc:
        sys.stderr.write(f"cluster demo: {exc}\n")
        return 1
    sys.stdout.write(
        f"\ncluster demo: nightly {args.ds} on {result.master_url} ({spec.workers} workers) exited "
        f"{result.returncode} in {result.seconds:.0f}s; project in {result.root}\n"
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
