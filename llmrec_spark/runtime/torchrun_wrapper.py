"""`python -m llmrec_spark.runtime.torchrun_wrapper TORCHRUN_ARGS...`: torchrun that reports its failures.

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

# torchrun stops its workers on SIGTERM (SIGTERM, then SIGKILL after its own 30 s grace);
# SIGKILL only when it does not exit in time, since that would orphan them.
TERMINATE_GRACE_S = 40.0
PARENT_POLL_S = 0.5


def stop(task: subprocess.Popen) -> None:
    """SIGTERM `task`, then SIGKILL it if it is still running after TERMINATE_GRACE_S."""
    try:
        task.terminate()
        task.wait(TERMINATE_GRACE_S)
    except subprocess.TimeoutExpired:
        task.kill()
    except OSError:
        pass


def stop_in_background(task: subprocess.Popen) -> None:
    # Not on the main thread: it may be inside task.wait(), which holds the lock that
    # another wait on the same Popen needs to see the exit.
    threading.Thread(target=stop, args=(task,), daemon=True).start()


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
    """Run torchrun with `argv` (default: this process's arguments); return its exit status."""
    args = sys.argv[1:] if argv is None else argv
    parent_pid = os.getppid()
    # torchrun sets OMP_NUM_THREADS=1 when it is unset, with a banner saying so; the training
    # function sets its own torch thread count, so set it here and skip the banner.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    task = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", *args], stdin=subprocess.DEVNULL, env=env
    )
    # SIGTERM (TorchDistributor stopping us) stops torchrun, which stops its workers; the
    # wait below then returns torchrun's (non-zero) status.
    signal.signal(signal.SIGTERM, lambda *_: stop_in_background(task))
    threading.Thread(target=stop_when_orphaned, args=(task, parent_pid), daemon=True).start()
    try:
        return exit_status(task.wait())
    finally:
        if task.poll() is None:  # interrupted (KeyboardInterrupt)
            stop(task)


if __name__ == "__main__":
    sys.exit(main())
