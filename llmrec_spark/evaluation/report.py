"""Self-contained HTML report of the offline evaluation: tables, inline SVG charts, claims.

The report is one file with inline CSS and hand-drawn SVG (no JavaScript, nothing fetched),
built from `ProtocolResult`s: per protocol and view, each model's per-user metrics (for
means and bootstrap intervals) and scalars (AUC, coverage, novelty, ARP). `Claim`s name the
differences the report states; each gets a paired bootstrap interval over the view's users.
"""

from __future__ import annotations

import html
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmrec_spark.core.metrics import METRIC_FUNCTIONS, bootstrap_interval, paired_bootstrap

log = logging.getLogger(__name__)

MODEL_ORDER = (
    "popularity",
    "als",
    "als_recent",
    "text_frozen",
    "text_frozen_kernel",
    "text_finetuned",
    "hybrid_frozen",
    "hybrid",
)
# Okabe-Ito (colour-blind safe); a frozen variant shares its family's hue family and is dashed.
MODEL_COLORS = {
    "popularity": "#7f7f7f",
    "als": "#0072b2",
    "als_recent": "#56b4e9",
    "text_frozen": "#e69f00",
    "text_frozen_kernel": "#f0c04a",
    "text_finetuned": "#d55e00",
    "hybrid_frozen": "#cc79a7",
    "hybrid": "#009e73",
}
OTHER_COLORS = ("#000000", "#8c6d31", "#6b6ecf", "#b5cf6b")
SERIES_COLORS = ("#3b5b92", "#e3a33b", "#6a9f6e", "#b56576", "#5fa8d3", "#8e7dbe", "#c9a227")
LIST_METRICS = tuple(METRIC_FUNCTIONS)  # precision, recall, f1, ndcg, map, hit_rate
METRIC_LABELS = {
    "precision": "Precision",
    "recall": "Recall",
    "f1": "F1",
    "ndcg": "NDCG",
    "map": "MAP",
    "hit_rate": "Hit rate",
}
SCALAR_ORDER = ("auc", "coverage", "novelty", "arp", "pop_percentile")
# Columns where a lower value is the better one; every other column is higher-is-better.
LOWER_IS_BETTER = ("arp", "pop_percentile")
# Per-user metrics defined for some of a view's users only (NaN for the others): the mixed
# view's share of a user's cold positives in the top K, for users with cold positives.
# Means and intervals are over the users it is defined for; tabled beside the scalars.
PARTIAL_METRICS = ("cold_recall",)
# The cold-vs-warm chart: (protocol, view, metric, label), each drawn when present.
COLD_WARM_SERIES = (
    ("user_temporal", "warm", "ndcg@10", "warm users: NDCG@10 (user_temporal)"),
    ("cold_item", "cold_only", "recall@20", "cold items only: Recall@20 (cold_item)"),
)
POPULARITY_SCALARS = (  # (scalar family, chart title, caption)
    (
        "arp",
        "Popularity bias: ARP",
        "Average recommendation popularity: mean number of training users per recommended "
        "item. Lower means less popularity bias.",
    ),
    (
        "novelty",
        "Novelty",
        "Mean self-information -log2(share of training users) of recommended items, in bits. "
        "Higher means less popular items are recommended.",
    ),
)


@dataclass
class ModelResult:
    """One model on one view.

    per_user: "ndcg@10" -> one value per test user of the view, in the same user order for
    every model of the view (claims pair them); NaN only in a `PARTIAL_METRICS` metric, for
    the users it is not defined for. scalars: one number per model and view,
    e.g. "auc", "coverage@20", "novelty@20", "arp@20" (shown without an interval).
    """

    per_user: dict[str, np.ndarray]
    scalars: dict[str, float] = field(default_factory=dict)


@dataclass
class ViewResult:
    name: str  # "warm", "cold_only", "mixed"
    description: str  # one sentence: candidates, relevant set
    users: int
    models: dict[str, ModelResult]  # model name -> result (any subset of MODEL_ORDER)


@dataclass
class ProtocolResult:
    name: str  # "user_temporal", "cold_item", "global_temporal"
    description: str
    views: list[ViewResult]


@dataclass
class Claim:
    """A difference the report states (model - baseline on one metric of one view)."""

    protocol: str
    view: str
    metric: str
    model: str
    baseline: str


@dataclass
class Draw:
    """The cold_item protocol on one seeded pick of cold items: cold-only means per model."""

    seed: int
    users: int  # test users with a positive on a cold item
    cold_items: int
    recall: dict[str, float]  # model -> mean cold-only Recall@20
    primary: bool = False  # the draw the rest of the report is about


Stat = tuple[float, float, float]  # mean, interval low, interval high (NaN when absent)
NAN_STAT: Stat = (math.nan, math.nan, math.nan)


# ---------------------------------------------------------------------------------------
# Public entry points


