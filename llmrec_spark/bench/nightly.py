"""`llmrec bench nightly`: whole nightlies at a chosen data scale, first night and the next.

Per scale (LLMREC_BENCH_NIGHTLY_SCALES, default "1,10": multiples of the `demo` config's
users, items, events per day, bots and new items), the demo writes `demo.days` + 1 landing
days into a fresh root under `<out-dir>/nightly-work/`. The first night (`llmrec nightly`
for the second-to-last day) cleans `demo.days` days and runs every stage; the second night
(the last day) finds one new landing day. Each night is its own `llmrec nightly` process, as
a scheduler starts it (a fresh JVM), with the bench's config folder, environment and
`--conf` overrides. Per-stage seconds come from the run's `pipeline_runs` table (read with
delta-rs); peak memory is sampled every 0.2 s over the night's process tree.

With LLMREC_BENCH_NIGHTLY_CLUSTER_SCALES (e.g. "10"; default none) those scales' two nights
run again, on fresh copies of the same landing data, as `spark-submit` of `jobs/nightly.py`
to a loopback standalone cluster (`runtime.cluster`: a master and 2 workers of 1 core, as
`make cluster-demo` starts); their figures go under `cluster`, next to local mode's. Their
peak memory covers spark-submit's process tree (the driver); the executors are the workers'.

The ratios of issue 30: `evaluate_vs_training` (the largest scale's first night: evaluate
over the training stages, TRAINING_STAGES), `second_vs_first_night` (there, whole nights) and
`x10_vs_x1_first_night` (largest over smallest scale's first night, whatever the scales are).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from llmrec_spark.config import Config, DemoConfig
from llmrec_spark.errors import InputError
from llmrec_spark.pipeline.runner import NIGHTLY_AFTER_CLEAN

log = logging.getLogger(__name__)

FIRST_NIGHT, SECOND_NIGHT = "2026-11-14", "2026-11-15"
# The loopback cluster's workers (2 x 1 core) and executors at the larger scales.
CLUSTER_WORKER_MEMORY, CLUSTER_EXECUTOR_MEMORY = "4g", "3g"
# The bars of issue 30 (at the largest scale; the last between the largest and smallest).
TARGETS = {
    "evaluate_vs_training": 0.5,
    "second_vs_first_night": 0.4,
    "x10_vs_x1_first_night": 3.0,
}


# The stages whose time is training (train-vae: a skip unless vae.enabled).
TRAINING_STAGES = ("train-als", "train-vae", "train-contrastive")


def run(cfg: Config, options: dict[str, Any]) -> dict[str, Any]:
    """The benchmark at the scales of LLMREC_BENCH_NIGHTLY_SCALES; `options` carries the
    command line's conf_dir, env and conf overrides for the nightly processes."""
    scales = parse_scales(os.environ.get("LLMREC_BENCH_NIGHTLY_SCALES", "1,10"))
    work = Path(options.get("out_dir") or "bench-results").resolve() / "nightly-work"
    on_cluster = parse_scales(os.environ.get("LLMREC_BENCH_NIGHTLY_CLUSTER_SCALES", ""), empty=True)
    results = {}
    for scale in scales:
        results[scale_label(scale)] = bench_scale(cfg, scale, work / scale_label(scale), options)
    cluster = {}
    for scale in on_cluster:
        label = scale_label(scale)
        cluster[label] = bench_scale_on_cluster(cfg, scale, work / f"{label}-cluster", options)
    return {**summarize(results, scales), **cluster_summary(cluster, results)}


def parse_scales(text: str, *, empty: bool = False) -> list[float]:
    """ "1,10" -> [1.0, 10.0]; InputError for anything but positive numbers (and for none,
    unless `empty`)."""
    if empty and not text.strip():
        return []
    try:
        scales = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InputError(
            f"LLMREC_BENCH_NIGHTLY_SCALES={text!r}: expected numbers separated by commas, e.g. 1,10"
        ) from None
    if not scales or any(s <= 0 for s in scales):
        raise InputError(f"LLMREC_BENCH_NIGHTLY_SCALES={text!r}: scales must be positive")
    return scales


def scale_label(scale: float) -> str:
    return f"x{scale:g}"


def scaled_demo(demo: DemoConfig, scale: float) -> DemoConfig:
    """The demo config `scale` times larger (users, items, events, bots, new items), with one
    more day than configured: the second night's."""

    def times(n: int) -> int:
        return max(1, round(n * scale))

    return dataclasses.replace(
        demo,
        n_users=times(demo.n_users),
        n_items=times(demo.n_items),
        events_per_day=times(demo.events_per_day),
        n_bots=times(demo.n_bots),
        new_items=times(demo.new_items),
        days=demo.days + 1,
    )


