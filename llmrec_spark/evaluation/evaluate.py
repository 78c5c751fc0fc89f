"""The evaluate stage: protocols, baselines and ablations on one split each, one report.

The nightly's `evaluate` measures the models that night trained, on the users it held out of
training (`evaluation.published`; `evaluate.holdout_fraction`); `evaluate-protocols` runs the
refitted suite below, on its own schedule (weekly in the bundle and the DAG).

Per protocol (`llmrec_spark.stages.splits`) the models are refitted on the split's training
events only (`refit`) and eight models are ranked against the same candidates (`ranking`):
popularity, ALS, ALS + recent items, frozen text (plain and with a kernel), fine-tuned text,
ALS + frozen text and the hybrid that ships (ALS + fine-tuned text). With tuning on, their
mixes are chosen on validation splits first (`validation`). `run_evaluate` is the nightly
stage; `evaluate_events` runs the same on any events (`llmrec bench quality`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pyspark.sql import DataFrame

from llmrec_spark.config import Config
from llmrec_spark.core.hybrid import Mix
from llmrec_spark.errors import ConfigError, InputError
from llmrec_spark.evaluation import profile_side, published
from llmrec_spark.evaluation.anchor import MODEL as ANCHOR
from llmrec_spark.evaluation.anchor import AnchorParams, attach_anchor
from llmrec_spark.evaluation.ranking import protocol_result, same_as_text_frozen
from llmrec_spark.evaluation.refit import UNSLOTTED, Fitted, fit_split, make_split
from llmrec_spark.evaluation.report import (
    MODEL_ORDER,
    Claim,
    Draw,
    ProtocolResult,
    report_summary,
)
from llmrec_spark.evaluation.report_html import write_report
from llmrec_spark.evaluation.tuning import describe_mix, text_only_params
from llmrec_spark.evaluation.validation import tune_on_validation
from llmrec_spark.runtime.context import RunContext, StageResult
from llmrec_spark.schema import EVENT_COLUMNS
from llmrec_spark.stages import als, splits

log = logging.getLogger(__name__)

# The differences the report states: (protocol, view, metric, model, baseline).
CLAIMS = (
    ("holdout", "warm", "ndcg@10", "hybrid", "als"),
    ("holdout", "warm", "ndcg@10", "hybrid", "hybrid_frozen"),
    ("holdout", "warm", "ndcg@10", "hybrid", "als_recent"),
    ("holdout", "warm", "ndcg@10", "hybrid", "popularity"),
    ("user_temporal", "warm", "ndcg@10", "hybrid", "als"),
    ("user_temporal", "warm", "ndcg@10", "hybrid", "implicit_als"),
    ("user_temporal", "warm", "ndcg@10", "als", "implicit_als"),
    ("user_temporal", "warm", "ndcg@10", "hybrid", "hybrid_frozen"),
    ("user_temporal", "warm", "ndcg@10", "hybrid", "als_recent"),
    ("user_temporal", "warm", "ndcg@10", "als_recent", "als"),
    ("user_temporal", "warm", "ndcg@10", "vae", "als"),
    ("user_temporal", "warm", "ndcg@10", "hybrid_vae", "hybrid"),
    ("holdout", "warm", "ndcg@10", "hybrid_vae", "hybrid"),
    ("cold_item", "mixed", "ndcg@10", "hybrid_vae", "hybrid"),
    ("cold_item", "cold_only", "recall@20", "text_finetuned", "text_frozen"),
    ("cold_item", "cold_only", "recall@20", "text_encoder_tuned", "text_finetuned"),
    ("cold_user", "warm", "ndcg@10", "profile_text", "popularity"),
    ("cold_user", "warm", "recall@20", "profile_text", "popularity"),
    ("cold_item", "cold_only", "recall@20", "text_finetuned", "text_frozen_kernel"),
    ("cold_item", "cold_only", "recall@20", "text_frozen_kernel", "text_frozen"),
    ("cold_item", "mixed", "ndcg@10", "hybrid", "als"),
    ("cold_item", "mixed", "ndcg@10", "hybrid", "implicit_als"),
    ("cold_item", "mixed", "ndcg@10", "hybrid", "hybrid_frozen"),
    ("cold_item", "mixed", "cold_recall@20", "hybrid", "hybrid_frozen"),
    # What the new-item slots cost on warm lists (they fill the list's last places, so
    # NDCG@20, not @10) and gain in shown new items.
    ("holdout", "warm", "ndcg@20", "hybrid", UNSLOTTED),
    ("user_temporal", "warm", "ndcg@20", "hybrid", UNSLOTTED),
    ("cold_item", "mixed", "ndcg@20", "hybrid", UNSLOTTED),
    ("cold_item", "mixed", "cold_recall@20", "hybrid", UNSLOTTED),
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


def run_evaluate(ctx: RunContext) -> StageResult:
    """The nightly evaluation: with `evaluate.holdout_fraction` > 0 the models trained for
    ctx.ds on the users they held out (`evaluation.published`, no refit); with 0 the protocol
    suite (`run_evaluate_protocols`)."""
    if ctx.cfg.evaluate.holdout_fraction <= 0:
        return run_evaluate_protocols(ctx)
    cfg = ctx.cfg.evaluate
    started = time.perf_counter()
    window = als.training_window(ctx.store.read("events_clean"), ctx.ds, ctx.cfg.als.train_days)
    frozen, base_id = _frozen_embeddings(ctx)
    split = published.holdout_split(ctx, window)
    fitted = published.published_fitted(ctx, split, catalog=ctx.store.read("items"), frozen=frozen)
    if not any(len(r) for r in fitted.relevant):
        raise InputError(
            f"evaluate: none of the holdout users (evaluate.holdout_fraction="
            f"{cfg.holdout_fraction:g} of the users) has a held-out positive (weight >= "
            f"{cfg.positive_min_weight:g}) and {splits.MIN_TRAIN_POSITIVES} training positives; "
            "raise evaluate.holdout_fraction"
        )
    params = _with_unslotted(_configured_params(ctx.cfg))
    results = [protocol_result(fitted, "holdout", params=params, ks=sorted(set(cfg.ks)))]
    path = write_report(
        ctx.cfg.path(ctx.cfg.storage.reports_dir),
        title=f"llmrec nightly evaluation {ctx.ds}",
        ds=ctx.ds,
        protocols=results,
        claims=_claims(results),
        bootstrap_samples=cfg.bootstrap_samples,
        seed=cfg.seed,
        notes=[
            f"The models trained for {ctx.ds}, measured on the "
            f"{cfg.holdout_fraction:.0%} of users whose last {cfg.test_fraction:.0%} of "
            "events that night's training left out; `llmrec evaluate-protocols` runs the "
            "refitted protocol suite",
            *_notes(ctx.cfg, params, tuned=False, tuning={}),
        ],
    )
    evaluation = Evaluation(results, params, {}, path, time.perf_counter() - started)
    return _stage_result(ctx, evaluation, base_id)


def run_evaluate_protocols(ctx: RunContext) -> StageResult:
    """The protocol suite (`evaluate.protocols`) on the training window ending at ctx.ds: every
    model refitted per protocol (`llmrec evaluate-protocols`; the nightly's evaluate with
    `evaluate.holdout_fraction` 0)."""
    cfg = ctx.cfg.evaluate
    window = als.training_window(ctx.store.read("events_clean"), ctx.ds, ctx.cfg.als.train_days)
    frozen, base_id = _frozen_embeddings(ctx)
    evaluation = evaluate_events(
        ctx,
        window,
        catalog=ctx.store.read("items"),
        frozen=frozen,
        protocols=cfg.protocols,
        tune=cfg.tune_hybrid,
        work_dir=ctx.model_dir("evaluation"),
        title=f"llmrec offline evaluation {ctx.ds}",
        profiles=profile_embeddings(ctx, base_id) if "cold_user" in cfg.protocols else None,
    )
    return _stage_result(ctx, evaluation, base_id)


def profile_embeddings(ctx: RunContext, base_id: str) -> DataFrame | None:
    """(user_id, embedding) of every profiled user's current profile text under the base
    model; None (logged) when there is none."""
    from llmrec_spark.stages.profiles import current_profiles

    profiles = current_profiles(ctx.store, ctx.cfg.embed, base_id)
    if profiles.limit(1).count() == 0:
        log.warning(
            "evaluate: no %s profile embeddings in user_embeddings; cold_user ranks popularity alone",
            base_id,
        )
        return None
    return profiles


def _frozen_embeddings(ctx: RunContext) -> tuple[DataFrame | None, str]:
    """(item_id, embedding) of the base model (None when it has none), and its model id."""
    from llmrec_spark.core import encoder
    from llmrec_spark.stages import embed

    base_id = encoder.base_model_id(ctx.cfg.embed)
    frozen: DataFrame | None = embed.latest_embeddings(ctx.store, base_id, ctx.cfg.embed).select(
        "item_id", "embedding"
    )
    if frozen is not None and frozen.limit(1).count() == 0:
        log.warning("evaluate: no %s embeddings in item_embeddings; text models skipped", base_id)
        frozen = None
    return frozen, base_id


def _stage_result(ctx: RunContext, evaluation: Evaluation, base_id: str) -> StageResult:
    """The stage's metrics (the gate reads the first protocol's first view), params, report."""
    cfg = ctx.cfg.evaluate
    summary = evaluation.summary()
    first = evaluation.protocols[0]
    headline = f"ndcg@{10 if 10 in cfg.ks else min(cfg.ks)}"
    warm = summary[first.name][first.views[0].name]
    return StageResult(
        rows_in=first.views[0].users,
        metrics=_stage_metrics(evaluation.protocols, summary),
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


def _stage_metrics(
    protocols: Sequence[ProtocolResult], summary: dict[str, Any]
) -> dict[str, float]:
    """Every defined mean as "protocol.view.model.metric"; the first view's also as
    "model.metric" (the names the metric gate reads), and its test users."""
    first = protocols[0]
    metrics: dict[str, float] = {}
    for protocol in protocols:
        for view in protocol.views:
            for model, values in summary[protocol.name][view.name].items():
                for key, value in values.items():
                    if value is None:
                        continue
                    metrics[f"{protocol.name}.{view.name}.{model}.{key}"] = float(value)
                    if protocol is first and view is first.views[0]:
                        metrics[f"{model}.{key}"] = float(value)  # the gate's names
    metrics["test_users"] = float(first.views[0].users)
    return metrics


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
    profiles: DataFrame | None = None,
) -> Evaluation:
    """Run `protocols` on `events`: fit on each train part, rank, write the report.
    `profiles` (user_id, embedding): the users' profile embeddings cold_user's user tower
    learns from (None: cold_user ranks popularity alone)."""
    cfg = ctx.cfg.evaluate
    ks = sorted(set(cfg.ks))
    if not ks or ks[0] <= 0:
        raise InputError(f"evaluate.ks must be positive integers, got {cfg.ks}")
    started = time.perf_counter()
    events = events.select(*EVENT_COLUMNS).cache()
    params = _configured_params(ctx.cfg)
    tuning: dict[str, Any] = {}
    if tune:
        ctx, params, tuning = tune_on_validation(ctx, events, catalog, frozen, protocols, work_dir)

    params = _with_unslotted(params)
    anchor = _anchor_params(cfg, tuning)

    def fit(protocol: str, seed: int, folder: str, vae: bool = True) -> Fitted:
        cold_user = protocol == profile_side.PROTOCOL  # no text tower, VAE or anchor there
        fitted = fit_split(
            ctx,
            make_split(events, protocol, cfg, seed=seed),
            catalog=catalog,
            embeddings=frozen,
            work_dir=os.path.join(work_dir, folder),
            max_test_users=cfg.max_test_users,
            seed=cfg.seed,
            tower=not cold_user,
            keep_pairs=anchor is not None and not cold_user,
            vae=vae and not cold_user,
            profiles=profiles if cold_user else None,
            encoder=protocol == "cold_item",  # text_encoder_tuned: ranked on cold items
        )
        if anchor is None or cold_user:
            return fitted
        return attach_anchor(fitted, anchor, positive_min_weight=cfg.positive_min_weight)

    results, draws = _rank_protocols(fit, protocols, params, ks, cfg, started)
    events.unpersist()
    if not results:
        raise InputError(
            f"no user has a held-out positive (weight >= {cfg.positive_min_weight}) and "
            f"{splits.MIN_TRAIN_POSITIVES} training positives; nothing to evaluate"
        )
    path = write_report(
        ctx.cfg.path(ctx.cfg.storage.reports_dir),
        title=title,
        ds=ctx.ds,
        protocols=results,
        claims=_claims(results),
        bootstrap_samples=cfg.bootstrap_samples,
        seed=cfg.seed,
        notes=_notes(ctx.cfg, params, tuned=tune, tuning=tuning),
        draws=draws,
    )
    return Evaluation(results, params, tuning, path, time.perf_counter() - started, draws)


def _anchor_params(cfg: Any, tuning: dict[str, Any]) -> AnchorParams | None:
    """The outside anchor's settings chosen on validation (None: evaluate.implicit_anchor off)."""
    if not cfg.implicit_anchor:
        return None
    if ANCHOR not in tuning:
        raise ConfigError(
            "evaluate.implicit_anchor needs evaluate.tune_hybrid: true (it is tuned on validation)"
        )
    record = tuning[ANCHOR]
    return AnchorParams(**{f.name: record[f.name] for f in dataclasses.fields(AnchorParams)})


