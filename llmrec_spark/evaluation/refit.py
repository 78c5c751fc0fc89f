"""Cutting a protocol's split and fitting its models: `Fitted`, what ranking needs on the driver.

Per split, ALS (`als.fit_als`) and the text tower (`contrastive.fit_text_tower`) are fitted
on the training events only (Spark); the item matrices, the test users (at most
`evaluate.max_test_users`, a seeded sample), their factors, histories and test positives are
then collected to the driver.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from llmrec_spark.core.hybrid import ItemMatrices
from llmrec_spark.errors import ConfigError
from llmrec_spark.evaluation import profile_side, vae_side
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.stages import als, recommend, splits

# The models that score with collaborative factors alone (they cannot rank cold items).
ALS_ONLY = ("als", "als_recent", "implicit_als", "vae")
# The shipped hybrid without its new-item slots: what the slots cost and gain.
UNSLOTTED = "hybrid_no_slots"


@dataclass(frozen=True)
class TrainPairs:
    """A split's training pairs on the driver: every training user, and per (user, item) pair
    the user's row in `user_ids`, the item index and the summed weight (no als.min_weight)."""

    user_ids: list[str]
    user_idx: np.ndarray  # (pairs,) int64
    item_idx: np.ndarray  # (pairs,) int64
    weight: np.ndarray  # (pairs,) float64


@dataclass(frozen=True)
class SideFactors:
    """Another model's factors beside ALS's (the outside anchor, `evaluation.anchor`; the
    Mult-VAE, `evaluation.vae_side`): items in item order, the test users in `Fitted.users`
    order (zero rows without one), and its settings."""

    params: dict[str, Any]
    item_factors: np.ndarray  # (n, factors)
    has_item: np.ndarray  # (n,) bool
    user_factors: np.ndarray  # (u, factors)
    has_user: np.ndarray  # (u,) bool


