"""Tuning on validation splits of the development part: ALS, the tower, the models' mixes.

The development part (`development_part`) holds only events every protocol's test split
trains on; the validation splits are the same protocols cut from it with another seed, so
no choice made here has seen a test event.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from pyspark.sql import DataFrame

from llmrec_spark.core.hybrid import Mix
from llmrec_spark.evaluation.anchor import MODEL as ANCHOR
from llmrec_spark.evaluation.anchor import tune_anchor
from llmrec_spark.evaluation.ranking import cold_only_recall, ndcg_per_user
from llmrec_spark.evaluation.refit import (
    Fitted,
    fit_split,
    make_split,
    only_items_in,
    with_als_factors,
)
from llmrec_spark.evaluation.search import widening_grid_search
from llmrec_spark.evaluation.tuning import (
    holds_on,
    text_only_params,
    trial_key,
    tune_hybrid,
    tune_new_item_slots,
    tune_text_kernel,
)
from llmrec_spark.evaluation.vae_side import with_hybrid_weight
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.schema import EVENT_COLUMNS
from llmrec_spark.stages import als, splits

log = logging.getLogger(__name__)

HYBRIDS = ("hybrid", "hybrid_frozen")


def development_part(events: DataFrame, protocols: Sequence[str], cfg: Any) -> DataFrame:
    """The events in the training part of every protocol's test split: what tuning may see.

    Validation splits are cut from this, so no choice made on them has seen a test event of
    any protocol: user_temporal's training part holds cold_item's cold positives, and
    cold_item's holds some of the events user_temporal holds out. cold_user is not one of
    them: nothing ranked on it is tuned, and leaving a fifth of the users out would change
    every other protocol's choices.
    """
    part = events.select(*EVENT_COLUMNS)
    for protocol in protocols:
        if protocol == "cold_user":
            continue
        train = make_split(events, protocol, cfg, seed=cfg.seed).train
        part = part.join(train.select(*EVENT_COLUMNS), list(EVENT_COLUMNS), "left_semi")
    return part


def tune_on_validation(
    ctx: RunContext,
    events: DataFrame,
    catalog: DataFrame,
    frozen: DataFrame | None,
    protocols: Sequence[str],
    work_dir: str,
) -> tuple[RunContext, dict[str, Mix], dict[str, Any]]:
    """ALS and text weights on user_temporal validation; on cold_item validation the tuned
    text's kernel for items scored by text alone, then the cold offsets, then the hybrid's
    new-item slots (the configured ones without a cold_item split).

    Returns the context to fit the test splits with (its ALS config the chosen one), the
    hybrids' parameters and every trial's validation NDCG@10 (the slots': NDCG@20).
    """
    cfg = ctx.cfg.evaluate
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
    chosen = text_only_params(kernel)
    # ALS first: every later fit (the tower's trials too) fits ALS, with the chosen settings.
    if cfg.tune_als_reg_params and cfg.tune_als_alphas:
        inner = make_split(dev, "user_temporal", cfg, seed=cfg.seed + 1)
        ctx, tuning["als"] = _tune_als(ctx, inner, catalog, cfg)
    fitted_cold: Fitted | None = None  # the tower search's fit of the cold_item validation split
    if cfg.tune_tower_temperatures and "cold_item" in protocols and frozen is not None:
        ctx, tuning["tower"], fitted_cold = _tune_tower(ctx, dev, catalog, frozen, work_dir)
    # Items with events in the development part (not the test splits' cold items, say).
    dev_items = {r["item_id"] for r in dev.select("item_id").distinct().collect()}
    validation: dict[str, Fitted] = {}
    for protocol in ("user_temporal", "cold_item"):
        if protocol not in protocols and protocol != "user_temporal":
            continue
        # Validation: the same protocol applied to the development part, with another seed.
        inner = make_split(dev, protocol, cfg, seed=cfg.seed + 1)
        if protocol == "cold_item" and fitted_cold is not None:
            fitted = fitted_cold  # the same split, ALS and tower settings: fitted once
        else:
            fitted = fit_split(
                ctx,
                inner,
                catalog=catalog,
                embeddings=frozen,
                work_dir=os.path.join(work_dir, "validation", protocol),
                max_test_users=cfg.max_test_users,
                seed=cfg.seed,
                keep_pairs=cfg.implicit_anchor and protocol == "user_temporal",
                vae=protocol == "user_temporal",  # hybrid_vae's weight is tuned there
            )
        validation[protocol] = fitted = only_items_in(fitted, dev_items)
        if protocol == "user_temporal" and cfg.implicit_anchor:
            _, search = tune_anchor(fitted, positive_min_weight=cfg.positive_min_weight)
            tuning[ANCHOR] = search.record()
        if protocol == "user_temporal":
            picked, trials = _tune_warm(fitted, cfg, warm)
            warm |= {model: picked[model] for model in HYBRIDS}  # their cold_offset is 0.0
            ctx, trials = _tune_vae_weight(ctx, fitted, picked["hybrid"], trials)
        else:
            picked, trials = _tune_cold(fitted, validation["user_temporal"], cfg, warm, shipped)
        chosen |= picked
        tuning |= trials
    if "cold_item" not in validation:  # no split to tune them on: the configured ones
        chosen["hybrid"] = _configured_slots(chosen["hybrid"], shipped)
    dev.unpersist()
    return ctx, chosen, tuning


def _tune_warm(
    fitted: Fitted, cfg: Any, warm: dict[str, Mix]
) -> tuple[dict[str, Mix], dict[str, Any]]:
    """On the user_temporal validation split: first the collaborative score alone (ALS with
    the recent-items term), then each hybrid's text weight and half-life with that recent
    term. Returns the chosen mixes and every trial's mean."""
    recent, trials = tune_hybrid(
        fitted,
        "als_recent",
        text_weights=[0.0],
        cold_offsets=[0.0],
        recent_weights=cfg.tune_recent_weights,
        recent_half_lives=cfg.tune_recent_half_lives,
        one_standard_error=cfg.tune_one_standard_error,
    )
    chosen = {"als_recent": recent}
    tuning: dict[str, Any] = {"user_temporal.als_recent": trials}
    for model in HYBRIDS:
        chosen[model], tuning[f"user_temporal.{model}"] = tune_hybrid(
            fitted,
            model,
            text_weights=cfg.tune_text_weights,
            cold_offsets=[0.0],
            half_lives=cfg.tune_text_half_lives,
            recent_weights=[recent.recent_weight],
            recent_half_lives=[recent.recent_half_life],
            text_kernel=warm[model].text_kernel,
            neighbour_factors=[warm[model].neighbour_factors],
            neighbour_temperature=warm[model].neighbour_temperature,
            one_standard_error=cfg.tune_one_standard_error,
        )
    return chosen, tuning


# hybrid_vae: the VAE's z-score weights tried beside ALS's on user_temporal validation.
VAE_WEIGHTS = (0.1, 0.25, 0.5, 1.0, 2.0)


def _tune_vae_weight(
    ctx: RunContext, fitted: Fitted, hybrid: Mix, trials: dict[str, Any]
) -> tuple[RunContext, dict[str, Any]]:
    """With the Mult-VAE on `fitted` (vae.enabled): vae.hybrid_weight with the best hybrid_vae
    NDCG@10 on the user_temporal validation split (the hybrid's chosen mix; ties to the
    smaller weight); the context that ships it and `trials` plus "vae" (every weight's mean)."""
    if fitted.vae is None:
        return ctx, trials
    means: dict[str, float] = {}
    for weight in VAE_WEIGHTS:
        values = ndcg_per_user(with_hybrid_weight(fitted, weight), "hybrid_vae", hybrid)
        means[str(weight)] = float(values.mean()) if len(values) else float("nan")
    best = max(VAE_WEIGHTS, key=lambda w: (means[str(w)], -w))
    log.info("evaluate: vae.hybrid_weight %s on validation (NDCG@10 %s)", best, means)
    cfg = dataclasses.replace(ctx.cfg, vae=dataclasses.replace(ctx.cfg.vae, hybrid_weight=best))
    return dataclasses.replace(ctx, cfg=cfg), {**trials, "vae": {"hybrid_weight": best, **means}}


def _tune_cold(
    fitted: Fitted, warm_split: Fitted, cfg: Any, warm: dict[str, Mix], shipped: Mix
) -> tuple[dict[str, Mix], dict[str, Any]]:
    """On the cold_item validation split: the tuned tower's text-only kernel (the shipped
    hybrid scores new items so), then each hybrid's cold offset and borrowed factors on top
    of its `warm` mix, among the settings that cost `warm_split`'s lists nothing; then the
    hybrid's new-item slots (`_tune_new_item_slots`; `shipped`: the configured mix)."""
    chosen: dict[str, Mix] = {}
    tuning: dict[str, Any] = {}
    warm = dict(warm)
    if cfg.tune_text_kernels:
        kernel, tuning["cold_item.text_finetuned"] = tune_text_kernel(
            fitted, "text_finetuned", kernels=cfg.tune_text_kernels
        )
        if kernel is not None:  # else the configured kernel stays
            chosen |= text_only_params(kernel)
            warm["hybrid"] = dataclasses.replace(warm["hybrid"], text_kernel=kernel)
    for model in HYBRIDS:
        params, tuning[f"cold_item.{model}"] = tune_hybrid(
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
            admissible=_costs_no_warm_hits(warm_split, model, warm[model]),
        )
        chosen[model] = dataclasses.replace(
            warm[model], cold_offset=params.cold_offset, neighbour_factors=params.neighbour_factors
        )
    chosen["hybrid"], slot_trials = _tune_new_item_slots(fitted, chosen["hybrid"], shipped, cfg)
    if slot_trials:
        tuning["cold_item.new_item_slots"] = slot_trials
    return chosen, tuning


def _tune_new_item_slots(
    fitted: Fitted, hybrid: Mix, shipped: Mix, cfg: Any
) -> tuple[Mix, dict[str, float]]:
    """`hybrid` with the new-item slots and threshold of evaluate.tune_new_item_slots x
    tune_new_item_min_z (an empty list: the configured value) with the best mixed NDCG@20 on
    the cold_item validation split `fitted` (`tune_new_item_slots`), and every trial's mean
    ({} and the configured ones when neither list is set). Only the hybrid gets slots:
    hybrid_frozen is the ablation."""
    configured = _configured_slots(hybrid, shipped)
    if not (cfg.tune_new_item_slots or cfg.tune_new_item_min_z):
        return configured, {}
    return tune_new_item_slots(
        fitted,
        "hybrid",
        configured,
        slots=cfg.tune_new_item_slots or [shipped.new_item_slots],
        min_zs=cfg.tune_new_item_min_z or [shipped.new_item_min_z],
        one_standard_error=cfg.tune_one_standard_error,
        k=20,
    )


def _configured_slots(hybrid: Mix, shipped: Mix) -> Mix:
    """`hybrid` with the configured (`shipped`) new-item slots, threshold and list length."""
    return dataclasses.replace(
        hybrid,
        new_item_slots=shipped.new_item_slots,
        new_item_min_z=shipped.new_item_min_z,
        list_length=shipped.list_length,
    )


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
) -> tuple[RunContext, dict[str, Any], Fitted | None]:
    """The tower's temperature with the best cold-only Recall@20 of text_finetuned on a
    cold_item validation split of `dev` (`development_part`); ctx with that contrastive
    config, and the split as fitted with it (None when no trial scored)."""
    cfg = ctx.cfg.evaluate
    inner = make_split(dev, "cold_item", cfg, seed=cfg.seed + 1)
    fits: dict[float, Fitted] = {}

    def with_temperature(temperature: float) -> RunContext:
        contrastive = dataclasses.replace(ctx.cfg.contrastive, temperature=float(temperature))
        return dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, contrastive=contrastive))

    def cold_recall(point: dict[str, Any]) -> float | None:
        temperature = float(point["temperature"])
        fits[temperature] = fitted = fit_split(
            with_temperature(temperature),
            inner,
            catalog=catalog,
            embeddings=frozen,
            work_dir=os.path.join(work_dir, "validation", f"tower-{temperature:g}"),
            max_test_users=cfg.max_test_users,
            seed=cfg.seed,
            vae=False,
        )
        return cold_only_recall(fitted, "text_finetuned", Mix(0.0))

    # A tower fit is the dearest trial: an edge is widened once.
    axes = {"temperature": sorted(float(t) for t in cfg.tune_tower_temperatures)}
    try:
        result = widening_grid_search(axes, cold_recall, widen=("temperature",), max_widenings=1)
    except ValueError:  # no trial could be built: the configured tower
        return ctx, {"trials": {}, "temperature": ctx.cfg.contrastive.temperature}, None
    temperature = float(result.best["temperature"])
    log.info("evaluate: tower tuned on validation: temperature %s (%s)", temperature, result.trials)
    return with_temperature(temperature), result.record(), fits.get(temperature)


