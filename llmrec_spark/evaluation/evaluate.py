"""Offline evaluation: protocols, baselines and ablations on one split, full ranking, one report.

Per protocol (`llmrec_spark.stages.splits`) the models are fitted on the split's training events
only -- ALS (`als.fit_als`) and the text tower (`contrastive.fit_text_tower`) -- and six
models are ranked against the same candidates with the product's own scorer
(`recommend.hybrid_scores`): popularity, ALS, frozen text, fine-tuned text, ALS + frozen text
and the hybrid that ships (ALS + fine-tuned text). Metrics are Spark RankingMetrics
definitions over the full candidate ranking with training items excluded (`metrics`).
The test users are scored on the driver: at most `evaluate.max_test_users` (a seeded sample).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.core.metrics import (
    auc_from_scores,
    average_recommendation_popularity,
    catalog_coverage,
    mean_metrics,
    ndcg_at_k,
    novelty,
    per_user_metrics,
)
from llmrec_spark.errors import ConfigError, InputError
from llmrec_spark.evaluation.report import (
    MODEL_ORDER,
    Claim,
    Draw,
    ModelResult,
    ProtocolResult,
    ViewResult,
    draw_summary,
    report_summary,
    write_report,
)
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.stages import als, recommend, splits
from llmrec_spark.stages.recommend import Mix
from llmrec_spark.stages.splits import user_temporal_split

log = logging.getLogger(__name__)

__all__ = ["MODELS", "mean_metrics", "ndcg_at_k", "run_evaluate", "user_temporal_split"]

MODELS = MODEL_ORDER  # every model evaluate ranks, in the report's order
# The models that score with ALS factors alone (they cannot rank cold items).
ALS_ONLY = ("als", "als_recent")
DESCRIPTIONS = {
    "user_temporal": "each user's last share of events by time is held out; the warm bar",
    "cold_item": "a seeded share of items with enough positives lose all training events",
    "global_temporal": "the last share of all events by time is held out (few test users)",
}
BLOCK = 512  # users per score matrix on the driver


@dataclass
class Fitted:
    """One split with its models fitted: item matrices, tuned text, test users in a fixed order."""

    items: recommend.ItemMatrices  # ALS factors + frozen text
    tuned: np.ndarray | None  # (n, out_dim) unit rows of the fine-tuned tower, or None
    users: list[str]
    user_als: np.ndarray | None  # (u, rank)
    user_has_als: np.ndarray  # (u,)
    histories: list[np.ndarray]  # training item indices per user
    relevant: list[np.ndarray]  # test positives (item indices) per user
    cold: np.ndarray | None  # (n,) bool: cold items (cold_item protocol)
    train_users_per_item: np.ndarray  # (n,) distinct training users per item
    n_train_users: int

    def variant(self, model: str) -> recommend.ItemMatrices | None:
        """The item matrices model `model` scores with (None: the model cannot be built)."""
        m = self.items
        tuned: dict[str, Any] = {}
        if self.tuned is not None:
            tuned = {"text": self.tuned, "has_text": np.linalg.norm(self.tuned, axis=1) > 0}
        if model == "popularity":
            return dataclasses.replace(m, als=None, has_als=None, text=None, has_text=None)
        if model in ALS_ONLY:  # als_recent: its Mix adds the recent-items term
            return None if m.als is None else dataclasses.replace(m, text=None, has_text=None)
        if model in ("text_frozen", "text_frozen_kernel"):  # the latter: its Mix has a kernel
            return None if m.text is None else dataclasses.replace(m, als=None, has_als=None)
        if model == "text_finetuned":
            return dataclasses.replace(m, als=None, has_als=None, **tuned) if tuned else None
        if model == "hybrid_frozen":
            return m if m.als is not None and m.text is not None else None
        if model == "hybrid":
            return dataclasses.replace(m, **tuned) if tuned and m.als is not None else None
        raise ValueError(f"unknown model {model!r}")


# ---------------------------------------------------------------------------------------
# Fitting on a split (Spark for ALS and the tower; the rest collected to the driver)


def fit_split(
    ctx: RunContext,
    split: splits.Split,
    *,
    catalog: DataFrame,
    embeddings: DataFrame | None,
    work_dir: str,
    max_test_users: int,
    seed: int,
    tower: bool = True,
) -> Fitted:
    """Fit ALS and (with `tower`) the text tower on split.train; collect the test users."""
    from llmrec_spark.stages import contrastive

    train = split.train.cache()
    pairs = als.interactions(train).cache()
    factors = als.fit_als(pairs, ctx.cfg.als)
    frame = recommend.item_frame(
        catalog,
        popularity=recommend.popularity_frame(train),
        item_factors=factors.items,
        embeddings=embeddings,
        apply_rules=False,
    ).cache()
    item_pd = frame.toPandas()
    items = recommend.item_matrices(item_pd)
    index = {item: k for k, item in enumerate(items.item_ids)}

    tuned = None
    if tower and embeddings is not None and items.text is not None:
        current = contrastive.with_item_index(embeddings.select("item_id", "embedding"))
        current = current.withColumn("dim", F.size("embedding")).cache()
        fit = contrastive.fit_text_tower(
            ctx,
            ctx.cfg.contrastive,
            train,
            current,
            work_dir=os.path.join(work_dir, "tower"),
            head_metadata={"base_model_id": "evaluation", "protocol": split.protocol},
        )
        current.unpersist()
        embedder = contrastive.load_head(fit.head_dir)
        assert items.has_text is not None
        tuned = _apply_head(embedder, items.text, items.has_text)

    test: pd.DataFrame = split.test.toPandas()
    users = sorted(test["user_id"].unique())
    if len(users) > max_test_users:
        rng = np.random.default_rng(seed)
        users = sorted(rng.choice(np.array(users, dtype=object), max_test_users, replace=False))
    test = test[test["user_id"].isin(set(users))]
    relevant_by_user = {
        u: np.array(sorted(index[i] for i in g["item_id"] if i in index), dtype=np.int64)
        for u, g in test.groupby("user_id")
    }
    user_pd: pd.DataFrame = recommend.user_frame(
        ctx.spark.createDataFrame([(u,) for u in users], "user_id string"),
        history=train.select("user_id", "item_id", "event_ts"),
        item_index=frame.select("item_id", "item_idx"),
        user_factors=factors.users,
    ).toPandas()
    user_pd = user_pd.set_index("user_id").loc[users]
    has_als = user_pd["als_features"].map(lambda v: v is not None and len(v) > 0).to_numpy(bool)
    user_als = None
    if items.als is not None:
        user_als = np.zeros((len(users), items.als.shape[1]), dtype=np.float32)
        for row, vector in enumerate(user_pd["als_features"]):
            if vector is not None and len(vector):
                user_als[row] = np.asarray(vector, dtype=np.float32)
    histories = [np.asarray(h if h is not None else [], dtype=np.int64) for h in user_pd["history"]]
    per_item: pd.DataFrame = (
        pairs.join(frame.select("item_id", "item_idx"), "item_id")
        .groupBy("item_idx")
        .agg(F.countDistinct("user_id").alias("users"))
        .toPandas()
    )
    train_users_per_item = np.zeros(items.size, dtype=np.float64)
    train_users_per_item[per_item["item_idx"].to_numpy()] = per_item["users"].to_numpy()
    n_train_users = int(pairs.select("user_id").distinct().count())
    cold = None
    if split.cold_items is not None:
        cold_ids = {r["item_id"] for r in split.cold_items.collect()}
        cold = np.array([i in cold_ids for i in items.item_ids], dtype=bool)
        if items.has_als is not None and (items.has_als & cold).any():
            raise AssertionError("cold items have ALS factors: they leaked into training")
    for df in (frame, pairs, train):
        df.unpersist()
    return Fitted(
        items=items,
        tuned=tuned,
        users=list(users),
        user_als=user_als,
        user_has_als=has_als,
        histories=histories,
        relevant=[relevant_by_user.get(u, np.zeros(0, np.int64)) for u in users],
        cold=cold,
        train_users_per_item=train_users_per_item,
        n_train_users=max(n_train_users, 1),
    )


def _apply_head(head: Any, text: np.ndarray, has_text: np.ndarray) -> np.ndarray:
    import torch

    out = np.zeros((len(text), head.out_dim), dtype=np.float32)
    with torch.inference_mode():
        out[has_text] = head(torch.from_numpy(np.ascontiguousarray(text[has_text]))).numpy()
    return out


# ---------------------------------------------------------------------------------------
# Ranking one view


@dataclass
class Ranked:
    """Top-k item indices per user (-1 padded) and each user's positive ranks among candidates."""

    top: np.ndarray  # (u, k)
    auc: np.ndarray  # (u,) NaN where undefined