@dataclass
class Fitted:
    """One split with its models fitted: item matrices, tuned text, test users in a fixed order."""

    items: ItemMatrices  # ALS factors + frozen text
    tuned: np.ndarray | None  # (n, out_dim) unit rows of the fine-tuned tower, or None
    users: list[str]
    user_als: np.ndarray | None  # (u, rank)
    user_has_als: np.ndarray  # (u,)
    histories: list[np.ndarray]  # training item indices per user
    relevant: list[np.ndarray]  # test positives (item indices) per user
    cold: np.ndarray | None  # (n,) bool: cold items (cold_item protocol)
    train_users_per_item: np.ndarray  # (n,) distinct training users per item
    n_train_users: int
    train_pairs: TrainPairs | None = None  # with fit_split(keep_pairs=True)
    anchor: SideFactors | None = None  # the outside anchor's factors (`evaluation.anchor`)
    vae: SideFactors | None = None  # the Mult-VAE's (`evaluation.vae_side`), params hybrid_weight
    profile: SideFactors | None = None  # the user tower's (`evaluation.profile_side`): cold_user
    # (n, out_dim) unit rows of the tuned encoder (contrastive.mode encoder), or None
    tuned_encoder: np.ndarray | None = None

    def for_model(self, model: str) -> Fitted:
        """This split as `model` ranks it: the anchor's factors in place of ALS's for
        implicit_als, the VAE's for vae, both z-scored side by side for hybrid_vae
        (`vae_side.mixed_factors`); else itself."""
        side = {"implicit_als": self.anchor, "vae": self.vae, "profile_text": self.profile}.get(
            model
        )
        if side is not None:
            items = dataclasses.replace(
                self.items, als=side.item_factors, has_als=side.has_item, text=None, has_text=None
            )
            return dataclasses.replace(
                self, items=items, user_als=side.user_factors, user_has_als=side.has_user
            )
        if model == "hybrid_vae" and self.vae is not None and self.user_als is not None:
            return vae_side.mixed_factors(self, self.vae)
        return self

    def variant(self, model: str) -> ItemMatrices | None:
        """The item matrices model `model` scores with (None: the model cannot be built)."""
        m = self.items
        tuned: dict[str, Any] = {}
        if self.tuned is not None:
            tuned = {"text": self.tuned, "has_text": np.linalg.norm(self.tuned, axis=1) > 0}
        if model in ("implicit_als", "vae", "profile_text"):  # ranked with for_model's users
            side = {"implicit_als": self.anchor, "vae": self.vae}.get(model, self.profile)
            return None if side is None else self.for_model(model).items
        if model == "hybrid_vae":
            if self.vae is None or m.als is None or not tuned:
                return None
            return dataclasses.replace(self.for_model(model).items, **tuned)
        if model == "popularity":
            return dataclasses.replace(m, als=None, has_als=None, text=None, has_text=None)
        if model in ALS_ONLY:  # als_recent: its Mix adds the recent-items term
            return None if m.als is None else dataclasses.replace(m, text=None, has_text=None)
        if model in ("text_frozen", "text_frozen_kernel"):  # the latter: its Mix has a kernel
            return None if m.text is None else dataclasses.replace(m, als=None, has_als=None)
        if model == "text_finetuned":
            return dataclasses.replace(m, als=None, has_als=None, **tuned) if tuned else None
        if model == "text_encoder_tuned":
            if self.tuned_encoder is None:
                return None
            has_text = np.linalg.norm(self.tuned_encoder, axis=1) > 0
            return dataclasses.replace(
                m, als=None, has_als=None, text=self.tuned_encoder, has_text=has_text
            )
        if model == "hybrid_frozen":
            return m if m.als is not None and m.text is not None else None
        if model in ("hybrid", UNSLOTTED):  # the latter: its Mix has no new-item slots
            return dataclasses.replace(m, **tuned) if tuned and m.als is not None else None
        raise ValueError(f"unknown model {model!r}")


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
    if protocol == "cold_user":
        return splits.cold_user(
            events,
            cold_fraction=cfg.cold_user_fraction,
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
    keep_pairs: bool = False,
    vae: bool = True,
    profiles: DataFrame | None = None,
    encoder: bool = False,
) -> Fitted:
    """Fit ALS, (with `tower`) the text tower, (with `vae` and vae.enabled) the Mult-VAE and
    (with `profiles`: user_id, embedding) the user tower and (with `encoder` and
    contrastive.mode encoder) the tuned encoder on split.train; collect the test users (and
    with `keep_pairs` every training pair, for the outside anchor)."""
    train = split.train.cache()
    pairs = als.interactions(train, ctx.cfg.als.min_weight).cache()
    factors = als.fit_als(pairs, ctx.cfg.als)
    frame = recommend.item_frame(
        catalog,
        popularity=recommend.popularity_frame(train),
        item_factors=factors.items,
        embeddings=embeddings,
        apply_rules=False,
    ).cache()
    items = recommend.item_matrices(frame.toPandas())
    tuned, head_dir = None, None
    if tower and embeddings is not None and items.text is not None:
        tuned, head_dir = _fine_tuned_text(ctx, split, train, embeddings, items, work_dir)
    vae_dir = None
    if vae and ctx.cfg.vae.enabled:
        vae_dir = vae_side.fit_vae_model(ctx, pairs, work_dir)
    tuned_encoder = None
    if encoder and ctx.cfg.contrastive.mode == "encoder" and items.text is not None:
        tuned_encoder = _encoder_tuned_text(ctx, split, train, catalog, items, work_dir, head_dir)
    profile_dir = None
    if profiles is not None:
        profile_dir = profile_side.fit_profile_model(ctx, train, profiles, frame, work_dir)
    fitted = collect_split(
        ctx,
        split,
        pairs=pairs,
        frame=frame,
        items=items,
        tuned=tuned,
        user_factors=factors.users,
        max_test_users=max_test_users,
        seed=seed,
        keep_pairs=keep_pairs,
        vae_dir=vae_dir,
    )
    if tuned_encoder is not None:
        fitted = dataclasses.replace(fitted, tuned_encoder=tuned_encoder)
    if profile_dir is None or profiles is None:
        return fitted
    side = profile_side.profile_factors(profile_dir, profiles, fitted.items, fitted.users)
    return dataclasses.replace(fitted, profile=side)


