"""README "Querying the recommendations": every code block runs as printed, without warnings.

The blocks are read from README.md (not copied here) and run in a project-like folder whose
`lakehouse/` holds published tables: Python blocks with `exec` in a fresh namespace, SQL
blocks with `spark.sql` once the first Python block has registered the views.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import yaml

from llmrec_spark.config import load_config
from llmrec_spark.errors import InputError
from llmrec_spark.io.tables import open_store
from llmrec_spark.io.views import register_views, table_metadata
from llmrec_spark.runtime.context import RunContext
from llmrec_spark.stages.publish import (
    PROP_MLFLOW_RUN_ID,
    PROP_MODEL_VERSION,
    publish_recommendations,
)
from tests.conftest import PROJECT, TINY_OVERLAY

pytestmark = pytest.mark.spark

SECTION = "### Querying the recommendations"
USER = "u00001"  # the README's user: the demo names its users u00001, u00002, ...


def readme_blocks(heading: str = SECTION) -> list[tuple[str, str]]:
    """(language, code) of each fenced block under `heading`, up to the next heading of its level."""
    level = len(heading) - len(heading.lstrip("#"))
    blocks: list[tuple[str, str]] = []
    inside, fence, language, code = False, None, "", []
    for line in (PROJECT / "README.md").read_text(encoding="utf-8").splitlines():
        if fence is not None:
            if line.strip() == fence:
                blocks.append((language, "\n".join(code) + "\n"))
                fence = None
            else:
                code.append(line)
            continue
        opening = re.match(r"^(```+)\s*(\w*)\s*$", line)
        heading_level = re.match(r"^(#{1,6}) ", line)
        if line.strip() == heading:
            inside = True
        elif inside and heading_level and len(heading_level.group(1)) <= level:
            break
        elif inside and opening:
            fence, language, code = opening.group(1), opening.group(2), []
    assert inside, f"README.md has no {heading!r}"
    return blocks


def write_project(root: Path, **overlay) -> Path:
    """A project folder like this one: conf/ (base.yaml and a tiny local overlay), lakehouse/."""
    conf = root / "conf"
    conf.mkdir()
    shutil.copy(PROJECT / "conf" / "base.yaml", conf / "base.yaml")
    spark_conf = {"master": "local[2]", "shuffle_partitions": 2, "driver_memory": "2g"}
    local = {"spark": spark_conf, "storage": {"engine": "embedded"}, **overlay}
    (conf / "local.yaml").write_text(yaml.safe_dump(local))
    return root


@contextlib.contextmanager
def in_project(spark, root: Path, monkeypatch) -> Iterator[None]:
    """cwd = `root`, the local overlay, any warning an error; the shared session's checkpoints kept."""
    monkeypatch.chdir(root)
    monkeypatch.delenv("LLMREC_ENV", raising=False)
    checkpoints = spark.sparkContext.getCheckpointDir()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            # py4j's sockets, closed by the garbage collector whenever it runs: not the README's
            warnings.simplefilter("ignore", ResourceWarning)
            yield
    finally:
        if checkpoints:
            spark.sparkContext.setCheckpointDir(checkpoints)


def run_blocks(spark, root: Path, monkeypatch) -> tuple[list[dict], list[pd.DataFrame]]:
    """Each Python block's namespace and each SQL block's result, in README order."""
    blocks = readme_blocks()
    assert [language for language, _ in blocks] == ["python", "sql", "sql", "sql", "python"]
    namespaces, results = [], []
    with in_project(spark, root, monkeypatch):
        for language, code in blocks:
            if language == "python":
                namespace: dict = {"__name__": "__readme__"}
                exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our README
                namespaces.append(namespace)
            else:
                results.append(spark.sql(code).collect())
    # Rows, not toPandas(): pyspark's own pandas version check warns (distutils LooseVersion).
    return namespaces, [pd.DataFrame([row.asDict() for row in result]) for result in results]


def rows(frame: pd.DataFrame, *columns: str) -> list[tuple]:
    return [tuple(r) for r in frame[list(columns)].itertuples(index=False)]


# ---------------------------------------------------------------------------------------
# Against hand-published tables: exact rows


def ranked(ds: str, version: str) -> pd.DataFrame:
    """u00001 and u00002, two items each; the items and scores differ between the two dates."""
    first, second = ("i1", "i2") if ds == "2026-11-23" else ("i3", "i1")
    return pd.DataFrame(
        {
            "user_id": [USER, USER, "u00002", "u00002"],
            "rank": [1, 2, 1, 2],
            "item_id": [first, second, "i2", "i3"],
            "score": [0.75, 0.5, 0.25, 0.125],
            "source": ["hybrid", "als", "text", "popular"],
            "model_version": version,
            "ds": ds,
        }
    )


