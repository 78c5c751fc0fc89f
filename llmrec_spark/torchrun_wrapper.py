"""`python -m llmrec_spark.torchrun_wrapper TORCHRUN_ARGS...`: torchrun that reports its failures.

pyspark's `pyspark.ml.torch.torch_run_process_wrapper` runs torchrun and kills it when the
parent (the Spark driver or task) dies, but always exits 0, so TorchDistributor never sees a
crashed training process. This wrapper does the same and exits with torchrun's status (128 + N
when torchrun itself died of signal N). torchrun's output goes straight to this process's
stdout and stderr, which the caller reads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

# torchrun stops its workers on SIGTERM (SIGTERM, then SIGKILL after its own grace period);
# SIGKILL only when it does not exit in time, since that would orphan them.
TERMINATE_GRACE_S = 15.0
PARENT_POLL_S = 0.5


def stop(task: subprocess.Popen) -> None:
    """SIGTERM `task`, then SIGKILL it if it is still running after TERMINATE_GRACE_S."""
    if task.poll() is not None:
        return
    try:
        task.terminate()
        task.wait(TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        task.kill()
    except OSError:
        pass


def stop_when_orphaned(task: subprocess.Popen, parent_pid: int) -> None:
    """Stop `task` once this process's parent has died (we are re-parented)."""
    while task.poll() is None:
        if os.getppid() != parent_pid:
            stop(task)
            return
        time.sleep(PARENT_POLL_S)


def exit_status(returncode: int) -> int:
    """A process exit status for a Popen return code (-N: killed by signal N -> 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with `argv`; return its exit status."""
    args = sys.argv[1:] if argv is None else argv
    parent_pid = os.getppid()
    task = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args], stdin=subprocess.DEVNULL
    )

    def on_sigterm(*_: Any) -> None:
        stop(task)
        os._exit(exit_status(-signal.SIGTERM))

    signal.signal(signal.SIGTERM, on_sigterm)
    threading.Thread(target=stop_when_orphaned, args=(task, parent_pid), daemon=True).start()
    try:
        return exit_status(task.wait())
    finally:
        stop(task)


if __name__ == "__main__":
    sys.exit(main())