def write_report(
    folder: str,
    *,
    title: str,
    ds: str,
    protocols: list[ProtocolResult],
    claims: list[Claim],
    bootstrap_samples: int,
    seed: int,
    notes: Sequence[str] = (),
    draws: Sequence[Draw] = (),
) -> str:
    """Write `<folder>/evaluation-<ds>.html` and return its path."""
    stats = _Stats(bootstrap_samples=bootstrap_samples, seed=seed)
    body = [
        _header(title, ds, protocols, bootstrap_samples, seed, notes),
        _overview(protocols, stats),
        _claims_section(protocols, claims, bootstrap_samples, seed),
        _draws_section(draws),
        *(_protocol_section(p, stats) for p in protocols),
    ]
    page = (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)} ({_e(ds)})</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"evaluation-{ds}.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    log.info("evaluation report: %s", path)
    return path


def report_summary(protocols: Sequence[ProtocolResult]) -> dict[str, Any]:
    """{protocol: {view: {model: {metric: mean}}}} over per-user metrics and scalars.

    Means of empty or non-finite values are None, so the result serialises as strict JSON.
    """
    out: dict[str, Any] = {}
    for protocol in protocols:
        views = out.setdefault(protocol.name, {})
        for view in protocol.views:
            models = views.setdefault(view.name, {})
            for model in _ordered(view.models):
                result = view.models[model]
                means = {
                    key: _finite_or_none(_mean(_defined(key, v)))
                    for key, v in result.per_user.items()
                }
                means |= {key: _finite_or_none(v) for key, v in result.scalars.items()}
                models[model] = means
    return out


def screenshot(html_path: str, png_path: str, *, width: int = 1400, height: int = 3000) -> bool:
    """Render `html_path` to `png_path` with headless Chromium; False when none is on PATH.

    Only the first `height` pixels are captured (headless Chromium has no full-page flag).
    """
    browser = next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        return False
    if os.path.exists(png_path):
        os.remove(png_path)
    with tempfile.TemporaryDirectory(prefix="llmrec-chromium-") as profile:
        command = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--screenshot={os.path.abspath(png_path)}",
            f"--window-size={width},{height}",
            "file://" + os.path.abspath(html_path),
        ]
        try:
            # Chromium may exit non-zero over missing D-Bus while the PNG is fine: judge the file.
            subprocess.run(command, capture_output=True, timeout=120, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log.warning("screenshot of %s failed: %s", html_path, exc)
    return os.path.exists(png_path) and os.path.getsize(png_path) > 0


# ---------------------------------------------------------------------------------------
# Statistics


class _Stats:
    """Means and bootstrap intervals, computed once per (model result, key)."""

    def __init__(self, *, bootstrap_samples: int, seed: int) -> None:
        self.samples = bootstrap_samples
        self.seed = seed
        self._cache: dict[tuple[int, str], Stat] = {}

    def get(self, result: ModelResult | None, key: str) -> Stat:
        if result is None:
            return NAN_STAT
        if key in result.per_user:
            cache_key = (id(result.per_user[key]), key)
            if cache_key not in self._cache:
                values = _defined(key, result.per_user[key])
                low, high = bootstrap_interval(values, samples=self.samples, seed=self.seed)
                self._cache[cache_key] = (_mean(values), low, high)
            return self._cache[cache_key]
        if key in result.scalars:
            return (float(result.scalars[key]), math.nan, math.nan)
        return NAN_STAT


def _mean(values: Iterable[float] | np.ndarray) -> float:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()) if array.size else math.nan


def _partial(key: str) -> bool:
    return _split_key(key)[0] in PARTIAL_METRICS


def _defined(key: str, values: Iterable[float] | np.ndarray) -> np.ndarray:
    """A per-user array without the users `key` is not defined for (NaN in a partial metric)."""
    array = np.asarray(values, dtype=np.float64)
    return array[~np.isnan(array)] if _partial(key) else array


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _split_key(key: str) -> tuple[str, int | None]:
    """ "ndcg@10" -> ("ndcg", 10); "auc" -> ("auc", None)."""
    match = re.fullmatch(r"(.+)@(\d+)", key)
    return (match.group(1), int(match.group(2))) if match else (key, None)


def _scalar_order(key: str) -> tuple[int, str, int]:
    """AUC, coverage, novelty, ARP, popularity percentile, then the rest alphabetically."""
    name, k = _split_key(key)
    rank = SCALAR_ORDER.index(name) if name in SCALAR_ORDER else len(SCALAR_ORDER)
    return (rank, name, k or 0)


def _lower_is_better(key: str) -> bool:
    return _split_key(key)[0] in LOWER_IS_BETTER


def _best(values: Mapping[str, float], lower_is_better: bool) -> set[str]:
    """Models holding the best finite value (ties all win); none with fewer than two values."""
    finite = {m: v for m, v in values.items() if math.isfinite(v)}
    if len(finite) < 2:
        return set()
    target = min(finite.values()) if lower_is_better else max(finite.values())
    return {m for m, v in finite.items() if abs(v - target) <= 1e-12}