def _tune_als(
    ctx: RunContext, inner: splits.Split, catalog: DataFrame, cfg: Any
) -> tuple[RunContext, dict[str, Any]]:
    """ALS min_weight x reg_param x alpha with the best validation NDCG@10 (ALS alone), the
    numeric axes widened while the best sits on an edge; ctx with that ALS config.

    The split is fitted once; a trial refits ALS alone and swaps its factors in."""
    base = fit_split(
        ctx,
        inner,
        catalog=catalog,
        embeddings=None,
        work_dir="",
        max_test_users=cfg.max_test_users,
        seed=cfg.seed,
        tower=False,
        vae=False,
    )
    train = inner.train.cache()

    def als_ndcg(point: dict[str, Any]) -> float | None:
        trial = _als_config(ctx.cfg.als, point)
        factors = als.fit_als(als.interactions(train, trial.min_weight), trial)
        values = ndcg_per_user(with_als_factors(base, factors), "als", Mix(0.0))
        return float(values.mean()) if len(values) else None

    axes = {
        "min_weight": cfg.tune_als_min_weights or [ctx.cfg.als.min_weight],
        "reg_param": sorted(cfg.tune_als_reg_params),
        "alpha": sorted(cfg.tune_als_alphas),
    }
    result = widening_grid_search(axes, als_ndcg, widen=("reg_param", "alpha"))
    train.unpersist()
    chosen = _als_config(ctx.cfg.als, result.best)
    log.info(
        "evaluate: ALS tuned on validation: min_weight %s reg %s alpha %s (on an edge: %s)",
        chosen.min_weight,
        chosen.reg_param,
        chosen.alpha,
        result.at_edge or "none",
    )
    tuned = dataclasses.replace(ctx, cfg=dataclasses.replace(ctx.cfg, als=chosen))
    return tuned, result.record()


def _als_config(base: Any, point: dict[str, Any]) -> Any:
    """ALS config `base` with a search point's min_weight, reg_param and alpha."""
    return dataclasses.replace(
        base,
        min_weight=float(point["min_weight"]),
        reg_param=float(point["reg_param"]),
        alpha=float(point["alpha"]),
    )
