from pathlib import Path

import pytest

from llmrec_spark.config import load_config
from llmrec_spark.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"


def test_base_plus_local_overlay_and_overrides():
    cfg = load_config(
        CONF, env="local", overrides=["als.rank=64", "recommend.exclude_categories=[toys, books]"]
    )
    assert cfg.env == "local"
    assert cfg.spark.master == "local[*]"  # from local.yaml
    assert cfg.storage.engine == "embedded"
    assert cfg.als.rank == 64
    assert cfg.recommend.exclude_categories == ["toys", "books"]
    assert cfg.clean.event_weights["purchase"] == 8.0


def test_int_accepted_for_float_and_relative_paths_resolve_under_root(tmp_path):
    cfg = load_config(CONF, overrides=["als.alpha=3", f"root={tmp_path}"])
    assert cfg.als.alpha == 3.0 and isinstance(cfg.als.alpha, float)
    assert cfg.path(cfg.storage.lakehouse) == str(tmp_path / "lakehouse")
    assert cfg.path("s3://bucket/x") == "s3://bucket/x"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("als.rnak=3", "unknown config key 'als.rnak' (did you mean 'als.rank'?)"),
        ("als.rank=abc", "als.rank: expected an integer, got str 'abc'"),
        ("als.rank=1.5", "als.rank: expected an integer, got float 1.5"),
        ("spark.ui_enabled=maybe", "spark.ui_enabled: expected true/false, got str 'maybe'"),
        ("nosuchsection.x=1", "unknown config key 'nosuchsection'"),
        ("recommend.text_weight=2", "recommend.text_weight: must be within [0, 1]"),
        (
            "evaluate.tune_text_kernels=[0.1, -1]",
            "recommend.text_kernel, evaluate.tune_text_kernels: must not be negative (0 = the mean vector)",
        ),
        (
            "recommend.neighbour_factors=-1",
            "recommend.neighbour_factors, evaluate.tune_neighbour_factors: must not be negative (0 = off)",
        ),
        ("recommend.neighbour_temperature=0", "recommend.neighbour_temperature: must be positive"),
        (
            "contrastive.input_dropout=1",
            "contrastive.input_dropout: must be within [0, 1) (0 = off)",
        ),
        ("als", "--conf expects key=value, got 'als'"),
        ("evaluate.ks=5", "evaluate.ks: expected a list, got int 5"),
    ],
)
def test_bad_settings_are_one_clear_line(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONF, overrides=[override])
    assert str(err.value) == message


def test_unknown_environment_and_missing_conf_dir(tmp_path):
    with pytest.raises(ConfigError, match="unknown environment 'prod'"):
        load_config(CONF, env="prod")
    with pytest.raises(ConfigError, match="has no base.yaml"):
        load_config(tmp_path / "nowhere")


def test_environment_references_expand_and_missing_ones_are_named(monkeypatch):
    monkeypatch.setenv("LLMREC_LAKEHOUSE", "/data/lake")
    monkeypatch.setenv("LLMREC_LANDING", "/data/landing")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = load_config(CONF, env="cluster")
    assert cfg.storage.lakehouse == "/data/lake"
    assert cfg.storage.checkpoint_dir == "/data/lake/_checkpoints"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(
        ConfigError,
        match="mlflow.tracking_uri: environment variable 'MLFLOW_TRACKING_URI' is not set",
    ):
        load_config(CONF, env="cluster")


def test_yaml_errors_name_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("als: [unclosed\n")
    with pytest.raises(ConfigError, match="base.yaml: not valid YAML"):
        load_config(tmp_path)


def test_spark_settings_keep_their_dots():
    cfg = load_config(CONF, overrides=["spark.extra.spark.executor.memory=8g"])
    assert cfg.spark.extra["spark.executor.memory"] == "8g"
    assert cfg.spark.extra["spark.sql.adaptive.enabled"] == "false"  # from local.yaml, kept