def _with_unslotted(params: dict[str, Mix]) -> dict[str, Mix]:
    """`params` plus, when the hybrid has new-item slots, the same hybrid without them
    (UNSLOTTED: what the slots cost and gain); and hybrid_vae mixing as the hybrid does."""
    params["hybrid_vae"] = params["hybrid"]
    if params["hybrid"].new_item_slots > 0:
        params[UNSLOTTED] = dataclasses.replace(params["hybrid"], new_item_slots=0)
    return params


def _configured_params(cfg: Config) -> dict[str, Mix]:
    """The models' mixes from config, before any tuning: the hybrid as recommend ships it."""
    shipped = Mix.configured(cfg.recommend)
    return {
        "hybrid": shipped,
        # LLM4Rec-style text: new items scored by text alone, as in `tune_on_validation`.
        "hybrid_frozen": dataclasses.replace(
            shipped, text_kernel=0.0, neighbour_factors=0, new_item_slots=0
        ),
        "als_recent": Mix(
            0.0, recent_weight=shipped.recent_weight, recent_half_life=shipped.recent_half_life
        ),
        **text_only_params(shipped.text_kernel),
    }


def _rank_protocols(
    fit: Callable[[str, int, str, bool], Fitted],
    protocols: Sequence[str],
    params: dict[str, Mix],
    ks: Sequence[int],
    cfg: Any,
    started: float,
) -> tuple[list[ProtocolResult], list[Draw]]:
    """Each protocol fitted by `fit(protocol, seed, folder)` and ranked (protocols without
    test users left out); with `cfg.cold_item_draws`, cold_item on other seeded picks too."""
    results = []
    draws: list[Draw] = []  # cold_item on other seeded picks of the cold items
    for protocol in protocols:
        fitted = fit(protocol, cfg.seed, protocol, True)
        if not any(len(r) for r in fitted.relevant):
            log.warning("evaluate: %s has no test users; skipped", protocol)
            continue
        models = profile_side.MODELS if protocol == profile_side.PROTOCOL else MODEL_ORDER
        results.append(protocol_result(fitted, protocol, params=params, ks=ks, models=models))
        if protocol == "cold_item" and cfg.cold_item_draws > 0:
            draws.append(_draw(fitted, results[-1], cfg.seed, primary=True))
        log.info("evaluate: %s done (%.0fs so far)", protocol, time.perf_counter() - started)
    for k in range(1, cfg.cold_item_draws + 1 if draws else 0):
        seed = cfg.seed + 100 * k
        fitted = fit("cold_item", seed, f"cold_item-draw-{seed}", False)  # cold-only: no VAE
        draws.append(
            _draw(fitted, protocol_result(fitted, "cold_item", params=params, ks=[20]), seed)
        )
        log.info("evaluate: cold_item draw %d: %s", seed, draws[-1].recall)
    return results, draws


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