# ---------------------------------------------------------------------------------------
# Sections


def _header(
    title: str,
    ds: str,
    protocols: Sequence[ProtocolResult],
    bootstrap_samples: int,
    seed: int,
    notes: Sequence[str],
) -> str:
    rows = []
    for protocol in protocols:
        views: list[ViewResult | None] = list(protocol.views) or [None]
        for i, view in enumerate(views):
            first = (
                f"<td rowspan='{len(views)}'><a href='#{_id(protocol.name)}'>{_e(protocol.name)}</a>"
                f"<div class='muted'>{_e(protocol.description)}</div></td>"
                if i == 0
                else ""
            )
            if view is None:
                rows.append(f"<tr>{first}<td colspan='4' class='muted'>no views</td></tr>")
                continue
            models = ", ".join(_ordered(view.models)) or "none"
            rows.append(
                f"<tr>{first}<td><a href='#{_id(protocol.name, view.name)}'>{_e(view.name)}</a></td>"
                f"<td class='num'>{view.users:,}</td><td>{_e(view.description)}</td>"
                f"<td>{_e(models)}</td></tr>"
            )
    notes_html = (
        "<h3>Notes</h3><ul class='notes'>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"
        if notes
        else ""
    )
    return (
        f"<header><h1>{_e(title)}</h1>"
        f"<p class='lead'>Run date <b>{_e(ds)}</b>. Cells show the mean over test users and a "
        f"95% percentile bootstrap interval ({bootstrap_samples:,} resamples of users, seed "
        f"{seed}); claims use a paired bootstrap (users resampled jointly, same seed). "
        "Best value per column is highlighted (lowest for ARP and popularity percentile, "
        "highest elsewhere).</p>"
        "<table class='setup'><thead><tr><th>protocol</th><th>view</th><th>test users</th>"
        "<th>candidates and relevant set</th><th>models</th></tr></thead><tbody>"
        + ("".join(rows) or "<tr><td colspan='5' class='muted'>no protocols</td></tr>")
        + f"</tbody></table>{notes_html}</header>"
    )


def _overview(protocols: Sequence[ProtocolResult], stats: _Stats) -> str:
    charts = [_cold_warm_chart(protocols, stats), *_popularity_charts(protocols, stats)]
    drawn = [c for c in charts if c]
    if not drawn:
        return (
            "<section id='overview'><h2>Overview</h2><p class='muted'>No cold/warm or "
            "popularity-bias results to chart.</p></section>"
        )
    return (
        "<section id='overview'><h2>Overview</h2><div class='charts'>"
        + "".join(drawn)
        + "</div></section>"
    )


def _cold_warm_chart(protocols: Sequence[ProtocolResult], stats: _Stats) -> str:
    series = []
    for protocol_name, view_name, metric, label in COLD_WARM_SERIES:
        view = _find_view(protocols, protocol_name, view_name)
        if view is None or view.users == 0:
            continue
        values = {m: stats.get(r, metric) for m, r in view.models.items()}
        if any(math.isfinite(v[0]) for v in values.values()):
            series.append((label, values))
    if not series:
        return ""
    return _bar_chart(
        "Cold vs warm",
        series,
        y_label="mean over test users",
        chart_id="chart-cold-warm",
        with_intervals=True,
        caption="Per model: accuracy on warm users next to accuracy on items without "
        "interactions; whiskers are 95% bootstrap intervals.",
    )


def _popularity_charts(protocols: Sequence[ProtocolResult], stats: _Stats) -> list[str]:
    charts = []
    for family, title, caption in POPULARITY_SCALARS:
        series: list[tuple[str, dict[str, Stat]]] = []
        constant: list[str] = []
        for protocol in protocols:
            for view in protocol.views:
                keys = {
                    key
                    for result in view.models.values()
                    for key in [*result.scalars, *result.per_user]
                    if _split_key(key)[0] == family
                }
                if not keys or view.users == 0:
                    continue
                ks = {key: _split_key(key)[1] or 0 for key in keys}
                key = min(keys, key=lambda k: (abs(ks[k] - 20), -ks[k]))  # @20 when present
                values = {m: stats.get(r, key) for m, r in view.models.items()}
                label = f"{protocol.name} / {view.name}: {key}"
                means = {v[0] for v in values.values() if math.isfinite(v[0])}
                if len(values) > 1 and len(means) == 1:
                    # e.g. cold-only ARP: every list holds only items no training user touched
                    constant.append(f"{label} is {round(means.pop(), 4):g} for every model")
                    continue
                series.append((label, values))
        if constant:
            caption += (
                " Not drawn (the same value for every model, so nothing to compare): "
                + "; ".join(constant)
                + "."
            )
        if series:
            charts.append(
                _bar_chart(
                    title,
                    series,
                    y_label=family,
                    chart_id=f"chart-{family}",
                    with_intervals=False,
                    caption=caption,
                )
            )
    return charts