TIE_ORDER_SEED = 20261203


def tie_order(n_items: int) -> np.ndarray:
    """The seeded permutation of item indices in which `rank_view` lists tied scores."""
    return np.random.default_rng(TIE_ORDER_SEED).permutation(n_items)


def rank_view(
    fitted: Fitted,
    matrices: recommend.ItemMatrices,
    params: Mix,
    *,
    rows: np.ndarray,
    relevant: Sequence[np.ndarray],
    candidates: np.ndarray | None,
    k: int,
) -> Ranked:
    """Rank the candidates (None: every item) for the users at `rows`, training items excluded.

    Tied scores are listed in a fixed pseudo-random item order (`tie_order`), not by index:
    popularity scores every cold item 0, and index order would make its cold-only list the
    first item ids, a baseline below random order.
    """
    order = tie_order(fitted.items.size)
    top = np.full((len(rows), k), -1, dtype=np.int64)
    auc = np.full(len(rows), np.nan)
    for start in range(0, len(rows), BLOCK):
        block = rows[start : start + BLOCK]
        scores, _, _ = recommend.hybrid_scores(
            None if fitted.user_als is None else fitted.user_als[block],
            fitted.user_has_als[block],
            [fitted.histories[r] for r in block],
            matrices,
            mix=params,
        )
        in_view = np.ones(scores.shape, dtype=bool)
        for j, r in enumerate(block):
            in_view[j, fitted.histories[r]] = False
        if candidates is not None:
            in_view[:, ~candidates] = False
        scores = np.where(in_view, scores, -np.inf).astype(np.float32)
        indices, best = recommend.select_top_n(scores[:, order], k)
        for j in range(len(block)):
            keep = np.isfinite(best[j])
            top[start + j, : int(keep.sum())] = order[indices[j][keep]]
            auc[start + j] = _auc(scores[j], in_view[j], relevant[start + j])
    return Ranked(top=top, auc=auc)


def _auc(scores: np.ndarray, candidates: np.ndarray, positives: np.ndarray) -> float:
    """AUC over the candidates (bool mask): positives against the other candidates, ties half."""
    positive = np.zeros(len(candidates), dtype=bool)
    positive[positives] = True
    positive &= candidates
    values = np.where(np.isfinite(scores), scores, -np.inf)
    return auc_from_scores(values[positive], values[candidates & ~positive])


def view_result(
    fitted: Fitted,
    *,
    name: str,
    description: str,
    models: Mapping[str, tuple[recommend.ItemMatrices, Mix]],
    relevant: Sequence[np.ndarray],
    candidates: np.ndarray | None,
    ks: Sequence[int],
    cold_share: bool = False,
) -> ViewResult:
    """Every model ranked for the users with a relevant item in this view, metrics per user."""
    rows = np.array([r for r, rel in enumerate(relevant) if len(rel)], dtype=np.int64)
    rel_rows = [relevant[r] for r in rows]
    relevant_sets = {int(r): set(relevant[r].tolist()) for r in rows}
    n_candidates = int(candidates.sum()) if candidates is not None else fitted.items.size
    popularity: dict[Hashable, float] = dict(enumerate(fitted.train_users_per_item.tolist()))
    out: dict[str, ModelResult] = {}
    for model, (matrices, params) in models.items():
        ranked = rank_view(
            fitted,
            matrices,
            params,
            rows=rows,
            relevant=rel_rows,
            candidates=candidates,
            k=max([*ks, 20]) if cold_share else max(ks),
        )
        lists = {int(r): [i for i in ranked.top[j] if i >= 0] for j, r in enumerate(rows)}
        per_user = per_user_metrics(lists, relevant_sets, ks)
        scalars = {
            "auc": float(np.nanmean(ranked.auc)) if np.isfinite(ranked.auc).any() else math.nan
        }
        for k in ks:
            scalars[f"coverage@{k}"] = catalog_coverage(lists, max(n_candidates, 1), k)
        headline = 20 if 20 in ks else max(ks)
        scalars[f"novelty@{headline}"] = novelty(lists, popularity, fitted.n_train_users, headline)
        scalars[f"arp@{headline}"] = average_recommendation_popularity(lists, popularity, headline)
        if cold_share and fitted.cold is not None:
            # NaN for users without cold positives (a partial metric: its mean and interval
            # are over the users with some); users in per_user_metrics' (ascending) order.
            per_user["cold_recall@20"] = cold_shares(fitted, lists, 20)
        out[model] = ModelResult(per_user=per_user, scalars=scalars)
    return ViewResult(name=name, description=description, users=len(rows), models=out)


