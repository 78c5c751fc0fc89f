"""An outside anchor: the `implicit` library's CPU ALS, tuned as a careful practitioner would.

With `evaluate.implicit_anchor`, `implicit_als` is ranked beside the product's models: fitted
on the same training pairs, tuned on the same user_temporal validation split (factors,
regularization and alpha each over two decades or more, and explicit ratings either as
weights or as positives above evaluate.positive_min_weight; an axis whose best value is on
the grid's edge is widened, `search.widening_grid_search`), scored by the same scorer with
the same exclusions over the full ranking (`ranking`). Its factors live on the `Fitted` as
`anchor`; `Fitted.for_model("implicit_als")` swaps them in.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmrec_spark.core.hybrid import Mix
from llmrec_spark.errors import ConfigError
from llmrec_spark.evaluation.ranking import ndcg_per_user
from llmrec_spark.evaluation.refit import Fitted, SideFactors, TrainPairs
from llmrec_spark.evaluation.search import SearchResult, widening_grid_search

log = logging.getLogger(__name__)

MODEL = "implicit_als"
# The grid tried on validation; factors, regularization and alpha widen when chosen on an edge.
GRID: dict[str, tuple[Any, ...]] = {
    "values": ("weights", "positives"),
    "factors": (32, 64, 128),
    "regularization": (0.1, 1.0, 10.0),
    "alpha": (0.1, 0.3, 1.0, 3.0, 10.0),
}
WIDEN = ("factors", "regularization", "alpha")
ITERATIONS = 15
SEED = 17


@dataclass(frozen=True)
class AnchorParams:
    """`implicit`'s settings: the stored confidence of a pair is alpha x its value, where the
    value is the pair's summed weight ("weights") or 1 for a pair weighing at least the
    positive threshold, others left out ("positives")."""

    values: str
    factors: int
    regularization: float
    alpha: float


def fit_anchor(
    pairs: TrainPairs, n_items: int, params: AnchorParams, *, positive_min_weight: float
) -> tuple[np.ndarray, np.ndarray]:
    """`implicit`'s ALS on the training pairs: (user factors per pairs.user_ids, item factors
    (n_items, factors)); a user or item without a pair keeps a zero row."""
    try:
        from implicit.cpu.als import AlternatingLeastSquares
    except ImportError as exc:
        raise ConfigError(
            "evaluate.implicit_anchor (always on in `llmrec bench quality`) needs the `implicit` "
            "package: make install, or pip install 'llmrec-spark[dev]'"
        ) from exc
    from scipy.sparse import csr_matrix
    from threadpoolctl import threadpool_limits

    weight = pairs.weight
    keep = np.ones(len(weight), dtype=bool)
    if params.values == "positives":
        keep = weight >= positive_min_weight
        weight = np.ones(len(weight), dtype=np.float64)
    elif params.values != "weights":
        raise ConfigError(f"implicit anchor: unknown values {params.values!r}")
    matrix = csr_matrix(
        (params.alpha * weight[keep], (pairs.user_idx[keep], pairs.item_idx[keep])),
        shape=(len(pairs.user_ids), n_items),
        dtype=np.float32,
    )
    # implicit parallelises over rows itself: BLAS stays single-threaded (its check, made when
    # the model is built, warns otherwise).
    with threadpool_limits(1, "blas"):
        model = AlternatingLeastSquares(
            factors=params.factors,
            regularization=params.regularization,
            alpha=1.0,  # alpha is in the stored values
            iterations=ITERATIONS,
            random_state=SEED,
            num_threads=0,
        )
        model.fit(matrix, show_progress=False)
    users, items = np.asarray(model.user_factors), np.asarray(model.item_factors)
    has_user = np.bincount(pairs.user_idx[keep], minlength=len(pairs.user_ids)) > 0
    has_item = np.bincount(pairs.item_idx[keep], minlength=n_items) > 0
    return np.where(has_user[:, None], users, 0.0), np.where(has_item[:, None], items, 0.0)


def attach_anchor(fitted: Fitted, params: AnchorParams, *, positive_min_weight: float) -> Fitted:
    """`fitted` with the anchor fitted on its training pairs (`Fitted.anchor`)."""
    if fitted.train_pairs is None:
        raise ValueError("the split was fitted without its training pairs (keep_pairs)")
    users, items = fit_anchor(
        fitted.train_pairs, fitted.items.size, params, positive_min_weight=positive_min_weight
    )
    row = {user: k for k, user in enumerate(fitted.train_pairs.user_ids)}
    test_rows = np.array([row.get(u, -1) for u in fitted.users], dtype=np.int64)
    user_factors = np.zeros((len(fitted.users), params.factors), dtype=np.float32)
    user_factors[test_rows >= 0] = users[test_rows[test_rows >= 0]]
    has_user = np.linalg.norm(user_factors, axis=1) > 0
    has_item = np.linalg.norm(items, axis=1) > 0
    anchor = SideFactors(
        params=dataclasses.asdict(params),
        item_factors=items.astype(np.float32),
        has_item=has_item,
        user_factors=user_factors,
        has_user=has_user,
    )
    return dataclasses.replace(fitted, anchor=anchor)


def tune_anchor(fitted: Fitted, *, positive_min_weight: float) -> tuple[AnchorParams, SearchResult]:
    """The anchor's settings with the best mean NDCG@10 on the validation split `fitted`."""

    def score(point: dict[str, Any]) -> float | None:
        trial = attach_anchor(
            fitted, AnchorParams(**point), positive_min_weight=positive_min_weight
        )
        values = ndcg_per_user(trial, MODEL, Mix(0.0))
        return float(values.mean()) if len(values) else None

    result = widening_grid_search(GRID, score, widen=WIDEN)
    log.info("evaluate: implicit anchor tuned on validation: %s", result.best)
    return AnchorParams(**result.best), result
