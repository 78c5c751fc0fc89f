"""CheckedTorchDistributor: a training process that exits non-zero fails the run, by rank and signal.

pyspark's own TorchDistributor returns normally in both fault cases below (its torchrun wrapper
always exits 0, and rank 0 has written the output pickle), so these tests fail on it.
"""

from __future__ import annotations

import logging

import pytest

from llmrec_spark.errors import TrainingProcessError, UserError
from llmrec_spark.runtime.distributor import (
    CheckedTorchDistributor,
    describe_exit,
    root_cause,
    torchrun_command,
    training_failure,
)

# torchrun's ChildFailedError summary as one nightly printed it (rank 1 aborted at exit, rank 0
# was then stopped by torchrun).
NIGHTLY_SUMMARY = """\
terminate called without an active exception
W1206 01:49:52.785000 569 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 581 closing signal SIGTERM
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
=====================================================
/tmp/tmp23wi07cl/train.py FAILED
-----------------------------------------------------
Failures:
[0]:
  time      : 2026-12-06_01:49:52
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 581)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 581
-----------------------------------------------------
Root Cause (first observed failure):
[1]:
  time      : 2026-12-06_01:49:52
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -6 (pid: 582)  (SIGABRT)
  error_file: <N/A>
  traceback : Signal 6 (SIGABRT) received by PID 582
=====================================================
""".splitlines(keepends=True)


def test_the_error_names_the_root_cause_rank_and_signal_not_the_rank_torchrun_stopped():
    assert root_cause(NIGHTLY_SUMMARY) == (1, -6)
    error = training_failure("train-contrastive", 1, NIGHTLY_SUMMARY)
    assert str(error) == (
        "train-contrastive: training process rank 1 exited with SIGABRT (exit code -6)"
    )
    assert (error.rank, error.returncode) == (1, -6)
    assert isinstance(error, RuntimeError) and not isinstance(error, UserError)


def test_a_plain_exit_code_and_a_torchrun_that_failed_before_any_rank():
    python_error = [
        line.replace("-6 (pid: 582)  (SIGABRT)", "1 (pid: 582)") for line in NIGHTLY_SUMMARY
    ]
    assert str(training_failure("tower", 1, python_error)) == (
        "tower: training process rank 1 exited with code 1"
    )
    rendezvous = ["torch.distributed.DistNetworkError: The server socket has failed to listen\n"]
    error = training_failure("tower", 1, rendezvous)
    assert str(error) == "tower: torchrun exited with code 1" and error.rank is None
    # The wrapper reports a torchrun killed by signal N as 128 + N.
    assert (
        str(training_failure("tower", 137, []))
        == "tower: torchrun exited with SIGKILL (exit code 137)"
    )
    assert describe_exit(-9) == "SIGKILL (exit code -9)" and describe_exit(2) == "code 2"


def test_the_torchrun_command_goes_through_our_wrapper():
    command = torchrun_command({"local_mode": True, "num_processes": 2}, "/tmp/x/train.py", 7)
    assert command[1:] == [
        "-m",
        "llmrec_spark.runtime.torchrun_wrapper",
        "--standalone",
        "--nnodes=1",
        "--nproc_per_node=2",
        "/tmp/x/train.py",
        "7",
    ]


# ---------------------------------------------------------------------------------------------
# Two gloo processes under torchrun. The training functions are defined inside the tests so
# that cloudpickle ships them by value (the torchrun workers cannot import `tests`).


def _distributor():
    return CheckedTorchDistributor(
        label="test-training", num_processes=2, local_mode=True, use_gpu=False
    )


@pytest.mark.spark
def test_a_rank_that_aborts_after_training_returned_fails_the_run(spark, caplog):
    def train_then_abort_at_exit_on_rank_1(scale):
        import atexit
        import os

        import torch
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        dist.init_process_group("gloo")
        total = torch.tensor([float(rank + 1)])
        dist.all_reduce(total)
        dist.destroy_process_group()
        if rank == 1:
            # What the nightlies saw: the function returned (and its output was written),
            # then the interpreter's exit aborted.
            atexit.register(os.abort)
        return {"total": float(total) * scale}

    with (
        caplog.at_level(logging.ERROR, logger="llmrec_spark.runtime.distributor"),
        pytest.raises(TrainingProcessError) as failed,
    ):
        _distributor().run(train_then_abort_at_exit_on_rank_1, 2.0)
    assert str(failed.value) == (
        "test-training: training process rank 1 exited with SIGABRT (exit code -6)"
    )
    logged = caplog.text
    assert "last lines of the training output" in logged and "Root Cause" in logged


@pytest.mark.spark
def test_a_rank_killed_in_the_middle_of_training_fails_the_run(spark):
    def rank_1_killed_while_rank_0_finishes():
        import os
        import signal
        import time

        if int(os.environ["RANK"]) == 1:
            time.sleep(3)  # still training when rank 0 has returned and written the output
            os.kill(os.getpid(), signal.SIGKILL)
        return {"rank": int(os.environ["RANK"])}

    with pytest.raises(TrainingProcessError) as failed:
        _distributor().run(rank_1_killed_while_rank_0_finishes)
    assert str(failed.value) == (
        "test-training: training process rank 1 exited with SIGKILL (exit code -9)"
    )


@pytest.mark.spark
def test_healthy_processes_return_the_training_summary(spark):
    def sum_of_ranks(scale):
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        total = torch.tensor([float(dist.get_rank() + 1)])
        dist.all_reduce(total)
        dist.destroy_process_group()
        return {"total": float(total) * scale}

    assert _distributor().run(sum_of_ranks, 2.0) == {"total": 6.0}
