"""Named crash points for the fault tests: the process kills itself where a test asks it to.

A test sets `LLMREC_CRASH_AT=<point>` in the environment of the process it starts; when that
process reaches the point it sends itself SIGKILL (no cleanup, no `finally`, like a lost
machine). Unset, every point is a no-op: one dictionary lookup.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

CRASH_ENV = "LLMREC_CRASH_AT"


def crash_point(name: str) -> None:
    """Kill this process with SIGKILL when `LLMREC_CRASH_AT` names `name`."""
    if os.environ.get(CRASH_ENV) == name:
        log.warning("fault injection: killing the process at %s", name)
        logging.shutdown()
        os.kill(os.getpid(), signal.SIGKILL)