def bench_scale(cfg: Config, scale: float, root: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Demo data at `scale` in a fresh `root`, then the two nights; their figures."""
    from llmrec_spark.io.demo import generate_demo

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    demo = scaled_demo(cfg.demo, scale)
    started = time.perf_counter()
    written = generate_demo(demo, str(root / "landing"), SECOND_NIGHT)
    generated = time.perf_counter() - started
    nights = {}
    for name, ds in (("first_night", FIRST_NIGHT), ("second_night", SECOND_NIGHT)):
        seconds, memory = run_night(root, ds, options)
        stages = stage_seconds(root / "lakehouse", ds, first=name == "first_night")
        nights[name] = {"ds": ds, "seconds": round(seconds, 1), **stages, "peak_memory_mb": memory}
        log.info("bench nightly %s %s: %.0fs %s", scale_label(scale), name, seconds, stages)
    return {
        "scale": scale,
        "users": demo.n_users,
        "items": written["items"],
        "event_lines": written["events"],
        "landing_days": demo.days,
        "generate_seconds": round(generated, 1),
        **nights,
    }


def run_night(root: Path, ds: str, options: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """`llmrec nightly --ds ds` with root `root` as its own process: (seconds, peak memory).

    Raises InputError with the process's last lines when it fails."""
    command = [str(Path(sys.executable).parent / "llmrec"), "nightly", "--ds", ds]
    command += ["--conf-dir", str(Path(options.get("conf_dir") or "conf").resolve())]
    if options.get("env"):
        command += ["--env", options["env"]]
    for override in [*(options.get("conf") or []), *own_storage(root)]:
        command += ["--conf", override]
    return timed_night(command, root / f"nightly-{ds}.log", ds)


def timed_night(
    command: list[str], log_path: Path, ds: str, env: dict[str, str] | None = None
) -> tuple[float, dict[str, float]]:
    """Run one night's `command`, its output to `log_path`: (seconds, peak memory)."""
    started = time.perf_counter()
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        memory = PeakMemory(process.pid)
        memory.start()
        code = process.wait()
        memory.stop()
    seconds = time.perf_counter() - started
    if code != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-15:]
        raise InputError(
            f"bench nightly: the night of {ds} failed ({code}); {log_path} ends:\n"
            + "\n".join(tail)
        )
    return seconds, memory.peaks()


def bench_scale_on_cluster(
    cfg: Config, scale: float, root: Path, options: dict[str, Any]
) -> dict[str, Any]:
    """The two nights of `bench_scale` at `scale` on a loopback standalone cluster (started
    for them, stopped after), each a `spark-submit` of jobs/nightly.py; their figures."""
    from llmrec_spark.io.demo import generate_demo
    from llmrec_spark.runtime.cluster import ClusterSpec, StandaloneCluster, nightly_command

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    generate_demo(scaled_demo(cfg.demo, scale), str(root / "landing"), SECOND_NIGHT)
    spec = ClusterSpec(worker_memory=CLUSTER_WORKER_MEMORY, master_port=0, webui_port=0)
    conf_dir = Path(options.get("conf_dir") or "conf").resolve()
    env = {**os.environ, "SPARK_LOCAL_IP": spec.host, "HF_HUB_OFFLINE": "1"}
    env["TRANSFORMERS_OFFLINE"] = "1"
    nights = {}
    with StandaloneCluster(spec, root / "cluster") as cluster:
        for name, ds in (("first_night", FIRST_NIGHT), ("second_night", SECOND_NIGHT)):
            command = nightly_command(
                cluster.master_url,
                ds,
                root=root,
                conf_dir=conf_dir,
                overrides=[*cluster_overrides(options.get("conf") or []), *own_storage(root)],
                python=sys.executable,
                executor_memory=CLUSTER_EXECUTOR_MEMORY,
            )
            seconds, memory = timed_night(command, root / f"nightly-{ds}.log", ds, env)
            stages = stage_seconds(root / "lakehouse", ds, first=name == "first_night")
            nights[name] = {
                "ds": ds,
                "seconds": round(seconds, 1),
                **stages,
                "peak_memory_mb_driver": memory,
            }
            log.info("bench nightly %s on the cluster %s: %.0fs", scale_label(scale), name, seconds)
    return {
        "master": "standalone, 2 workers x 1 core on 127.0.0.1",
        "executor_memory": CLUSTER_EXECUTOR_MEMORY,
        **nights,
    }


def cluster_overrides(conf: list[str]) -> list[str]:
    """The bench's --conf overrides for a night on the cluster: without spark.master, which
    spark-submit's --master sets there (a local master would silently run it in-process)."""
    return [item for item in conf if not item.replace(" ", "").startswith("spark.master=")]


