"""The HTML evaluation report: parsed back with html.parser and checked cell by cell."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from llmrec_spark.evaluation.report import (
    Claim,
    Draw,
    ModelResult,
    ProtocolResult,
    ViewResult,
    report_summary,
)
from llmrec_spark.evaluation.report_html import write_report


class ParsedReport(HTMLParser):
    """Cells by (protocol, view, model, metric), chart series, claim rows, every start tag."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.cells: dict[tuple[str, str, str, str], dict] = {}
        self.series: dict[str, list[str]] = {}  # svg id -> data-series of its line groups
        self.polylines: dict[str, list[str]] = {}  # svg id -> series drawn with a line
        self.markers: dict[str, list[str]] = {}  # svg id -> series of each point marker
        self.bars: dict[str, list[tuple[str, str]]] = {}  # svg id -> (model, series)
        self.claims: list[dict] = []
        self.tags: list[str] = []
        self.views: dict[tuple[str, str], list[str]] = {}  # (protocol, view) -> its text
        self._cell: dict | None = None
        self._claim: dict | None = None
        self._svg = ""
        self._series = ""
        self._view: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        classes = (a.get("class") or "").split()
        if tag == "td" and "data-metric" in a and "data-model" in a and self._claim is None:
            key = (a["data-protocol"], a["data-view"], a["data-model"], a["data-metric"])
            self._cell = self.cells[key] = {"classes": classes, "text": ""}
        elif tag == "tr" and "claim" in classes:
            self._claim = {**a, "text": "", "cells": []}
            self.claims.append(self._claim)
        elif tag == "td" and self._claim is not None:
            self._claim["cells"].append("")
        elif tag == "svg":
            self._svg = a["id"]
            self.polylines[self._svg] = []
            self.series[self._svg] = []
            self.markers[self._svg] = []
            self.bars[self._svg] = []
        elif tag == "g" and "series" in classes:
            self._series = a["data-series"]
            self.series[self._svg].append(self._series)
        elif tag == "circle" and self._series:
            self.markers[self._svg].append(self._series)
        elif tag == "polyline":
            self.polylines[self._svg].append(self._series)
        elif tag == "rect" and "bar" in classes:
            self.bars[self._svg].append((a["data-model"], a["data-series"]))
        elif tag == "div" and "view" in classes:
            self._view = self.views[(a["data-protocol"], a["data-view"])] = []

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._claim = None
        elif tag == "g":
            self._series = ""

    def handle_data(self, data):
        for sink in (self._cell, self._claim):
            if sink is not None:
                sink["text"] += data
        if self._claim is not None and self._claim["cells"]:
            self._claim["cells"][-1] += data
        if self._view is not None:
            self._view.append(data)


def interval(text: str) -> tuple[float, float, float]:
    """(mean, low, high) from a cell's text "0.6500[0.5250, 0.7500]"."""
    numbers = [float(x.replace("−", "-")) for x in re.findall(r"[−+-]?\d+\.\d+", text)]
    assert len(numbers) == 3, text
    return numbers[0], numbers[1], numbers[2]


def hand_built_protocols() -> list[ProtocolResult]:
    rng = np.random.default_rng(0)
    base = rng.random(300)
    warm = ViewResult(
        name="warm",
        description="Whole catalog minus training items; relevant: held-out positives.",
        users=4,
        models={
            "popularity": ModelResult(
                per_user={
                    "ndcg@5": np.array([0.0, 0.1, 0.2, 0.3]),
                    "ndcg@10": np.array([0.1, 0.2, 0.3, 0.4]),
                    "recall@5": np.array([0.0, 0.25, 0.25, 0.5]),
                    "recall@10": np.array([0.0, 0.5, 0.5, 1.0]),
                },
                scalars={"arp@20": 120.0, "coverage@20": 0.01},
            ),
            "als": ModelResult(
                per_user={
                    "ndcg@5": np.array([0.4, 0.5, 0.6, 0.7]),
                    "ndcg@10": np.array([0.5, 0.6, 0.7, 0.8]),
                    "recall@5": np.array([0.25, 0.25, 0.5, 1.0]),
                    "recall@10": np.array([0.5, 0.5, 1.0, 1.0]),
                },
                scalars={"arp@20": 45.5, "coverage@20": 0.2},
            ),
        },
    )
    cold_only = ViewResult(
        name="cold_only",
        description="Cold items only <b>&</b> their held-out positives.",
        users=3,
        models={
            # ARP is 0 for every model here: cold items have no training users.
            "popularity": ModelResult(
                per_user={"recall@20": np.zeros(3), "ndcg@20": np.array([0.0, 0.3, 0.0])},
                scalars={"arp@20": 0.0},
            ),
            "text_finetuned": ModelResult(
                per_user={"recall@20": np.array([0.2, 0.4, 0.6])}, scalars={"arp@20": 0.0}
            ),
        },
    )
    empty = ViewResult(name="mixed", description="Warm and cold items.", users=0, models={})
    paired = ViewResult(
        name="all",
        description="300 users with seeded values.",
        users=300,
        models={
            "popularity": ModelResult(per_user={"ndcg@10": base}),
            "als": ModelResult(per_user={"ndcg@10": base + 0.1 + rng.normal(0, 0.02, 300)}),
            "text_frozen": ModelResult(per_user={"ndcg@10": base.copy()}),
        },
    )
    return [
        ProtocolResult("user_temporal", "Latest 20% of each user's events held out.", [warm]),
        ProtocolResult("cold_item", "10% of items never seen in training.", [cold_only, empty]),
        ProtocolResult("global_temporal", "One cut date <script>alert(1)</script>.", [paired]),
    ]