def collect_split(
    ctx: RunContext,
    split: splits.Split,
    *,
    pairs: DataFrame,
    frame: DataFrame,
    items: ItemMatrices,
    tuned: np.ndarray | None,
    user_factors: DataFrame,
    max_test_users: int,
    seed: int,
    keep_pairs: bool = False,
    vae_dir: str | None = None,
) -> Fitted:
    """The split's `Fitted` from models fitted on split.train (`fit_split`) or trained by the
    nightly (`evaluation.published`): test users, their factors and histories, per-item
    training users (and with `vae_dir`, the Mult-VAE saved there); `frame` is `items`' item
    frame, `pairs` split.train's interactions. Unpersists pairs, frame and split.train."""
    train = split.train
    users, relevant = _test_users(split.test, items, max_test_users, seed)
    user_pd: pd.DataFrame = recommend.user_frame(
        ctx.spark.createDataFrame([(u,) for u in users], "user_id string"),
        history=train.select("user_id", "item_id", "event_ts"),
        item_index=frame.select("item_id", "item_idx"),
        user_factors=user_factors,
    ).toPandas()
    user_pd = user_pd.set_index("user_id").loc[users]
    user_als, has_als = _user_factors(user_pd["als_features"], items)
    per_item, n_train_users = _training_users(pairs, frame, items.size)
    cold = _cold_mask(split, items)
    train_pairs = _train_pairs(train, items) if keep_pairs else None
    vae = None
    if vae_dir is not None:
        vae = vae_side.vae_factors(
            vae_dir,
            items,
            users,
            vae_side.user_pairs(pairs, users),
            hybrid_weight=ctx.cfg.vae.hybrid_weight,
        )
    for df in (frame, pairs, train):
        df.unpersist()
    return Fitted(
        items=items,
        tuned=tuned,
        users=users,
        user_als=user_als,
        user_has_als=has_als,
        histories=[np.asarray(h if h is not None else [], np.int64) for h in user_pd["history"]],
        relevant=relevant,
        cold=cold,
        train_users_per_item=per_item,
        n_train_users=max(n_train_users, 1),
        train_pairs=train_pairs,
        vae=vae,
    )


def _train_pairs(train: DataFrame, items: ItemMatrices) -> TrainPairs:
    """Every training (user, item) pair with its summed weight, indexed on the driver."""
    pairs: pd.DataFrame = als.interactions(train).toPandas()
    index = {item: k for k, item in enumerate(items.item_ids)}
    pairs = pairs[pairs["item_id"].isin(index.keys())]
    user_ids = sorted(pairs["user_id"].unique())
    row = {user: k for k, user in enumerate(user_ids)}
    return TrainPairs(
        user_ids=list(user_ids),
        user_idx=pairs["user_id"].map(row).to_numpy(np.int64),
        item_idx=pairs["item_id"].map(index).to_numpy(np.int64),
        weight=pairs["weight"].to_numpy(np.float64),
    )


def with_als_factors(fitted: Fitted, factors: als.AlsFactors) -> Fitted:
    """`fitted` with other ALS factors (a trial of the ALS search): item rows and the test
    users' rows taken from `factors`, zero rows where it has none."""
    if factors.arrays is not None:  # solver cg: the driver has them already
        arrays = factors.arrays
        item_pd = pd.DataFrame({"id": arrays.item_ids, "features": list(arrays.items)})
        user_pd = pd.DataFrame({"id": arrays.user_ids, "features": list(arrays.users)})
        user_pd = user_pd[user_pd["id"].isin(fitted.users)]
    else:
        item_pd = factors.items.toPandas()
        user_pd = factors.users.where(F.col("id").isin(fitted.users)).toPandas()
    rank = len(item_pd["features"].iloc[0]) if len(item_pd) else 0
    item_rows = {item: k for k, item in enumerate(fitted.items.item_ids)}
    item_als = np.zeros((fitted.items.size, rank), dtype=np.float32)
    for item, vector in zip(item_pd["id"], item_pd["features"], strict=True):
        if item in item_rows:
            item_als[item_rows[item]] = vector
    user_rows = {user: k for k, user in enumerate(fitted.users)}
    user_als = np.zeros((len(fitted.users), rank), dtype=np.float32)
    for user, vector in zip(user_pd["id"], user_pd["features"], strict=True):
        user_als[user_rows[user]] = vector
    has_item = np.linalg.norm(item_als, axis=1) > 0
    items = dataclasses.replace(fitted.items, als=item_als, has_als=has_item)
    has_user = np.linalg.norm(user_als, axis=1) > 0
    return dataclasses.replace(fitted, items=items, user_als=user_als, user_has_als=has_user)


def _fine_tuned_text(
    ctx: RunContext,
    split: splits.Split,
    train: DataFrame,
    embeddings: DataFrame,
    items: ItemMatrices,
    work_dir: str,
) -> tuple[np.ndarray, str]:
    """The tower fitted on `train` applied to every item's frozen text: (n, out_dim), and the
    head's folder."""
    from llmrec_spark.stages import contrastive, tower_training

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
    assert items.text is not None and items.has_text is not None
    head = tower_training.load_head(fit.head_dir)
    return apply_head(head, items.text, items.has_text), fit.head_dir