@pytest.fixture
def published(spark, tmp_path) -> Path:
    root = write_project(tmp_path, recommend={"retention_days": 0})
    cfg = load_config(root / "conf", env="local")
    store = open_store(spark, cfg.path(cfg.storage.lakehouse), "embedded")
    store.overwrite(
        "items",
        pd.DataFrame(
            {
                "item_id": ["i1", "i2", "i3"],
                "title": ["Trail Backpack", "Espresso Machine", "Rain Shell"],
                "description": "",
                "category": ["Outdoors", "Kitchen", "Outdoors"],
                "brand": "",
                "available": "true",
                "added_ds": "2026-11-01",
            }
        ),
    )
    ctx = RunContext(cfg=cfg, spark=spark, store=store, ds="")
    for ds, version in [("2026-11-22", "m2"), ("2026-11-23", "m3")]:
        ctx.ds = ds
        metadata = {PROP_MODEL_VERSION: version, PROP_MLFLOW_RUN_ID: f"run-{version}"}
        publish_recommendations(ctx, ranked(ds, version), metadata=metadata)
    return root


def test_readme_blocks_run_as_printed_against_published_tables(spark, published, monkeypatch):
    (with_spark, without_spark), (served, titled, run_dates) = run_blocks(
        spark, published, monkeypatch
    )

    assert with_spark["views"] == ["items", "recommendations", "recommendations_latest"]
    assert with_spark["served"]["llmrec.ds"] == "2026-11-23"
    assert with_spark["served"]["llmrec.model_version"] == "m3"
    assert rows(with_spark["top"].toPandas(), "ds", "rank", "item_id", "score") == [
        ("2026-11-23", 1, "i1", 0.75),
        ("2026-11-23", 2, "i2", 0.5),
    ]

    assert rows(served, "rank", "item_id", "score", "source", "model_version") == [
        (1, "i1", 0.75, "hybrid", "m3"),
        (2, "i2", 0.5, "als", "m3"),
    ]
    assert rows(titled, "rank", "title", "category") == [
        (1, "Trail Backpack", "Outdoors"),
        (2, "Espresso Machine", "Kitchen"),
    ]
    assert rows(run_dates, "ds", "users", "n_rows") == [("2026-11-23", 2, 4), ("2026-11-22", 2, 4)]

    assert without_spark["served"]["llmrec.model_version"] == "m3"
    assert rows(without_spark["top"], "rank", "item_id", "ds") == [
        (1, "i1", "2026-11-23"),
        (2, "i2", "2026-11-23"),
    ]
    day = without_spark["day"].sort_values(["user_id", "rank"])
    assert rows(day, "user_id", "rank", "item_id", "ds") == [
        (USER, 1, "i1", "2026-11-23"),
        (USER, 2, "i2", "2026-11-23"),
        ("u00002", 1, "i2", "2026-11-23"),
        ("u00002", 2, "i3", "2026-11-23"),
    ]


def test_views_name_only_existing_tables(spark, published):
    lakehouse = str(published / "lakehouse")
    assert register_views(spark, lakehouse, ["items"]) == ["items"]
    assert sorted(r["item_id"] for r in spark.table("items").collect()) == ["i1", "i2", "i3"]
    with pytest.raises(InputError, match="events_clean"):
        register_views(spark, lakehouse, ["items", "events_clean"])
    with pytest.raises(KeyError, match="unknown table 'recs'"):
        register_views(spark, lakehouse, ["recs"])
    with pytest.raises(InputError, match="no lakehouse folder"):
        register_views(spark, str(published / "nowhere"))
    assert not (published / "nowhere").exists()
    assert table_metadata(spark, lakehouse, "recommendations")["llmrec.ds"] == "2026-11-23"


# ---------------------------------------------------------------------------------------
# Against the demo's own nightly: the README's user and the published properties exist

DEMO_DS = "2026-11-23"
TOP_N = TINY_OVERLAY["recommend"]["top_n"]


@pytest.mark.slow
def test_readme_blocks_run_against_the_demo_nightly(spark, tmp_path, monkeypatch):
    from llmrec_spark.io.demo import generate_demo
    from llmrec_spark.pipeline.runner import run_nightly

    root = write_project(tmp_path, **TINY_OVERLAY)
    cfg = load_config(root / "conf", env="local")
    generate_demo(cfg.demo, cfg.path(cfg.storage.landing), DEMO_DS)
    summary = run_nightly(cfg, spark, DEMO_DS)

    (with_spark, without_spark), (served, titled, run_dates) = run_blocks(spark, root, monkeypatch)

    assert {"events_clean", "items", "recommendations", "recommendations_latest"} <= set(
        with_spark["views"]
    )
    assert with_spark["served"]["llmrec.ds"] == DEMO_DS
    assert with_spark["served"]["llmrec.model_version"] == summary.mlflow_run_id
    top = with_spark["top"].toPandas()
    assert top["rank"].tolist() == list(range(1, TOP_N + 1))
    assert set(top["ds"]) == {DEMO_DS}
    assert served["rank"].tolist() == list(range(1, TOP_N + 1))
    assert served["item_id"].tolist() == top["item_id"].tolist()
    assert set(served["model_version"]) == {summary.mlflow_run_id}
    assert titled["rank"].tolist() == list(range(1, TOP_N + 1)) and titled["title"].notna().all()
    assert run_dates["ds"].tolist() == [DEMO_DS] and run_dates["users"][0] > 1
    assert without_spark["served"]["llmrec.ds"] == DEMO_DS
    assert without_spark["top"]["item_id"].tolist() == top["item_id"].tolist()
    assert len(without_spark["day"]) == run_dates["n_rows"][0]
