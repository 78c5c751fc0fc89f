import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from llmrec_spark.config import (
    ENVIRONMENTS,
    Config,
    EmbedConfig,
    check_embed,
    load_config,
)
from llmrec_spark.errors import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
# Set at load time, not in base.yaml: the environment chosen and the folder holding conf/.
RUN_SCOPED = {"env", "root"}


def _dotted_keys(node: dict[str, Any], prefix: str = "") -> set[str]:
    """`section.key` for every leaf of a YAML mapping (a dict-valued setting is one leaf)."""
    keys = set()
    for name, value in node.items():
        is_section = isinstance(value, dict) and f"{prefix}{name}" not in DICT_SETTINGS
        keys |= _dotted_keys(value, f"{prefix}{name}.") if is_section else {f"{prefix}{name}"}
    return keys


def _setting_defaults(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`section.key -> value` for every field reachable from a config dataclass instance."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out |= _setting_defaults(value, f"{prefix}{f.name}.")
        else:
            out[f"{prefix}{f.name}"] = value
    return out


DEFAULTS = {k: v for k, v in _setting_defaults(Config()).items() if k not in RUN_SCOPED}
DICT_SETTINGS = {k for k, v in DEFAULTS.items() if isinstance(v, dict)}


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
        (
            "contrastive.anchor_pooling=max",
            "contrastive.anchor_pooling: choose one of mean_of_heads, head_of_mean, got 'max'",
        ),
        ("contrastive.reader_workers=0", "contrastive.reader_workers: must be at least 1, got 0"),
        ("contrastive.epochs=0", "contrastive.epochs: must be at least 1, got 0"),
        ("contrastive.device=gpu", "contrastive.device: choose auto, cpu or cuda, got 'gpu'"),
        ("embed.batch_size=0", "embed.batch_size: must be positive, got 0"),
        ("embed.max_length=1", "embed.max_length: must be at least 2, got 1"),
        ("embed.device=gpu0", "embed.device: 'gpu0' is not auto, cpu, cuda or cuda:N"),
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


def test_base_yaml_sets_every_setting():
    base = yaml.safe_load((CONF / "base.yaml").read_text())
    missing = sorted(DEFAULTS.keys() - _dotted_keys(base))
    assert missing == [], f"add these settings, with a comment, to conf/base.yaml: {missing}"
    assert "spark.extra" in DEFAULTS and "als.search.trials" in DEFAULTS  # the walk reaches both


def test_base_yaml_values_are_the_dataclass_defaults(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "base.yaml").write_text((CONF / "base.yaml").read_text())
    base_only = _setting_defaults(load_config(tmp_path / "conf", env="local"))  # no overlay here
    differing = {k: (base_only[k], v) for k, v in DEFAULTS.items() if base_only[k] != v}
    assert differing == {}, "base.yaml and config.py disagree on (base, default)"


@pytest.mark.parametrize(
    ("env", "master", "engine"),
    [("local", "local[*]", "embedded"), ("cluster", "", "auto"), ("databricks", "", "spark")],
)
def test_every_overlay_loads(monkeypatch, env, master, engine):
    monkeypatch.setenv("LLMREC_LAKEHOUSE", "/data/lake")
    monkeypatch.setenv("LLMREC_LANDING", "/data/landing")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = load_config(CONF, env=env)
    assert (cfg.env, cfg.spark.master, cfg.storage.engine) == (env, master, engine)
    assert cfg.root == str(CONF.parent)


def test_overlays_cover_every_environment():
    assert sorted(p.stem for p in CONF.glob("*.yaml") if p.stem != "base") == sorted(ENVIRONMENTS)


def test_embed_max_length_is_bounded_by_the_models_positions():
    check_embed(EmbedConfig(max_length=512), max_positions=512)
    with pytest.raises(ConfigError) as err:
        check_embed(EmbedConfig(max_length=513), max_positions=512)
    assert str(err.value) == "embed.max_length: must be within [2, 512] for this model, got 513"


def test_tower_choices_match_the_tower_modules():
    from llmrec_spark import config
    from llmrec_spark.core import tower
    from llmrec_spark.stages import contrastive

    assert config.ANCHOR_POOLINGS == tower.ANCHOR_POOLINGS
    assert config.EXAMPLE_KINDS == contrastive.EXAMPLE_KINDS
