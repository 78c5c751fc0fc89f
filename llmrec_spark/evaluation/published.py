"""The nightly's measurement of the models it is about to publish, on users it held out.

A seeded `evaluate.holdout_fraction` of the users (the same users every night) lose the last
`evaluate.test_fraction` of their events in the training window from that night's training
(`stages.als.training_events`): train-als, train-vae and train-contrastive never see them. The
evaluate stage then ranks with exactly what the night trained (the date's `als_factors`, its
Mult-VAE, its fine-tuned item embeddings, the frozen ones) for those users, and compares with their
held-out positives. Nothing is refitted, so it costs a few driver-side rankings, not a
second training; the full protocol suite (refits per protocol, cold items, the anchor) is
`llmrec evaluate-protocols`, on its own schedule.
"""

from __future__ import annotations

import logging

import numpy as np
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.core.hybrid import ItemMatrices
from llmrec_spark.evaluation.refit import Fitted, collect_split
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.stages import als, recommend, splits
from llmrec_spark.stages.vae import saved_vae_dir

log = logging.getLogger(__name__)


def holdout_split(ctx: RunContext, window: DataFrame) -> splits.Split:
    """The night's `holdout` split of the ALS training window (the rows training left out)."""
    cfg = ctx.cfg.evaluate
    return splits.published_holdout(
        window,
        fraction=cfg.holdout_fraction,
        seed=cfg.seed,
        test_fraction=cfg.test_fraction,
        positive_min_weight=cfg.positive_min_weight,
        min_users=cfg.holdout_min_users,
    )


def published_fitted(
    ctx: RunContext,
    split: splits.Split,
    *,
    catalog: DataFrame,
    frozen: DataFrame | None,
) -> Fitted:
    """`split` ranked with the models trained for ctx.ds: ALS factors from `als_factors`, the
    fine-tuned text from the date's tuned embeddings (None when there are none), `frozen`
    as the plain text. InputError names the stage to run when the factors are missing."""
    factors, _ = recommend.read_factors_and_catalog(ctx)
    train = split.train.cache()
    pairs = als.interactions(train, ctx.cfg.als.min_weight).cache()

    def frame_with(embeddings: DataFrame | None) -> DataFrame:
        return recommend.item_frame(
            catalog,
            popularity=recommend.popularity_frame(train),
            item_factors=factors.where(F.col("kind") == "item").select("id", "features"),
            embeddings=embeddings,
            apply_rules=False,
        )

    frame = frame_with(frozen).cache()
    items = recommend.item_matrices(frame.toPandas())
    tuned = _published_tuned(ctx, items)
    return collect_split(
        ctx,
        split,
        pairs=pairs,
        frame=frame,
        items=items,
        tuned=tuned,
        user_factors=factors.where(F.col("kind") == "user").select("id", "features"),
        max_test_users=ctx.cfg.evaluate.max_test_users,
        seed=ctx.cfg.evaluate.seed,
        vae_dir=_published_vae(ctx),
    )


def _published_vae(ctx: RunContext) -> str | None:
    """The Mult-VAE train-vae saved for ctx.ds, or None (vae.enabled off, or none saved)."""
    if not ctx.cfg.vae.enabled:
        return None
    model_dir = saved_vae_dir(ctx)
    if model_dir is None:
        log.warning("evaluate: no Mult-VAE trained for %s; vae and hybrid_vae skipped", ctx.ds)
        return None
    return model_dir


def _published_tuned(ctx: RunContext, items: ItemMatrices) -> np.ndarray | None:
    """(n, out_dim) the date's fine-tuned item embeddings in `items`' order (zero rows for
    items without one), as recommend scores with them; None when train-contrastive is off or
    wrote none for ctx.ds."""
    from llmrec_spark.core import encoder

    embeddings, model = recommend.embedding_frame(ctx)
    if model == encoder.base_model_id(ctx.cfg.embed):
        log.warning(
            "evaluate: no fine-tuned embeddings for %s; text_finetuned and hybrid skipped", ctx.ds
        )
        return None
    return recommend.aligned_text(items.item_ids, embeddings.toPandas())