def draw_summary(draws: Sequence[Draw]) -> dict[str, dict[str, float]]:
    """Per model with a finite value in some draw: the mean, min and max over the draws."""
    out = {}
    for model in _ordered({m for d in draws for m in d.recall}):
        values = [d.recall[model] for d in draws if math.isfinite(d.recall.get(model, math.nan))]
        if values:
            out[model] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return out


def _draws_section(draws: Sequence[Draw]) -> str:
    """One row per cold-item draw, then the mean and range over the draws, per model."""
    if len(draws) < 2:
        return ""
    models = _ordered({m for d in draws for m in d.recall})
    head = "".join(f"<th>{_e(m)}</th>" for m in models)
    rows = []
    for d in draws:
        values = "".join(f"<td class='num'>{_fmt(d.recall.get(m, math.nan))}</td>" for m in models)
        label = f"{d.seed}" + (" (this report)" if d.primary else "")
        rows.append(
            f"<tr class='draw' data-seed='{d.seed}'><td>{_e(label)}</td><td class='num'>"
            f"{d.cold_items}</td><td class='num'>{d.users}</td>{values}</tr>"
        )
    spread = draw_summary(draws)
    summary = []
    for label in ("mean", "min", "max"):
        cells = "".join(
            f"<td class='num'>{_fmt(spread[m][label] if m in spread else math.nan)}</td>"
            for m in models
        )
        summary.append(f"<tr class='draw-{label}'><th>{label}</th><td></td><td></td>{cells}</tr>")
    return (
        "<section id='draws'><h2>cold_item on other draws</h2><p class='muted'>Cold-only "
        "Recall@20 (mean over users) with the same models fitted on other seeded picks of the "
        "cold items. The intervals above resample users, not which items are cold; this table "
        "shows how much the cold-only numbers depend on that pick.</p><table class='draws'>"
        f"<thead><tr><th>seed</th><th>cold items</th><th>users</th>{head}</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody><tfoot>"
        + "".join(summary)
        + "</tfoot></table></section>"
    )


def _claims_section(
    protocols: Sequence[ProtocolResult], claims: Sequence[Claim], samples: int, seed: int
) -> str:
    if not claims:
        return "<section id='claims'><h2>Claims</h2><p class='muted'>No claims.</p></section>"
    rows = []
    for claim in claims:
        cells = (
            f"<td>{_e(claim.protocol)}</td><td>{_e(claim.view)}</td><td>{_e(claim.metric)}</td>"
            f"<td>{_e(claim.model)}</td><td>{_e(claim.baseline)}</td>"
        )
        attrs = (
            f"data-protocol='{_e(claim.protocol)}' data-view='{_e(claim.view)}' "
            f"data-metric='{_e(claim.metric)}' data-model='{_e(claim.model)}' "
            f"data-baseline='{_e(claim.baseline)}'"
        )
        values, reason = _claim_values(protocols, claim)
        if values is None:
            rows.append(
                f"<tr class='claim' {attrs}>{cells}<td colspan='4' class='verdict unavailable'>"
                f"not available: {_e(reason)}</td></tr>"
            )
            continue
        a, b = values
        diff, low, high = paired_bootstrap(a, b, samples=samples, seed=seed)
        if low > 0:
            verdict, css = f"excludes 0: {claim.model} better", "excludes-zero"
        elif high < 0:
            verdict, css = f"excludes 0: {claim.baseline} better", "excludes-zero"
        else:
            verdict, css = "includes 0: no clear difference", "includes-zero"
        rows.append(
            f"<tr class='claim' {attrs}>{cells}<td class='num'>{_fmt(_mean(a))}</td>"
            f"<td class='num'>{_fmt(_mean(b))}</td>"
            f"<td class='num'>{_fmt(diff, signed=True)} "
            f"<span class='ci'>[{_fmt(low, signed=True)}, {_fmt(high, signed=True)}]</span></td>"
            f"<td class='verdict {css}'>{_e(verdict)}</td></tr>"
        )
    return (
        "<section id='claims'><h2>Claims</h2><p class='muted'>Model − baseline on the same "
        "users, with a paired 95% bootstrap interval.</p><table class='claims'><thead><tr>"
        "<th>protocol</th><th>view</th><th>metric</th><th>model</th><th>baseline</th>"
        "<th>model mean</th><th>baseline mean</th><th>difference [95% interval]</th>"
        "<th>verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>"
    )