def _claims(results: Sequence[ProtocolResult]) -> list[Claim]:
    """The `CLAIMS` whose model and baseline were both ranked on the view."""
    present = {(p.name, v.name, m) for p in results for v in p.views for m in v.models}
    return [
        Claim(protocol=p, view=v, metric=metric, model=a, baseline=b)
        for p, v, metric, a, b in CLAIMS
        if (p, v, a) in present and (p, v, b) in present
    ]


def _notes(
    cfg: Config, params: dict[str, Mix], *, tuned: bool, tuning: dict[str, Any]
) -> list[str]:
    """The report's notes: the models' mixes and where they came from; ALS and the tower."""
    mixes = "; ".join(
        f"{model}: {describe_mix(params[model])}"
        for model in (
            "als_recent",
            "text_finetuned",
            "text_frozen_kernel",
            "hybrid",
            "hybrid_frozen",
        )
        if model in params and not same_as_text_frozen(model, params[model])
    )
    origin = (
        " (chosen on validation splits of the development part: the events every protocol trains on)"
        if tuned
        else " (from config)"
    )
    return [
        mixes + origin,
        f"ALS rank {cfg.als.rank}, reg {cfg.als.reg_param}, alpha {cfg.als.alpha}, "
        f"min_weight {cfg.als.min_weight:g}, "
        f"{cfg.als.max_iter} iterations; tower {cfg.contrastive.members} member(s), "
        f"each {cfg.contrastive.epochs} epochs of {cfg.contrastive.batch_size} "
        f"examples per process and step, temperature {cfg.contrastive.temperature}",
        *_search_notes(tuning),
    ]


def _search_notes(tuning: dict[str, Any]) -> list[str]:
    """A note per grid search (ALS, the implicit anchor): its choice, and any setting still
    on the edge of its grid after widening."""
    notes = []
    for key, name in (("als", "ALS"), (ANCHOR, "implicit_als (the implicit library's CPU ALS)")):
        record = tuning.get(key)
        if not record or "grid" not in record:
            continue
        chosen = ", ".join(f"{axis} {record[axis]}" for axis in record["grid"])
        edge = (
            f"; on the edge of its grid even after widening: {', '.join(record['at_edge'])}"
            if record["at_edge"]
            else "; every setting inside its grid"
        )
        notes.append(
            f"{name} chosen on validation: {chosen} (validation NDCG@10 {record['score']}, "
            f"{len(record['trials'])} trials){edge}"
        )
    return notes
