"""TorchDistributor whose training processes' crashes fail the run.

pyspark 3.5 runs torchrun through `pyspark.ml.torch.torch_run_process_wrapper`, which exits 0
whatever torchrun did: a rank that dies of SIGABRT at exit, or in the middle of training once
another rank has written the output pickle, passes as a success. `CheckedTorchDistributor`
runs torchrun through `llmrec_spark.runtime.torchrun_wrapper` (the same, but it exits with torchrun's
status) and turns a non-zero exit into a `TrainingProcessError` that names the failed rank
and its exit status, read from torchrun's failure summary.
"""

from __future__ import annotations

import collections
import functools
import logging
import re
import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from pyspark.ml.torch.distributor import TorchDistributor

from llmrec_spark.errors import TrainingProcessError
from llmrec_spark.runtime import torchrun_wrapper

log = logging.getLogger(__name__)

WRAPPER_MODULE = torchrun_wrapper.__name__
# Lines of the training output kept for the error log and for finding torchrun's failure
# summary (~20 lines, more with a worker's traceback in it) at its end.
TAIL_LINES = 200

_ROOT_CAUSE = "Root Cause (first observed failure):"
_RANK = re.compile(r"^\s*rank\s*:\s*(\d+)\s*\(local_rank")
_EXITCODE = re.compile(r"^\s*exitcode\s*:\s*(-?\d+)")


class CheckedTorchDistributor(TorchDistributor):
    """TorchDistributor whose `run` raises TrainingProcessError when a training process fails.

    `label` starts the error's message, e.g. "text tower: training process rank 1 exited
    with SIGABRT (exit code -6)".
    """

    def __init__(self, *, label: str = "training", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.label = label

    def run(self, train_object: Callable | str, *args: Any, **kwargs: Any) -> Any:
        """As TorchDistributor.run, with torchrun's exit status checked (see module docstring)."""
        # A module-level function (and a partial of one) also pickles to the executors when
        # local_mode=False, where it runs inside the Spark task.
        run_file = functools.partial(run_torchrun_file, label=self.label)
        return self._run(train_object, run_file, *args, **kwargs)


def torchrun_command(input_params: dict[str, Any], train_path: str, *args: Any) -> list[str]:
    """pyspark's torchrun command line for `train_path`, run through our checking wrapper."""
    torchrun_args, processes_per_node = TorchDistributor._get_torchrun_args(
        local_mode=input_params["local_mode"], num_processes=input_params["num_processes"]
    )
    return [
        sys.executable,
        "-m",
        WRAPPER_MODULE,
        *torchrun_args,
        f"--nproc_per_node={processes_per_node}",
        train_path,
        *map(str, args),
    ]


def run_torchrun_file(
    input_params: dict[str, Any], train_path: str, *args: Any, label: str = "training"
) -> None:
    """Run `train_path` under torchrun, its output streamed to stdout (and to the driver's
    log server when distributed); raise TrainingProcessError if torchrun exits non-zero."""
    command = torchrun_command(input_params, train_path, *args)
    returncode, tail = stream_command(command, input_params.get("log_streaming_client"))
    if returncode != 0:
        error = training_failure(label, returncode, tail)
        log.error("%s; last lines of the training output:\n%s", error, "".join(tail).rstrip())
        raise error


def stream_command(command: list[str], log_client: Any = None) -> tuple[int, list[str]]:
    """Run `command`, copying its output line by line; (return code, last TAIL_LINES lines)."""
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    task = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        assert task.stdout is not None
        for raw in task.stdout:
            line = raw.decode(errors="replace")
            tail.append(line)
            if log_client is None or log_client.failed or not _same_host(log_client):
                sys.stdout.write(line)
            if log_client is not None:  # distributed mode: to the driver's log server too
                log_client.send(line.rstrip())
        task.wait()
    finally:
        if task.poll() is None:  # interrupted: the wrapper stops torchrun and its workers
            task.terminate()
            try:
                task.wait(torchrun_wrapper.TERMINATE_GRACE_S + 5)
            except subprocess.TimeoutExpired:
                task.kill()
    return task.returncode, list(tail)


def _same_host(log_client: Any) -> bool:
    """Whether the driver's log server (which prints what it receives) runs on this host."""
    sock = log_client.sock
    return bool(sock.getsockname()[0] == sock.getpeername()[0])


def training_failure(label: str, returncode: int, output: list[str]) -> TrainingProcessError:
    """The one-line error for a torchrun that exited with `returncode` after printing `output`.

    The rank and exit code come from the root cause of torchrun's ChildFailedError summary
    ("rank : 1 (local_rank: 1)", "exitcode : -6 (pid: 123)"); without one (torchrun failed
    before any worker did, or was killed) the message names torchrun's own status.
    """
    rank, exitcode = root_cause(output)
    if rank is None or exitcode is None:
        return TrainingProcessError(
            f"{label}: torchrun exited with {describe_exit(returncode)}",
            rank=None,
            returncode=returncode,
        )
    return TrainingProcessError(
        f"{label}: training process rank {rank} exited with {describe_exit(exitcode)}",
        rank=rank,
        returncode=exitcode,
    )


def root_cause(output: list[str]) -> tuple[int | None, int | None]:
    """(rank, exit code) of the root-cause failure in torchrun's summary, or Nones."""
    rank = exitcode = None
    in_root_cause = False
    for line in output:
        if _ROOT_CAUSE in line:
            in_root_cause, rank, exitcode = True, None, None
        elif in_root_cause and line.startswith("===="):  # the summary's closing border
            in_root_cause = False
        elif in_root_cause and (match := _RANK.match(line)):
            rank = int(match.group(1))
        elif in_root_cause and (match := _EXITCODE.match(line)):
            exitcode = int(match.group(1))
    return rank, exitcode


def describe_exit(code: int) -> str:
    """'SIGABRT (exit code -6)' for a signal (-N, or 128 + N from the wrapper), else 'code 1'."""
    signum = -code if code < 0 else code - 128 if 128 < code < 160 else None
    if signum is not None:
        try:
            return f"{signal.Signals(signum).name} (exit code {code})"
        except ValueError:
            pass
    return f"code {code}"
