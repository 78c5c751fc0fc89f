"""The report's inline SVG charts (line and grouped bar), their colours and number formats.

Hand-drawn SVG, no JavaScript: every chart is a <figure> with one <svg>, its series marked
with data-* attributes so tests can read them back.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmrec_spark.evaluation.report import NAN_STAT, Stat, ordered

# Okabe-Ito (colour-blind safe); a frozen variant shares its family's hue family and is dashed.
MODEL_COLORS = {
    "popularity": "#7f7f7f",
    "profile_text": "#b15928",
    "als": "#0072b2",
    "implicit_als": "#000000",
    "als_recent": "#56b4e9",
    "text_frozen": "#e69f00",
    "text_frozen_kernel": "#f0c04a",
    "text_finetuned": "#d55e00",
    "text_encoder_tuned": "#8c2d04",
    "hybrid_frozen": "#cc79a7",
    "hybrid_no_slots": "#8fd3b8",
    "hybrid": "#009e73",
    "vae": "#6b3fa0",
    "hybrid_vae": "#006b4f",
}

OTHER_COLORS = ("#8c6d31", "#6b6ecf", "#b5cf6b")

SERIES_COLORS = ("#3b5b92", "#e3a33b", "#6a9f6e", "#b56576", "#5fa8d3", "#8e7dbe", "#c9a227")


def line_chart(
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
    ticks = nice_ticks(max(finite, default=0.0))
    y_max = ticks[-1]

    def x(i: int) -> float:
        return left + plot_w * (i + 0.5) / len(ks)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / y_max)

    caption = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
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
        color = model_color(model)
        dash = " stroke-dasharray='6 3'" if "_frozen" in model else ""
        points = [
            (x(i), y(v), k, v)
            for i, (k, v) in enumerate(zip(ks, ys, strict=True))
            if math.isfinite(v)
        ]
        out.append(f"<g class='series' data-series='{esc(model)}'>")
        if len(points) > 1:
            path = " ".join(f"{px:.1f},{py:.1f}" for px, py, _, _ in points)
            out.append(
                f"<polyline points='{path}' fill='none' stroke='{color}' stroke-width='2'{dash}/>"
            )
        for px, py, k, v in points:
            out.append(
                f"<circle cx='{px:.1f}' cy='{py:.1f}' r='3' fill='{color}'>"
                f"<title>{esc(model)} @{k}: {fmt(v)}</title></circle>"
            )
        out.append("</g>")
    legend_x = left + plot_w + 10
    for i, model in enumerate(series):
        ly = top + 8 + i * 18
        dash = " stroke-dasharray='6 3'" if "_frozen" in model else ""
        out.append(
            f"<line x1='{legend_x}' y1='{ly}' x2='{legend_x + 22}' y2='{ly}' "
            f"stroke='{model_color(model)}' stroke-width='2'{dash}/>"
            f"<circle cx='{legend_x + 11}' cy='{ly}' r='3' fill='{model_color(model)}'/>"
            f"<text class='legend' x='{legend_x + 28}' y='{ly + 4}'>{esc(model)}</text>"
        )
    out.append(f"</svg>{caption}</figure>")
    return "".join(out)


def bar_chart(
    title: str,
    series: Sequence[tuple[str, Mapping[str, Stat]]],
    *,
    y_label: str,
    chart_id: str,
    with_intervals: bool,
    caption: str = "",
) -> str:
    """Grouped bars: one group per model, one bar per series (legend above), value labels."""
    models = ordered({m for _, values in series for m in values})
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
    ticks = nice_ticks(max(finite, default=0.0) * 1.12)  # head-room for the value labels
    y_max = ticks[-1]

    def y(v: float) -> float:
        return top + plot_h * (1 - v / y_max)

    caption = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    out = [_svg_open(chart_id, width, height, title)]
    for i, (label, _) in enumerate(series):
        ly = 34 + i * 18
        out.append(
            f"<rect x='{left}' y='{ly}' width='12' height='12' fill='{series_color(i)}'/>"
            f"<text class='legend' x='{left + 18}' y='{ly + 10}'>{esc(label)}</text>"
        )
    out += _y_axis(ticks, y, left, left + plot_w, y_label, top, plot_h)
    for g, model in enumerate(models):
        out += _bar_group(
            model,
            series,
            group_x=left + g * group_w,
            group_w=group_w,
            bar_w=bar_w,
            y=y,
            axis_y=top + plot_h,
            with_intervals=with_intervals,
        )
    out.append(f"</svg>{caption}</figure>")
    return "".join(out)


def _bar_group(
    model: str,
    series: Sequence[tuple[str, Mapping[str, Stat]]],
    *,
    group_x: float,
    group_w: float,
    bar_w: int,
    y: Callable[[float], float],
    axis_y: int,
    with_intervals: bool,
) -> list[str]:
    """One model's group: a bar per series (n/a without a value) with its value label and,
    `with_intervals`, its whisker; the model's name below the x axis (at `axis_y`)."""
    bars_x = group_x + (group_w - len(series) * bar_w) / 2
    out = [f"<g class='group' data-model='{esc(model)}'>"]
    for i, (label, values) in enumerate(series):
        mean, low, high = values.get(model, NAN_STAT)
        bx = bars_x + i * bar_w
        if not math.isfinite(mean):
            out.append(
                f"<text class='na' x='{bx + bar_w / 2:.1f}' y='{axis_y - 4}' "
                "text-anchor='middle'>n/a</text>"
            )
            continue
        out.append(
            f"<rect class='bar' data-model='{esc(model)}' data-series='{esc(label)}' "
            f"x='{bx + 1:.1f}' y='{y(mean):.1f}' width='{bar_w - 2}' "
            f"height='{max(y(0) - y(mean), 0.5):.1f}' fill='{series_color(i)}'>"
            f"<title>{esc(model)}, {esc(label)}: {fmt(mean)}</title></rect>"
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
            f"{label_y - 4:.1f}) rotate(-90)'>{fmt(mean, short=True)}</text>"
        )
    out.append(
        f"<text class='tick model-label' x='{group_x + group_w / 2:.1f}' "
        f"y='{axis_y + 18}' text-anchor='middle'>{esc(model)}</text></g>"
    )
    return out


