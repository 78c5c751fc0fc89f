import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from llmrec_spark import config
from llmrec_spark.config import (
    ENVIRONMENTS,
    CleanConfig,
    Config,
    EmbedConfig,
    check_clean,
    check_embed,
    is_uri,
    load_config,
    register_check,
    validate,
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
        ("contrastive.mode=lora", "contrastive.mode: choose head or encoder, got 'lora'"),
        (
            "contrastive.encoder_start=warm",
            "contrastive.encoder_start: choose head or scratch, got 'warm'",
        ),
        ("embed.batch_size=0", "embed.batch_size: must be positive, got 0"),
        ("embed.max_length=1", "embed.max_length: must be at least 2, got 1"),
        ("embed.device=gpu0", "embed.device: 'gpu0' is not auto, cpu, cuda or cuda:N"),
        ("embed.max_text_chars=0", "embed.max_text_chars: must be positive, got 0"),
        (
            "clean.event_weights.like=1",
            "clean.event_weights: unknown event type(s) like; known: view, click, cart, purchase, rating",
        ),
        ("demo.malformed_rate=1.5", "demo.malformed_rate=1.5: rates must lie within [0, 1]"),
        (
            "demo.late_rate=0.99",  # + 0.013 of the other broken-record rates
            "demo: the *_rate settings of broken records add up to more than 1",
        ),
        ("demo.days=0", "demo.days: must be at least 1"),
        ("demo.n_bots=-1", "demo.n_bots: must not be negative"),
        ("demo.n_items=9", "demo.n_items/n_users: at least 10 each"),
        (
            "als.search.metric=ndgc@10",
            "als.search.metric: a metric@k of f1, hit_rate, map, ndcg, precision, recall, "
            "got 'ndgc@10'",
        ),
        (
            "als.search.metric=ndcg",
            "als.search.metric: a metric@k of f1, hit_rate, map, ndcg, precision, recall, "
            "got 'ndcg'",
        ),
        ("als.search.trials=-1", "als.search.trials: must be 0 (the whole grid) or positive"),
        ("storage.engine=duckdb", "storage.engine: choose auto, embedded or spark"),
        (
            "evaluate.protocols=[user_temporal, leave_one_out]",
            "evaluate.protocols: a non-empty list of user_temporal, cold_item, global_temporal, cold_user",
        ),
        (
            "recommend.recent_half_life=-1",
            "recommend.recent_half_life, evaluate.tune_recent_half_lives: must not be negative "
            "(0 = plain mean)",
        ),
        (
            "recommend.new_item_slots=20",  # top_n is 20: a list of new items only
            "recommend.new_item_slots, evaluate.tune_new_item_slots: must be within "
            "[0, recommend.top_n) (0 = off)",
        ),
        (
            "evaluate.tune_new_item_slots=[0, -1]",
            "recommend.new_item_slots, evaluate.tune_new_item_slots: must be within "
            "[0, recommend.top_n) (0 = off)",
        ),
        (
            "recommend.new_item_min_z=.nan",
            "recommend.new_item_min_z, evaluate.tune_new_item_min_z: must be finite",
        ),
        (
            "evaluate.tune_new_item_min_z=[1.0, .inf]",
            "recommend.new_item_min_z, evaluate.tune_new_item_min_z: must be finite",
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


def test_base_yaml_sets_every_setting():
    base = yaml.safe_load((CONF / "base.yaml").read_text())
    missing = sorted(DEFAULTS.keys() - _dotted_keys(base))
    assert missing == [], f"add these settings, with a comment, to conf/base.yaml: {missing}"
    assert "spark.extra" in DEFAULTS and "als.search.trials" in DEFAULTS  # the walk reaches both


def test_base_yaml_comments_every_setting():
    """Each key has a comment on its line or on the line just above it."""
    lines = (CONF / "base.yaml").read_text().splitlines()
    path: list[str] = []
    bare = []
    for above, line in zip(["#", *lines], lines, strict=False):
        key = re.match(r"( *)([a-z_]+):", line)
        if key is None:
            continue
        path[len(key.group(1)) // 2 :] = [key.group(2)]
        if " #" not in line and not above.lstrip().startswith("#"):
            bare.append(".".join(path))
    assert bare == [], f"say what these settings do in conf/base.yaml: {bare}"


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


def test_metric_names_in_config_match_the_metric_functions():
    from llmrec_spark.core import metrics

    # The one set of names config cannot import (core.metrics maps them to functions).
    assert tuple(metrics.METRIC_FUNCTIONS) == config.RANKING_METRICS


def test_every_event_type_but_rating_needs_a_weight():
    # An overlay or --conf can only add weights (mappings merge), so a gap comes from code.
    with pytest.raises(ConfigError) as err:
        check_clean(CleanConfig(event_weights={"view": 1.0}))
    assert (
        str(err.value) == "clean.event_weights: no weight for event type(s) click, cart, purchase"
    )
    check_clean(CleanConfig(event_weights={"view": 1, "click": 2, "cart": 3, "purchase": 4}))


@pytest.fixture
def checks(monkeypatch):
    """The registered checks, restored after the test."""
    monkeypatch.setattr(config, "_CHECKS", list(config._CHECKS))
    return config._CHECKS


def test_a_registered_check_runs_at_load_and_its_message_reaches_the_user(checks):
    seen = []

    def top_n_fits_the_catalog(recommend):
        seen.append(recommend.top_n)
        if recommend.top_n > 100:
            raise ConfigError(
                f"recommend.top_n: at most 100 for this catalog, got {recommend.top_n}"
            )

    assert register_check(top_n_fits_the_catalog, "recommend") is top_n_fits_the_catalog
    register_check(top_n_fits_the_catalog, "recommend")  # a second registration keeps one
    assert load_config(CONF).recommend.top_n == 20
    assert seen == [20]
    with pytest.raises(ConfigError) as err:
        load_config(CONF, overrides=["recommend.top_n=500"])
    assert str(err.value) == "recommend.top_n: at most 100 for this catalog, got 500"


def test_a_whole_config_check_sees_every_section(checks):
    def landing_beside_lakehouse(cfg):
        if not cfg.path(cfg.storage.landing).startswith(cfg.root):
            raise ConfigError("storage.landing: keep it under root")

    register_check(landing_beside_lakehouse)
    validate(Config(root="/srv/llmrec", storage=config.StorageConfig(landing="landing")))
    with pytest.raises(ConfigError, match="storage.landing: keep it under root"):
        validate(Config(root="/srv/llmrec", storage=config.StorageConfig(landing="/data/in")))
    with pytest.raises(ValueError, match="no section 'recomend'"):
        register_check(landing_beside_lakehouse, "recomend")


@pytest.mark.parametrize(
    ("value", "uri"),
    [
        ("s3a://bucket/lake", True),
        ("dbfs:/landing", True),
        ("abfss://c@acct.dfs.core.windows.net/x", True),
        ("file:/tmp/lake", True),
        ("C:/data/lake", False),  # a drive letter, not a scheme
        ("lakehouse", False),
        ("/data/lake", False),
        ("lake:house", False),
    ],
)
def test_uris_have_a_scheme_of_two_or_more_letters(value, uri):
    assert is_uri(value) is uri


def test_a_single_slash_uri_is_not_resolved_under_root(tmp_path):
    cfg = load_config(CONF, overrides=[f"root={tmp_path}", "storage.landing=dbfs:/landing"])
    assert cfg.path(cfg.storage.landing) == "dbfs:/landing"
    assert cfg.path("C:/data") == str(tmp_path.resolve() / "C:" / "data")