CLAIMS = [
    Claim("global_temporal", "all", "ndcg@10", "als", "popularity"),
    Claim("global_temporal", "all", "ndcg@10", "text_frozen", "popularity"),
    Claim("user_temporal", "warm", "ndcg@10", "hybrid", "als"),
]


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, ParsedReport]:
    folder = tmp_path_factory.mktemp("report")
    path = write_report(
        str(folder),
        title="Offline evaluation <test>",
        ds="2024-06-30",
        protocols=hand_built_protocols(),
        claims=CLAIMS,
        bootstrap_samples=200,
        seed=7,
        notes=["note with <script>alert('x')</script> inside"],
    )
    assert Path(path) == folder / "evaluation-2024-06-30.html"
    return Path(path), ParsedReport(Path(path).read_text(encoding="utf-8"))


def test_cells_show_hand_computed_means_with_intervals(report):
    _, page = report
    expected = {
        ("popularity", "ndcg@10"): 0.25,
        ("popularity", "recall@10"): 0.5,
        ("popularity", "ndcg@5"): 0.15,
        ("popularity", "recall@5"): 0.25,
        ("als", "ndcg@10"): 0.65,
        ("als", "recall@10"): 0.75,
        ("als", "ndcg@5"): 0.55,
        ("als", "recall@5"): 0.5,
    }
    for (model, metric), mean in expected.items():
        cell = page.cells[("user_temporal", "warm", model, metric)]
        shown, low, high = interval(cell["text"])
        assert shown == pytest.approx(mean), (model, metric)
        assert low <= shown <= high
        assert low < high  # four different values: resampling moves the mean
    # The bootstrap cannot leave the range of the per-user values.
    _, low, high = interval(page.cells[("user_temporal", "warm", "als", "ndcg@10")]["text"])
    assert low >= 0.5 and high <= 0.8
    assert page.cells[("cold_item", "cold_only", "text_finetuned", "recall@20")]["text"].startswith(
        "0.4000"
    )
    # Scalars: the value, no interval.
    assert page.cells[("user_temporal", "warm", "popularity", "arp@20")]["text"] == "120.0"
    assert page.cells[("user_temporal", "warm", "als", "coverage@20")]["text"] == "0.2000"


def test_best_cell_per_column_is_marked(report):
    _, page = report

    def best(model: str, metric: str, protocol="user_temporal", view="warm") -> bool:
        return "best" in page.cells[(protocol, view, model, metric)]["classes"]

    for metric in ("ndcg@5", "ndcg@10", "recall@5", "recall@10", "coverage@20"):
        assert best("als", metric) and not best("popularity", metric), metric
    assert best("als", "arp@20") and not best("popularity", "arp@20")  # lower ARP is better
    assert best("text_finetuned", "recall@20", "cold_item", "cold_only")
    # Only one model has ndcg@20 on the cold view: no winner, and the other shows a dash.
    assert not best("popularity", "ndcg@20", "cold_item", "cold_only")
    missing = page.cells[("cold_item", "cold_only", "text_finetuned", "ndcg@20")]
    assert missing["text"] == "—" and "missing" in missing["classes"]


