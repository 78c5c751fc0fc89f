"""Human-readable summaries of stage and nightly runs (what the CLI prints)."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from llmrec_spark.pipeline.runner import NightlySummary, StageRecord

COUNT_FIELDS = ("rows_in", "rows_out", "rows_duplicate", "rows_quarantined", "rows_excluded")
HEADLINE_METRICS = ("ndcg@10", "recall@20", "precision@10", "map@10", "hit_rate@10")


def format_stage(record: StageRecord) -> str:
    """One stage's counts, metrics and summary as a few lines."""
    lines = [f"{record.stage} {record.ds}: ok in {record.seconds:.1f}s"]
    counts = _counts(record)
    if counts:
        lines.append("  " + "  ".join(f"{k}={v:,}" for k, v in counts.items()))
    for key, value in record.result.summary.items():
        if key != "samples":
            lines.append(f"  {key}: {_fmt(value)}")
    return "\n".join(lines)


def format_nightly(summary: NightlySummary) -> str:
    """The nightly's report: stage table, evaluation, sample top-N, where things are."""
    out = [
        f"nightly {summary.ds}: done",
        "",
        "stage               ds          seconds  "
        + "  ".join(f"{f[5:]:>10}" for f in COUNT_FIELDS),
    ]
    for record in summary.records:
        counts = [getattr(record.result, f) for f in COUNT_FIELDS]
        out.append(
            f"{record.stage:<19} {record.ds}  {record.seconds:7.1f}  "
            + "  ".join(f"{'' if c is None else f'{c:,}':>10}" for c in counts)
        )
    evaluation = next((r for r in summary.records if r.stage == "evaluate"), None)
    if evaluation is not None:
        out += ["", "evaluation (held-out events, full ranking, seen items excluded):"]
        out += _metric_table(evaluation.result.metrics)
        out += _cold_table(evaluation.result.metrics)
        for name, path in evaluation.result.artifacts.items():
            out.append(f"  {name}: {path}")
    recommend = next((r for r in summary.records if r.stage == "recommend"), None)
    if recommend is not None:
        for key, value in recommend.result.summary.items():
            if key != "samples":
                out.append(f"recommend {key}: {_fmt(value)}")
        samples = recommend.result.summary.get("samples") or []
        for sample in samples[:3]:
            out += [
                "",
                f"top-{len(sample.get('items', []))} for user {sample.get('user_id')}"
                f" (history: {_fmt(sample.get('history', ''))})",
            ]
            for item in sample.get("items", []):
                out.append(
                    f"  {item.get('rank'):>2}. {item.get('item_id')}  {str(item.get('title', ''))[:60]:<60}"
                    f"  {item.get('category', '')!s:<14} {item.get('score', 0):.3f} {item.get('source', '')}"
                )
    out += ["", "tables:"]
    out += [f"  {name:<23} {path}" for name, path in summary.tables.items()]
    if summary.mlflow_run_id is not None:
        out += ["", f"mlflow: run {summary.mlflow_run_id} in {summary.tracking_uri}"]
        out.append(f"        browse with: {mlflow_ui_command(summary.tracking_uri)}")
    return "\n".join(out)


def mlflow_ui_command(tracking_uri: str, cwd: str | None = None) -> str:
    """How to browse `tracking_uri`'s runs: a command runnable as printed from `cwd` (default:
    the current folder) with this interpreter's `mlflow`, which is not on PATH when the package
    lives in a virtualenv; a tracking server's own address; or Databricks' Experiments page."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri
    if tracking_uri.startswith("databricks"):
        return "the workspace's Experiments page"
    mlflow = Path(sys.executable).parent / "mlflow"  # the venv's bin/: its python unresolved
    here = os.path.abspath(cwd or os.getcwd())
    if not mlflow.exists():
        command = f"{shlex.quote(sys.executable)} -m mlflow"
    elif mlflow.is_relative_to(here):
        relative = os.path.relpath(mlflow, here)
        command = shlex.quote(relative if os.sep in relative else os.path.join(".", relative))
    else:
        command = shlex.quote(str(mlflow))
    return f"{command} ui --backend-store-uri {shlex.quote(tracking_uri)}"


def _metric_table(metrics: dict[str, float]) -> list[str]:
    models: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        model, _, metric = key.partition(".")
        if metric in HEADLINE_METRICS:
            models.setdefault(model, {})[metric] = value
    if not models:
        return [f"  {k}: {_fmt(v)}" for k, v in sorted(metrics.items())]
    header = "  " + f"{'model':<20}" + "".join(f"{m:>14}" for m in HEADLINE_METRICS)
    rows = [header]
    for model, values in models.items():
        rows.append(
            "  "
            + f"{model:<20}"
            + "".join(
                f"{values[m]:>14.4f}" if m in values else f"{'':>14}" for m in HEADLINE_METRICS
            )
        )
    return rows


COLD_METRICS = (
    ("cold_only", "recall@20"),
    ("cold_only", "ndcg@20"),
    ("mixed", "ndcg@10"),
    ("mixed", "cold_recall@20"),
)


def _cold_table(metrics: dict[str, float]) -> list[str]:
    """cold_item protocol lines (cold-only ranking and the mixed view), when it ran."""
    models: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split(".", 3)
        if len(parts) == 4 and parts[0] == "cold_item" and (parts[1], parts[3]) in COLD_METRICS:
            models.setdefault(parts[2], {})[f"{parts[1]} {parts[3]}"] = value
    if not models:
        return []
    names = [f"{view} {metric}" for view, metric in COLD_METRICS]
    rows = ["", "cold items (cold_item protocol: cold-only ranking, and mixed with known items):"]
    rows.append("  " + f"{'model':<20}" + "".join(f"{n:>26}" for n in names))
    for model, values in models.items():
        rows.append(
            "  "
            + f"{model:<20}"
            + "".join(f"{values[n]:>26.4f}" if n in values else f"{'':>26}" for n in names)
        )
    return rows


def _counts(record: StageRecord) -> dict[str, int]:
    return {
        f[5:]: getattr(record.result, f)
        for f in COUNT_FIELDS
        if getattr(record.result, f) is not None
    }


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    if isinstance(value, list):
        return ", ".join(_fmt(v) for v in value[:10]) + (" ..." if len(value) > 10 else "")
    return str(value)