def _claim_values(
    protocols: Sequence[ProtocolResult], claim: Claim
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    view = _find_view(protocols, claim.protocol, claim.view)
    if view is None:
        return None, f"no view {claim.protocol} / {claim.view}"
    arrays = []
    for model in (claim.model, claim.baseline):
        result = view.models.get(model)
        if result is None:
            return None, f"no model {model} in this view"
        if claim.metric not in result.per_user:
            return None, f"no per-user {claim.metric} for {model}"
        arrays.append(np.asarray(result.per_user[claim.metric], dtype=np.float64))
    if arrays[0].shape != arrays[1].shape:
        return None, f"different user counts ({len(arrays[0])} and {len(arrays[1])})"
    if _partial(claim.metric):  # paired over the users it is defined for, the same for both
        defined = ~np.isnan(arrays[0])
        if (defined != ~np.isnan(arrays[1])).any():
            return None, f"{claim.metric} is defined for different users"
        arrays = [arrays[0][defined], arrays[1][defined]]
    if arrays[0].size == 0:
        return None, "no test users"
    if not (np.isfinite(arrays[0]).all() and np.isfinite(arrays[1]).all()):
        return None, "non-finite per-user values"
    return (arrays[0], arrays[1]), ""


def _protocol_section(protocol: ProtocolResult, stats: _Stats) -> str:
    parts = [
        f"<section class='protocol' id='{_id(protocol.name)}'>"
        f"<h2>Protocol: {_e(protocol.name)}</h2><p>{_e(protocol.description)}</p>"
    ]
    if not protocol.views:
        parts.append("<p class='muted'>No views evaluated.</p>")
    for view in protocol.views:
        parts.append(_view_section(protocol, view, stats))
    parts.append("</section>")
    return "".join(parts)


def _view_section(protocol: ProtocolResult, view: ViewResult, stats: _Stats) -> str:
    head = (
        f"<div class='view' id='{_id(protocol.name, view.name)}' "
        f"data-protocol='{_e(protocol.name)}' data-view='{_e(view.name)}'>"
        f"<h3>{_e(protocol.name)} / {_e(view.name)} "
        f"<span class='muted'>{view.users:,} test users</span></h3>"
        f"<p>{_e(view.description)}</p>"
    )
    if view.users == 0:
        return head + "<p class='empty'>No test users in this view; nothing was scored.</p></div>"
    if not view.models:
        return head + "<p class='empty'>No model results for this view.</p></div>"
    for model, result in view.models.items():
        lengths = {len(v) for v in result.per_user.values()}
        if lengths and lengths != {view.users}:
            log.warning(
                "report: %s/%s %s has per-user arrays of %s values for %d users",
                protocol.name,
                view.name,
                model,
                sorted(lengths),
                view.users,
            )
    models = _ordered(view.models)
    ranked_keys = {
        key
        for r in view.models.values()
        for key in r.per_user
        if _split_key(key)[1] is not None and not _partial(key)
    }
    ks = sorted({_split_key(key)[1] or 0 for key in ranked_keys})
    names = _ordered_metrics({_split_key(key)[0] for key in ranked_keys})
    tables = [_ranked_table(protocol, view, models, ks, names, stats)] if ranked_keys else []
    other_keys = sorted(
        {key for r in view.models.values() for key in [*r.per_user, *r.scalars]} - ranked_keys,
        key=_scalar_order,
    )
    if other_keys:
        tables.append(_other_table(protocol, view, models, other_keys, stats))
    dashed = "Dashed: frozen text encoder." if any("_frozen" in m for m in models) else ""
    charts = [
        _line_chart(
            f"{METRIC_LABELS.get(metric, metric)}@K",
            ks,
            {m: [stats.get(view.models[m], f"{metric}@{k}")[0] for k in ks] for m in models},
            chart_id=_id("chart", protocol.name, view.name, metric),
            caption=dashed,
        )
        for metric in ("ndcg", "recall")
        if metric in names
    ]
    return (
        head
        + "<div class='view-body'><div class='tables'>"
        + "".join(tables)
        + "</div><div class='charts'>"
        + "".join(charts)
        + "</div></div></div>"
    )


def _ranked_table(
    protocol: ProtocolResult,
    view: ViewResult,
    models: Sequence[str],
    ks: Sequence[int],
    names: Sequence[str],
    stats: _Stats,
) -> str:
    head = "".join(f"<th>{_e(METRIC_LABELS.get(n, n))}</th>" for n in names)
    rows = []
    for k in ks:
        best = {
            name: _best(
                {m: stats.get(view.models[m], f"{name}@{k}")[0] for m in models},
                _lower_is_better(name),
            )
            for name in names
        }
        for i, model in enumerate(models):
            k_cell = f"<th class='k' rowspan='{len(models)}'>@{k}</th>" if i == 0 else ""
            cells = "".join(
                _cell(protocol, view, model, f"{name}@{k}", stats, model in best[name])
                for name in names
            )
            rows.append(
                f"<tr class='{'group-start' if i == 0 else ''}'>{k_cell}"
                f"{_model_th(model)}{cells}</tr>"
            )
    return (
        "<div class='table-wrap'><table class='metrics' "
        f"data-protocol='{_e(protocol.name)}' data-view='{_e(view.name)}'>"
        f"<thead><tr><th>K</th><th>model</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _other_table(
    protocol: ProtocolResult,
    view: ViewResult,
    models: Sequence[str],
    keys: Sequence[str],
    stats: _Stats,
) -> str:
    best = {
        key: _best({m: stats.get(view.models[m], key)[0] for m in models}, _lower_is_better(key))
        for key in keys
    }
    rows = [
        f"<tr>{_model_th(model)}"
        + "".join(_cell(protocol, view, model, key, stats, model in best[key]) for key in keys)
        + "</tr>"
        for model in models
    ]
    head = "".join(f"<th>{_e(key)}</th>" for key in keys)
    return (
        "<div class='table-wrap'><table class='metrics scalars' "
        f"data-protocol='{_e(protocol.name)}' data-view='{_e(view.name)}'>"
        f"<thead><tr><th>model</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _cell(
    protocol: ProtocolResult, view: ViewResult, model: str, key: str, stats: _Stats, best: bool
) -> str:
    mean, low, high = stats.get(view.models.get(model), key)
    attrs = (
        f"data-protocol='{_e(protocol.name)}' data-view='{_e(view.name)}' "
        f"data-model='{_e(model)}' data-metric='{_e(key)}'"
    )
    css = "num best" if best else "num"
    if not math.isfinite(mean):
        return f"<td class='num missing' {attrs}>—</td>"
    interval = f"<span class='ci'>[{_fmt(low)}, {_fmt(high)}]</span>" if math.isfinite(low) else ""
    title = " title='best in column'" if best else ""
    return f"<td class='{css}' {attrs}{title}><span class='mean'>{_fmt(mean)}</span>{interval}</td>"


def _model_th(model: str) -> str:
    return (
        f"<th class='model'><span class='swatch' style='background:{_color(model)}'></span>"
        f"{_e(model)}</th>"
    )


# ---------------------------------------------------------------------------------------
# SVG charts


def _line_chart(
    title: str,
    ks: Sequence[int],
    series: Mapping[str, Sequence[float]],
    *,
    chart_id: str,
    caption: str = "",
) -> str:
    """One line per model over categorical K positions, y from 0, legend on the right."""
    # The legend column is as wide as the longest model name (about 7 px a character at 12 px).
    left, top, bottom, plot_w, plot_h = 52, 34, 44, 230, 182
    right = 44 + math.ceil(7 * max((len(m) for m in series), default=0))
    width, height = left + plot_w + right, top + plot_h + bottom
    finite = [v for ys in series.values() for v in ys if math.isfinite(v)]
    ticks = _nice_ticks(max(finite, default=0.0))
    y_max = ticks[-1]

    def x(i: int) -> float:
        return left + plot_w * (i + 0.5) / len(ks)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / y_max)

    caption = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    out = [_svg_open(chart_id, width, height, title)]
    out += _y_axis(ticks, y, left, left + plot_w, "mean over test users", top, plot_h)
    for i, k in enumerate(ks):
        out.append(
            f"<text class='tick' x='{x(i):.1f}' y='{top + plot_h + 16}' text-anchor='middle'>{k}</text>"
        )
    out.append(
        f"<text class='axis-label' x='{left + plot_w / 2:.1f}' y='{height - 8}' "
        "text-anchor='middle'>K (list length)</text>"
    )
    for model, ys in series.items():
        color = _color(model)
        dash = " stroke-dasharray='6 3'" if "_frozen" in model else ""
        points = [
            (x(i), y(v), k, v)
            for i, (k, v) in enumerate(zip(ks, ys, strict=True))
            if math.isfinite(v)
        ]
        out.append(f"<g class='series' data-series='{_e(model)}'>")
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in points)
            out.append(
                f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='2'{dash}/>"
            )
        for px, py, k, v in points:
            out.append(
                f"<circle cx='{px:.1f}' cy='{py:.1f}' r='3' fill='{color}'>"
                f"<title>{_e(model)} @{k}: {_fmt(v)}</title></circle>"
            )
        out.append("</g>")
    legend_x = left + plot_w + 10
    for i, model in enumerate(series):
        ly = top + 8 + i * 18
        dash = " stroke-dasharray='6 3'" if "_frozen" in model else ""
        out.append(
            f"<line x1='{legend_x}' y1='{ly}' x2='{legend_x + 22}' y2='{ly}' "
            f"stroke='{_color(model)}' stroke-width='2'{dash}/>"
            f"<circle cx='{legend_x + 11}' cy='{ly}' r='3' fill='{_color(model)}'/>"
            f"<text class='legend' x='{legend_x + 28}' y='{ly + 4}'>{_e(model)}</text>"
        )
    out.append(f"</svg>{caption}</figure>")
    return "".join(out)