def test_charts_have_one_series_per_model(report):
    path, page = report
    for metric in ("ndcg", "recall"):
        assert sorted(page.polylines[f"chart-user_temporal-warm-{metric}"]) == [
            "als",
            "popularity",
        ]
        assert sorted(page.markers[f"chart-user_temporal-warm-{metric}"]) == sorted(
            ["als", "popularity"] * 2  # K = 5 and 10
        )
    # A single K: one marker per model and no line to draw.
    one_k = "chart-global_temporal-all-ndcg"
    assert sorted(page.series[one_k]) == ["als", "popularity", "text_frozen"]
    assert sorted(page.markers[one_k]) == ["als", "popularity", "text_frozen"]
    assert page.polylines[one_k] == []
    assert "chart-global_temporal-all-recall" not in page.series  # no recall in that view
    # Cold vs warm: the warm NDCG@10 bars and the cold-only Recall@20 bars, per model present.
    warm = "warm users: NDCG@10 (user_temporal)"
    cold = "cold items only: Recall@20 (cold_item)"
    assert sorted(page.bars["chart-cold-warm"]) == sorted(
        [("popularity", warm), ("als", warm), ("popularity", cold), ("text_finetuned", cold)]
    )
    assert sorted(page.bars["chart-arp"]) == [
        ("als", "user_temporal / warm: arp@20"),
        ("popularity", "user_temporal / warm: arp@20"),
    ]
    assert "chart-novelty" not in page.bars  # no novelty scalar anywhere
    # The cold-only ARP (0 for both models) is named in the caption instead of drawn as bars.
    html = path.read_text()
    arp_figure = html[html.index("id='chart-arp'") :]
    caption = arp_figure[: arp_figure.index("</figure>")]
    assert "cold_item / cold_only: arp@20 is 0 for every model" in caption


def test_claims_state_the_paired_interval(report):
    _, page = report
    rows = {(c["data-model"], c["data-baseline"], c["data-view"]): c["cells"] for c in page.claims}

    # cells: protocol, view, metric, model, baseline, model mean, baseline mean, difference, verdict
    clear = rows[("als", "popularity", "all")]
    assert clear[:5] == ["global_temporal", "all", "ndcg@10", "als", "popularity"]
    diff, low, high = interval(clear[7])
    assert 0.09 < low < diff < high < 0.11  # als = popularity + 0.1 + N(0, 0.02) per user
    assert float(clear[5]) - float(clear[6]) == pytest.approx(diff, abs=2e-4)
    assert clear[8] == "excludes 0: als better"
    same = rows[("text_frozen", "popularity", "all")]
    assert same[7] == "+0.0000 [+0.0000, +0.0000]"
    assert same[8] == "includes 0: no clear difference"
    assert rows[("hybrid", "als", "warm")][5] == "not available: no model hybrid in this view"


def test_missing_models_and_empty_views_render(report):
    _, page = report
    empty = "".join(page.views[("cold_item", "mixed")])
    assert "0 test users" in empty and "No test users in this view" in empty
    assert not any(key[:2] == ("cold_item", "mixed") for key in page.cells)
    warm_models = {key[2] for key in page.cells if key[:2] == ("user_temporal", "warm")}
    assert warm_models == {"popularity", "als"}


def test_all_text_is_escaped(report):
    path, page = report
    raw = path.read_text(encoding="utf-8")
    assert "script" not in page.tags
    assert "<b>&</b>" not in raw and "<test>" not in raw
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in raw
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in raw
    assert "Cold items only &lt;b&gt;&amp;&lt;/b&gt; their held-out positives." in raw
    assert "<title>Offline evaluation &lt;test&gt; (2024-06-30)</title>" in raw
    # Self-contained: nothing fetched, no script.
    assert not re.search(r"(src|href)=['\"]?https?:", raw)


def test_report_summary_nests_means_by_protocol_view_model():
    protocols = hand_built_protocols()
    protocols[1].views[1] = ViewResult(
        "mixed", "no users", 0, {"als": ModelResult(per_user={"ndcg@10": np.array([])})}
    )

    summary = report_summary(protocols)

    warm = summary["user_temporal"]["warm"]
    assert warm["als"]["ndcg@10"] == pytest.approx(0.65)
    assert warm["popularity"]["recall@5"] == pytest.approx(0.25)
    assert warm["als"]["arp@20"] == 45.5
    assert summary["cold_item"]["cold_only"]["text_finetuned"] == {
        "recall@20": pytest.approx(0.4),
        "arp@20": 0.0,
    }
    assert summary["cold_item"]["mixed"] == {"als": {"ndcg@10": None}}  # no users: no mean
    assert list(summary) == ["user_temporal", "cold_item", "global_temporal"]


