"""The package's shape: one-way dependencies, a numpy/torch core, functions a reader can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROJECT

PACKAGE = PROJECT / "llmrec_spark"
LAYERS = ("core", "io", "runtime", "stages", "evaluation", "pipeline", "bench")
MAX_FUNCTION_LINES = 80


def test_the_layering_contracts_hold() -> None:
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run(
        [str(lint), "--no-cache"], cwd=PROJECT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "2 kept, 0 broken" in done.stdout


def test_core_imports_neither_spark_nor_pandas() -> None:
    modules = sorted(f"llmrec_spark.core.{p.stem}" for p in (PACKAGE / "core").glob("*.py"))
    assert "llmrec_spark.core.encoder" in modules and "llmrec_spark.core.topn" in modules
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in ('pyspark', 'pandas', 'mlflow', 'deltalake') if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=PROJECT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_says_what_lives_there(layer: str) -> None:
    doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text()))
    assert doc, layer
    summary = doc.splitlines()[0]
    assert summary.endswith(".") and len(summary) <= 120, summary


def _long_functions(root: Path, limit: int) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > limit:
                    found.append(
                        f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({lines})"
                    )
    return found


def test_no_package_function_is_longer_than_a_reader_can_hold() -> None:
    assert _long_functions(PACKAGE, MAX_FUNCTION_LINES) == []


def test_the_length_check_sees_a_long_function(tmp_path: Path) -> None:
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert _long_functions(tmp_path, MAX_FUNCTION_LINES) == [
        f"{tmp_path.name}/m.py:5 long ({MAX_FUNCTION_LINES + 1})"
    ]