def _bar_chart(
    title: str,
    series: Sequence[tuple[str, Mapping[str, Stat]]],
    *,
    y_label: str,
    chart_id: str,
    with_intervals: bool,
    caption: str = "",
) -> str:
    """Grouped bars: one group per model, one bar per series (legend above), value labels."""
    models = _ordered({m for _, values in series for m in values})
    bar_w = 18 if len(series) <= 3 else 14
    longest = max((len(m) for m in models), default=0)  # model names are the x labels
    min_group_w = max(92, len(series) * bar_w + 24, 7 * longest + 12)
    left, right, bottom = 60, 20, 56
    legend_h = 18 * len(series) + 8
    top = 34 + legend_h
    plot_h = 220
    width = max(420, left + right + min_group_w * len(models))
    plot_w = width - left - right
    group_w = plot_w / max(len(models), 1)
    height = top + plot_h + bottom
    finite = [
        v
        for _, values in series
        for stat in values.values()
        for v in (stat if with_intervals else stat[:1])
        if math.isfinite(v)
    ]
    ticks = _nice_ticks(max(finite, default=0.0) * 1.12)  # head-room for the value labels
    y_max = ticks[-1]

    def y(v: float) -> float:
        return top + plot_h * (1 - v / y_max)

    caption = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    out = [_svg_open(chart_id, width, height, title)]
    for i, (label, _) in enumerate(series):
        ly = 34 + i * 18
        out.append(
            f"<rect x='{left}' y='{ly}' width='12' height='12' fill='{_series_color(i)}'/>"
            f"<text class='legend' x='{left + 18}' y='{ly + 10}'>{_e(label)}</text>"
        )
    out += _y_axis(ticks, y, left, left + plot_w, y_label, top, plot_h)
    for g, model in enumerate(models):
        group_x = left + g * group_w
        bars_x = group_x + (group_w - len(series) * bar_w) / 2
        out.append(f"<g class='group' data-model='{_e(model)}'>")
        for i, (label, values) in enumerate(series):
            mean, low, high = values.get(model, NAN_STAT)
            bx = bars_x + i * bar_w
            if not math.isfinite(mean):
                out.append(
                    f"<text class='na' x='{bx + bar_w / 2:.1f}' y='{top + plot_h - 4}' "
                    "text-anchor='middle'>n/a</text>"
                )
                continue
            out.append(
                f"<rect class='bar' data-model='{_e(model)}' data-series='{_e(label)}' "
                f"x='{bx + 1:.1f}' y='{y(mean):.1f}' width='{bar_w - 2}' "
                f"height='{max(y(0) - y(mean), 0.5):.1f}' fill='{_series_color(i)}'>"
                f"<title>{_e(model)}, {_e(label)}: {_fmt(mean)}</title></rect>"
            )
            label_y = y(mean)
            if with_intervals and math.isfinite(low) and math.isfinite(high):
                cx = bx + bar_w / 2
                out.append(
                    f"<path class='err' d='M{cx:.1f},{y(low):.1f}V{y(high):.1f}"
                    f"M{cx - 3:.1f},{y(low):.1f}h6M{cx - 3:.1f},{y(high):.1f}h6'/>"
                )
                label_y = min(label_y, y(high))
            out.append(
                f"<text class='value' transform='translate({bx + bar_w / 2 + 3:.1f},"
                f"{label_y - 4:.1f}) rotate(-90)'>{_fmt(mean, short=True)}</text>"
            )
        out.append(
            f"<text class='tick model-label' x='{group_x + group_w / 2:.1f}' "
            f"y='{top + plot_h + 18}' text-anchor='middle'>{_e(model)}</text></g>"
        )
    out.append(f"</svg>{caption}</figure>")
    return "".join(out)