def protocol_result(
    fitted: Fitted,
    protocol: str,
    *,
    params: Mapping[str, Mix],
    ks: Sequence[int],
    models: Sequence[str] = MODELS,
) -> ProtocolResult:
    """The protocol's views (warm; or cold-only and mixed for cold_item) for every buildable model."""
    built = {}
    for model in models:
        matrices, mix = fitted.variant(model), params.get(model, Mix(0.0))
        if _same_as_text_frozen(model, mix):
            continue
        if matrices is not None:
            built[model] = (matrices, mix)
    description = DESCRIPTIONS.get(protocol, protocol)
    if fitted.cold is None:
        view = view_result(
            fitted,
            name="warm",
            description="candidates: every item the user has not trained on; relevant: held-out positives",
            models=built,
            relevant=fitted.relevant,
            candidates=None,
            ks=ks,
        )
        return ProtocolResult(protocol, description, [view])
    views = [
        cold_only_view(fitted, built, ks),
        view_result(
            fitted,
            name="mixed",
            description=(
                "candidates: every item the user has not trained on, cold included; relevant: "
                "all the user's test positives"
            ),
            models=built,
            relevant=fitted.relevant,
            candidates=None,
            ks=ks,
            cold_share=True,
        ),
    ]
    return ProtocolResult(protocol, description, views)


def _same_as_text_frozen(model: str, mix: Mix) -> bool:
    """text_frozen_kernel without a kernel ranks exactly as text_frozen: left out."""
    return model == "text_frozen_kernel" and mix.text_kernel <= 0


def cold_only_view(
    fitted: Fitted, models: Mapping[str, tuple[recommend.ItemMatrices, Mix]], ks: Sequence[int]
) -> ViewResult:
    """cold_item's cold-only view: the cold items ranked by every model that can score them."""
    assert fitted.cold is not None
    cold = fitted.cold
    return view_result(
        fitted,
        name="cold_only",
        description=(
            "candidates: the cold items; relevant: the user's positives on them "
            "(popularity: no cold item has training events, a seeded random order)"
        ),
        models={m: v for m, v in models.items() if m not in ALS_ONLY},  # no cold item has a factor
        relevant=[rel[cold[rel]] for rel in fitted.relevant],
        candidates=cold,
        ks=ks,
    )


def cold_only_recall(fitted: Fitted, model: str, params: Mix, k: int = 20) -> float | None:
    """`model`'s mean cold-only Recall@k on a cold_item split (None: it cannot be built)."""
    matrices = fitted.variant(model)
    if matrices is None or fitted.cold is None:
        return None
    result = cold_only_view(fitted, {model: (matrices, params)}, [k]).models.get(model)
    return float(result.per_user[f"recall@{k}"].mean()) if result is not None else -1.0


# ---------------------------------------------------------------------------------------
# Choosing the hybrids' mix on a validation split (never on the test split)


def tune_text_kernel(
    fitted: Fitted, model: str, *, kernels: Sequence[float], k: int = 20
) -> tuple[float | None, dict[str, float]]:
    """The text-only items' kernel (`Mix.text_kernel`, 0 = the mean vector) with the best
    cold-only Recall@k of `model` on a cold_item validation split; the first of equal means
    wins. Returns the kernel (None: the model cannot be built or no trial scored) and every
    trial's mean."""
    trials: dict[str, float] = {}
    best, best_kernel = -math.inf, None
    for kernel in kernels:
        recall = cold_only_recall(fitted, model, text_only_mix(kernel), k)
        if recall is None:
            return None, {}
        if math.isnan(recall):  # no validation user has a cold positive
            continue
        trials[f"k={kernel:g}"] = round(recall, 5)
        if recall > best:
            best, best_kernel = recall, float(kernel)
    log.info("evaluate: %s text kernel tuned on validation: %s (%s)", model, best_kernel, trials)
    return best_kernel, trials


def text_only_mix(kernel: float) -> Mix:
    """The Mix of a text-only model (text_finetuned, text_frozen_kernel): the plain history
    mean, new items matched with `kernel`."""
    return Mix(0.0, text_kernel=float(kernel))


def text_only_params(kernel: float) -> dict[str, Mix]:
    """text_finetuned's and text_frozen_kernel's Mix for the new items' `kernel`."""
    return dict.fromkeys(("text_finetuned", "text_frozen_kernel"), text_only_mix(kernel))