def cluster_summary(
    cluster: dict[str, dict[str, Any]], local: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """The cluster's figures and, per scale, its nights over local mode's ({} without any)."""
    if not cluster:
        return {}
    return {
        "cluster": cluster,
        "cluster_vs_local": {
            label: {
                night: round(runs[night]["seconds"] / local[label][night]["seconds"], 3)
                for night in ("first_night", "second_night")
            }
            for label, runs in cluster.items()
            if label in local
        },
    }


def own_storage(root: Path) -> list[str]:
    """Overrides that keep every path of a benchmark night under `root`, whatever the bench's
    own config says (it must never write into a real lakehouse or tracking store)."""
    return [
        f"root={root}",
        f"storage.lakehouse={root}/lakehouse",
        f"storage.landing={root}/landing",
        f"storage.checkpoint_dir={root}/lakehouse/_checkpoints",
        f"storage.models_dir={root}/lakehouse/_models",
        f"storage.reports_dir={root}/reports",
        f"mlflow.tracking_uri=sqlite:///{root}/mlflow.db",
        f"mlflow.artifact_location={root}/mlruns",
    ]


class PeakMemory:
    """Samples the resident memory of a process tree: the driver's Python, the JVMs (local
    mode: the driver JVM is the executor too) and every other Python process in it (pandas
    UDF workers, training processes); peaks of each and of their sum."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every = pid, every
        self.peak = {"driver_python": 0.0, "jvm": 0.0, "python_workers": 0.0, "total": 0.0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peaks(self) -> dict[str, float]:
        return {key: round(value / 2**20, 1) for key, value in self.peak.items()}

    def _sample_until_stopped(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every)

    def _sample(self) -> None:
        parts = {"driver_python": 0, "jvm": 0, "python_workers": 0}
        try:
            root = psutil.Process(self.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        driver = _driver_python(tree)
        for process in tree:
            try:
                if process.name() == "java":
                    kind = "jvm"
                else:
                    kind = "driver_python" if process.pid == driver else "python_workers"
                parts[kind] += process.memory_info().rss
            except psutil.Error:
                continue
        for key, value in parts.items():
            self.peak[key] = max(self.peak[key], float(value))
        self.peak["total"] = max(self.peak["total"], float(sum(parts.values())))


def _driver_python(tree: list[psutil.Process]) -> int | None:
    """The pid of the night's driver process: the root in local mode (the `llmrec` process),
    the first Python process under spark-submit's JVM on a cluster."""
    for process in tree:
        try:
            name = process.name()
        except psutil.Error:
            continue
        if (process is tree[0] and name != "java") or name.startswith("python"):
            return int(process.pid)
    return None


def stage_seconds(lakehouse: Path, ds: str, *, first: bool) -> dict[str, Any]:
    """The night's per-stage seconds from `pipeline_runs` (clean summed over its dates) and
    the clean stage's input lines per second."""
    import pandas as pd
    import pyarrow.parquet as pq
    from deltalake import DeltaTable

    # The table's live files, read file by file: its partition column (ds) lives in the
    # paths, and Hive-style partition discovery across files of mixed dates is not needed.
    frames = []
    for uri in DeltaTable(str(lakehouse / "pipeline_runs")).file_uris():
        frame = pq.read_table(uri.removeprefix("file://")).to_pandas()
        frame["ds"] = next(p[3:] for p in Path(uri).parts if p.startswith("ds="))
        frames.append(frame)
    runs = pd.concat(frames, ignore_index=True)
    runs = runs[(runs["status"] == "ok") & ((runs["ds"] <= ds) if first else (runs["ds"] == ds))]
    order = {stage: k for k, stage in enumerate(["clean", *NIGHTLY_AFTER_CLEAN])}
    seconds = runs.groupby("stage")["seconds"].sum()
    seconds = seconds.sort_index(key=lambda names: names.map(lambda n: order.get(n, len(order))))
    clean = runs[runs["stage"] == "clean"]
    lines = int(clean["rows_in"].sum())
    return {
        "stages": {stage: round(float(s), 1) for stage, s in seconds.items()},
        "clean_dates": len(clean),
        "clean_lines": lines,
        "clean_lines_per_second": round(lines / max(float(clean["seconds"].sum()), 1e-9)),
    }


def summarize(results: dict[str, dict[str, Any]], scales: list[float]) -> dict[str, Any]:
    """Every scale's figures and the three ratios with their targets."""
    largest = results[scale_label(max(scales))]
    smallest = results[scale_label(min(scales))]
    first = largest["first_night"]
    training = sum(first["stages"].get(stage, 0.0) for stage in TRAINING_STAGES)
    ratios = {
        "evaluate_vs_training": round(first["stages"].get("evaluate", 0.0) / training, 3)
        if training
        else None,
        "second_vs_first_night": round(largest["second_night"]["seconds"] / first["seconds"], 3),
        "x10_vs_x1_first_night": round(first["seconds"] / smallest["first_night"]["seconds"], 3)
        if len(scales) > 1
        else None,
    }
    for name, target in TARGETS.items():
        value = ratios[name]
        ratios[f"{name}_met"] = None if value is None else value <= target
    return {
        "scales": results,
        **ratios,
        "targets": TARGETS,
        "ratios_from": (
            f"evaluate_vs_training and second_vs_first_night at {scale_label(max(scales))}; "
            f"x10_vs_x1_first_night is {scale_label(max(scales))} over {scale_label(min(scales))}"
        ),
        "events_per_second_first_night": {
            label: round(r["first_night"]["clean_lines"] / r["first_night"]["seconds"])
            for label, r in results.items()
        },
    }