def _encoder_tuned_text(
    ctx: RunContext,
    split: splits.Split,
    train: DataFrame,
    catalog: DataFrame,
    items: ItemMatrices,
    work_dir: str,
    head_dir: str | None,
) -> np.ndarray:
    """The encoder tuned on `train` (contrastive.mode encoder; from the head in `head_dir`
    with encoder_start head) applied to the text of every item that has a frozen embedding:
    (n, out_dim), zero rows elsewhere."""
    from llmrec_spark.core.encoder import resolve_model
    from llmrec_spark.stages import embed, encoder_fit

    cfg = ctx.cfg.contrastive
    texts = embed.item_text(
        catalog, template=ctx.cfg.embed.text_template, max_chars=ctx.cfg.embed.max_text_chars
    ).select("item_id", "text")
    fit = encoder_fit.fit_text_encoder(
        ctx,
        cfg,
        train,
        texts,
        work_dir=os.path.join(work_dir, "encoder"),
        metadata={"kind": "evaluation", "protocol": split.protocol},
        init_head_dir=head_dir if cfg.encoder_start == "head" else None,
    )
    text_pd: pd.DataFrame = texts.toPandas()
    by_item = dict(zip(text_pd["item_id"], text_pd["text"], strict=True))
    assert items.has_text is not None
    rows = np.flatnonzero(items.has_text)
    vectors = encoder_fit.tuned_item_vectors(
        fit.model_dir,
        [by_item.get(items.item_ids[r], "") for r in rows],
        model_path=resolve_model(ctx.cfg.embed.model)[0],
        max_length=cfg.encoder_max_length,
    )
    out = np.zeros((items.size, vectors.shape[1]), dtype=np.float32)
    out[rows] = vectors
    return out


def apply_head(head: Any, text: np.ndarray, has_text: np.ndarray) -> np.ndarray:
    """(n, out_dim): `head` applied to the rows of `text` that have one, zero rows elsewhere."""
    import torch

    out = np.zeros((len(text), head.out_dim), dtype=np.float32)
    with torch.inference_mode():
        out[has_text] = head(torch.from_numpy(np.ascontiguousarray(text[has_text]))).numpy()
    return out


def _test_users(
    test_events: DataFrame, items: ItemMatrices, max_test_users: int, seed: int
) -> tuple[list[str], list[np.ndarray]]:
    """The test users in sorted order (a seeded sample of `max_test_users` when more) and each
    one's test positives as sorted item indices."""
    index = {item: k for k, item in enumerate(items.item_ids)}
    test: pd.DataFrame = test_events.toPandas()
    users = sorted(test["user_id"].unique())
    if len(users) > max_test_users:
        rng = np.random.default_rng(seed)
        users = sorted(rng.choice(np.array(users, dtype=object), max_test_users, replace=False))
    test = test[test["user_id"].isin(set(users))]
    relevant_by_user = {
        u: np.array(sorted(index[i] for i in g["item_id"] if i in index), dtype=np.int64)
        for u, g in test.groupby("user_id")
    }
    return list(users), [relevant_by_user.get(u, np.zeros(0, np.int64)) for u in users]


def _user_factors(features: pd.Series, items: ItemMatrices) -> tuple[np.ndarray | None, np.ndarray]:
    """The users' ALS factors as a (u, rank) matrix (None without item factors; zero rows for
    users without a factor) and which users have one."""
    has_als = features.map(lambda v: v is not None and len(v) > 0).to_numpy(bool)
    if items.als is None:
        return None, has_als
    user_als = np.zeros((len(features), items.als.shape[1]), dtype=np.float32)
    for row, vector in enumerate(features):
        if vector is not None and len(vector):
            user_als[row] = np.asarray(vector, dtype=np.float32)
    return user_als, has_als


def _training_users(pairs: DataFrame, frame: DataFrame, n_items: int) -> tuple[np.ndarray, int]:
    """Distinct training users per item index (n_items,), and of all items together."""
    per_item: pd.DataFrame = (
        pairs.join(frame.select("item_id", "item_idx"), "item_id")
        .groupBy("item_idx")
        .agg(F.countDistinct("user_id").alias("users"))
        .toPandas()
    )
    counts = np.zeros(n_items, dtype=np.float64)
    counts[per_item["item_idx"].to_numpy()] = per_item["users"].to_numpy()
    return counts, int(pairs.select("user_id").distinct().count())


def _cold_mask(split: splits.Split, items: ItemMatrices) -> np.ndarray | None:
    """(n,) bool: the split's cold items (None outside cold_item); they must have no factor."""
    if split.cold_items is None:
        return None
    cold_ids = {r["item_id"] for r in split.cold_items.collect()}
    cold = np.array([i in cold_ids for i in items.item_ids], dtype=bool)
    if items.has_als is not None and (items.has_als & cold).any():
        raise AssertionError("cold items have ALS factors: they leaked into training")
    return cold


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