def _svg_open(chart_id: str, width: int, height: int, title: str) -> str:
    return (
        f"<figure class='chart'><svg id='{_e(chart_id)}' xmlns='http://www.w3.org/2000/svg' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
        f"aria-label='{_e(title)}'><text class='chart-title' x='10' y='20'>{_e(title)}</text>"
    )


def _y_axis(
    ticks: Sequence[float],
    y: Any,
    x0: float,
    x1: float,
    label: str,
    top: float,
    plot_h: float,
) -> list[str]:
    out = []
    for tick in ticks:
        ty = y(tick)
        out.append(
            f"<line class='grid' x1='{x0}' y1='{ty:.1f}' x2='{x1:.1f}' y2='{ty:.1f}'/>"
            f"<text class='tick' x='{x0 - 6}' y='{ty + 4:.1f}' text-anchor='end'>{tick:g}</text>"
        )
    out.append(
        f"<line class='axis' x1='{x0}' y1='{top}' x2='{x0}' y2='{top + plot_h}'/>"
        f"<line class='axis' x1='{x0}' y1='{top + plot_h}' x2='{x1:.1f}' y2='{top + plot_h}'/>"
        f"<text class='axis-label' transform='translate(14,{top + plot_h / 2:.1f}) rotate(-90)' "
        f"text-anchor='middle'>{_e(label)}</text>"
    )
    return out


