"""The scheduled-job definitions under conf/: the Databricks bundle and the Airflow DAG.

Neither Databricks nor Airflow is installed: the bundle is read as YAML and the DAG file as
a Python AST. Both must run the pipeline's stages in the pipeline's order, pass the run date
to every task, and name entry points that exist and accept the arguments they are given.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from llmrec_spark.cli import build_parser, shift_ds
from llmrec_spark.pipeline.runner import NIGHTLY_AFTER_CLEAN, STAGES

PROJECT = Path(__file__).resolve().parents[2]
CONF = PROJECT / "conf"
BUNDLE = CONF / "bundle" / "databricks.yml"
DAG_FILE = CONF / "airflow" / "llmrec_nightly_dag.py"
STAGE_ORDER = ["clean", *NIGHTLY_AFTER_CLEAN]
GPU_STAGES = {"embed", "train-vae", "train-contrastive"}


def topological_order(edges: dict[str, set[str]]) -> list[str]:
    """Kahn's algorithm over task -> upstream tasks; raises on a cycle or an unknown upstream."""
    for task, upstream in edges.items():
        unknown = upstream - edges.keys()
        assert not unknown, f"{task} depends on undefined tasks {unknown}"
    remaining = {task: set(up) for task, up in edges.items()}
    order = []
    while remaining:
        ready = sorted(t for t, up in remaining.items() if not up)
        assert ready, f"cycle among {sorted(remaining)}"
        if len(ready) > 1:
            raise AssertionError(f"{ready} could run in any order; expected one chain")
        order.append(ready[0])
        del remaining[ready[0]]
        for up in remaining.values():
            up.discard(ready[0])
    return order


def job_script_stage(script: Path) -> str:
    """The `llmrec` sub-command a jobs/*.py script dispatches to: main(["<stage>", ...])."""
    match = re.search(r'main\(\["([a-z-]+)"', script.read_text())
    assert match, f"{script} does not call llmrec_spark.cli.main with a stage"
    return match.group(1)


def test_topological_order_rejects_cycles_and_forks():
    assert topological_order({"a": set(), "b": {"a"}, "c": {"b"}}) == ["a", "b", "c"]
    with pytest.raises(AssertionError, match="cycle"):
        topological_order({"a": {"b"}, "b": {"a"}})
    with pytest.raises(AssertionError, match="any order"):
        topological_order({"a": set(), "b": {"a"}, "c": {"a"}})


# ---------------------------------------------------------------------------------------
# Databricks Asset Bundle


@pytest.fixture(scope="module")
def bundle() -> dict:
    root = yaml.safe_load(BUNDLE.read_text())
    for pattern in root.get("include", []):
        files = sorted(BUNDLE.parent.glob(pattern))
        assert files, f"include {pattern!r} matches no file"
        for path in files:
            resources = yaml.safe_load(path.read_text())["resources"]
            for kind, items in resources.items():
                for name, item in items.items():
                    item["_file"] = path
                    root.setdefault("resources", {}).setdefault(kind, {})[name] = item
    return root


@pytest.fixture(scope="module")
def nightly_job(bundle) -> dict:
    return bundle["resources"]["jobs"]["llmrec_nightly"]


def test_bundle_tasks_are_the_pipeline_stages_in_order(nightly_job):
    edges = {
        task["task_key"]: {d["task_key"] for d in task.get("depends_on", [])}
        for task in nightly_job["tasks"]
    }
    assert topological_order(edges) == STAGE_ORDER
    assert set(edges) == set(STAGES) - {"evaluate-protocols"}


def test_the_weekly_jobs_run_the_protocol_suite_on_sundays(bundle):
    job = bundle["resources"]["jobs"]["llmrec_weekly_evaluation"]
    (task,) = job["tasks"]
    script = (job["_file"].parent / task["spark_python_task"]["python_file"]).resolve()
    assert job_script_stage(script) == task["task_key"] == "evaluate-protocols"
    assert job["schedule"]["quartz_cron_expression"].split()[-1] == "SUN"
    args = build_parser().parse_args(
        [
            "evaluate-protocols",
            *(
                _substitute(
                    str(a),
                    {
                        "{{job.parameters.ds}}": "2026-11-29",
                        "{{job.parameters.ds_offset}}": "-1",
                        "${workspace.file_path}": "/Workspace/llmrec",
                    },
                )
                for a in task["spark_python_task"]["parameters"]
            ),
        ]
    )
    assert shift_ds(args.ds, args.ds_offset) == "2026-11-28"
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in job["job_clusters"]}
    assert "-gpu-ml-" in clusters[task["job_cluster_key"]]["spark_version"]  # it refits the tower

    weekly = dag_block("llmrec_weekly_evaluation")
    tasks, _, edges = _tasks_of(weekly)
    assert list(tasks) == ["evaluate-protocols"] and not edges
    application = tasks["evaluate-protocols"]["application"]
    assert ast.literal_eval(application.values[-1]) == "/jobs/evaluate_protocols.py"
    call = weekly.items[0].context_expr
    assert isinstance(call, ast.Call)
    schedule = {k.arg: k.value for k in call.keywords}["schedule"]
    assert ast.literal_eval(schedule).split()[-1] == "0"  # Sunday