def _svg_open(chart_id: str, width: int, height: int, title: str) -> str:
    return (
        f"<figure class='chart'><svg id='{esc(chart_id)}' xmlns='http://www.w3.org/2000/svg' "
        f"width='{width}' height='{height}' viewBox='0 0 {width} {height}' role='img' "
        f"aria-label='{esc(title)}'><text class='chart-title' x='10' y='20'>{esc(title)}</text>"
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
        f"text-anchor='middle'>{esc(label)}</text>"
    )
    return out


def nice_ticks(top: float, n: int = 5) -> list[float]:
    """0, step, ... up to the first multiple of a 1/2/2.5/5 x 10^m step at or above `top`."""
    if not math.isfinite(top) or top <= 0:
        top = 1.0
    magnitude = 10 ** math.floor(math.log10(top / n))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude * n >= top)
    count = math.ceil(top / step - 1e-9)
    return [round(i * step, 10) for i in range(count + 1)]


def model_color(model: str) -> str:
    """The model's colour: its own for the known models, else one of OTHER_COLORS by name."""
    if model in MODEL_COLORS:
        return MODEL_COLORS[model]
    return OTHER_COLORS[sum(map(ord, model)) % len(OTHER_COLORS)]


def series_color(i: int) -> str:
    """The i-th series' colour (they repeat after SERIES_COLORS)."""
    return SERIES_COLORS[i % len(SERIES_COLORS)]


def fmt(value: float, *, signed: bool = False, short: bool = False) -> str:
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


def esc(text: object) -> str:
    """`text` escaped for HTML text and attribute values."""
    return html.escape(str(text), quote=True)
