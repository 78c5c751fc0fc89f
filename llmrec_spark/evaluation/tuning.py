"""Choosing a model's `Mix` on one fitted validation split: grid searches, the one-SE rule.

Never run on a test split: `validation.py` cuts the validation splits these searches see.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np

from llmrec_spark.core.hybrid import ItemMatrices, Mix
from llmrec_spark.core.metrics import per_user_metrics
from llmrec_spark.evaluation.ranking import (
    cold_only_recall,
    cold_shares,
    top_lists,
    users_with_positives,
)
from llmrec_spark.evaluation.refit import Fitted

log = logging.getLogger(__name__)


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
    if matrices is None or len(users_with_positives(fitted)[0]) == 0:
        return Mix(0.0), {}
    grid = _mix_grid(
        text_weights,
        cold_offsets if fitted.cold is not None else [0.0],
        half_lives,
        recent_weights,
        recent_half_lives,
        text_kernel=text_kernel,
        neighbour_factors=neighbour_factors,
        neighbour_temperature=neighbour_temperature,
    )
    scored, shown = _score_grid(fitted, matrices, grid, k)
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


def tune_new_item_slots(
    fitted: Fitted,
    model: str,
    base: Mix,
    *,
    slots: Sequence[int],
    min_zs: Sequence[float],
    one_standard_error: bool = False,
    k: int = 20,
) -> tuple[Mix, dict[str, float]]:
    """`base` with the new-item slots and plausibility threshold (`Mix.new_item_slots`,
    `new_item_min_z`) of the best mean NDCG@k of `model` over every unseen item, new ones
    included, on a validation split (cold_item's mixed view); every slot count with every
    threshold (0 slots once). With `one_standard_error`, of the trials within one standard
    error of the best, the one that shows new items most: more slots, then a lower
    threshold. Returns the choice (`base` when the model cannot be built) and every trial's
    mean, keyed as `slot_key`."""
    matrices = fitted.variant(model)
    if matrices is None or len(users_with_positives(fitted)[0]) == 0:
        return base, {}
    # Least shown first: without the one-SE rule the first of equal means wins.
    grid = [
        dataclasses.replace(base, new_item_slots=int(s), new_item_min_z=float(z))
        for s in sorted(set(slots))
        for z in (sorted(set(min_zs), reverse=True) if s > 0 else [base.new_item_min_z])
    ]
    scored, shares = _score_grid(fitted, matrices, grid, k)
    chosen, best = pick_trial(
        scored, one_standard_error=one_standard_error, shown=list(range(len(grid)))
    )
    trials = {slot_key(params): round(float(values.mean()), 5) for params, values in scored}
    if shares:
        log.info(
            "evaluate: %s share of cold positives in the top %d per new-item trial: %s",
            model,
            k,
            {slot_key(p): round(v, 4) for (p, _), v in zip(scored, shares, strict=True)},
        )
    log.info(
        "evaluate: %s new-item slots tuned on validation: %s (ndcg@%d %.4f; best %.4f)",
        model,
        slot_key(chosen),
        k,
        _trial_mean(scored, chosen),
        best,
    )
    return chosen, trials


def slot_key(params: Mix) -> str:
    """A new-item slots trial's name in the tuning record: "slots=2,min_z=1" ("slots=0")."""
    if params.new_item_slots <= 0:
        return "slots=0"
    return f"slots={params.new_item_slots},min_z={params.new_item_min_z:g}"


def _mix_grid(
    text_weights: Sequence[float],
    cold_offsets: Sequence[float],
    half_lives: Sequence[float],
    recent_weights: Sequence[float],
    recent_half_lives: Sequence[float],
    *,
    text_kernel: float,
    neighbour_factors: Sequence[int],
    neighbour_temperature: float,
) -> list[Mix]:
    """Every combination of the given values (recent half-lives only with a recent weight)."""
    return [
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
        for b in cold_offsets
        for h in half_lives
        for r in recent_weights
        for hr in (recent_half_lives if r > 0 else recent_half_lives[:1])
        for n in neighbour_factors
    ]


def _score_grid(
    fitted: Fitted, matrices: ItemMatrices, grid: Sequence[Mix], k: int
) -> tuple[list[tuple[Mix, np.ndarray]], list[float]]:
    """Per trial: its per-user NDCG@k (users with a positive, in row order) and, on a split
    with cold items, the mean share of the users' cold positives in their top k."""
    rows, relevant = users_with_positives(fitted)
    scored: list[tuple[Mix, np.ndarray]] = []
    shown: list[float] = []
    for params in grid:
        lists = top_lists(fitted, matrices, params, rows, k)
        scored.append((params, per_user_metrics(lists, relevant, [k])[f"ndcg@{k}"]))
        if fitted.cold is not None:
            shares = cold_shares(fitted, lists, k)
            shares = shares[~np.isnan(shares)]  # the users with cold positives
            shown.append(float(shares.mean()) if len(shares) else 0.0)
    return scored, shown


def describe_mix(params: Mix) -> str:
    """The mix as the report's notes print it."""
    return (
        f"text_weight={params.text_weight:g}, cold_offset={params.cold_offset:g}, "
        f"text_half_life={params.text_half_life:g}, recent_weight={params.recent_weight:g}, "
        f"recent_half_life={params.recent_half_life:g}, text_kernel={params.text_kernel:g}, "
        f"neighbour_factors={params.neighbour_factors}, new_item_slots={params.new_item_slots}"
        + (
            f" (new_item_min_z={params.new_item_min_z:g}, in a list of {params.list_length})"
            if params.new_item_slots
            else ""
        )
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
