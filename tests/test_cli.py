"""The CLI's error paths: a user mistake is one line on stderr and a non-zero exit, no traceback."""

import json
from pathlib import Path

import pytest

from llmrec_spark.cli import main

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_bad_date_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["clean", "--ds", "2026-13-40", "--conf-dir", CONF])
    assert exit_info.value.code == 2
    assert "--ds must be a date YYYY-MM-DD, got '2026-13-40'" in capsys.readouterr().err


def test_unknown_config_key_is_one_line(capsys):
    code, out, err = run(
        capsys, "clean", "--ds", "2026-11-23", "--conf-dir", CONF, "--conf", "als.rnak=3"
    )
    assert code == 2
    assert err == "llmrec: error: unknown config key 'als.rnak' (did you mean 'als.rank'?)\n"
    assert "Traceback" not in out + err


def test_missing_conf_dir_names_the_flag(capsys, tmp_path):
    code, _, err = run(capsys, "nightly", "--conf-dir", str(tmp_path / "nope"))
    assert code == 2
    assert "has no base.yaml; pass --conf-dir PATH" in err


def test_unknown_benchmark_lists_the_known_ones(capsys):
    code, _, err = run(capsys, "bench", "nope", "--conf-dir", CONF)
    assert code == 2
    assert "unknown benchmark 'nope'; available: " in err and "delta-write" in err


def test_bench_list_prints_json_as_last_line(capsys, tmp_path):
    code, out, _ = run(capsys, "bench", "list", "--conf-dir", CONF, "--out-dir", str(tmp_path))
    assert code == 0
    assert "embed" in json.loads(out.strip().splitlines()[-1])["benchmarks"]


def test_unknown_environment(capsys):
    code, _, err = run(capsys, "clean", "--env", "prod", "--conf-dir", CONF)
    assert code == 2
    assert (
        err.strip()
        == "llmrec: error: unknown environment 'prod'; choose one of local, cluster, databricks"
    )


def test_unknown_nightly_stage_is_refused_before_any_work(capsys):
    code, _, err = run(
        capsys, "nightly", "--ds", "2026-11-23", "--conf-dir", CONF, "--stages", "embed,trian-als"
    )
    assert code == 2
    assert "--stages: unknown stage 'trian-als'; choose from embed, train-als" in err


def test_a_crashed_training_process_is_one_line_and_exit_1(capsys, monkeypatch):
    from llmrec_spark import cli
    from llmrec_spark.errors import TrainingProcessError

    def crash(args):
        raise TrainingProcessError(
            "text tower: training process rank 1 exited with SIGABRT (exit code -6)",
            rank=1,
            returncode=-6,
        )

    monkeypatch.setattr(cli, "_dispatch", crash)
    code, out, err = run(capsys, "train-contrastive", "--ds", "2026-11-23", "--conf-dir", CONF)
    assert code == 1
    assert err == (
        "llmrec: training failed, nothing published: text tower: training process rank 1 "
        "exited with SIGABRT (exit code -6)\n"
    )
    assert "Traceback" not in out + err