def tune_hybrid(
    fitted: Fitted,
    model: str,
    *,
    text_weights: Sequence[float],
    cold_offsets: Sequence[float],
    half_lives: Sequence[float] = (0.0,),
    recent_weights: Sequence[float] = (0.0,),
    recent_half_lives: Sequence[float] = (0.0,),
    text_kernel: float = 0.0,
    neighbour_factors: Sequence[int] = (0,),
    neighbour_temperature: float = 0.05,
    one_standard_error: bool = False,
    k: int = 10,
    admissible: Callable[[Mix], bool] | None = None,
) -> tuple[Mix, dict[str, float]]:
    """The `Mix` chosen by mean NDCG@k on a validation split, over the grid of every given
    text weight, cold offset, text half-life, recent weight, recent half-life and count of
    neighbours new items borrow a factor from (the text kernel fixed).

    The best mean wins; with `one_standard_error`, the trial with the smallest text weight
    (then recent weight), then the one that shows new items most, whose mean is within one
    standard error of the paired per-user difference from the best (the "one-SE rule": the
    weights closest to ALS alone that the validation cannot tell apart from the best; and of
    the new-item settings it cannot tell apart, the one that shows new items most, since a
    new item that is never shown never collects the events that make it known). On a split
    with cold items "shows most" is measured: the mean share of each user's cold positives in
    their top k; elsewhere the largest cold offset. Only trials `admissible` accepts are
    chosen from (all are scored). Returns the choice and every trial's mean.
    """
    matrices = fitted.variant(model)
    if matrices is None:
        return Mix(0.0), {}
    rows, relevant = _users_with_positives(fitted)
    if len(rows) == 0:
        return Mix(0.0), {}
    offsets = cold_offsets if fitted.cold is not None else [0.0]
    scored: list[tuple[Mix, np.ndarray]] = []  # per-user NDCG@k, users in sorted order
    shown: list[float] = []  # per trial: the mean share of cold positives in the top k
    grid = [
        Mix(
            float(w),
            float(b),
            float(h),
            float(r),
            float(hr),
            float(text_kernel),
            int(n),
            float(neighbour_temperature),
        )
        for w in text_weights
        for b in offsets
        for h in half_lives
        for r in recent_weights
        for hr in (recent_half_lives if r > 0 else recent_half_lives[:1])
        for n in neighbour_factors
    ]
    for params in grid:
        lists = _top_lists(fitted, matrices, params, rows, k)
        values = per_user_metrics(lists, relevant, [k])[f"ndcg@{k}"]
        scored.append((params, values))
        if fitted.cold is not None:
            shares = cold_shares(fitted, lists, k)
            shares = shares[~np.isnan(shares)]  # the users with cold positives
            shown.append(float(shares.mean()) if len(shares) else 0.0)
    keep = [j for j, (params, _) in enumerate(scored) if admissible is None or admissible(params)]
    trials = {
        trial_key(params) + ("" if j in keep else " (inadmissible)"): round(float(values.mean()), 5)
        for j, (params, values) in enumerate(scored)
    }
    if admissible is not None:
        scored = [scored[j] for j in keep]
        shown = [shown[j] for j in keep] if shown else shown
    if not scored:
        return Mix(0.0), trials
    chosen, best = pick_trial(
        scored, one_standard_error=one_standard_error, shown=shown if shown else None
    )
    if shown:
        log.info(
            "evaluate: %s share of cold positives in the top %d per trial: %s",
            model,
            k,
            {trial_key(p): round(v, 4) for (p, _), v in zip(scored, shown, strict=True)},
        )
    log.info(
        "evaluate: %s tuned on validation: %s (ndcg@%d %.4f; best %.4f)",
        model,
        chosen,
        k,
        _trial_mean(scored, chosen),
        best,
    )
    return chosen, trials


def describe_mix(params: Mix) -> str:
    """The mix as the report's notes print it."""
    return (
        f"text_weight={params.text_weight:g}, cold_offset={params.cold_offset:g}, "
        f"text_half_life={params.text_half_life:g}, recent_weight={params.recent_weight:g}, "
        f"recent_half_life={params.recent_half_life:g}, text_kernel={params.text_kernel:g}, "
        f"neighbour_factors={params.neighbour_factors}"
    )


def trial_key(params: Mix) -> str:
    """A trial's name in the tuning record: w, b, h; and r, hr when the recent term is on."""
    key = f"w={params.text_weight:g},b={params.cold_offset:g},h={params.text_half_life:g}"
    if params.recent_weight > 0:
        key += f",r={params.recent_weight:g},hr={params.recent_half_life:g}"
    if params.text_kernel > 0:
        key += f",k={params.text_kernel:g}"
    if params.neighbour_factors > 0:
        key += f",n={params.neighbour_factors}"
    return key


def _users_with_positives(fitted: Fitted) -> tuple[np.ndarray, dict[int, set[int]]]:
    """The rows of the users with a test positive, and each one's positives as a set."""
    rows = np.array([r for r, rel in enumerate(fitted.relevant) if len(rel)], dtype=np.int64)
    return rows, {int(r): set(fitted.relevant[r].tolist()) for r in rows}


def _top_lists(
    fitted: Fitted, matrices: recommend.ItemMatrices, params: Mix, rows: np.ndarray, k: int
) -> dict[int, list[int]]:
    """Each user's (row in `fitted`) top-k item indices over every unseen item."""
    ranked = rank_view(
        fitted,
        matrices,
        params,
        rows=rows,
        relevant=[fitted.relevant[r] for r in rows],
        candidates=None,
        k=k,
    )
    return {int(r): [i for i in ranked.top[j] if i >= 0] for j, r in enumerate(rows)}


def ndcg_per_user(fitted: Fitted, model: str, params: Mix, k: int = 10) -> np.ndarray:
    """Per-user NDCG@k of `model` under `params` over every unseen item, for the users with
    a test positive (in row order); empty when the model cannot be built."""
    matrices = fitted.variant(model)
    rows, relevant = _users_with_positives(fitted)
    if matrices is None or len(rows) == 0:
        return np.zeros(0)
    lists = _top_lists(fitted, matrices, params, rows, k)
    return per_user_metrics(lists, relevant, [k])[f"ndcg@{k}"]


def holds_on(candidate: np.ndarray, fallback: np.ndarray) -> tuple[bool, dict[str, float]]:
    """Whether per-user values `candidate` stay within one standard error of the paired
    `fallback` values (the same users), and both means."""
    if len(candidate) < 2:
        return True, {}
    diff = candidate - fallback
    se = _paired_se(diff)
    means = {
        "candidate": round(float(candidate.mean()), 5),
        "fallback": round(float(fallback.mean()), 5),
    }
    return _within_one_se(float(diff.mean()), se), means


