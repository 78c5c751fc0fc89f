"""Helpers that let the Databricks notebooks also run as plain Python."""

from __future__ import annotations

import logging
import os
from typing import Any

from llmrec_spark.config import Config, load_config
from llmrec_spark.runtime.session import build_spark

log = logging.getLogger(__name__)


def param(name: str, default: str) -> str:
    """A notebook parameter: a Databricks widget when there is one, else $LLMREC_<NAME>, else default."""
    try:
        dbutils = _ipython_global("dbutils")
        dbutils.widgets.text(name, default)
        return str(dbutils.widgets.get(name))
    except LookupError:
        return os.environ.get(f"LLMREC_{name.upper()}", default)


def setup(conf_dir: str | None = None, env: str | None = None, overrides: list[str] | None = None):
    """Config and SparkSession for a notebook; on Databricks the running session is reused."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    folder = conf_dir or os.environ.get("LLMREC_CONF_DIR") or "conf"
    cfg: Config = load_config(folder, env=env, overrides=overrides)
    return cfg, build_spark(cfg)


def show(data: Any, rows: int = 20) -> None:
    """Databricks `display` when available, else a plain-text table in the log/stdout."""
    try:
        _ipython_global("display")(data)
        return
    except LookupError:
        pass
    if hasattr(data, "savefig"):  # a matplotlib figure: nothing to draw on outside a notebook
        log.info("figure: %s", ", ".join(ax.get_title() for ax in data.axes))
    elif hasattr(data, "show"):
        data.show(rows, truncate=60)
    else:
        import pandas as pd

        with pd.option_context("display.max_columns", 20, "display.width", 160):
            log.info("\n%s", data.head(rows) if hasattr(data, "head") else data)


def show_html(path: str) -> None:
    """An HTML report inline on Databricks (`displayHTML`), else its path in the log."""
    try:
        display_html = _ipython_global("displayHTML")
    except LookupError:
        log.info("report: %s", path)
        return
    with open(path, encoding="utf-8") as fh:
        display_html(fh.read())


def _ipython_global(name: str) -> Any:
    try:
        from IPython import get_ipython  # type: ignore[import-not-found]
    except ImportError:
        raise LookupError(name) from None
    shell = get_ipython()
    if shell is None or name not in shell.user_ns:
        raise LookupError(name)
    return shell.user_ns[name]
