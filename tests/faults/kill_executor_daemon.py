"""Test hook: a `spark.python.daemon.module` that SIGKILLs its executor JVM on the first task.

Spark starts one Python daemon per executor (`python -m <spark.python.daemon.module>`) and forks
a worker from it for every Python task. This module is pyspark's own daemon with one change:
when `LLMREC_FAULT_KILL_EXECUTOR_ONCE` names a marker file that does not exist yet, the first
task to claim it (O_EXCL: one claim across all executors) records the executor's pid and command
line there and kills that executor's JVM mid-task. Nothing in the library knows about it; the
fault tests put this folder on the executors' PYTHONPATH and name the module in the Spark conf.
"""

from __future__ import annotations

import os
import signal

import pyspark.daemon as daemon

MARKER_ENV = "LLMREC_FAULT_KILL_EXECUTOR_ONCE"
EXECUTOR_MAIN = "org.apache.spark.executor.CoarseGrainedExecutorBackend"

_worker_main = daemon.worker_main


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        # "pid (comm) state ppid ...": comm may hold spaces, so split after its closing paren.
        return int(fh.read().rsplit(")", 1)[1].split()[1])


def _command_line(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")


def _kill_executor_once(infile, outfile):
    marker = os.environ.get(MARKER_ENV)
    if marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            fd = None
        if fd is not None:
            # This process is a worker forked by the daemon; the daemon's parent is the JVM.
            executor = _parent_pid(os.getppid())
            command = _command_line(executor)
            is_executor = EXECUTOR_MAIN in command and "java" in command.split(" ", 1)[0]
            with os.fdopen(fd, "w") as fh:
                fh.write(f"pid={executor} killed={is_executor}\n{command}\n")
            if is_executor:  # never the driver (local[*] runs tasks inside the driver JVM)
                os.kill(executor, signal.SIGKILL)
    return _worker_main(infile, outfile)


daemon.worker_main = _kill_executor_once

if __name__ == "__main__":
    daemon.manager()
