"""Test-only fault points: die (or pause) at a named step boundary (SPEC G5's fault suite).

Operations call :func:`point` between their steps, e.g.
``faults.point("spawn.after_barbican")``. It does nothing unless the
environment names that step in ``VTPM_FAULT_AT`` (a comma-separated list);
then the process kills itself with SIGKILL there, as ``kill -9`` would, so no
``finally`` block, undo or atexit handler runs.

``<step>:stop`` instead stops the process there with SIGSTOP: the test can
break something outside it at exactly that boundary (restart libvirtd, kill
swtpm) and let it go on with SIGCONT, so "the next external call fails"
happens at a known step, not at a race.

The fault-injection suite (tests/functional/test_faults.py) runs the CLI with
each step named and checks that nothing that could lose a TPM is left behind.
Reading the variable costs one dict lookup; production never sets it.
"""

from __future__ import annotations

import os
import signal

ENV = "VTPM_FAULT_AT"
STOP = "stop"


def _wanted() -> dict[str, str]:
    """``{step: "kill" | "stop"}`` from ``VTPM_FAULT_AT`` (pure apart from reading it)."""
    found: dict[str, str] = {}
    for item in (os.environ.get(ENV) or "").split(","):
        step, _, how = item.strip().partition(":")
        if step:
            found[step] = STOP if how == STOP else "kill"
    return found


def armed(name: str) -> bool:
    """Whether ``VTPM_FAULT_AT`` names this step (to kill or to stop)."""
    return name in _wanted()


def point(name: str) -> None:
    """Kill (or, with ``<name>:stop``, stop) this process now if ``VTPM_FAULT_AT`` names
    ``name``; else nothing."""
    how = _wanted().get(name)
    if how is None:
        return
    os.kill(os.getpid(), signal.SIGSTOP if how == STOP else signal.SIGKILL)