def test_bundle_tasks_run_existing_job_scripts_of_their_stage(nightly_job, bundle):
    for task in nightly_job["tasks"]:
        script = (nightly_job["_file"].parent / task["spark_python_task"]["python_file"]).resolve()
        assert script.parent == PROJECT / "jobs", script
        assert script.is_file(), script
        assert job_script_stage(script) == task["task_key"]
        assert task["libraries"] == [{"whl": "../../../dist/*.whl"}]
    wheel_project = (BUNDLE.parent / bundle["artifacts"]["llmrec_wheel"]["path"]).resolve()
    assert (wheel_project / "pyproject.toml").is_file()
    for path in bundle["sync"]["paths"]:
        assert (BUNDLE.parent / path).resolve().is_dir(), path


def test_bundle_passes_the_run_date_the_cli_accepts(nightly_job):
    params = {p["name"]: p["default"] for p in nightly_job["parameters"]}
    assert params == {"ds": "{{job.trigger.time.iso_date}}", "ds_offset": "-1"}
    values = {
        "{{job.parameters.ds}}": "2026-11-24",
        "{{job.parameters.ds_offset}}": "-1",
        "${workspace.file_path}": "/Workspace/llmrec",
    }
    for task in nightly_job["tasks"]:
        argv = [task["task_key"]] + [
            _substitute(str(a), values) for a in task["spark_python_task"]["parameters"]
        ]
        args = build_parser().parse_args(argv)
        assert args.command == task["task_key"]
        assert shift_ds(args.ds, args.ds_offset) == "2026-11-23"
        assert args.env == "databricks"
        assert args.conf_dir == "/Workspace/llmrec/conf"


def test_bundle_schedule_and_clusters(nightly_job):
    schedule = nightly_job["schedule"]
    assert schedule["quartz_cron_expression"].split() == ["0", "30", "2", "*", "*", "?"]
    assert schedule["timezone_id"] == "UTC"
    clusters = {c["job_cluster_key"]: c["new_cluster"] for c in nightly_job["job_clusters"]}
    for task in nightly_job["tasks"]:
        spark_version = clusters[task["job_cluster_key"]]["spark_version"]
        assert spark_version.startswith("15.4.x-")  # the platform line: DBR 15.4 LTS ML
        want = "-gpu-ml-" if task["task_key"] in GPU_STAGES else "-cpu-ml-"
        assert want in spark_version, (task["task_key"], spark_version)


def _substitute(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace(key, value)
    assert "{{" not in text and "${" not in text, f"unresolved reference in {text!r}"
    return text


# ---------------------------------------------------------------------------------------
# Airflow DAG (parsed, not imported: Airflow is no dependency of this project)


def dag_block(dag_id: str) -> ast.With:
    """The `with DAG(dag_id=...)` block of the DAG file that defines `dag_id`."""
    for node in ast.walk(ast.parse(DAG_FILE.read_text())):
        if isinstance(node, ast.With):
            call = node.items[0].context_expr
            if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "DAG":
                keywords = {k.arg: k.value for k in call.keywords}
                if ast.literal_eval(keywords["dag_id"]) == dag_id:
                    return node
    raise AssertionError(f"no DAG {dag_id!r} in {DAG_FILE}")


@pytest.fixture(scope="module")
def dag_tasks() -> tuple[dict[str, dict[str, ast.expr]], dict[str, str], set[tuple[str, str]]]:
    """The nightly DAG's (task_id -> operator keywords, variable -> task_id,
    upstream/downstream task_id edges)."""
    return _tasks_of(dag_block("llmrec_nightly"))


def _tasks_of(
    tree: ast.AST,
) -> tuple[dict[str, dict[str, ast.expr]], dict[str, str], set[tuple[str, str]]]:
    tasks: dict[str, dict[str, ast.expr]] = {}
    variables: dict[str, str] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and getattr(node.value.func, "id", None) == "SparkSubmitOperator"
        ):
            keywords = {k.arg: k.value for k in node.value.keywords if k.arg}
            task_id = ast.literal_eval(keywords["task_id"])
            tasks[task_id] = keywords
            (target,) = node.targets
            assert isinstance(target, ast.Name)
            variables[target.id] = task_id
    edges: set[tuple[str, str]] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.BinOp):
            chain = _rshift_chain(node.value)
            edges |= {(variables[a], variables[b]) for a, b in zip(chain, chain[1:], strict=False)}
    return tasks, variables, edges


