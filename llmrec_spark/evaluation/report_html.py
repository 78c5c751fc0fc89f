"""The self-contained HTML report of the offline evaluation: tables, charts, claims, draws.

One file with inline CSS and SVG (`charts`), nothing fetched, built from `ProtocolResult`s:
per protocol and view a table of each model's means with bootstrap intervals, the scalars,
and line charts over K; an overview of cold vs warm accuracy and popularity bias; each
`Claim` with its paired bootstrap interval.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence

from llmrec_spark.core.metrics import paired_bootstrap
from llmrec_spark.evaluation.charts import bar_chart, esc, fmt, line_chart, model_color
from llmrec_spark.evaluation.report import (
    Claim,
    Draw,
    ProtocolResult,
    Stat,
    Stats,
    ViewResult,
    claim_values,
    draw_summary,
    find_view,
    is_partial,
    mean_of,
    ordered,
    ordered_metrics,
    split_key,
)

log = logging.getLogger(__name__)

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
    stats = Stats(bootstrap_samples=bootstrap_samples, seed=seed)
    body = [
        _header(title, ds, protocols, bootstrap_samples, seed, notes),
        _overview(protocols, stats),
        _claims_section(protocols, claims, bootstrap_samples, seed),
        _draws_section(draws),
        *(_protocol_section(p, stats) for p in protocols),
    ]
    page = (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{esc(title)} ({esc(ds)})</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(body)
        + "\n</body></html>\n"
    )
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"evaluation-{ds}.html")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(page)
    log.info("evaluation report: %s", path)
    return path


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
                f"<td rowspan='{len(views)}'><a href='#{_id(protocol.name)}'>{esc(protocol.name)}</a>"
                f"<div class='muted'>{esc(protocol.description)}</div></td>"
                if i == 0
                else ""
            )
            if view is None:
                rows.append(f"<tr>{first}<td colspan='4' class='muted'>no views</td></tr>")
                continue
            models = ", ".join(ordered(view.models)) or "none"
            rows.append(
                f"<tr>{first}<td><a href='#{_id(protocol.name, view.name)}'>{esc(view.name)}</a></td>"
                f"<td class='num'>{view.users:,}</td><td>{esc(view.description)}</td>"
                f"<td>{esc(models)}</td></tr>"
            )
    notes_html = (
        "<h3>Notes</h3><ul class='notes'>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>"
        if notes
        else ""
    )
    return (
        f"<header><h1>{esc(title)}</h1>"
        f"<p class='lead'>Run date <b>{esc(ds)}</b>. Cells show the mean over test users and a "
        f"95% percentile bootstrap interval ({bootstrap_samples:,} resamples of users, seed "
        f"{seed}); claims use a paired bootstrap (users resampled jointly, same seed). "
        "Best value per column is highlighted (lowest for ARP and popularity percentile, "
        "highest elsewhere).</p>"
        "<table class='setup'><thead><tr><th>protocol</th><th>view</th><th>test users</th>"
        "<th>candidates and relevant set</th><th>models</th></tr></thead><tbody>"
        + ("".join(rows) or "<tr><td colspan='5' class='muted'>no protocols</td></tr>")
        + f"</tbody></table>{notes_html}</header>"
    )


def _overview(protocols: Sequence[ProtocolResult], stats: Stats) -> str:
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


def _cold_warm_chart(protocols: Sequence[ProtocolResult], stats: Stats) -> str:
    series = []
    for protocol_name, view_name, metric, label in COLD_WARM_SERIES:
        view = find_view(protocols, protocol_name, view_name)
        if view is None or view.users == 0:
            continue
        values = {m: stats.get(r, metric) for m, r in view.models.items()}
        if any(math.isfinite(v[0]) for v in values.values()):
            series.append((label, values))
    if not series:
        return ""
    return bar_chart(
        "Cold vs warm",
        series,
        y_label="mean over test users",
        chart_id="chart-cold-warm",
        with_intervals=True,
        caption="Per model: accuracy on warm users next to accuracy on items without "
        "interactions; whiskers are 95% bootstrap intervals.",
    )


def _popularity_charts(protocols: Sequence[ProtocolResult], stats: Stats) -> list[str]:
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
                    if split_key(key)[0] == family
                }
                if not keys or view.users == 0:
                    continue
                ks = {key: split_key(key)[1] or 0 for key in keys}
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
                bar_chart(
                    title,
                    series,
                    y_label=family,
                    chart_id=f"chart-{family}",
                    with_intervals=False,
                    caption=caption,
                )
            )
    return charts


def _draws_section(draws: Sequence[Draw]) -> str:
    """One row per cold-item draw, then the mean and range over the draws, per model."""
    if len(draws) < 2:
        return ""
    models = ordered({m for d in draws for m in d.recall})
    head = "".join(f"<th>{esc(m)}</th>" for m in models)
    rows = []
    for d in draws:
        values = "".join(f"<td class='num'>{fmt(d.recall.get(m, math.nan))}</td>" for m in models)
        label = f"{d.seed}" + (" (this report)" if d.primary else "")
        rows.append(
            f"<tr class='draw' data-seed='{d.seed}'><td>{esc(label)}</td><td class='num'>"
            f"{d.cold_items}</td><td class='num'>{d.users}</td>{values}</tr>"
        )
    spread = draw_summary(draws)
    summary = []
    for label in ("mean", "min", "max"):
        cells = "".join(
            f"<td class='num'>{fmt(spread[m][label] if m in spread else math.nan)}</td>"
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
            f"<td>{esc(claim.protocol)}</td><td>{esc(claim.view)}</td><td>{esc(claim.metric)}</td>"
            f"<td>{esc(claim.model)}</td><td>{esc(claim.baseline)}</td>"
        )
        attrs = (
            f"data-protocol='{esc(claim.protocol)}' data-view='{esc(claim.view)}' "
            f"data-metric='{esc(claim.metric)}' data-model='{esc(claim.model)}' "
            f"data-baseline='{esc(claim.baseline)}'"
        )
        values, reason = claim_values(protocols, claim)
        if values is None:
            rows.append(
                f"<tr class='claim' {attrs}>{cells}<td colspan='4' class='verdict unavailable'>"
                f"not available: {esc(reason)}</td></tr>"
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
            f"<tr class='claim' {attrs}>{cells}<td class='num'>{fmt(mean_of(a))}</td>"
            f"<td class='num'>{fmt(mean_of(b))}</td>"
            f"<td class='num'>{fmt(diff, signed=True)} "
            f"<span class='ci'>[{fmt(low, signed=True)}, {fmt(high, signed=True)}]</span></td>"
            f"<td class='verdict {css}'>{esc(verdict)}</td></tr>"
        )
    return (
        "<section id='claims'><h2>Claims</h2><p class='muted'>Model − baseline on the same "
        "users, with a paired 95% bootstrap interval.</p><table class='claims'><thead><tr>"
        "<th>protocol</th><th>view</th><th>metric</th><th>model</th><th>baseline</th>"
        "<th>model mean</th><th>baseline mean</th><th>difference [95% interval]</th>"
        "<th>verdict</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table></section>"
    )


def _protocol_section(protocol: ProtocolResult, stats: Stats) -> str:
    parts = [
        f"<section class='protocol' id='{_id(protocol.name)}'>"
        f"<h2>Protocol: {esc(protocol.name)}</h2><p>{esc(protocol.description)}</p>"
    ]
    if not protocol.views:
        parts.append("<p class='muted'>No views evaluated.</p>")
    for view in protocol.views:
        parts.append(_view_section(protocol, view, stats))
    parts.append("</section>")
    return "".join(parts)


def _view_section(protocol: ProtocolResult, view: ViewResult, stats: Stats) -> str:
    head = (
        f"<div class='view' id='{_id(protocol.name, view.name)}' "
        f"data-protocol='{esc(protocol.name)}' data-view='{esc(view.name)}'>"
        f"<h3>{esc(protocol.name)} / {esc(view.name)} "
        f"<span class='muted'>{view.users:,} test users</span></h3>"
        f"<p>{esc(view.description)}</p>"
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
    models = ordered(view.models)
    ranked_keys = {
        key
        for r in view.models.values()
        for key in r.per_user
        if split_key(key)[1] is not None and not is_partial(key)
    }
    ks = sorted({split_key(key)[1] or 0 for key in ranked_keys})
    names = ordered_metrics({split_key(key)[0] for key in ranked_keys})
    tables = [_ranked_table(protocol, view, models, ks, names, stats)] if ranked_keys else []
    other_keys = sorted(
        {key for r in view.models.values() for key in [*r.per_user, *r.scalars]} - ranked_keys,
        key=_scalar_order,
    )
    if other_keys:
        tables.append(_other_table(protocol, view, models, other_keys, stats))
    dashed = "Dashed: frozen text encoder." if any("_frozen" in m for m in models) else ""
    charts = [
        line_chart(
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
    stats: Stats,
) -> str:
    head = "".join(f"<th>{esc(METRIC_LABELS.get(n, n))}</th>" for n in names)
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
        f"data-protocol='{esc(protocol.name)}' data-view='{esc(view.name)}'>"
        f"<thead><tr><th>K</th><th>model</th>{head}</tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _other_table(
    protocol: ProtocolResult,
    view: ViewResult,
    models: Sequence[str],
    keys: Sequence[str],
    stats: Stats,
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
    head = "".join(f"<th>{esc(key)}</th>" for key in keys)
    return (
        "<div class='table-wrap'><table class='metrics scalars' "
        f"data-protocol='{esc(protocol.name)}' data-view='{esc(view.name)}'>"
        f"<thead><tr><th>model</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
    )


def _cell(
    protocol: ProtocolResult, view: ViewResult, model: str, key: str, stats: Stats, best: bool
) -> str:
    mean, low, high = stats.get(view.models.get(model), key)
    attrs = (
        f"data-protocol='{esc(protocol.name)}' data-view='{esc(view.name)}' "
        f"data-model='{esc(model)}' data-metric='{esc(key)}'"
    )
    css = "num best" if best else "num"
    if not math.isfinite(mean):
        return f"<td class='num missing' {attrs}>—</td>"
    interval = f"<span class='ci'>[{fmt(low)}, {fmt(high)}]</span>" if math.isfinite(low) else ""
    title = " title='best in column'" if best else ""
    return f"<td class='{css}' {attrs}{title}><span class='mean'>{fmt(mean)}</span>{interval}</td>"


def _model_th(model: str) -> str:
    return (
        f"<th class='model'><span class='swatch' style='background:{model_color(model)}'></span>"
        f"{esc(model)}</th>"
    )


def _best(values: Mapping[str, float], lower_is_better: bool) -> set[str]:
    """Models holding the best finite value (ties all win); none with fewer than two values."""
    finite = {m: v for m, v in values.items() if math.isfinite(v)}
    if len(finite) < 2:
        return set()
    target = min(finite.values()) if lower_is_better else max(finite.values())
    return {m for m, v in finite.items() if abs(v - target) <= 1e-12}


def _lower_is_better(key: str) -> bool:
    return split_key(key)[0] in LOWER_IS_BETTER


def _scalar_order(key: str) -> tuple[int, str, int]:
    """AUC, coverage, novelty, ARP, popularity percentile, then the rest alphabetically."""
    name, k = split_key(key)
    rank = SCALAR_ORDER.index(name) if name in SCALAR_ORDER else len(SCALAR_ORDER)
    return (rank, name, k or 0)


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
