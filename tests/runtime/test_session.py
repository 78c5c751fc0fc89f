"""The local scratch folder behind Derby's home and the quiet log4j2 file."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from llmrec_spark.runtime.session import _local_log4j2, _scratch
from tests.conftest import make_config


def test_scratch_sits_under_a_local_lakehouse(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    scratch = Path(_scratch(cfg))
    assert scratch == Path(cfg.path(cfg.storage.lakehouse)) / "_scratch"
    assert scratch.is_dir()


@pytest.mark.parametrize("lakehouse", ["s3a://bucket/lake", "dbfs:/mnt/lake"])
def test_a_uri_lakehouse_gets_a_local_scratch_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lakehouse: str
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SPARK_CONF_DIR", raising=False)
    monkeypatch.delenv("SPARK_HOME", raising=False)
    cfg = make_config(tmp_path, f"storage.lakehouse={lakehouse}")
    scratch = Path(_scratch(cfg))
    assert scratch == Path(tempfile.gettempdir()) / "llmrec-spark" / "_scratch"
    log4j2 = _local_log4j2(cfg)
    assert log4j2 == str(scratch / "log4j2.properties")
    assert "rootLogger.level = warn" in Path(log4j2).read_text()
    # Nothing named after the scheme appears beside the project (Path("s3a://b") is "s3a:/b").
    assert not any(p.name.endswith(":") for p in tmp_path.rglob("*"))
