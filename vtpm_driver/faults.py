"""Test-only fault points: die at a named step boundary (SPEC G5's fault suite).

Operations call :func:`point` between their steps, e.g.
``faults.point("spawn.after_barbican")``. It does nothing unless the
environment names that step in ``VTPM_FAULT_AT`` (a comma-separated list);
then the process kills itself with SIGKILL there, as ``kill -9`` would, so no
``finally`` block, undo or atexit handler runs. The fault-injection suite
(tests/functional/test_faults.py) runs the CLI with each step named and checks
that nothing that could lose a TPM is left behind.

Reading the variable costs one dict lookup; production never sets it.
"""

from __future__ import annotations

import os
import signal

ENV = "VTPM_FAULT_AT"


def armed(name: str) -> bool:
    """Whether ``VTPM_FAULT_AT`` names this step."""
    wanted = os.environ.get(ENV)
    return bool(wanted) and name in wanted.split(",")


def point(name: str) -> None:
    """Kill this process now if ``VTPM_FAULT_AT`` names ``name``; else nothing."""
    if armed(name):
        os.kill(os.getpid(), signal.SIGKILL)