def test_draws_table_lists_each_cold_item_pick_with_mean_and_range(tmp_path):
    draws = [
        Draw(
            seed=5,
            users=900,
            cold_items=202,
            recall={"text_frozen": 0.2, "text_finetuned": 0.31},
            primary=True,
        ),
        Draw(
            seed=105,
            users=910,
            cold_items=202,
            recall={"text_frozen": 0.24, "text_finetuned": 0.35},
        ),
        Draw(seed=205, users=905, cold_items=201, recall={"text_frozen": 0.22}),
    ]

    def page(folder: Path, picks: list[Draw]) -> str:
        path = write_report(
            str(folder),
            title="draws",
            ds="2024-06-30",
            protocols=hand_built_protocols(),
            claims=[],
            bootstrap_samples=20,
            seed=7,
            draws=picks,
        )
        return Path(path).read_text()

    html = page(tmp_path, draws)
    section = html[html.index("<section id='draws'>") :]
    section = section[: section.index("</section>")]
    rows = [
        [c for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row)]
        for row in re.findall(r"<tr[^>]*>(.*?)</tr>", section)
    ]
    # Models in the report's order (frozen before fine-tuned), a dash where a draw lacks one.
    assert rows[0] == ["seed", "cold items", "users", "text_frozen", "text_finetuned"]
    assert rows[1] == ["5 (this report)", "202", "900", "0.2000", "0.3100"]
    assert rows[3] == ["205", "201", "905", "0.2200", "—"]
    assert rows[4] == ["mean", "", "", "0.2200", "0.3300"]
    assert rows[5] == ["min", "", "", "0.2000", "0.3100"]
    assert rows[6] == ["max", "", "", "0.2400", "0.3500"]
    # One draw (or none) is no spread: no section.
    assert "id='draws'" not in page(tmp_path / "one", draws[:1])


def test_cold_recall_is_averaged_and_paired_over_the_users_with_cold_positives(tmp_path):
    # Four mixed-view users; the third has no cold positive, so no share (NaN).
    nan = float("nan")
    mixed = ViewResult(
        name="mixed",
        description="every unseen item",
        users=4,
        models={
            "hybrid": ModelResult(
                per_user={
                    "ndcg@10": np.array([0.5, 0.4, 0.3, 0.2]),
                    "cold_recall@20": np.array([1.0, 0.5, nan, 0.0]),
                }
            ),
            "hybrid_frozen": ModelResult(
                per_user={
                    "ndcg@10": np.array([0.5, 0.3, 0.3, 0.2]),
                    "cold_recall@20": np.array([0.5, 0.0, nan, 0.0]),
                }
            ),
            # Defined for other users than the two above: cannot be paired with them.
            "als": ModelResult(
                per_user={
                    "ndcg@10": np.array([0.4, 0.4, 0.3, 0.2]),
                    "cold_recall@20": np.array([0.0, nan, 0.0, 0.0]),
                }
            ),
        },
    )
    protocols = [ProtocolResult("cold_item", "cold items", [mixed])]
    claims = [
        Claim("cold_item", "mixed", "cold_recall@20", "hybrid", "hybrid_frozen"),
        Claim("cold_item", "mixed", "cold_recall@20", "hybrid", "als"),
    ]
    path = write_report(
        str(tmp_path),
        title="partial",
        ds="2024-06-30",
        protocols=protocols,
        claims=claims,
        bootstrap_samples=200,
        seed=7,
        notes=[],
    )
    page = ParsedReport(Path(path).read_text(encoding="utf-8"))

    mean, low, high = interval(
        page.cells[("cold_item", "mixed", "hybrid", "cold_recall@20")]["text"]
    )
    assert mean == pytest.approx(0.5)  # (1 + 0.5 + 0) / 3: the NaN user left out
    assert 0.0 <= low <= mean <= high <= 1.0
    # One table cell per model, not a column at every K of the ranked table.
    assert not any(
        key[3].startswith("cold_recall@") and key[3] != "cold_recall@20" for key in page.cells
    )
    rows = {c["data-baseline"]: c["cells"] for c in page.claims}
    paired = rows["hybrid_frozen"]
    assert paired[5:7] == ["0.5000", "0.1667"]
    diff, low, high = interval(paired[7])
    assert diff == pytest.approx(1 / 3, abs=1e-4)  # differences 0.5, 0.5, 0 over 3 users
    assert 0.0 <= low <= diff <= high <= 0.5
    assert rows["als"][5] == "not available: cold_recall@20 is defined for different users"
    summary = report_summary(protocols)["cold_item"]["mixed"]
    assert summary["hybrid"]["cold_recall@20"] == pytest.approx(0.5)
    assert summary["hybrid_frozen"]["cold_recall@20"] == pytest.approx(1 / 6)
    assert summary["hybrid"]["ndcg@10"] == pytest.approx(0.35)