def _paired_se(diff: np.ndarray) -> float:
    """Standard error of the mean of per-user paired differences (0 for fewer than two)."""
    n = len(diff)
    return float(diff.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0


def _within_one_se(mean_diff: float, se: float) -> bool:
    """Whether a mean paired difference is no worse than one standard error below zero,
    the boundary included.

    A change for one user alone (of n) has mean -d/n and standard error exactly d/n, so
    it sits on the boundary in exact arithmetic; a plain `>=` on the rounded floats then
    decides it either way, by the users' count and d (about half the cases went each way).
    """
    return mean_diff >= -se or math.isclose(mean_diff, -se, rel_tol=1e-9, abs_tol=0.0)


def cold_shares(fitted: Fitted, lists: Mapping[int, Sequence[int]], k: int) -> np.ndarray:
    """Per user (row of `fitted`, ascending): the share of their cold test positives in
    their top k; NaN for a user with none."""
    assert fitted.cold is not None
    shares = []
    for row in sorted(lists):
        cold_positives = fitted.relevant[row][fitted.cold[fitted.relevant[row]]]
        hits = np.intersect1d(list(lists[row])[:k], cold_positives)
        shares.append(len(hits) / len(cold_positives) if len(cold_positives) else math.nan)
    return np.array(shares, dtype=np.float64)


def pick_trial(
    scored: Sequence[tuple[Mix, np.ndarray]],
    *,
    one_standard_error: bool,
    shown: Sequence[float] | None = None,
) -> tuple[Mix, float]:
    """(chosen params, best mean) from per-user values of each trial (see `tune_hybrid`);
    `shown`: per trial, how much it shows new items (default: its cold offset)."""
    means = np.array([values.mean() for _, values in scored])
    best = int(np.argmax(means))  # the first of equal means
    if not one_standard_error:
        return scored[best][0], float(means[best])
    best_values = scored[best][1]
    close = []
    for k, (params, values) in enumerate(scored):
        if _within_one_se(float(means[k] - means[best]), _paired_se(values - best_values)):
            shows = shown[k] if shown is not None else params.cold_offset
            simpler = (params.text_weight, params.recent_weight, -shows)
            close.append((simpler, -means[k], k))
    return scored[min(close)[2]][0], float(means[best])


def _trial_mean(scored: Sequence[tuple[Mix, np.ndarray]], params: Mix) -> float:
    return float(next(values.mean() for p, values in scored if p == params))


# ---------------------------------------------------------------------------------------
# Running protocols end to end


def make_split(events: DataFrame, protocol: str, cfg: Any, *, seed: int) -> splits.Split:
    """Protocol `protocol` of `events` under evaluate config `cfg` (seeded)."""
    if protocol == "user_temporal":
        return splits.user_temporal(
            events, test_fraction=cfg.test_fraction, positive_min_weight=cfg.positive_min_weight
        )
    if protocol == "cold_item":
        return splits.cold_item(
            events,
            cold_fraction=cfg.cold_fraction,
            min_item_positives=cfg.cold_min_positives,
            test_fraction=cfg.test_fraction,
            positive_min_weight=cfg.positive_min_weight,
            seed=seed,
        )
    if protocol == "global_temporal":
        return splits.global_temporal(
            events, test_fraction=cfg.test_fraction, positive_min_weight=cfg.positive_min_weight
        )
    raise ConfigError(
        f"evaluate.protocols: unknown protocol {protocol!r}; choose from {splits.PROTOCOLS}"
    )


@dataclass
class Evaluation:
    """Every protocol's results, the hybrids' parameters and where the report is."""

    protocols: list[ProtocolResult]
    params: dict[str, Mix]
    tuning: dict[str, Any]
    report: str
    seconds: float
    draws: list[Draw] = dataclasses.field(default_factory=list)  # cold_item on other picks

    def summary(self) -> dict[str, Any]:
        return report_summary(self.protocols)


def evaluate_events(
    ctx: RunContext,
    events: DataFrame,
    *,
    catalog: DataFrame,
    frozen: DataFrame | None,
    protocols: Sequence[str],
    tune: bool,
    work_dir: str,
    title: str,
) -> Evaluation:
    """Run `protocols` on `events`: fit on each train part, rank, write the report."""
    cfg = ctx.cfg.evaluate
    ks = sorted(set(cfg.ks))
    if not ks or ks[0] <= 0:
        raise InputError(f"evaluate.ks must be positive integers, got {cfg.ks}")
    started = time.perf_counter()
    events = events.select("user_id", "item_id", "event_ts", "weight").cache()
    shipped = Mix.configured(ctx.cfg.recommend)
    params = {
        "hybrid": shipped,
        # LLM4Rec-style text: new items scored by text alone, as in `_tune`.
        "hybrid_frozen": dataclasses.replace(shipped, text_kernel=0.0, neighbour_factors=0),
        "als_recent": Mix(
            0.0, recent_weight=shipped.recent_weight, recent_half_life=shipped.recent_half_life
        ),
        **text_only_params(shipped.text_kernel),
    }
    tuning: dict[str, Any] = {}
    if tune:
        ctx, params, tuning = _tune(ctx, events, catalog, frozen, protocols, work_dir)

    def fit(protocol: str, seed: int, folder: str) -> Fitted:
        return fit_split(
            ctx,
            make_split(events, protocol, cfg, seed=seed),
            catalog=catalog,
            embeddings=frozen,
            work_dir=os.path.join(work_dir, folder),
            max_test_users=cfg.max_test_users,
            seed=cfg.seed,
        )

    results = []
    draws: list[Draw] = []  # cold_item on other seeded picks of the cold items
    for protocol in protocols:
        fitted = fit(protocol, cfg.seed, protocol)
        if not any(len(r) for r in fitted.relevant):
            log.warning("evaluate: %s has no test users; skipped", protocol)
            continue
        results.append(protocol_result(fitted, protocol, params=params, ks=ks))
        if protocol == "cold_item" and cfg.cold_item_draws > 0:
            draws.append(_draw(fitted, results[-1], cfg.seed, primary=True))
        log.info("evaluate: %s done (%.0fs so far)", protocol, time.perf_counter() - started)
    for k in range(1, cfg.cold_item_draws + 1 if draws else 0):
        seed = cfg.seed + 100 * k
        fitted = fit("cold_item", seed, f"cold_item-draw-{seed}")
        draws.append(
            _draw(fitted, protocol_result(fitted, "cold_item", params=params, ks=[20]), seed)
        )
        log.info("evaluate: cold_item draw %d: %s", seed, draws[-1].recall)
    events.unpersist()
    if not results:
        raise InputError(
            f"no user has a held-out positive (weight >= {cfg.positive_min_weight}) and "
            f"{splits.MIN_TRAIN_POSITIVES} training positives; nothing to evaluate"
        )
    notes = [
        "; ".join(
            f"{model}: {describe_mix(params[model])}"
            for model in (
                "als_recent",
                "text_finetuned",
                "text_frozen_kernel",
                "hybrid",
                "hybrid_frozen",
            )
            if model in params and not _same_as_text_frozen(model, params[model])
        )
        + (
            " (chosen on validation splits of the development part: the events every protocol trains on)"
            if tune
            else " (from config)"
        ),
        f"ALS rank {ctx.cfg.als.rank}, reg {ctx.cfg.als.reg_param}, alpha {ctx.cfg.als.alpha}, "
        f"{ctx.cfg.als.max_iter} iterations; tower {ctx.cfg.contrastive.members} member(s), "
        f"each {ctx.cfg.contrastive.epochs} epochs of {ctx.cfg.contrastive.batch_size} "
        f"examples per process and step, temperature {ctx.cfg.contrastive.temperature}",
    ]
    path = write_report(
        ctx.cfg.path(ctx.cfg.storage.reports_dir),
        title=title,
        ds=ctx.ds,
        protocols=results,
        claims=_claims(results),
        bootstrap_samples=cfg.bootstrap_samples,
        seed=cfg.seed,
        notes=notes,
        draws=draws,
    )
    return Evaluation(results, params, tuning, path, time.perf_counter() - started, draws)


def _draw(fitted: Fitted, result: ProtocolResult, seed: int, *, primary: bool = False) -> Draw:
    """The cold-only view of a cold_item result as a `Draw` (mean Recall@20 per model)."""
    view = next(v for v in result.views if v.name == "cold_only")
    return Draw(
        seed=seed,
        users=view.users,
        cold_items=0 if fitted.cold is None else int(fitted.cold.sum()),
        recall={
            m: float(np.mean(r.per_user["recall@20"]))
            for m, r in view.models.items()
            if "recall@20" in r.per_user and len(r.per_user["recall@20"])
        },
        primary=primary,
    )


EVENT_COLUMNS = ["user_id", "item_id", "event_ts", "weight"]


def development_part(events: DataFrame, protocols: Sequence[str], cfg: Any) -> DataFrame:
    """The events in the training part of every protocol's test split: what tuning may see.

    Validation splits are cut from this, so no choice made on them has seen a test event of
    any protocol: user_temporal's training part holds cold_item's cold positives, and
    cold_item's holds some of the events user_temporal holds out.
    """
    part = events.select(*EVENT_COLUMNS)
    for protocol in protocols:
        train = make_split(events, protocol, cfg, seed=cfg.seed).train
        part = part.join(train.select(*EVENT_COLUMNS), EVENT_COLUMNS, "left_semi")
    return part


def _tune(
    ctx: RunContext,
    events: DataFrame,
    catalog: DataFrame,
    frozen: DataFrame | None,
    protocols: Sequence[str],
    work_dir: str,
) -> tuple[RunContext, dict[str, Mix], dict[str, Any]]:
    """ALS and text weights on user_temporal validation; on cold_item validation the tuned
    text's kernel for items scored by text alone, then the cold offsets.

    Returns the context to fit the test splits with (its ALS config the chosen one), the
    hybrids' parameters and every trial's validation NDCG@10.
    """
    cfg = ctx.cfg.evaluate
    chosen: dict[str, Mix] = {}
    dev = development_part(events, protocols, cfg).cache()
    tuning: dict[str, Any] = {"development_events": dev.count()}
    log.info(
        "evaluate: tuning on the %d events in every protocol's training part",
        tuning["development_events"],
    )
    kernel = ctx.cfg.recommend.text_kernel  # the text-only items' kernel (frozen text: none)
    # The recent term and text choices made on user_temporal, kept for the cold_offset search.
    shipped = Mix.configured(ctx.cfg.recommend)
    warm = {
        "hybrid": Mix(
            0.0,
            text_kernel=kernel,
            neighbour_factors=shipped.neighbour_factors,
            neighbour_temperature=shipped.neighbour_temperature,
        ),
        "hybrid_frozen": Mix(0.0),  # LLM4Rec-style text: new items scored by text alone
    }
    chosen.update(text_only_params(kernel))
    if cfg.tune_tower_temperatures and "cold_item" in protocols and frozen is not None:
        ctx, tuning["tower"] = _tune_tower(ctx, dev, catalog, frozen, work_dir)
    validation: dict[str, Fitted] = {}
    # The catalog's items that have events in the development part: the others (the test
    # splits' cold items, items whose every event is held out) do not exist in it.
    dev_items = {r["item_id"] for r in dev.select("item_id").distinct().collect()}
    for protocol in ("user_temporal", "cold_item"):
        if protocol not in protocols and protocol != "user_temporal":
            continue
        # Validation: the same protocol applied to the development part, with another seed.
        inner = make_split(dev, protocol, cfg, seed=cfg.seed + 1)
        if protocol == "user_temporal" and cfg.tune_als_reg_params and cfg.tune_als_alphas:
            ctx, tuning["als"] = _tune_als(ctx, inner, catalog, cfg)
        fitted = fit_split(
            ctx,
            inner,
            catalog=catalog,
            embeddings=frozen,
            work_dir=os.path.join(work_dir, "validation", protocol),
            max_test_users=cfg.max_test_users,
            seed=cfg.seed,
        )
        fitted = only_items_in(fitted, dev_items)
        validation[protocol] = fitted
        if protocol == "user_temporal":
            # First the collaborative score alone: ALS with the recent-items term.
            recent, trials = tune_hybrid(
                fitted,
                "als_recent",
                text_weights=[0.0],
                cold_offsets=[0.0],
                recent_weights=cfg.tune_recent_weights,
                recent_half_lives=cfg.tune_recent_half_lives,
                one_standard_error=cfg.tune_one_standard_error,
            )
            chosen["als_recent"] = recent
            tuning[f"{protocol}.als_recent"] = trials
        elif cfg.tune_text_kernels:
            # The tuned tower's text-only score first; the shipped hybrid scores new items so.
            tuned, tuning[f"{protocol}.text_finetuned"] = tune_text_kernel(
                fitted, "text_finetuned", kernels=cfg.tune_text_kernels
            )
            if tuned is not None:  # else the configured kernel stays
                chosen.update(text_only_params(tuned))
                warm["hybrid"] = dataclasses.replace(warm["hybrid"], text_kernel=tuned)
        for model in ("hybrid", "hybrid_frozen"):
            if protocol == "user_temporal":
                params, trials = tune_hybrid(
                    fitted,
                    model,
                    text_weights=cfg.tune_text_weights,
                    cold_offsets=[0.0],
                    half_lives=cfg.tune_text_half_lives,
                    recent_weights=[chosen["als_recent"].recent_weight],
                    recent_half_lives=[chosen["als_recent"].recent_half_life],
                    text_kernel=warm[model].text_kernel,
                    neighbour_factors=[warm[model].neighbour_factors],
                    neighbour_temperature=warm[model].neighbour_temperature,
                    one_standard_error=cfg.tune_one_standard_error,
                )
                warm[model] = params  # its cold_offset is 0.0
            else:
                params, trials = tune_hybrid(
                    fitted,
                    model,
                    text_weights=[warm[model].text_weight],
                    cold_offsets=cfg.tune_cold_offsets,
                    half_lives=[warm[model].text_half_life],
                    recent_weights=[warm[model].recent_weight],
                    recent_half_lives=[warm[model].recent_half_life],
                    text_kernel=warm[model].text_kernel,
                    neighbour_factors=(
                        (cfg.tune_neighbour_factors or [warm[model].neighbour_factors])
                        if model == "hybrid"
                        else [0]
                    ),
                    neighbour_temperature=warm[model].neighbour_temperature,
                    one_standard_error=cfg.tune_one_standard_error,
                    admissible=_costs_no_warm_hits(validation["user_temporal"], model, warm[model]),
                )
            chosen[model] = dataclasses.replace(
                warm[model],
                cold_offset=params.cold_offset,
                neighbour_factors=params.neighbour_factors,
            )
            tuning[f"{protocol}.{model}"] = trials
    dev.unpersist()
    return ctx, chosen, tuning


def only_items_in(fitted: Fitted, item_ids: set[str]) -> Fitted:
    """`fitted` with the items outside `item_ids` made ineligible: never a candidate.

    A validation split is cut from the development part, whose catalog still lists the
    items the test splits hold out whole; in the validation's world they have no events at
    all, so no user can want them, and ranking them only adds noise (the more a setting lets
    new items in, the more it is penalised for them).
    """
    present = np.array([item in item_ids for item in fitted.items.item_ids], dtype=bool)
    items = dataclasses.replace(fitted.items, eligible=fitted.items.eligible & present)
    return dataclasses.replace(fitted, items=items)


def _costs_no_warm_hits(warm_split: Fitted, model: str, warm: Mix) -> Callable[[Mix], bool]:
    """Whether a new-item setting (cold offset, borrowed factors) tried on the cold_item
    validation split keeps the user_temporal validation's NDCG@10 within one standard
    error of `warm`, the mix chosen there, without an offset or borrowing.

    The two protocols' new items differ: cold_item makes cold only items with five or more
    positive users, while on user_temporal the items without training events are the rare
    ones whose every event is held out. A setting that lifts the first kind into the lists
    also lifts the second, so it is chosen only where it costs the warm lists nothing the
    validation can tell.
    """

    baseline = ndcg_per_user(
        warm_split, model, dataclasses.replace(warm, cold_offset=0.0, neighbour_factors=0)
    )

    def admissible(params: Mix) -> bool:
        candidate = dataclasses.replace(
            warm, cold_offset=params.cold_offset, neighbour_factors=params.neighbour_factors
        )
        holds, means = holds_on(ndcg_per_user(warm_split, model, candidate), baseline)
        log.info(
            "evaluate: %s %s on user_temporal validation: ndcg@10 %s against %s: %s",
            model,
            trial_key(params),
            means.get("candidate"),
            means.get("fallback"),
            "admissible" if holds else "inadmissible",
        )
        return holds

    return admissible


def _tune_tower(
    ctx: RunContext,
    dev: DataFrame,
    catalog: DataFrame,
    frozen: DataFrame | None,
    work_dir: str,
) -> tuple[RunContext, dict[str, Any]]:
    """The tower's temperature with the best cold-only Recall@20 of text_finetuned on a
    cold_item validation split of `dev` (`development_part`); ctx with that contrastive
    config."""
    cfg = ctx.cfg.evaluate
    inner = make_split(dev, "cold_item", cfg, seed=cfg.seed + 1)

    def cold_recall(trial: RunContext) -> float | None:
        fitted = fit_split(
            trial,
            inner,
            catalog=catalog,
            embeddings=frozen,
            work_dir=os.path.join(
                work_dir, "validation", f"tower-{trial.cfg.contrastive.temperature:g}"
            ),
            max_test_users=cfg.max_test_users,
            seed=cfg.seed,
        )
        return cold_only_recall(fitted, "text_finetuned", Mix(0.0))

    candidates = [
        (
            f"temperature={t:g}",
            dataclasses.replace(
                ctx.cfg,
                contrastive=dataclasses.replace(ctx.cfg.contrastive, temperature=float(t)),
            ),
        )
        for t in cfg.tune_tower_temperatures
    ]
    tuned, trials = _best_config(ctx, candidates, cold_recall)
    temperature = tuned.cfg.contrastive.temperature
    log.info("evaluate: tower tuned on validation: temperature %s (%s)", temperature, trials)
    return tuned, {"trials": trials, "temperature": temperature}


def _tune_als(
    ctx: RunContext, inner: splits.Split, catalog: DataFrame, cfg: Any
) -> tuple[RunContext, dict[str, Any]]:
    """ALS reg_param x alpha with the best validation NDCG@10 (ALS alone); ctx with that ALS config."""

    def als_ndcg(trial: RunContext) -> float:
        fitted = fit_split(
            trial,
            inner,
            catalog=catalog,
            embeddings=None,
            work_dir="",
            max_test_users=cfg.max_test_users,
            seed=cfg.seed,
            tower=False,
        )
        _, scores = tune_hybrid(fitted, "als", text_weights=[0.0], cold_offsets=[0.0])
        return next(iter(scores.values()), -1.0)

    candidates = [
        (
            f"reg={reg:g},alpha={alpha:g}",
            dataclasses.replace(
                ctx.cfg,
                als=dataclasses.replace(ctx.cfg.als, reg_param=float(reg), alpha=float(alpha)),
            ),
        )
        for reg in cfg.tune_als_reg_params
        for alpha in cfg.tune_als_alphas
    ]
    tuned, trials = _best_config(ctx, candidates, als_ndcg)
    chosen = tuned.cfg.als
    log.info("evaluate: ALS tuned on validation: reg %s alpha %s", chosen.reg_param, chosen.alpha)
    return tuned, {"trials": trials, "reg_param": chosen.reg_param, "alpha": chosen.alpha}


def _best_config(
    ctx: RunContext,
    candidates: Sequence[tuple[str, Any]],
    score: Callable[[RunContext], float | None],
) -> tuple[RunContext, dict[str, float]]:
    """ctx with the candidate config (label, Config) of the highest validation score (the first
    of equal scores; ctx itself when none scores), and every scored trial's value. A score of
    None (the trial could not be built) is left out."""
    trials: dict[str, float] = {}
    best: tuple[float, RunContext] = (-1.0, ctx)
    for label, config in candidates:
        trial = dataclasses.replace(ctx, cfg=config)
        value = score(trial)
        if value is None:
            continue
        trials[label] = round(value, 5)
        if value > best[0] + 1e-12:
            best = (value, trial)
    return best[1], trials


def _claims(results: Sequence[ProtocolResult]) -> list[Claim]:
    wanted = [
        ("user_temporal", "warm", "ndcg@10", "hybrid", "als"),
        ("user_temporal", "warm", "ndcg@10", "hybrid", "hybrid_frozen"),
        ("user_temporal", "warm", "ndcg@10", "hybrid", "als_recent"),
        ("user_temporal", "warm", "ndcg@10", "als_recent", "als"),
        ("cold_item", "cold_only", "recall@20", "text_finetuned", "text_frozen"),
        ("cold_item", "cold_only", "recall@20", "text_finetuned", "text_frozen_kernel"),
        ("cold_item", "cold_only", "recall@20", "text_frozen_kernel", "text_frozen"),
        ("cold_item", "mixed", "ndcg@10", "hybrid", "als"),
        ("cold_item", "mixed", "ndcg@10", "hybrid", "hybrid_frozen"),
        ("cold_item", "mixed", "cold_recall@20", "hybrid", "hybrid_frozen"),
    ]
    present = {(p.name, v.name, m) for p in results for v in p.views for m in v.models}
    return [
        Claim(protocol=p, view=v, metric=metric, model=a, baseline=b)
        for p, v, metric, a, b in wanted
        if (p, v, a) in present and (p, v, b) in present
    ]


def run_evaluate(ctx: RunContext) -> StageResult:
    """The nightly evaluation: configured protocols on the training window ending at ctx.ds."""
    from llmrec_spark.core import encoder
    from llmrec_spark.stages import embed

    cfg = ctx.cfg.evaluate
    window = als.training_window(ctx.store.read("events_clean"), ctx.ds, ctx.cfg.als.train_days)
    base_id = encoder.base_model_id(ctx.cfg.embed)
    frozen: DataFrame | None = embed.latest_embeddings(ctx.store, base_id, ctx.cfg.embed).select(
        "item_id", "embedding"
    )
    if frozen is not None and frozen.limit(1).count() == 0:
        log.warning("evaluate: no %s embeddings in item_embeddings; text models skipped", base_id)
        frozen = None
    evaluation = evaluate_events(
        ctx,
        window,
        catalog=ctx.store.read("items"),
        frozen=frozen,
        protocols=cfg.protocols,
        tune=cfg.tune_hybrid,
        work_dir=ctx.model_dir("evaluation"),
        title=f"llmrec offline evaluation {ctx.ds}",
    )
    summary = evaluation.summary()
    first = evaluation.protocols[0]
    metrics: dict[str, float] = {}
    for protocol in evaluation.protocols:
        for view in protocol.views:
            for model, values in summary[protocol.name][view.name].items():
                for key, value in values.items():
                    if value is None:
                        continue
                    metrics[f"{protocol.name}.{view.name}.{model}.{key}"] = float(value)
                    if protocol is first and view is first.views[0]:
                        metrics[f"{model}.{key}"] = float(value)  # the gate's names
    metrics["test_users"] = float(first.views[0].users)
    headline = f"ndcg@{10 if 10 in cfg.ks else min(cfg.ks)}"
    warm = summary[first.name][first.views[0].name]
    return StageResult(
        rows_in=first.views[0].users,
        metrics=metrics,
        params={f"evaluate.{k}": v for k, v in vars(cfg).items()}
        | {"evaluate.text_model": base_id},
        artifacts={"evaluation_report": evaluation.report},
        summary={
            "protocols": ", ".join(p.name for p in evaluation.protocols),
            "test_users": first.views[0].users,
            headline: {m: round(v[headline], 4) for m, v in warm.items() if headline in v},
            "seconds": round(evaluation.seconds, 1),
            "report": evaluation.report,
        },
    )


# ---------------------------------------------------------------------------------------
# `llmrec bench quality`: a public dataset through the pipeline, both bar protocols


def quality_json(evaluation: Evaluation) -> dict[str, Any]:
    """The bench's JSON: per protocol and model the bar's metrics (cold_item: cold-only + mixed)."""
    summary = evaluation.summary()
    out: dict[str, Any] = {}
    if "user_temporal" in summary:
        out["user_temporal"] = {
            model: {k: round(v, 4) for k, v in values.items() if not _nan(v)}
            for model, values in summary["user_temporal"]["warm"].items()
        }
    if "cold_item" in summary:
        cold_only = summary["cold_item"].get("cold_only", {})
        mixed = summary["cold_item"].get("mixed", {})
        out["cold_item"] = {}
        for model in MODELS:
            if model not in cold_only and model not in mixed:
                continue
            row = {
                "recall@20": cold_only.get(model, {}).get("recall@20"),
                "ndcg@20": cold_only.get(model, {}).get("ndcg@20"),
                "mixed_ndcg@10": mixed.get(model, {}).get("ndcg@10"),
                "mixed_cold_recall@20": mixed.get(model, {}).get("cold_recall@20"),
            }
            out["cold_item"][model] = {k: round(v, 4) for k, v in row.items() if not _nan(v)}
    if evaluation.draws:
        models = [m for m in MODELS if any(m in d.recall for d in evaluation.draws)]
        out["cold_item_draws"] = {
            "seeds": [d.seed for d in evaluation.draws],
            "cold_items": [d.cold_items for d in evaluation.draws],
            "recall@20": {
                m: [round(d.recall[m], 4) if m in d.recall else None for d in evaluation.draws]
                for m in models
            },
            "mean_recall@20": {
                m: round(v["mean"], 4) for m, v in draw_summary(evaluation.draws).items()
            },
        }
    return out


def _nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