def _rshift_chain(node: ast.expr) -> list[str]:
    if isinstance(node, ast.BinOp):
        assert isinstance(node.op, ast.RShift), ast.dump(node.op)
        return _rshift_chain(node.left) + _rshift_chain(node.right)
    assert isinstance(node, ast.Name), ast.dump(node)
    return [node.id]


def test_dag_tasks_are_the_pipeline_stages_in_order(dag_tasks):
    tasks, _, edges = dag_tasks
    upstream: dict[str, set[str]] = {task: set() for task in tasks}
    for up, down in edges:
        upstream[down].add(up)
    assert topological_order(upstream) == STAGE_ORDER


def test_dag_applications_are_job_scripts_of_their_stage(dag_tasks):
    tasks, _, _ = dag_tasks
    for task_id, keywords in tasks.items():
        application = keywords["application"]
        assert isinstance(application, ast.JoinedStr)
        assert ast.unparse(application.values[0]) == "{LLMREC_HOME}"
        relative = ast.literal_eval(application.values[-1]).lstrip("/")
        script = PROJECT / relative
        assert script.parent == PROJECT / "jobs" and script.is_file(), script
        assert job_script_stage(script) == task_id


def test_dag_passes_airflow_ds_the_cli_accepts(dag_tasks):
    tasks, _, _ = dag_tasks
    for task_id, keywords in tasks.items():
        argv = ast.literal_eval(keywords["application_args"])
        assert argv[argv.index("--ds") + 1] == "{{ ds }}"
        args = build_parser().parse_args(
            [task_id, *(_substitute(a, {"{{ ds }}": "2026-11-23"}) for a in argv)]
        )
        assert (args.command, args.ds, args.ds_offset, args.env) == (
            task_id,
            "2026-11-23",
            0,
            "cluster",
        )


def test_dag_ships_the_packed_virtualenv():
    tree = ast.parse(DAG_FILE.read_text())
    constants = {
        node.targets[0].id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
    }
    submit = constants["SUBMIT"]
    assert isinstance(submit, ast.Dict)
    fields = {ast.literal_eval(k): v for k, v in zip(submit.keys, submit.values, strict=True)}
    assert ast.unparse(fields["archives"]) == "f'{VENV_ARCHIVE}#environment'"
    assert ast.literal_eval(fields["conn_id"]) == "spark_llmrec"
    spark_conf = constants["SPARK_CONF"]
    assert isinstance(spark_conf, ast.Dict)
    conf = {ast.literal_eval(k): v for k, v in zip(spark_conf.keys, spark_conf.values, strict=True)}
    assert ast.literal_eval(conf["spark.pyspark.python"]) == "./environment/bin/python"


# ---------------------------------------------------------------------------------------
# No secrets in conf/

SECRET_PATTERNS = {
    "assignment": re.compile(
        r"""(?ix)(password|passwd|secret|token|api[_-]?key|access[_-]?key|client[_-]?secret)
        ['"]?\s*[:=]\s*['"]?(?!\$\{|\{\{|['"]?\s*$)[^\s'",}]{4,}"""
    ),
    "databricks token": re.compile(r"\bdapi[0-9a-f]{32}\b"),
    "aws key id": re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    "github token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "credentials in url": re.compile(r"://[^/\s:@]+:[^/\s@${]+@"),
}


def find_secrets(text: str) -> list[str]:
    """Names of the secret patterns that match `text`."""
    return [name for name, pattern in SECRET_PATTERNS.items() if pattern.search(text)]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("token: s3cr3t-value", ["assignment"]),
        ('"password": "hunter22"', ["assignment"]),
        (
            "DATABRICKS_TOKEN=dapi0123456789abcdef0123456789abcdef",
            ["assignment", "databricks token"],
        ),
        ("aws: AKIAABCDEFGHIJKLMNOP", ["aws key id"]),
        ("-----BEGIN RSA PRIVATE KEY-----", ["private key"]),
        ("tracking_uri: postgresql://mlflow:pa55word@db:5432/mlflow", ["credentials in url"]),
        ("token: ${DATABRICKS_TOKEN}", []),
        ("tracking_uri: ${MLFLOW_TRACKING_URI}", []),
        ("api_key: {{ var.value.api_key }}", []),
        ("ds: '{{job.parameters.ds}}'", []),
    ],
)
def test_secret_scanner_flags_literals_not_references(text, found):
    assert find_secrets(text) == found


def test_conf_holds_no_secrets():
    files = sorted(p for p in CONF.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert {p.relative_to(CONF).as_posix() for p in files} >= {
        "base.yaml",
        "bundle/databricks.yml",
        "airflow/llmrec_nightly_dag.py",
    }
    leaks = {p.relative_to(CONF).as_posix(): find_secrets(p.read_text()) for p in files}
    assert {name: hits for name, hits in leaks.items() if hits} == {}
