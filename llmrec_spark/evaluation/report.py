"""The evaluation's results and their statistics: per protocol, view and model the per-user
metrics and scalars, their means and bootstrap intervals, and the JSON-ready summaries.

`ProtocolResult`s are what `ranking` produces and `report_html` draws: each model's per-user
metrics (for means and bootstrap intervals) and scalars (AUC, coverage, novelty, ARP).
`Claim`s name the differences the report states; each is paired over the view's users.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmrec_spark.core.metrics import METRIC_FUNCTIONS, bootstrap_interval

MODEL_ORDER = (
    "popularity",
    "profile_text",
    "als",
    "implicit_als",
    "vae",
    "als_recent",
    "text_frozen",
    "text_frozen_kernel",
    "text_finetuned",
    "text_encoder_tuned",
    "hybrid_frozen",
    "hybrid_no_slots",
    "hybrid",
    "hybrid_vae",
)

LIST_METRICS = tuple(METRIC_FUNCTIONS)  # precision, recall, f1, ndcg, map, hit_rate

# Per-user metrics defined for some of a view's users only (NaN for the others): the mixed
# view's share of a user's cold positives in the top K, for users with cold positives.
# Means and intervals are over the users it is defined for; tabled beside the scalars.
PARTIAL_METRICS = ("cold_recall",)


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


def report_summary(protocols: Sequence[ProtocolResult]) -> dict[str, Any]:
    """{protocol: {view: {model: {metric: mean}}}} over per-user metrics and scalars.

    Means of empty or non-finite values are None, so the result serialises as strict JSON.
    """
    out: dict[str, Any] = {}
    for protocol in protocols:
        views = out.setdefault(protocol.name, {})
        for view in protocol.views:
            models = views.setdefault(view.name, {})
            for model in ordered(view.models):
                result = view.models[model]
                means = {
                    key: finite_or_none(mean_of(defined(key, v)))
                    for key, v in result.per_user.items()
                }
                means |= {key: finite_or_none(v) for key, v in result.scalars.items()}
                models[model] = means
    return out


def draw_summary(draws: Sequence[Draw]) -> dict[str, dict[str, float]]:
    """Per model with a finite value in some draw: the mean, min and max over the draws."""
    out = {}
    for model in ordered({m for d in draws for m in d.recall}):
        values = [d.recall[model] for d in draws if math.isfinite(d.recall.get(model, math.nan))]
        if values:
            out[model] = {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}
    return out


class Stats:
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
                values = defined(key, result.per_user[key])
                low, high = bootstrap_interval(values, samples=self.samples, seed=self.seed)
                self._cache[cache_key] = (mean_of(values), low, high)
            return self._cache[cache_key]
        if key in result.scalars:
            return (float(result.scalars[key]), math.nan, math.nan)
        return NAN_STAT


def claim_values(
    protocols: Sequence[ProtocolResult], claim: Claim
) -> tuple[tuple[np.ndarray, np.ndarray] | None, str]:
    """The claim's model and baseline per-user values, paired over the same users; or None
    and the reason the claim cannot be checked."""
    view = find_view(protocols, claim.protocol, claim.view)
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
    if is_partial(claim.metric):  # paired over the users it is defined for, the same for both
        present = ~np.isnan(arrays[0])
        if (present != ~np.isnan(arrays[1])).any():
            return None, f"{claim.metric} is defined for different users"
        arrays = [arrays[0][present], arrays[1][present]]
    if arrays[0].size == 0:
        return None, "no test users"
    if not (np.isfinite(arrays[0]).all() and np.isfinite(arrays[1]).all()):
        return None, "non-finite per-user values"
    return (arrays[0], arrays[1]), ""


def mean_of(values: Iterable[float] | np.ndarray) -> float:
    array = np.asarray(values, dtype=np.float64)
    return float(array.mean()) if array.size else math.nan


def is_partial(key: str) -> bool:
    return split_key(key)[0] in PARTIAL_METRICS


def defined(key: str, values: Iterable[float] | np.ndarray) -> np.ndarray:
    """A per-user array without the users `key` is not defined for (NaN in a partial metric)."""
    array = np.asarray(values, dtype=np.float64)
    return array[~np.isnan(array)] if is_partial(key) else array


def finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def split_key(key: str) -> tuple[str, int | None]:
    """ "ndcg@10" -> ("ndcg", 10); "auc" -> ("auc", None)."""
    match = re.fullmatch(r"(.+)@(\d+)", key)
    return (match.group(1), int(match.group(2))) if match else (key, None)


def ordered(names: Iterable[str]) -> list[str]:
    """Known models in MODEL_ORDER, then the others alphabetically."""
    names = set(names)
    known = [m for m in MODEL_ORDER if m in names]
    return known + sorted(names - set(known))


def ordered_metrics(names: Iterable[str]) -> list[str]:
    """Known list metrics in LIST_METRICS order, then the others alphabetically."""
    names = set(names)
    known = [m for m in LIST_METRICS if m in names]
    return known + sorted(names - set(known))


def find_view(
    protocols: Sequence[ProtocolResult], protocol_name: str, view_name: str
) -> ViewResult | None:
    """The view `view_name` of protocol `protocol_name`, None when there is none."""
    for protocol in protocols:
        if protocol.name == protocol_name:
            for view in protocol.views:
                if view.name == view_name:
                    return view
    return None