def _nice_ticks(top: float, n: int = 5) -> list[float]:
    """0, step, ... up to the first multiple of a 1/2/2.5/5 x 10^m step at or above `top`."""
    if not math.isfinite(top) or top <= 0:
        top = 1.0
    magnitude = 10 ** math.floor(math.log10(top / n))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude * n >= top)
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(count + 1)]


# ---------------------------------------------------------------------------------------
# Small helpers


def _ordered(names: Iterable[str]) -> list[str]:
    """Known models in MODEL_ORDER, then the others alphabetically."""
    names = set(names)
    known = [m for m in MODEL_ORDER if m in names]
    return known + sorted(names - set(known))


def _ordered_metrics(names: Iterable[str]) -> list[str]:
    names = set(names)
    known = [m for m in LIST_METRICS if m in names]
    return known + sorted(names - set(known))


def _color(model: str) -> str:
    if model in MODEL_COLORS:
        return MODEL_COLORS[model]
    return OTHER_COLORS[sum(map(ord, model)) % len(OTHER_COLORS)]


def _series_color(i: int) -> str:
    return SERIES_COLORS[i % len(SERIES_COLORS)]


def _find_view(
    protocols: Sequence[ProtocolResult], protocol_name: str, view_name: str
) -> ViewResult | None:
    for protocol in protocols:
        if protocol.name == protocol_name:
            for view in protocol.views:
                if view.name == view_name:
                    return view
    return None


def _fmt(value: float, *, signed: bool = False, short: bool = False) -> str:
    """4 decimals for metrics in [0, 1]; fewer for large scalars such as ARP."""
    if not math.isfinite(value):
        return "—"
    size = abs(value)
    if short:
        decimals = 0 if size >= 1000 else 1 if size >= 100 else 2 if size >= 10 else 3
    else:
        decimals = 1 if size >= 100 else 2 if size >= 10 else 4
    text = f"{value:+.{decimals}f}" if signed else f"{value:.{decimals}f}"
    return text.replace("-", "−")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _id(*parts: str) -> str:
    return "-".join(re.sub(r"[^A-Za-z0-9_]+", "-", p).strip("-") or "x" for p in parts)


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1f2933;
margin:0 auto;padding:16px 24px 48px;max-width:1360px;line-height:1.4;font-size:14px}
h1{font-size:24px;margin:8px 0}h2{font-size:19px;margin:28px 0 6px;border-bottom:2px solid #d9dee5;
padding-bottom:4px}h3{font-size:16px;margin:18px 0 4px}p{margin:4px 0 8px}
.lead{max-width:1000px}.muted{color:#6b7280;font-weight:normal}
table{border-collapse:collapse;margin:6px 0 10px;font-variant-numeric:tabular-nums}
th,td{padding:3px 8px;border-bottom:1px solid #e5e7eb;vertical-align:top}
thead th{background:#f3f4f6;text-align:center;font-weight:600;border-bottom:1px solid #cbd2d9}
table.setup td,table.claims td{text-align:left}table.setup{max-width:1300px}
td.num{text-align:right;white-space:nowrap}.mean{display:block}
.ci{display:block;font-size:11px;color:#6b7280}
table.claims .ci{display:inline}
td.best{background:#d1fae5;font-weight:700}td.best .ci{font-weight:normal;color:#3f6f5a}
td.missing{color:#9ca3af;text-align:center}
th.model{text-align:left;white-space:nowrap;font-weight:600}
th.k{background:#f9fafb;text-align:center;vertical-align:middle;border-right:1px solid #e5e7eb}
tr.group-start td,tr.group-start th{border-top:2px solid #cbd2d9}
.swatch{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px}
.view{margin:10px 0 22px;padding:6px 12px 10px;border:1px solid #e5e7eb;border-radius:6px}
.view-body{display:flex;flex-wrap:wrap;gap:12px 20px;align-items:flex-start}
table.metrics th,table.metrics td{padding:3px 6px}
.charts{display:flex;flex-wrap:wrap;gap:12px 24px;align-items:flex-start}
.view-body .charts{flex-direction:column}
.table-wrap{overflow-x:auto;max-width:100%}
figure.chart{margin:0}figcaption{font-size:12px;color:#6b7280;max-width:600px;margin:0 0 0 10px}
.verdict.excludes-zero{background:#d1fae5;font-weight:600}
.verdict.includes-zero{background:#f3f4f6}.verdict.unavailable{color:#9a3412}
.empty{color:#9a3412;font-style:italic}ul.notes{margin:4px 0}
svg text{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;fill:#1f2933}
svg .chart-title{font-size:14px;font-weight:600}svg .tick{font-size:11px;fill:#4b5563}
svg .legend{font-size:12px}svg .axis-label{font-size:11px;fill:#4b5563}
svg .value{font-size:10px;fill:#374151}svg .na{font-size:9px;fill:#9ca3af}
svg .grid{stroke:#e5e7eb}svg .axis{stroke:#6b7280}svg .err{stroke:#111827;stroke-width:1.2;fill:none}
"""
