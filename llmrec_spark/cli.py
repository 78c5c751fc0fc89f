"""The `llmrec` command: one sub-command per stage, `nightly`, `generate-demo`, `tune-als` and `bench`."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Sequence

from llmrec_spark.errors import GateError, TrainingProcessError, UserError

log = logging.getLogger("llmrec")

STAGE_COMMANDS = (
    "clean",
    "embed",
    "train-als",
    "train-vae",
    "train-contrastive",
    "recommend",
    "evaluate",
    "evaluate-protocols",
)


def parse_ds(value: str) -> str:
    try:
        return dt.date.fromisoformat(value).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ds must be a date YYYY-MM-DD, got {value!r}") from None


def shift_ds(ds: str, days: int) -> str:
    """The ISO date `days` days after `ds` (negative: before)."""
    return (dt.date.fromisoformat(ds) + dt.timedelta(days=days)).isoformat()


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--ds",
        type=parse_ds,
        default=dt.datetime.now(dt.UTC).date().isoformat(),
        help="run date YYYY-MM-DD (default: today, UTC)",
    )
    common.add_argument(
        "--ds-offset",
        type=int,
        default=0,
        metavar="DAYS",
        help="days added to --ds, for schedulers that only know their trigger date "
        "(--ds <trigger date> --ds-offset -1 runs the day before)",
    )
    common.add_argument(
        "--env",
        default=None,
        help="config overlay: local, cluster or databricks (default: $LLMREC_ENV or local)",
    )
    common.add_argument(
        "--conf-dir",
        default=os.environ.get("LLMREC_CONF_DIR", "conf"),
        help="folder with base.yaml and the overlays (default: ./conf or $LLMREC_CONF_DIR)",
    )
    common.add_argument(
        "--conf",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. --conf als.rank=64 (repeatable)",
    )
    common.add_argument(
        "--allow-stale",
        action="store_true",
        help="let a stage use upstream outputs older than --ds (recorded in pipeline_runs); "
        "same as --conf pipeline.allow_stale=true",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")

    parser = argparse.ArgumentParser(prog="llmrec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "generate-demo",
        parents=[common],
        help="write demo catalog and behaviour logs to the landing zone",
    )
    for stage in STAGE_COMMANDS:
        sub.add_parser(stage, parents=[common], help=f"run the {stage} stage for one date")
    nightly = sub.add_parser(
        "nightly", parents=[common], help="run every stage in order for one date"
    )
    nightly.add_argument(
        "--stages", default=None, help="comma-separated stages after clean (default: all)"
    )
    tune = sub.add_parser(
        "tune-als",
        parents=[common],
        help="search ALS settings (als.search) on a temporal validation split; MLflow run per trial",
    )
    tune.add_argument(
        "--trials",
        type=int,
        default=None,
        help="trials drawn from the grid (0 = all; default: conf)",
    )
    bench = sub.add_parser(
        "bench", parents=[common], help="run a benchmark, write bench-results/NAME.json"
    )
    bench.add_argument("name", help="benchmark name (see `llmrec bench list`)")
    bench.add_argument("--out-dir", default="bench-results")
    bench.add_argument(
        "--dataset",
        default=None,
        help="bench quality: movielens or amazon (default: the folder's layout)",
    )
    bench.add_argument("--path", default=None, help="quality, tower-warm: the dataset's folder")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(argv) if argv is not None else None)
    args.ds = shift_ds(args.ds, args.ds_offset)
    _setup_logging(args.verbose)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        return _dispatch(args)
    except UserError as exc:
        sys.stderr.write(f"llmrec: error: {exc}\n")
        return UserError.exit_code
    except GateError as exc:
        sys.stderr.write(f"llmrec: quality gate failed, nothing published: {exc}\n")
        return GateError.exit_code
    except TrainingProcessError as exc:
        # Not the user's mistake, but no traceback either: the line names the rank and its
        # exit status, and the process's own output was logged above it.
        sys.stderr.write(f"llmrec: training failed, nothing published: {exc}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("llmrec: interrupted\n")
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    from llmrec_spark.config import load_config

    overrides = [*args.conf, *(["pipeline.allow_stale=true"] if args.allow_stale else [])]
    cfg = load_config(args.conf_dir, env=args.env, overrides=overrides)
    if args.command == "generate-demo":
        from llmrec_spark.io.demo import generate_demo

        written = generate_demo(cfg.demo, cfg.path(cfg.storage.landing), args.ds)
        _write(json.dumps(written, indent=2, default=str))
        return 0
    if args.command == "bench":
        from llmrec_spark.bench.runner import run_benchmark

        result = run_benchmark(
            args.name,
            cfg,
            out_dir=args.out_dir,
            options={
                "dataset": args.dataset,
                "path": args.path,
                # bench nightly runs `llmrec nightly` processes with the same settings
                "conf_dir": args.conf_dir,
                "env": args.env,
                "conf": overrides,
                "out_dir": args.out_dir,
            },
        )
        _write(json.dumps(result, default=str))
        return 0

    from llmrec_spark.pipeline.runner import make_context, run_nightly, run_stage
    from llmrec_spark.runtime.session import build_spark

    stages = _stage_list(args.stages) if args.command == "nightly" else None
    spark = build_spark(cfg)
    try:
        if args.command == "tune-als":
            from llmrec_spark.stages.als_search import tune_als

            result = tune_als(make_context(cfg, spark, args.ds), trials=args.trials)
            _write(json.dumps(result, default=str))
        elif args.command == "nightly":
            summary = run_nightly(cfg, spark, args.ds, stages)
            from llmrec_spark.pipeline.report import format_nightly

            _write(format_nightly(summary))
        else:
            record = run_stage(make_context(cfg, spark, args.ds), args.command)
            from llmrec_spark.pipeline.report import format_stage

            _write(format_stage(record))
    finally:
        if cfg.env != "databricks":  # the cluster's shared session outlives the job
            spark.stop()
    return 0


def _stage_list(value: str | None) -> list[str] | None:
    if not value:
        return None
    from llmrec_spark.pipeline.runner import NIGHTLY_AFTER_CLEAN

    stages = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in stages if s not in NIGHTLY_AFTER_CLEAN]
    if unknown:
        raise UserError(
            f"--stages: unknown stage {unknown[0]!r}; choose from {', '.join(NIGHTLY_AFTER_CLEAN)}"
        )
    return stages


def _write(text: str) -> None:
    sys.stdout.write(text.rstrip("\n") + "\n")
    sys.stdout.flush()


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in (
        "py4j",
        "urllib3",
        "alembic",
        "mlflow",
        "filelock",
        "fsspec",
        "petastorm",
        "numexpr",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
